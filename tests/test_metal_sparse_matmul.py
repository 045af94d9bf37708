"""metal/sparse_matmul.metal in the emulator, against tests/reference.py:
every instantiation, launched exactly as csrc/sparse_matmul/metal.cpp
launches it (tests/metal_sparse.py), under the three runs of
tests/metal_harness.py (thread orders, bounds-check sides), with poisoning,
strict mode and NaN-filled outputs.

Every instantiation runs under all three runs (about 20 s for the file on
the 2-core CI machine). The adversarial patterns are in
test_metal_sparse_edges.py, sampled in CI (MLX_EXT_METAL_FULL=1: all of them).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from tests.metal_harness import METAL, RUNS, Launch, library_fixture
from tests.metal_sparse import FLOAT_FORMATS, FORMATS, PAIRS, PLAN_CONSTANTS, Problem

lib = library_fixture(METAL / "sparse_matmul.metal")

# (schedule, check_bounds, has_bias) of the runs every instantiation gets.
RUNS_WITH_BIAS = [(s, c, b) for (s, c), b in zip(RUNS, (True, False, True))]


# The coverage shapes: per kernel, (M, N, K, extra Problem arguments) that
# reach its every path, small enough for the emulator.
def _shape(kernel: str, fmt: str, index: int):
    """index picks BSR's block shape (16, 32 and 64 all run) and N:M's n:m."""
    block = [(16, 16), (32, 32), (16, 64), (64, 16), (8, 8)][index % 5]
    nm = [(2, 4), (1, 4), (4, 8), (3, 4), (2, 8)][index % 5]
    if fmt.startswith("nm_b"):
        nm = (2, 4)  # K n / m = 384: 3 groups of 128, 6 of 64, 12 of 32
    if kernel == "mv":
        if fmt.startswith("csr"):
            return 11, 13, 300, {}  # two steps of 8 rows of x, the second partial
        if fmt == "bsr":
            return 3, 2 * block[0], 3 * block[1], {"block": block, "density": 0.5}
        if fmt == "bitmask":
            return 3, 13, 600, {}  # two 512-column steps; a partial last word
        return 5, 13, 768 if fmt != "nm" else 552, {"nm": nm}  # two steps, the second partial
    if kernel == "mv_split":
        return 5, 5, 900, {"density": 0.4}  # ~360 stored per row: rows across slices
    if kernel in ("mm_t", "mm_n"):
        M = 40 if kernel == "mm_t" else 9
        if fmt == "bsr":
            return M, 2 * block[0], 2 * block[1], {"block": block, "density": 0.5}
        if fmt.startswith("nm_b"):
            return M, 40, 768, {"nm": nm}
        return M, 40, 72 if fmt != "nm" else 88, {"nm": nm}  # partial tiles
    raise AssertionError(kernel)


def _product_cases():
    for index, (dtype, vdtype) in enumerate(PAIRS):
        for fmt in FORMATS:
            kernels = ["mv", "mm_n"]
            if fmt.startswith("csr"):
                kernels.append("mv_split")
            else:
                kernels.append("mm_t")
            for kernel in kernels:
                yield pytest.param(kernel, fmt, dtype, vdtype, index, id=f"{kernel}-{fmt}-{dtype}-{vdtype}")


def _problem(kernel, fmt, dtype, vdtype, index):
    M, N, K, extra = _shape(kernel, fmt, index + FORMATS.index(fmt))
    seed = zlib.crc32(f"{kernel}{fmt}{dtype}{vdtype}".encode())
    rng = np.random.default_rng(seed)
    return Problem(rng, fmt, N=N, K=K, dtype=dtype, value_dtype=vdtype, **extra), M, rng


@pytest.mark.parametrize("kernel,fmt,dtype,vdtype,index", list(_product_cases()))
def test_every_product_instantiation(lib, kernel, fmt, dtype, vdtype, index):
    p, M, rng = _problem(kernel, fmt, dtype, vdtype, index)
    transpose = kernel != "mm_n"
    for schedule, check_bounds, has_bias in RUNS_WITH_BIAS:
        launch = p.check_product(lib, rng, M, transpose=transpose, has_bias=has_bias, schedule=schedule,
                                 check_bounds=check_bounds)
        assert launch.kernel == kernel, launch


def _sampled_cases():
    for vdtype in ("float32", "float16", "bfloat16"):
        for fmt in FLOAT_FORMATS:
            yield pytest.param(fmt, vdtype, id=f"sampled-{fmt}-{vdtype}")


def _sampled_problem(fmt, vdtype):
    rng = np.random.default_rng(zlib.crc32(f"sampled{fmt}{vdtype}".encode()))
    extra = {"block": (16, 32), "density": 0.5} if fmt == "bsr" else {}
    N, K = (32, 64) if fmt == "bsr" else (13, 600 if fmt == "bitmask" else 72)
    return Problem(rng, fmt, N=N, K=K, dtype="float32", value_dtype=vdtype, **extra), rng


@pytest.mark.parametrize("fmt,vdtype", list(_sampled_cases()))
def test_every_sampled_instantiation(lib, fmt, vdtype):
    p, rng = _sampled_problem(fmt, vdtype)
    for schedule, check_bounds, _ in RUNS_WITH_BIAS:
        p.check_sampled(lib, rng, 5, schedule=schedule, check_bounds=check_bounds)


def test_every_instantiation_is_covered(lib):
    """The coverage shapes, planned by metal_plan.h, launch every instantiation once."""
    planned = []
    for case in _product_cases():
        kernel, fmt, dtype, vdtype, index = case.values
        p, M, _ = _problem(*case.values)
        planned.append(p.plan(M, kernel != "mm_n").host_name)
    planned += [f"sp_split_fixup_{t}" for t in ("float32", "float16", "bfloat16")]  # after mv_split
    planned += [_sampled_problem(*case.values)[0].plan_sampled().host_name for case in _sampled_cases()]
    assert sorted(planned) == sorted(lib.host_names)


def test_plan_is_metal_plan_h():
    """The planner passes its arguments to metal_plan.h and returns its choice:
    the launches its comments describe."""
    rng = np.random.default_rng(0)
    p = Problem(rng, "csr_u16", N=4096, K=64, dtype="float16", value_dtype="float16", density=0.1)
    assert p.plan(1) == Launch("mv", "sp_mv_csr_u16_float16_float16", (1024, 1, 1), (128, 1, 1))
    assert p.plan(100) == Launch("mv", "sp_mv_csr_u16_float16_float16", (1024, 13, 1), (128, 1, 1))
    assert p.plan(3, transpose=False) == Launch("mm_n", "sp_mm_n_csr_u16_float16_float16", (2, 1, 1),
                                                (128, 1, 1))
    q = Problem(rng, "nm_b4_gs64", N=40, K=512, dtype="float32", value_dtype="bfloat16")
    assert q.plan(8).host_name == "sp_mv_nm_b4_gs64_float32_bfloat16"
    assert q.plan(9) == Launch("mm_t", "sp_mm_t_nm_b4_gs64_float32_bfloat16", (2, 1, 1), (128, 1, 1))
    w = Problem(rng, "csr_u32", N=2, K=2048, dtype="float32", value_dtype="float32", density=0.5)
    slice_values, decode_rows, long_row = PLAN_CONSTANTS().groups
    assert (slice_values, decode_rows, long_row) == (256, 8, 256)  # as metal_plan.h's comments say
    assert w.stored >= long_row * 2
    slices = -(-w.stored // slice_values)
    assert w.plan(8) == Launch("mv_split", "sp_mv_split_csr_u32_float32_float32", (-(-slices // 4), 1, 1),
                               (128, 1, 1))
    assert w.plan(9) == Launch("mv", "sp_mv_csr_u32_float32_float32", (1, 2, 1), (128, 1, 1))
    assert w.plan_sampled() == Launch("sampled", "sp_sampled_csr_u32_float32", (1, 1, 1), (128, 1, 1))


# ---- the same problems on a real Apple GPU (macOS with Metal only) ----------------------


def _gpu_available() -> bool:
    import mlx.core as mx

    return mx.metal.is_available()


@pytest.mark.skipif(not _gpu_available(), reason="no Metal GPU here (the emulator runs these kernels instead)")
@pytest.mark.parametrize("kernel,fmt,dtype,vdtype,index", list(_product_cases()))
def test_every_product_on_the_gpu(kernel, fmt, dtype, vdtype, index):
    """The coverage problems through the op on the GPU stream: the product,
    or (sp_mm_n) the raw op's transposed product; and the values' gradient.
    (Containers keep uint16 columns while K <= 65536, so the csr_u32 cases
    run the uint16 kernels here.)"""
    import mlx.core as mx

    import mlx_ext
    from mlx_ext.sparse import _arrays

    from tests import reference as ref

    p, M, rng = _problem(kernel, fmt, dtype, vdtype, index)
    transpose = kernel != "mm_n"
    inner, outer = (p.K, p.N) if transpose else (p.N, p.K)
    x = mx.array(rng.standard_normal((M, inner)), dtype=getattr(mx, dtype))
    bias = mx.array(rng.standard_normal(outer), dtype=getattr(mx, dtype))
    lay = p.layout
    out = mlx_ext._ext.sparse_matmul_arrays(
        x, lay["format"], _arrays(p.ws), tuple(lay["shape"]), block=tuple(lay.get("block", (1, 1))),
        nm=(lay.get("n", 0), lay.get("m", 0)), bits=lay.get("bits", 0), group_size=lay.get("group_size", 0),
        bias=bias, transpose=transpose, stream=mx.gpu)
    expected, tol = ref.sparse_matmul_with_tolerance(x, p.ws, out_dtype=dtype, bias=bias, transpose=transpose)
    ref.assert_within_tolerance(out, expected, tol, f"{kernel} {p.describe()} M={M} on the GPU")
    if p.bits or not transpose:
        return
    g = mx.array(rng.standard_normal((M, p.N)), dtype=mx.float32)

    def loss(values):
        ws = dict(p.ws)
        ws["data"] = values
        return (g * mlx_ext.sparse_matmul(x.astype(mx.float32), ws, stream=mx.gpu)).sum()

    dvalues = mx.grad(loss)(p.ws["data"])
    expected, tol = ref.sparse_sampled_with_tolerance(g, x.astype(mx.float32), p.ws, out_dtype=vdtype)
    ref.assert_within_tolerance(dvalues, expected, tol, f"sampled {p.describe()} on the GPU")
