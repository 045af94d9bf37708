"""metal/quantized_matmul.metal in the emulator, against tests/reference.py.

Kernels are launched exactly as csrc/quantized_matmul/metal.cpp launches them:
the same binding table (metal/quantized_matmul_bindings.h, parsed), the same
kernel choice and grid (csrc/quantized_matmul/metal_plan.h itself, compiled
and called), M taken as x.size / K. Every instantiation runs under all three
runs of tests/metal_harness.py (schedules, bounds-check sides), with
poisoning, strict mode and NaN-filled outputs.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from tests.metal_emu import Library
from tests.metal_harness import (
    METAL,
    RUNS,
    Launch,
    Planner,
    assert_matches,
    from_device,
    library_fixture,
    nan_filled,
    parse_bindings,
    run_planned,
    to_device,
)

from . import reference as ref

BINDINGS = parse_bindings(METAL / "quantized_matmul_bindings.h", prefix="QMM", shape_struct="QmmShape")
lib = library_fixture(METAL / "quantized_matmul.metal")

BITS = [2, 3, 4, 5, 6, 8]
GROUP_SIZES = [32, 64, 128]
TYPES = ["float32", "float16", "bfloat16"]
# (schedule, check_bounds, has_bias) of the runs every instantiation gets.
RUNS_WITH_BIAS = [(schedule, check_bounds, has_bias)
                  for (schedule, check_bounds), has_bias in zip(RUNS, (True, False, True))]

PLAN = Planner(
    "quantized_matmul_metal_plan",
    "quantized_matmul/metal_plan.h",
    ints=("M", "N", "K", "transpose", "group_size", "bits"),
    strings=("type_name",),
    body="""
  const auto launch = mlx_ext::metal::qmm_plan::plan(M, N, K, transpose != 0);
  return {launch.kernel, mlx_ext::metal::qmm_plan::kernel_name(launch, type_name, group_size, bits),
          {launch.groups[0], launch.groups[1], launch.groups[2]}, {launch.threads, 1, 1}};
""",
)


PLAN_FP = Planner(
    "quantized_matmul_metal_plan_fp",
    "quantized_matmul/metal_plan.h",
    ints=("M", "N", "K", "transpose"),
    strings=("type_name", "mode_name"),
    body="""
  const auto launch = mlx_ext::metal::qmm_plan::plan_fp(M, N, K, transpose != 0);
  return {launch.kernel, mlx_ext::metal::qmm_plan::fp_kernel_name(launch, type_name, mode_name),
          {launch.groups[0], launch.groups[1], launch.groups[2]}, {launch.threads, 1, 1}};
