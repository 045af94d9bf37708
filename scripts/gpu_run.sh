#!/usr/bin/env bash
# Build, test and benchmark the CUDA kernels on the GPU machine in one go,
# from the repository root, writing logs and results under $OUT:
#
#   bash scripts/gpu_run.sh [stage ...]   stages: build exceptions cuda sanitize suite bench
#                                          (default: all, in that order)
#   MLX_EXT_GPU_BENCH_ARGS="--rows 1,8"   extra arguments of the quantized matmul's bench
#   MLX_EXT_GPU_BENCHES="attention"       which benches the bench stage runs, in order
#                                          (default: "quantized_matmul attention sparse_matmul gather_qmm")
#   MLX_EXT_GPU_ATTENTION_ARGS="--quick"  extra arguments of the attention's bench
#                                          (--quick: its decode rows only)
#   MLX_EXT_GPU_SPARSE_BENCH_ARGS="--quick" extra arguments of the sparse bench (--write given)
#   MLX_EXT_GPU_GATHER_BENCH_ARGS="--quick" extra arguments of the gather_qmm bench (--quick:
#                                          the first shape at M=1 and 8)
#
# gather_qmm (mixture of experts) too: cuda runs tests/test_gather_qmm_cuda.py and its
# kernels alone (bench/cuda/gather_qmm.cu: float64 checks with adversarial
# routings, NaN-poisoned outputs, then its kernel-only timings beside our dense kernels;
# MLX_EXT_GPU_GATHER_KERNEL_TIMES=0: the checks only); sanitize runs its cases in scripts/gpu_sanitize_case.py; suite
# runs the gather tests on the GPU stream (a second pytest call, gather_suite.log); bench
# runs bench_gather_qmm --device gpu. The CUDA gather kernels are off by default
# (csrc/gather_qmm/cuda.cpp says why): this script turns them on (MLX_EXT_CUDA_GATHER=1).
#
# Attention and the sparse matmul ride along in each stage: cuda runs
# tests/test_attention_cuda.py, tests/test_sparse_matmul_cuda.py and the sparse
# kernels alone (bench/cuda/sparse_matmul.cu --checks-only: float64 checks,
# NaN-poisoned outputs); sanitize runs their cases in
# scripts/gpu_sanitize_case.py; suite runs their op tests on the GPU stream;
# bench runs bench_attention / bench_sparse_matmul --device gpu (a few minutes
# each: give MLX_EXT_GPU_DEADLINE room, or choose with MLX_EXT_GPU_BENCHES in a
# second call). MLX_EXT_CUDA_SPARSE_TC=0 turns the sparse tensor-core prefill off.
#
# Needs, carried into the checkout (ignored by git): .gpu-tools/ (a copy of
# ../shared/gpu/*.sh), .gpu-wheels/b/ (see ../shared/gpu/README.md; a run just
# before this one copied .gpu-wheels/a/* to /root/stash) and .whl/ with
# nanobind-3.1.0 (the version whose ABI key matches the mlx 0.32.4 wheels);
# optionally .gpu-pylib/ (below) for the mlx-lm comparisons.
# A machine that still has /root/mlx-site and the build skips those steps.
# Every stage runs under a time limit that keeps the whole under MLX_EXT_GPU_DEADLINE
# seconds (default 570), so that what ran comes back.
set -uo pipefail
export MLX_EXT_CUDA_GATHER=1
OUT=${OUT:-/tmp/mlx_ext_gpu_out}
mkdir -p "$OUT"
# Logs and tables go to $LOGS; at exit they are packed into $OUT/gpu_run.tgz
# beside a copy of run.log (the device tool brings back only a few files of
# $OUT). $LOGS/.start marks what this run wrote.
LOGS=$(mktemp -d /tmp/mlx_ext_gpu_logs.XXXX)
touch "$LOGS/.start"
pack() {
  cp "$LOGS/run.log" "$OUT/run.log"
  tar czf "$OUT/gpu_run.tgz" -C "$LOGS" --exclude='*_kernels' --exclude=.start .
}
trap pack EXIT
exec > >(tee -a "$LOGS/run.log") 2>&1
export PYTHONUNBUFFERED=1
deadline=${MLX_EXT_GPU_DEADLINE:-570}
stages=${*:-build exceptions cuda sanitize suite bench}
left() { echo $((deadline - SECONDS)); }
# The time a stage may take: at most $1 seconds and what is left (at least 1:
# `timeout` refuses 0 and negative limits).
limit() { local l=$(left); ((l > $1)) && l=$1; ((l < 1)) && l=1; echo $l; }
stage() { echo; echo "=== $1 (t=${SECONDS}s, $(left)s left)"; }
has() { [[ " $stages " == *" $1 "* ]]; }

