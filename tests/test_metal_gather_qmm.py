"""mlx_ext.gather_qmm's Metal path in the emulator, against tests/reference.py.

gather_qmm runs the affine kernels of metal/quantized_matmul.metal with the
function constant `gather` on (one (row, expert) pair per grid z), or, for
many sorted one-row pairs, metal/gather_qmm.metal's tiled kernel over pairs
(gather_qmm_t / gather_qmm_n). Kernels are
launched exactly as csrc/gather_qmm/metal.cpp launches them: the binding table
metal/quantized_matmul_bindings.h (parsed), the plan csrc/gather_qmm/
metal_plan.h itself (compiled and called), the inputs as GatherQmm holds them
(x (X, M, K), w (E, rows, packed), lhs / rhs (P,) uint32). Every run is under
the three runs of tests/metal_harness.py (schedules, bounds-check sides), with
poisoning, strict mode and NaN-filled outputs.

`make test` runs every affine instantiation in gather mode and every
instantiation of gather_qmm.metal under RUNS (under a minute on the 2-core
machine), and the edge cases; set
MLX_EXT_METAL_FULL=1 to add, per instantiation, random routings
(sorted or not, repeated and unused experts, an out-of-range index) at
several rows per pair.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from tests.metal_emu import Library
from tests.metal_harness import (
    METAL,
    RUNS,
    STORAGE,
    Launch,
    Planner,
    assert_matches,
    from_device,
    library_fixture,
    load_library,
    nan_filled,
    parse_bindings,
    run_planned,
    to_device,
)

from . import reference as ref

BINDINGS = parse_bindings(METAL / "quantized_matmul_bindings.h", prefix="QMM", shape_struct="QmmShape")
lib = library_fixture(METAL / "quantized_matmul.metal")


@pytest.fixture(scope="module")
def libs(lib) -> dict[str, Library]:
    """The two libraries gather_qmm launches from, by file stem."""
    return {"quantized_matmul": lib, "gather_qmm": load_library(METAL / "gather_qmm.metal")}


BITS = [2, 3, 4, 5, 6, 8]
GROUP_SIZES = [32, 64, 128]
TYPES = ["float32", "float16", "bfloat16"]
FULL_SWEEP = os.environ.get("MLX_EXT_METAL_FULL", "") not in ("", "0")
# (schedule, check_bounds, bias) of the runs every case gets.
RUNS_WITH_BIAS = [(schedule, check_bounds, bias)
                  for (schedule, check_bounds), bias in zip(RUNS, ("per_expert", None, "shared"))]
OUT_OF_RANGE = 0xFFFFFFFF  # a negative index, as the op function's cast to uint32 leaves it

PLAN = Planner(
    "gather_qmm_metal_plan",
    "gather_qmm/metal_plan.h",
    ints=("P", "M", "N", "K", "transpose", "sorted", "group_size", "bits"),
    strings=("type_name",),
    body="""
  const auto launch = mlx_ext::metal::gather_qmm_plan::plan(P, M, N, K, transpose != 0, sorted != 0);
  return {launch.kernel, mlx_ext::metal::qmm_plan::kernel_name(launch, type_name, group_size, bits),
          {launch.groups[0], launch.groups[1], launch.groups[2]}, {launch.threads, 1, 1}};
""",
)


# metal_plan.h's over_pairs(launch), which metal.cpp binds by (shape.M = P, no
# gather constant): "over_pairs" or "per_pair" in place of the kernel.
OVER_PAIRS = Planner(
    "gather_qmm_metal_over_pairs",
    "gather_qmm/metal_plan.h",
    ints=("P", "M", "transpose", "sorted"),
    strings=(),
    body="""
  const auto launch = mlx_ext::metal::gather_qmm_plan::plan(P, M, 64, 64, transpose != 0, sorted != 0);
  return {mlx_ext::metal::gather_qmm_plan::over_pairs(launch) ? "over_pairs" : "per_pair", launch.kernel,
          {launch.groups[0], launch.groups[1], launch.groups[2]}, {launch.threads, 1, 1}};