""",
)


class Problem:
    """A random quantized matmul: x (*batch, K), w packed as (N, K) or (K, N);
    mode="affine" or an fp mode (uint8 scales, no biases)."""

    def __init__(self, rng, *, batch, K, N, transpose, group_size, bits, dtype, mode="affine"):
        self.describe = dict(K=K, N=N, transpose=transpose, group_size=group_size, bits=bits, mode=mode)
        self.dtype, self.group_size, self.bits, self.transpose = dtype, group_size, bits, transpose
        self.mode = mode
        rows, cols = (N, K) if transpose else (K, N)
        if mode == "affine":
            self.w, scales, biases = ref.random_affine_weights(rng, rows, cols, bits, group_size)
            self.scales, self.biases = to_device(scales, dtype), to_device(biases, dtype)
        else:
            w, scales = ref.random_fp_quantized(rng, (rows, cols), mode)
            self.w, self.scales, self.biases = np.array(w), np.array(scales), None
        self.x = to_device(rng.standard_normal(tuple(batch) + (K,)), dtype)
        self.bias = to_device(rng.standard_normal(N), dtype)
        self.M = int(np.prod(batch, dtype=np.int64))
        self.N, self.K = N, K

    def expected(self, has_bias: bool) -> tuple[np.ndarray, np.ndarray]:
        """The float64 reference and the tolerance of each output."""
        d = self.dtype
        x = from_device(self.x, d).reshape(self.M, self.K)
        if self.mode == "affine":
            scales, biases = from_device(self.scales, d), from_device(self.biases, d)
        else:
            scales, biases = self.scales, None
        bias = from_device(self.bias, d) if has_bias else None
        return ref.quantized_matmul_with_tolerance(
            x, self.w, scales, biases, out_dtype=d, transpose=self.transpose, group_size=self.group_size,
            bits=self.bits, bias=bias, mode=self.mode,
        )

    def plan(self) -> Launch:
        """The kernel and grid metal.cpp chooses for this problem."""
        if self.mode != "affine":
            return PLAN_FP(M=self.M, N=self.N, K=self.K, transpose=self.transpose, type_name=self.dtype,
                           mode_name=self.mode)
        return PLAN(M=self.M, N=self.N, K=self.K, transpose=self.transpose, group_size=self.group_size,
                    bits=self.bits, type_name=self.dtype)

    def launch(self, lib: Library, *, has_bias: bool, schedule="forward", check_bounds=1):
        """Runs what metal.cpp would run; returns (its Launch, out as float64 (M, N))."""
        launch = self.plan()
        out = nan_filled((self.M, self.N), self.dtype)
        shape = np.zeros((), BINDINGS.shape)
        shape["M"], shape["N"], shape["K"] = self.M, self.N, self.K
        buffer = BINDINGS.buffers
        buffers = {
            buffer["w"]: self.w,
            buffer["scales"]: self.scales,
            buffer["x"]: np.ascontiguousarray(self.x.reshape(self.M, self.K)),
            buffer["out"]: out,
            buffer["shape"]: shape,
        }
        if self.biases is not None:  # affine only: metal.cpp binds no biases for the fp modes
            buffers[buffer["biases"]] = self.biases
        if has_bias:
            buffers[buffer["bias"]] = self.bias
        constants = BINDINGS.function_constants  # gather: gather_qmm's launches (test_metal_gather_qmm.py)
        run_planned(lib, launch, buffers, schedule=schedule, check_bounds=check_bounds,
                    function_constants={constants["has_bias"]: has_bias, constants["gather"]: False})
        return launch, ref.to_f64(from_device(out, self.dtype))

    def check(self, lib: Library, *, has_bias=True, schedule="forward", check_bounds=1) -> Launch:
        launch, got = self.launch(lib, has_bias=has_bias, schedule=schedule, check_bounds=check_bounds)
        expected, tol = self.expected(has_bias)
        what = f"{launch.host_name} {self.describe} M={self.M} bias={has_bias} {schedule}"
        assert_matches(got, expected, tol, what)
        return launch


# ---- every instantiation ---------------------------------------------------------

# Small shapes per kernel that reach its every path: (batch, K, N) by group size.
COVERAGE_SHAPES = {
    "qmv_fast": lambda gs: ((2,), 1024, 16),  # two 512-wide blocks, 2 threadgroups
    "qmv": lambda gs: ((3,), 512 + 2 * gs, 13),  # a block and a tail; N % 8 != 0
    "qvm": lambda gs: ((2,), 165, 2 * gs),  # K past 4 simdgroups x 32 rows, ragged
    "qmm_t": lambda gs: ((9,), 2 * gs, 40),  # M, N tiles partial
    "qmm_n": lambda gs: ((3, 11), 45, gs),  # K tail; M = 33: a second, 1-row tile
}


def _coverage_cases():
    for kernel in COVERAGE_SHAPES:
        for dtype in TYPES:
            for gs in GROUP_SIZES:
                for bits in BITS:
                    yield pytest.param(kernel, dtype, gs, bits, id=f"{kernel}-{dtype}-gs{gs}-b{bits}")


def _coverage_problem(kernel, dtype, group_size, bits) -> Problem:
    """`kernel`'s coverage shape (metal.cpp picks `kernel` for it), seeded by the
    instantiation's name."""
    batch, K, N = COVERAGE_SHAPES[kernel](group_size)
    transpose = kernel in ("qmv_fast", "qmv", "qmm_t")
    launch = PLAN(M=np.prod(batch), N=N, K=K, transpose=transpose, group_size=group_size, bits=bits,
                  type_name=dtype)
    assert launch.kernel == kernel
    return Problem(np.random.default_rng(zlib.crc32(launch.host_name.encode())), batch=batch, K=K, N=N,
                   transpose=transpose, group_size=group_size, bits=bits, dtype=dtype)


@pytest.mark.parametrize("kernel,dtype,group_size,bits", list(_coverage_cases()))
def test_every_instantiation(lib, kernel, dtype, group_size, bits):
    p = _coverage_problem(kernel, dtype, group_size, bits)
    for schedule, check_bounds, has_bias in RUNS_WITH_BIAS:
        assert p.check(lib, has_bias=has_bias, schedule=schedule, check_bounds=check_bounds).kernel == kernel