stage setup
if PYTHONPATH=/root/mlx-site python3 -c "import mlx.core" 2>/dev/null; then
  export PYTHONPATH=/root/mlx-site
else
  eval "$(bash .gpu-tools/install-mlx-cuda.sh /root/stash .gpu-wheels/b)" || exit 1
fi
if ! python3 -c "import nanobind, sys; sys.exit(nanobind.__version__ != '3.1.0')" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/nb-site .whl/nanobind-*.whl || exit 1
  export PYTHONPATH=/root/nb-site:$PYTHONPATH
fi
# mlx-lm's attention and caches for the comparisons (no package index there):
# a copy of mlx_lm/{_version.py,models/base.py,models/cache.py}, git-ignored.
[ -d .gpu-pylib ] && export PYTHONPATH=$PWD/.gpu-pylib:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
python3 -c "import mlx.core as mx, nanobind; print('mlx', mx.__version__, mx.default_device(), 'nanobind', nanobind.__version__)"

# The image sets CXX=/opt/gcc/bin/g++; an _ext built with it crashed at its
# first C++ exception (2026-11-21), one built with /usr/bin/g++ did not (the
# exceptions stage, scripts/gpu_check_exceptions.sh, checks it each run).
echo "CXX=${CXX:-} g++ on PATH: $(command -v g++) ($(g++ -dumpfullversion 2>/dev/null)); system: $(ls /usr/bin/g++* 2>/dev/null | tr '\n' ' ')"
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi

if has build; then
  stage build
  cudnn=$(python3 -c "import nvidia.cudnn as c; print(list(c.__path__)[0])")
  export CMAKE_ARGS="-DCUDNN_INCLUDE_PATH=$cudnn/include -DCUDNN_LIBRARY_PATH=$cudnn/lib -DMLX_EXT_CUDA_ARCHITECTURES=90"
  # This machine's linker cannot run GCC's lto-wrapper (nanobind's LTO applies
  # to Release builds): build RelWithDebInfo at -O3 instead.
  export SKBUILD_CMAKE_BUILD_TYPE=RelWithDebInfo
  CMAKE_ARGS="$CMAKE_ARGS '-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O3 -DNDEBUG'"
  export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  if ! MLX_EXT_CUDA=ON timeout "$(limit 10000)" python3 -m pip install --no-build-isolation --no-deps -e . -v \
      > "$LOGS/build.log" 2>&1; then
    grep -E "error|Error|FAILED" "$LOGS/build.log" | head -40
    tail -40 "$LOGS/build.log"
    exit 1
  fi
  grep -E "nvcc|Linking" "$LOGS/build.log" | tail -5
  python3 -c "import mlx_ext, mlx.core as mx; print('mlx_ext imported;', mx.default_device())" || exit 1
fi

if has exceptions; then
  stage "C++ exceptions into Python"
  bash scripts/gpu_check_exceptions.sh
fi

pytest_device="-p tests.device_option --device gpu"
grep -q device_option tests/conftest.py 2>/dev/null && pytest_device="--device gpu"