""",
)


class GatherProblem:
    """A random gather_qmm as GatherQmm's inputs: E experts of w packed as
    (N, K) or (K, N), X matrices of x (M, K), and P pairs (lhs, rhs)."""

    def __init__(self, rng, *, E, X, M, K, N, lhs, rhs, transpose, group_size=64, bits=4, dtype="float16",
                 sorted=False):
        self.describe = dict(E=E, X=X, M=M, K=K, N=N, transpose=transpose, group_size=group_size, bits=bits,
                             sorted=sorted)
        self.sorted = sorted  # the sorted_indices hint (the plan's choice; any order is correct)
        self.dtype, self.group_size, self.bits, self.transpose = dtype, group_size, bits, transpose
        self.E, self.X, self.M, self.N, self.K = E, X, M, N, K
        self.lhs = np.ascontiguousarray(lhs, np.uint32)
        self.rhs = np.ascontiguousarray(rhs, np.uint32)
        assert self.lhs.shape == self.rhs.shape and self.lhs.ndim == 1
        self.P = len(self.lhs)
        rows, cols = (N, K) if transpose else (K, N)
        parts = [ref.random_affine_weights(rng, rows, cols, bits, group_size) for _ in range(E)]
        w, scales, biases = (np.stack(p) for p in zip(*parts))
        self.w = np.ascontiguousarray(w.reshape(E, rows, cols * bits // 32))
        self.scales = to_device(scales.reshape(E, rows, cols // group_size), dtype)
        self.biases = to_device(biases.reshape(E, rows, cols // group_size), dtype)
        self.x = to_device(rng.standard_normal((X, M, K)), dtype)
        self.bias_rows = {"shared": to_device(rng.standard_normal(N), dtype),
                          "per_expert": to_device(rng.standard_normal((E, N)), dtype)}

    def expected(self, bias) -> tuple[np.ndarray, np.ndarray]:
        """The float64 reference (P, M, N) (NaN for out-of-range pairs) and its tolerance."""
        d = self.dtype
        return ref.gather_qmm_with_tolerance(
            from_device(self.x, d), self.w, from_device(self.scales, d), from_device(self.biases, d),
            self.lhs.astype(np.int64), self.rhs.astype(np.int64), out_dtype=d, transpose=self.transpose,
            group_size=self.group_size, bits=self.bits,
            bias=None if bias is None else from_device(self.bias_rows[bias], d),
        )

    def plan(self) -> Launch:
        """The kernel and grid gather_qmm's metal.cpp chooses."""
        return PLAN(P=self.P, M=self.M, N=self.N, K=self.K, transpose=self.transpose, sorted=self.sorted,
                    group_size=self.group_size, bits=self.bits, type_name=self.dtype)

    def launch(self, libs: dict, *, bias=None, schedule="forward", check_bounds=1, out=None):
        """Runs what metal.cpp would run (bias None, "shared" or "per_expert");
        returns (its Launch, out as float64 (P, M, N)). `out`: the buffer to
        write (NaN-filled by default)."""
        launch = self.plan()
        over_pairs = launch.kernel.startswith("gather_qmm")  # metal_plan.h's over_pairs
        out = nan_filled((self.P, self.M, self.N), self.dtype) if out is None else out
        shape = np.zeros((), BINDINGS.shape)
        rows = self.w.shape[1]
        # gather_qmm_t / _n take the pairs as rows (M = 1): shape.M = P.
        shape["M"], shape["N"], shape["K"] = self.P if over_pairs else self.M, self.N, self.K
        shape["X"], shape["E"] = self.X, self.E
        shape["x_stride"], shape["w_stride"] = self.M * self.K, rows * self.w.shape[2]
        shape["group_stride"] = rows * self.scales.shape[2]
        shape["bias_stride"] = self.N if bias == "per_expert" else 0
        buffer = BINDINGS.buffers
        buffers = {
            buffer["w"]: self.w,
            buffer["scales"]: self.scales,
            buffer["biases"]: self.biases,
            buffer["x"]: self.x,
            buffer["out"]: out,
            buffer["shape"]: shape,
            buffer["lhs"]: self.lhs,
            buffer["rhs"]: self.rhs,
        }
        if bias is not None:
            buffers[buffer["bias"]] = self.bias_rows[bias]
        constants = {BINDINGS.function_constants["has_bias"]: bias is not None}
        if not over_pairs:
            constants[BINDINGS.function_constants["gather"]] = True
        lib = libs["gather_qmm" if over_pairs else "quantized_matmul"]
        run_planned(lib, launch, buffers, function_constants=constants, schedule=schedule,
                    check_bounds=check_bounds)
        return launch, ref.to_f64(from_device(out, self.dtype))

    def check(self, libs: dict, *, bias=None, schedule="forward", check_bounds=1) -> Launch:
        """One run against the reference: NaN exactly at out-of-range pairs
        (written over a zero-filled buffer there: nothing may stay unwritten),
        every other output written (NaN-filled buffer) and within tolerance."""
        expected, tol = self.expected(bias)
        invalid = np.isnan(expected)
        out = nan_filled((self.P, self.M, self.N), self.dtype)
        out[invalid.all(axis=(1, 2))] = 0
        launch, got = self.launch(libs, bias=bias, schedule=schedule, check_bounds=check_bounds, out=out)
        what = f"{launch.host_name} gather {self.describe} P={self.P} bias={bias} {schedule}"
        assert np.isnan(got[invalid]).all(), f"{what}: out-of-range pairs must be NaN"
        assert_matches(got[~invalid], expected[~invalid], tol[~invalid], what)
        return launch

    def check_all_runs(self, libs: dict) -> Launch:
        launches = {self.check(libs, bias=b, schedule=s, check_bounds=c) for s, c, b in RUNS_WITH_BIAS}
        assert len(launches) == 1
        return launches.pop()