# The fp modes' kernels: (batch, K, N) by group size (16 or 32). nvfp4's K
# (qmv, qmm_t) or N (qvm, qmm_n) ends on half a 32-wide run / tile row.
FP_COVERAGE_SHAPES = {
    "fp_qmv": lambda gs: ((3,), 512 + 3 * gs, 13),  # a block and a tail; N % 8 != 0
    "fp_qvm": lambda gs: ((2,), 45, 3 * gs),  # a partial simdgroup of columns (nvfp4)
    "qmm_t": lambda gs: ((9,), 3 * gs, 40),  # M, N tiles partial; nvfp4: K = 48
    "qmm_n": lambda gs: ((3, 11), 45, 3 * gs),  # K tail; M = 33; nvfp4: N = 48
}


def _fp_coverage_cases():
    for kernel in FP_COVERAGE_SHAPES:
        for dtype in TYPES:
            for mode in ref.FP_MODES:
                yield pytest.param(kernel, dtype, mode, id=f"{kernel}-{dtype}-{mode}")


def _fp_coverage_problem(kernel, dtype, mode) -> Problem:
    group_size, bits = ref.FP_MODES[mode]
    batch, K, N = FP_COVERAGE_SHAPES[kernel](group_size)
    transpose = kernel in ("fp_qmv", "qmm_t")
    p = Problem(np.random.default_rng(zlib.crc32(f"{kernel}{dtype}{mode}".encode())), batch=batch, K=K, N=N,
                transpose=transpose, group_size=group_size, bits=bits, dtype=dtype, mode=mode)
    assert p.plan().kernel == kernel
    return p


@pytest.mark.parametrize("kernel,dtype,mode", list(_fp_coverage_cases()))
def test_every_fp_instantiation(lib, kernel, dtype, mode):
    p = _fp_coverage_problem(kernel, dtype, mode)
    for schedule, check_bounds, has_bias in RUNS_WITH_BIAS:
        assert p.check(lib, has_bias=has_bias, schedule=schedule, check_bounds=check_bounds).kernel == kernel


def test_every_instantiation_is_covered(lib):
    """The coverage shapes, planned by metal_plan.h, launch every instantiation once."""
    planned = [_coverage_problem(*case.values).plan().host_name for case in _coverage_cases()]
    planned += [_fp_coverage_problem(*case.values).plan().host_name for case in _fp_coverage_cases()]
    assert sorted(planned) == sorted(lib.host_names)


# ---- edges -----------------------------------------------------------------------


def _problem(seed, *, batch, K, N, transpose, group_size=64, bits=4, dtype="float16") -> Problem:
    return Problem(np.random.default_rng(seed), batch=batch, K=K, N=N, transpose=transpose,
                   group_size=group_size, bits=bits, dtype=dtype)


def _check_all_runs(lib, p: Problem) -> Launch:
    launches = {p.check(lib, has_bias=b, schedule=s, check_bounds=c) for s, c, b in RUNS_WITH_BIAS}
    assert len(launches) == 1
    return launches.pop()


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("M", range(1, 10))
def test_rows_around_the_gemv_gemm_switch(lib, M, transpose):
    """M = 1 .. 9: the GEMVs up to 8 rows (metal_plan.h's kGemvMaxRows), the tiled GEMMs after."""
    bits, dtype = [(3, "bfloat16"), (4, "float16"), (6, "float32")][M % 3]
    K, N = (512, 24) if transpose else (77, 64)
    p = _problem(M, batch=(M,), K=K, N=N, transpose=transpose, bits=bits, dtype=dtype)
    gemv = "qmv_fast" if transpose else "qvm"
    gemm = "qmm_t" if transpose else "qmm_n"
    assert _check_all_runs(lib, p).kernel == (gemv if M <= 8 else gemm)


@pytest.mark.parametrize("N", [1, 5, 8, 13, 31, 32, 33, 63])
@pytest.mark.parametrize("M", [1, 12])
def test_output_features_not_a_multiple_of_8_or_32(lib, N, M):
    bits = [2, 3, 5, 8][N % 4]
    p = _problem(N, batch=(M,), K=128, N=N, transpose=True, group_size=32, bits=bits, dtype="float32")
    # K = 128 is no whole 512-wide block: qmv, never qmv_fast.
    assert _check_all_runs(lib, p).kernel == ("qmv" if M == 1 else "qmm_t")


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("M", [1, 2, 20])
@pytest.mark.parametrize("transpose", [True, False])
def test_k_equal_to_the_group_size(lib, group_size, M, transpose):
    """One group per row (transpose) / a reduction as short as a group (not)."""
    N = 40 if transpose else group_size
    p = _problem(group_size + M, batch=(M,), K=group_size, N=N, transpose=transpose,
                 group_size=group_size, bits=5, dtype="bfloat16")
    _check_all_runs(lib, p)