if has cuda; then
  stage "cuda kernel tests"
  # The gather kernels' harness takes minutes of nvcc: it compiles while the tests run.
  OUT="$LOGS" timeout "$(limit 400)" bash scripts/gpu_kernels.sh gather_qmm --build-only \
    > "$LOGS/gather_kernels_build.log" 2>&1 &
  gather_build=$!
  timeout "$(limit 200)" python3 -m pytest tests/test_quantized_matmul_cuda.py tests/test_sparse_matmul_cuda.py \
    $pytest_device -q -x -p no:cacheprovider 2>&1 | tail -25
  timeout "$(limit 150)" python3 -m pytest tests/test_attention_cuda.py \
    $pytest_device -q -p no:cacheprovider 2>&1 | tail -25
  echo "--- sparse_matmul kernels alone (bench/cuda/sparse_matmul.cu --checks-only)"
  OUT="$LOGS" timeout "$(limit 150)" bash scripts/gpu_kernels.sh sparse_matmul --checks-only \
    > "$LOGS/sparse_kernels.log" 2>&1
  echo "sparse kernels exit $?"
  grep -E "FAILED|checks:" "$LOGS/sparse_kernels.log" | tail -15
  timeout "$(limit 150)" python3 -m pytest tests/test_gather_qmm_cuda.py \
    $pytest_device -q -p no:cacheprovider 2>&1 | tail -15
  gather_args=
  [ "${MLX_EXT_GPU_GATHER_KERNEL_TIMES:-1}" = 0 ] && gather_args=--checks-only
  echo "--- gather_qmm kernels alone (bench/cuda/gather_qmm.cu $gather_args)"
  wait $gather_build
  echo "gather kernels build exit $? (gather_kernels_build.log)"
  OUT="$LOGS" timeout "$(limit 240)" bash scripts/gpu_kernels.sh gather_qmm --prebuilt $gather_args \
    > "$LOGS/gather_kernels.log" 2>&1
  echo "gather kernels exit $?"
  grep -E "FAILED|checks:|copy bandwidth|^\|| met| not met" "$LOGS/gather_kernels.log" | tail -25
fi

if has sanitize; then
  stage "compute-sanitizer memcheck"
  timeout "$(limit 120)" compute-sanitizer --tool memcheck --print-limit 20 \
    python3 scripts/gpu_sanitize_case.py > "$LOGS/sanitizer.log" 2>&1
  echo "sanitizer exit $?"
  tail -8 "$LOGS/sanitizer.log"
fi

if has suite; then
  stage "test suite on the GPU"
  timeout "$(limit 240)" python3 -m pytest tests/test_quantized_matmul.py tests/test_quantized_matmul_errors.py \
    tests/test_quantized_matmul_transforms.py tests/test_quantized_fp.py tests/test_quantized_fp_errors.py \
    tests/test_attention_errors.py tests/test_sparse_errors.py tests/test_gather_qmm_errors.py \
    tests/test_sparse_matmul.py tests/test_sparse_grad.py tests/test_sparse_nn.py \
    tests/test_package.py tests/test_cuda_compile.py \
    tests/test_cuda_plan.py tests/test_cuda_plan_sparse.py $pytest_device -q -p no:cacheprovider > "$LOGS/suite.log" 2>&1
  echo "suite exit $?"
  tail -15 "$LOGS/suite.log"
  timeout "$(limit 240)" python3 -m pytest tests/test_attention.py \
    tests/test_attention_transforms.py tests/test_attention_cuda_plan.py $pytest_device -q \
    -p no:cacheprovider > "$LOGS/suite_attention.log" 2>&1
  echo "attention suite exit $?"
  tail -15 "$LOGS/suite_attention.log"
  timeout "$(limit 240)" python3 -m pytest tests/test_gather_qmm.py \
    tests/test_gather_qmm_transforms.py tests/test_gather_swiglu.py tests/test_gather_qmm_layer.py \
    tests/test_cuda_plan_gather.py $pytest_device -q -p no:cacheprovider > "$LOGS/gather_suite.log" 2>&1
  echo "gather suite exit $?"
  tail -15 "$LOGS/gather_suite.log"
fi
if has bench; then
  for bench in ${MLX_EXT_GPU_BENCHES:-quantized_matmul attention sparse_matmul gather_qmm}; do
    stage "bench $bench"
    case $bench in
      attention) args=${MLX_EXT_GPU_ATTENTION_ARGS:-} ;;
      sparse_matmul) args="--write ${MLX_EXT_GPU_SPARSE_BENCH_ARGS:-}" ;;
      gather_qmm) args=${MLX_EXT_GPU_GATHER_BENCH_ARGS:-} ;;
      *) args=${MLX_EXT_GPU_BENCH_ARGS:-} ;;
    esac
    timeout "$(limit 10000)" python3 -m "bench.bench_$bench" --device gpu $args > "$LOGS/bench_$bench.log" 2>&1
    echo "bench $bench exit $?"
    tail -30 "$LOGS/bench_$bench.log"
    folder=$(grep -o "written to .*" "$LOGS/bench_$bench.log" | tail -1 | cut -d' ' -f3)
    # Only what this run wrote (the committed tables sit in the same folder).
    [ -n "$folder" ] && find "$folder" -maxdepth 1 -name "$bench*" -newer "$LOGS/.start" \
      -exec cp {} "$LOGS/" \;
  done
fi

stage done