def routing(rng, *, tokens, top_k, E, sort=False, used=None):
    """(lhs, rhs) as mlx-lm's SwitchGLU routes: token t's top_k experts drawn
    from `used` of the E experts (some repeat across tokens, the others get no
    rows); sorted by expert (stable) when `sort`."""
    used = rng.choice(E, size=used or max(1, E - 1), replace=False)
    rhs = np.stack([rng.choice(used, size=top_k, replace=False) if top_k <= len(used)
                    else rng.choice(used, size=top_k) for _ in range(tokens)])
    lhs = np.broadcast_to(np.arange(tokens)[:, None], rhs.shape).ravel()
    rhs = rhs.ravel()
    if sort:
        order = np.argsort(rhs, kind="stable")
        lhs, rhs = lhs[order], rhs[order]
    return lhs, rhs


# ---- the instantiations, in gather mode -------------------------------------------

# Per kernel, small shapes that reach its every path: (M, K, N) by group size,
# as tests/test_metal_quantized_matmul.py's coverage shapes, one matrix per pair.
COVERAGE_SHAPES = {
    "qmv_fast": lambda gs: (1, 1024, 16),  # two 512-wide blocks, 2 threadgroups
    "qmv": lambda gs: (3, 512 + 2 * gs, 13),  # a block and a tail; N % 8 != 0
    "qvm": lambda gs: (2, 165, 2 * gs),  # K past 4 simdgroups x 32 rows, ragged
    "qmm_t": lambda gs: (9, 2 * gs, 40),  # M, N tiles partial
    "qmm_n": lambda gs: (33, 45, gs),  # K tail; M = 33: a second, 1-row tile
}


def _instantiation_cases():
    for kernel in COVERAGE_SHAPES:
        for dtype in TYPES:
            for bits in BITS:
                for gs in GROUP_SIZES:
                    yield pytest.param(kernel, dtype, gs, bits, id=f"{kernel}-{dtype}-gs{gs}-b{bits}")


@pytest.mark.parametrize("kernel,dtype,group_size,bits", list(_instantiation_cases()))
def test_instantiations_in_gather_mode(libs, kernel, dtype, group_size, bits):
    """4 experts (one with no rows), 3 tokens x top-2 (an expert repeated),
    unsorted; the coverage shape of `kernel` per pair."""
    M, K, N = COVERAGE_SHAPES[kernel](group_size)
    transpose = kernel in ("qmv_fast", "qmv", "qmm_t")
    name = f"{kernel}{dtype}{group_size}{bits}"
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    lhs, rhs = np.array([0, 0, 1, 1, 2, 2]), np.array([2, 0, 0, 3, 3, 2])
    p = GatherProblem(rng, E=4, X=3, M=M, K=K, N=N, lhs=lhs, rhs=rhs, transpose=transpose,
                      group_size=group_size, bits=bits, dtype=dtype)
    assert p.check_all_runs(libs).kernel == kernel


