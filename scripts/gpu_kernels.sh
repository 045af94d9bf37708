#!/usr/bin/env bash
# Builds and runs the CUDA kernel benches on the GPU machine: bench/cuda/<op>.cu
# checks an operator's kernels against a float64 reference and times them on
# their own, without MLX. Needs nvcc (CUDA 12.x or 13) and a Hopper GPU (the
# Hopper kernels are built for sm_90a). Output under $OUT (default /tmp):
# the binary <op>_kernels and its log <op>_kernels.log.
#
#   bash scripts/gpu_kernels.sh                     every bench/cuda/*.cu
#   bash scripts/gpu_kernels.sh quantized_matmul    only these ops
#   bash scripts/gpu_kernels.sh --checks-only       arguments with -- go to each binary
#   bash scripts/gpu_kernels.sh gather_qmm --build-only   compile only (gpu_run.sh: while tests run)
#   bash scripts/gpu_kernels.sh gather_qmm --prebuilt     run $OUT's binary when there is one
set -euo pipefail
OUT=${OUT:-/tmp}
ops=() args=() build=1 run=1
for a in "$@"; do
  case $a in
    --build-only) run=0 ;;
    --prebuilt) build=0 ;;
    --*) args+=("$a") ;;
    *) ops+=("$a") ;;
  esac
done
if [ ${#ops[@]} -eq 0 ]; then
  for f in bench/cuda/*.cu; do ops+=("$(basename "$f" .cu)"); done
fi
for op in "${ops[@]}"; do
  echo "=== bench/cuda/$op.cu"
  if ((build)) || [ ! -x "$OUT/${op}_kernels" ]; then
    nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc "bench/cuda/$op.cu" -o "$OUT/${op}_kernels"
  fi
  if ((run)); then
    "$OUT/${op}_kernels" ${args[@]+"${args[@]}"} | tee "$OUT/${op}_kernels.log"
  fi
done