@pytest.mark.parametrize("batch", [(2, 3, 1), (2, 1, 4), (3, 2, 5)])
@pytest.mark.parametrize("transpose", [True, False])
def test_batch_dimensions_fold_into_rows(lib, batch, transpose):
    """x (*batch, K) is one (prod(batch), K) matrix for every kernel."""
    K, N = (1024, 48) if transpose else (100, 128)
    p = _problem(sum(batch), batch=batch, K=K, N=N, transpose=transpose, bits=6, dtype="float16")
    assert p.M == int(np.prod(batch))
    _check_all_runs(lib, p)


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("M", [1, 40])
def test_empty_reduction_gives_the_bias(lib, transpose, M):
    """K = 0: no loop iteration; every output is bias[n] (or 0)."""
    p = _problem(M, batch=(M,), K=0, N=64, transpose=transpose, bits=4, dtype="float32")
    for has_bias in (True, False):
        _, got = p.launch(lib, has_bias=has_bias)
        want = np.broadcast_to(from_device(p.bias, "float32") if has_bias else 0.0, got.shape)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "transpose,M,K,N,bits",
    [(True, 1, 2048, 64, 4), (True, 3, 1536, 72, 3), (False, 2, 640, 256, 4), (True, 64, 256, 96, 5),
     (False, 48, 300, 192, 2)],
)
def test_layer_sized_problems(lib, transpose, M, K, N, bits):
    """Several K blocks / steps and several threadgroups per dimension."""
    p = _problem(K + N, batch=(M,), K=K, N=N, transpose=transpose, group_size=64, bits=bits,
                 dtype="bfloat16")
    p.check(lib, has_bias=True, schedule="random")


# ---- the host code's plan ----------------------------------------------------------


def test_plan_is_metal_plan_h():
    """PLAN passes its arguments to metal_plan.h and returns its choice intact:
    the launches its comments describe."""
    cases = [  # (M, N, K, transpose, type_name, group_size, bits) -> launch
        ((1, 4096, 4096, True, "float16", 64, 4), ("qmv_fast", "qmv_fast_float16_gs64_b4", (1, 512, 1), 64)),
        ((8, 13, 1056, True, "float32", 32, 8), ("qmv", "qmv_float32_gs32_b8", (8, 2, 1), 64)),
        ((3, 4096, 32, False, "bfloat16", 128, 2), ("qvm", "qvm_bfloat16_gs128_b2", (3, 128, 1), 128)),
        ((9, 33, 512, True, "bfloat16", 32, 3), ("qmm_t", "qmm_t_bfloat16_gs32_b3", (2, 1, 1), 128)),
        ((1000, 64, 0, False, "float16", 64, 6), ("qmm_n", "qmm_n_float16_gs64_b6", (2, 32, 1), 128)),
    ]
    for (M, N, K, transpose, type_name, group_size, bits), (kernel, host_name, groups, threads) in cases:
        launch = PLAN(M=M, N=N, K=K, transpose=transpose, type_name=type_name, group_size=group_size, bits=bits)
        assert launch == Launch(kernel, host_name, groups, (threads, 1, 1))


# ---- the same instantiations on a real Apple GPU (macOS with Metal only) -------------


def _gpu_available() -> bool:
    import mlx.core as mx

    return mx.metal.is_available()


@pytest.mark.skipif(not _gpu_available(), reason="no Metal GPU here (the emulator runs these kernels instead)")
@pytest.mark.parametrize("kernel,dtype,group_size,bits", list(_coverage_cases()))
def test_every_instantiation_on_the_gpu(kernel, dtype, group_size, bits):
    """mlx_ext.quantized_matmul on the GPU stream, with the coverage shapes:
    metal.cpp picks `kernel` for each (metal_plan.h says so)."""
    import mlx.core as mx

    import mlx_ext

    p = _coverage_problem(kernel, dtype, group_size, bits)
    mx_type = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]

    def on_device(a):  # exact: every value is representable in the dtype
        return mx.array(from_device(a, dtype)).astype(mx_type)

    for has_bias in (True, False):
        out = mlx_ext.quantized_matmul(
            on_device(p.x), mx.array(p.w), on_device(p.scales), on_device(p.biases),
            transpose=p.transpose, group_size=group_size, bits=bits,
            bias=on_device(p.bias) if has_bias else None, stream=mx.gpu,
        )
        expected, tol = p.expected(has_bias)
        ref.assert_within_tolerance(out.reshape(p.M, p.N), expected, tol, f"{p.plan().host_name} bias={has_bias}")