def test_every_instantiation_is_run(libs):
    """The cases of this file plan every affine instantiation of
    quantized_matmul.metal and every instantiation of gather_qmm.metal."""
    planned = set()
    for case in _instantiation_cases():
        kernel, dtype, gs, bits = case.values
        M, K, N = COVERAGE_SHAPES[kernel](gs)
        planned.add(PLAN(P=6, M=M, N=N, K=K, transpose=kernel in ("qmv_fast", "qmv", "qmm_t"), sorted=False,
                         group_size=gs, bits=bits, type_name=dtype).host_name)
    affine = {name for name in libs["quantized_matmul"].host_names
              if name.startswith(tuple(COVERAGE_SHAPES)) and "_gs" in name}
    assert planned == affine
    over_pairs = {_over_pairs_problem(*case.values).plan().host_name for case in _over_pairs_cases()}
    assert over_pairs == set(libs["gather_qmm"].host_names)


# ---- gather_qmm.metal: sorted one-row pairs as the rows of tiles -----------------------


def _over_pairs_cases():
    for transpose in (True, False):
        for dtype in TYPES:
            for bits in BITS:
                for gs in GROUP_SIZES:
                    kernel = "gather_qmm_t" if transpose else "gather_qmm_n"
                    yield pytest.param(transpose, dtype, gs, bits, id=f"{kernel}-{dtype}-gs{gs}-b{bits}")


def _over_pairs_problem(transpose, dtype, group_size, bits, seed=None) -> GatherProblem:
    """40 sorted one-row pairs (a second, partial tile of 8) over 5 experts,
    one of them unused and one run crossing the tile boundary; transpose: N,
    K partial tiles; not: K = 45 (a K tail)."""
    rng = np.random.default_rng(zlib.crc32(f"rows{transpose}{dtype}{group_size}{bits}{seed}".encode()))
    rhs = np.repeat([0, 1, 3, 4], [7, 20, 9, 4])  # expert 3's run: pairs 27 .. 36, across the tiles
    lhs = rng.integers(0, 12, size=len(rhs))
    K, N = (2 * group_size, 40) if transpose else (45, group_size)
    return GatherProblem(rng, E=5, X=12, M=1, K=K, N=N, lhs=lhs, rhs=rhs, transpose=transpose,
                         group_size=group_size, bits=bits, dtype=dtype, sorted=True)


@pytest.mark.parametrize("transpose,dtype,group_size,bits", list(_over_pairs_cases()))
def test_over_pairs_instantiations(libs, transpose, dtype, group_size, bits):
    p = _over_pairs_problem(transpose, dtype, group_size, bits)
    assert p.check_all_runs(libs).kernel == ("gather_qmm_t" if transpose else "gather_qmm_n")


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("order", ["sorted", "unsorted", "one_expert", "alternating"])
def test_over_pairs_any_order_is_correct(libs, transpose, order):
    """The sorted_indices hint picks the kernel; a wrong hint costs time, not
    correctness: runs of one pair, one run for all, runs of 1 and 2."""
    rng = np.random.default_rng(len(order) + transpose)
    P, E = 70, 6
    rhs = {"sorted": np.sort(rng.integers(0, E, P)), "unsorted": rng.integers(0, E, P),
           "one_expert": np.full(P, 2), "alternating": np.arange(P) // (1 + np.arange(P) % 2) % E}[order]
    K, N = (96, 72) if transpose else (70, 64)
    p = GatherProblem(rng, E=E, X=P, M=1, K=K, N=N, lhs=rng.permutation(P), rhs=rhs, transpose=transpose,
                      bits=3, group_size=32, dtype="float32", sorted=True)
    assert p.check_all_runs(libs).kernel.startswith("gather_qmm")


@pytest.mark.parametrize("transpose", [True, False])
def test_over_pairs_out_of_range_indices(libs, transpose):
    """Sorted, an out-of-range expert sorts last (a skipped run, NaN rows);
    out-of-range rows of x inside valid runs (a zero x row, NaN outputs)."""
    rng = np.random.default_rng(40 + transpose)
    E, X = 4, 20
    rhs = np.repeat([0, 2, 3, E, OUT_OF_RANGE], [10, 15, 12, 5, 3])
    lhs = rng.integers(0, X, len(rhs))
    lhs[[0, 11, 30, 44]] = [X, OUT_OF_RANGE, X + 3, X]
    K, N = (64, 33) if transpose else (33, 64)
    p = GatherProblem(rng, E=E, X=X, M=1, K=K, N=N, lhs=lhs, rhs=rhs, transpose=transpose, bits=4,
                      group_size=64, dtype="bfloat16", sorted=True)
    assert p.check_all_runs(libs).kernel.startswith("gather_qmm")


@pytest.mark.parametrize("transpose", [True, False])
def test_over_pairs_empty_reduction_gives_the_bias(libs, transpose):
    rng = np.random.default_rng(5)
    rhs = np.repeat([0, 2], [20, 13])
    p = GatherProblem(rng, E=3, X=4, M=1, K=0, N=64, lhs=rng.integers(0, 4, 33), rhs=rhs, transpose=transpose,
                      dtype="float32", sorted=True)
    assert p.plan().kernel.startswith("gather_qmm")
    for bias in (None, "per_expert", "shared"):
        _, got = p.launch(libs, bias=bias)
        rows = np.zeros((33, 64))
        if bias is not None:
            b = from_device(p.bias_rows[bias], "float32")
            rows = np.broadcast_to(b[p.rhs] if bias == "per_expert" else b, rows.shape)
        np.testing.assert_array_equal(got, rows[:, None, :])


@pytest.mark.skipif(not FULL_SWEEP, reason="the full sweep: MLX_EXT_METAL_FULL=1")
@pytest.mark.parametrize("kernel,dtype,group_size,bits", list(_instantiation_cases()))
def test_random_routings(libs, kernel, dtype, group_size, bits):
    """Per instantiation, random routings at rows per pair its kernel takes."""
    _, K, N = COVERAGE_SHAPES[kernel](group_size)
    transpose = kernel in ("qmv_fast", "qmv", "qmm_t")
    rng = np.random.default_rng(zlib.crc32(f"sweep{kernel}{dtype}{group_size}{bits}".encode()))
    for M in ([1, 8] if kernel in ("qmv_fast", "qmv", "qvm") else [9, 33]):
        E, tokens = int(rng.integers(1, 7)), int(rng.integers(1, 6))
        lhs, rhs = routing(rng, tokens=tokens, top_k=int(rng.integers(1, E + 1)), E=E, sort=bool(rng.integers(2)))
        lhs, rhs = lhs.copy(), rhs.copy()
        lhs[rng.integers(len(lhs))] = tokens if rng.integers(2) else OUT_OF_RANGE
        p = GatherProblem(rng, E=E, X=tokens, M=M, K=K, N=N, lhs=lhs, rhs=rhs, transpose=transpose,
                          group_size=group_size, bits=bits, dtype=dtype)
        assert p.check_all_runs(libs).kernel == kernel


# ---- adversarial routing ------------------------------------------------------------


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("M", [*range(1, 10), 33])
def test_rows_per_pair(libs, M, transpose):
    """M = 1 .. 9 and 33 rows per pair: the GEMVs up to 8, the tiled GEMMs after
    (a partial second tile at 33)."""
    bits, dtype = [(3, "bfloat16"), (4, "float16"), (6, "float32")][M % 3]
    K, N = (512, 24) if transpose else (77, 64)
    rng = np.random.default_rng(M)
    lhs, rhs = routing(rng, tokens=3, top_k=2, E=5)
    p = GatherProblem(rng, E=5, X=3, M=M, K=K, N=N, lhs=lhs, rhs=rhs, transpose=transpose, bits=bits,
                      dtype=dtype)
    gemv = "qmv_fast" if transpose else "qvm"
    gemm = "qmm_t" if transpose else "qmm_n"
    assert p.check_all_runs(libs).kernel == (gemv if M <= 8 else gemm)


@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("transpose", [True, False])
def test_decode_routing(libs, sort, transpose):
    """A decode step: 6 tokens x top-4 of 8 experts, one row per pair
    (mlx-lm's layout), sorted by expert or not; 2 experts get no rows."""
    rng = np.random.default_rng(10 * sort + transpose)
    lhs, rhs = routing(rng, tokens=6, top_k=4, E=8, sort=sort, used=6)
    K, N = (256, 40) if transpose else (96, 128)
    p = GatherProblem(rng, E=8, X=6, M=1, K=K, N=N, lhs=lhs, rhs=rhs, transpose=transpose, bits=4,
                      group_size=64, dtype="bfloat16")
    assert p.check_all_runs(libs).kernel == ("qmv" if transpose else "qvm")


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("M", [1, 12])
def test_one_expert_for_every_pair_and_repeated_x(libs, transpose, M):
    """Every pair on the same expert and the same x (all repeats)."""
    rng = np.random.default_rng(M)
    K, N = (128, 33) if transpose else (50, 64)
    p = GatherProblem(rng, E=3, X=2, M=M, K=K, N=N, lhs=[1] * 5, rhs=[2] * 5, transpose=transpose, bits=5,
                      group_size=32, dtype="float32")
    p.check_all_runs(libs)


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("M", [1, 4, 9, 33])
def test_out_of_range_indices_give_nan_and_read_nothing(libs, transpose, M):
    """Run-time indices past X or E, and negative ones (as uint32), read
    nothing (the bounds guards would fault) and give NaN over their pair's
    block; the other pairs are unaffected."""
    rng = np.random.default_rng(100 + M)
    E, X = 3, 2
    lhs = [0, X, 1, OUT_OF_RANGE, 1, 0, X + 7]
    rhs = [E, 0, 2, 1, OUT_OF_RANGE, 1, 0]
    K, N = (192, 20) if transpose else (70, 64)
    p = GatherProblem(rng, E=E, X=X, M=M, K=K, N=N, lhs=lhs, rhs=rhs, transpose=transpose, bits=4,
                      group_size=64, dtype="float16")
    expected, _ = p.expected(None)
    assert np.isnan(expected).all(axis=(1, 2)).tolist() == [True, True, False, True, True, False, True]
    p.check_all_runs(libs)


def test_every_pair_out_of_range(libs):
    rng = np.random.default_rng(7)
    p = GatherProblem(rng, E=2, X=2, M=2, K=64, N=8, lhs=[2, 0], rhs=[0, 2], transpose=True)
    p.check_all_runs(libs)


@pytest.mark.parametrize("N", [1, 5, 13, 31, 33])
@pytest.mark.parametrize("M", [1, 12])
def test_output_features_not_a_multiple_of_the_tile(libs, N, M):
    """N off qmv's 8 rows and qmm_t's 32-column tiles; K = 96 no whole 512 block."""
    rng = np.random.default_rng(N * M)
    lhs, rhs = routing(rng, tokens=2, top_k=2, E=3)
    p = GatherProblem(rng, E=3, X=2, M=M, K=96, N=N, lhs=lhs, rhs=rhs, transpose=True, bits=[2, 3, 5, 8][N % 4],
                      group_size=32, dtype="float32")
    assert p.check_all_runs(libs).kernel == ("qmv" if M == 1 else "qmm_t")


@pytest.mark.parametrize("K", [1, 31, 45, 129])
@pytest.mark.parametrize("M", [2, 10])
def test_reduction_not_a_multiple_of_the_tile(libs, K, M):
    """Not transposed, K (the rows of w) is any size: qvm's 128-row steps and
    qmm_n's 32-deep K tiles end ragged."""
    rng = np.random.default_rng(K + M)
    lhs, rhs = routing(rng, tokens=2, top_k=2, E=3, sort=True)
    p = GatherProblem(rng, E=3, X=2, M=M, K=K, N=96, lhs=lhs, rhs=rhs, transpose=False, bits=6, group_size=32,
                      dtype="bfloat16")
    assert p.check_all_runs(libs).kernel == ("qvm" if M <= 8 else "qmm_n")


@pytest.mark.parametrize("transpose", [True, False])
def test_empty_reduction_gives_the_bias(libs, transpose):
    """K = 0: each valid pair's block is its expert's bias row (or 0)."""
    rng = np.random.default_rng(3)
    p = GatherProblem(rng, E=3, X=2, M=2, K=0, N=64, lhs=[0, 1, 1], rhs=[2, 0, 2], transpose=transpose,
                      dtype="float32")
    for bias in (None, "per_expert", "shared"):
        _, got = p.launch(libs, bias=bias)
        rows = np.zeros((3, 64))
        if bias is not None:
            b = from_device(p.bias_rows[bias], "float32")
            rows = np.broadcast_to(b[p.rhs] if bias == "per_expert" else b, rows.shape)
        np.testing.assert_array_equal(got, np.broadcast_to(rows[:, None, :], got.shape))


@pytest.mark.parametrize(
    "transpose,M,K,N,bits,sort",
    [(True, 1, 1024, 64, 4, False), (True, 1, 768, 96, 3, True), (False, 1, 512, 256, 4, False),
     (True, 40, 256, 72, 5, True), (False, 36, 200, 128, 2, False)],
)
def test_layer_sized_problems(libs, transpose, M, K, N, bits, sort):
    """Several K blocks / steps, several threadgroups per dimension and pair."""
    rng = np.random.default_rng(K + N)
    lhs, rhs = routing(rng, tokens=3, top_k=3, E=6, sort=sort)
    p = GatherProblem(rng, E=6, X=3, M=M, K=K, N=N, lhs=lhs, rhs=rhs, transpose=transpose, bits=bits,
                      group_size=64, dtype="bfloat16")
    p.check(libs, bias="per_expert", schedule="random")


@pytest.mark.parametrize("transpose,K,N,bits", [(True, 256, 72, 4), (False, 200, 128, 5)])
def test_prefill_sized_problem(libs, transpose, K, N, bits):
    """20 tokens x top-4 of 8 experts, sorted: 80 one-row pairs, 3 row tiles."""
    rng = np.random.default_rng(K)
    lhs, rhs = routing(rng, tokens=20, top_k=4, E=8, sort=True)
    p = GatherProblem(rng, E=8, X=20, M=1, K=K, N=N, lhs=lhs, rhs=rhs, transpose=transpose, bits=bits,
                      group_size=64, dtype="bfloat16", sorted=True)
    assert p.check(libs, bias="per_expert", schedule="random").kernel.startswith("gather_qmm")


# ---- the host code's plan ------------------------------------------------------------


def test_plan_is_metal_plan_h():
    """gather_qmm/metal_plan.h: one pair's quantized matmul plan, z the pairs;
    sorted one-row pairs from 32 on: the tiles over pairs."""
    cases = [  # (P, M, N, K, transpose, sorted, type_name, group_size, bits) -> launch
        ((8, 1, 768, 2048, True, 1, "bfloat16", 64, 4), ("qmv_fast", "qmv_fast_bfloat16_gs64_b4", (1, 96, 8), 64)),
        ((4, 1, 13, 96, True, 0, "float32", 32, 8), ("qmv", "qmv_float32_gs32_b8", (1, 2, 4), 64)),
        ((5, 8, 2880, 2880, False, 1, "float16", 32, 4), ("qvm", "qvm_float16_gs32_b4", (8, 90, 5), 128)),
        ((3, 9, 33, 512, True, 0, "bfloat16", 32, 3), ("qmm_t", "qmm_t_bfloat16_gs32_b3", (2, 1, 3), 128)),
        ((2, 100, 64, 7, False, 0, "float16", 64, 6), ("qmm_n", "qmm_n_float16_gs64_b6", (2, 4, 2), 128)),
        # Sorted one-row pairs: from 32 pairs, tiles over the pairs; unsorted never.
        ((31, 1, 768, 2048, True, 1, "float16", 64, 4), ("qmv_fast", "qmv_fast_float16_gs64_b4", (1, 96, 31), 64)),
        ((4096, 1, 768, 2048, True, 1, "bfloat16", 64, 4),
         ("gather_qmm_t", "gather_qmm_t_bfloat16_gs64_b4", (24, 128, 1), 128)),
        ((33, 1, 2880, 2880, False, 1, "float32", 32, 8),
         ("gather_qmm_n", "gather_qmm_n_float32_gs32_b8", (90, 2, 1), 128)),
        ((4096, 1, 768, 2048, True, 0, "bfloat16", 64, 4),
         ("qmv_fast", "qmv_fast_bfloat16_gs64_b4", (1, 96, 4096), 64)),
        ((64, 2, 768, 2048, True, 1, "bfloat16", 64, 4), ("qmv_fast", "qmv_fast_bfloat16_gs64_b4", (2, 96, 64), 64)),
    ]
    for (P, M, N, K, transpose, sorted_, type_name, group_size, bits), (kernel, host_name, groups, threads) in cases:
        launch = PLAN(P=P, M=M, N=N, K=K, transpose=transpose, sorted=sorted_, type_name=type_name,
                      group_size=group_size, bits=bits)
        assert launch == Launch(kernel, host_name, groups, (threads, 1, 1))


@pytest.mark.parametrize("P,M,transpose,sorted_", [(32, 1, 1, 1), (500, 1, 0, 1), (31, 1, 1, 1), (64, 1, 1, 0),
                                                   (64, 2, 0, 1), (1, 9, 1, 1)])
def test_over_pairs_names_the_kernels_of_gather_qmm_metal(P, M, transpose, sorted_):
    """What metal.cpp binds by (over_pairs) agrees with the kernel chosen
    (and with GatherProblem.launch's test of the name)."""
    launch = OVER_PAIRS(P=P, M=M, transpose=transpose, sorted=sorted_)
    assert (launch.kernel == "over_pairs") == launch.host_name.startswith("gather_qmm")
    assert (launch.kernel == "over_pairs") == (sorted_ == 1 and M == 1 and P >= 32)


def test_bindings_declare_the_gather_buffers():
    """The indices do not collide with the quantized matmul's buffers."""
    buffers = BINDINGS.buffers
    assert len(set(buffers.values())) == len(buffers)
    assert {"lhs", "rhs"} <= set(buffers)
    assert set(BINDINGS.function_constants) == {"has_bias", "gather"}
    assert STORAGE["float32"] is np.float32


# ---- the same on a real Apple GPU (macOS with Metal only) -----------------------------


def _gpu_available() -> bool:
    import mlx.core as mx

    return mx.metal.is_available()


@pytest.mark.skipif(not _gpu_available(), reason="no Metal GPU here (the emulator runs these kernels instead)")
@pytest.mark.parametrize("kernel,dtype,group_size,bits", list(_instantiation_cases()))
def test_instantiations_on_the_gpu(kernel, dtype, group_size, bits):
    """mlx_ext.gather_qmm on the GPU stream with the same problems, an
    out-of-range index included (computed in the graph, so that only the kernel
    sees it: evaluated indices are checked by the op function)."""
    import mlx.core as mx

    import mlx_ext

    M, K, N = COVERAGE_SHAPES[kernel](group_size)
    transpose = kernel in ("qmv_fast", "qmv", "qmm_t")
    rng = np.random.default_rng(zlib.crc32(f"gpu{kernel}{dtype}{group_size}{bits}".encode()))
    lhs, rhs = np.array([0, 0, 1, 1, 2, 2, 1]), np.array([2, 0, 0, 3, 3, 2, 9])
    p = GatherProblem(rng, E=4, X=3, M=M, K=K, N=N, lhs=lhs, rhs=rhs, transpose=transpose,
                      group_size=group_size, bits=bits, dtype=dtype)
    mx_type = getattr(mx, dtype)

    def on_device(a):  # exact: every value is representable in the dtype
        return mx.array(from_device(a, dtype)).astype(mx_type)

    for bias in (None, "shared", "per_expert"):
        out = mlx_ext.gather_qmm(
            on_device(p.x), mx.array(p.w), on_device(p.scales), on_device(p.biases),
            mx.array(p.lhs) + 0, mx.array(p.rhs) + 0, transpose=transpose, group_size=group_size, bits=bits,
            bias=None if bias is None else on_device(p.bias_rows[bias]), stream=mx.gpu,
        )
        expected, tol = p.expected(bias)
        got = ref.to_f64(out)
        invalid = np.isnan(expected)
        assert np.isnan(got[invalid]).all()
        ref.assert_within_tolerance(got[~invalid], expected[~invalid], tol[~invalid], f"{kernel} bias={bias}")


@pytest.mark.skipif(not _gpu_available(), reason="no Metal GPU here (the emulator runs these kernels instead)")
@pytest.mark.parametrize("transpose,dtype,group_size,bits", list(_over_pairs_cases()))
def test_over_pairs_instantiations_on_the_gpu(transpose, dtype, group_size, bits):
    """mlx_ext.gather_qmm(..., sorted_indices=True) on the GPU stream."""
    import mlx.core as mx

    import mlx_ext

    p = _over_pairs_problem(transpose, dtype, group_size, bits, seed="gpu")
    mx_type = getattr(mx, dtype)

    def on_device(a):
        return mx.array(from_device(a, dtype)).astype(mx_type)

    for bias in (None, "per_expert"):
        out = mlx_ext.gather_qmm(
            on_device(p.x), mx.array(p.w), on_device(p.scales), on_device(p.biases), mx.array(p.lhs),
            mx.array(p.rhs), transpose=transpose, group_size=group_size, bits=bits, sorted_indices=True,
            bias=None if bias is None else on_device(p.bias_rows[bias]), stream=mx.gpu,
        )
        expected, tol = p.expected(bias)
        ref.assert_within_tolerance(out, expected, tol, f"{p.plan().host_name} bias={bias}")
