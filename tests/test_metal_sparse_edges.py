"""metal/sparse_matmul.metal in the emulator on adversarial patterns: empty
rows (and an empty matrix), a single stored value, rows of very different
lengths, N and K off every tile size, and M from 1 to 9 and 33 (across the
decode / prefill switch). Each case runs the decode or prefill product, the
transposed product and (float values) the sampled product.

CI samples: each case under one of the three runs of tests/metal_harness.py
(rotating by case), the row patterns for four (format, dtypes) pairs.
MLX_EXT_METAL_FULL=1 runs the full sweep: every case under all three runs,
the row patterns for every CSR / Bitmask instantiation's dtypes.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.metal_harness import METAL, RUNS, library_fixture
from tests.metal_sparse import FORMATS, PAIRS, Problem, row_mask

lib = library_fixture(METAL / "sparse_matmul.metal")

FULL = os.environ.get("MLX_EXT_METAL_FULL") == "1"

# The sample: each row format with dtype pairs between them; the full sweep:
# every pair.
ROW_FORMATS = ([(f, t, v) for f in ("csr_u16", "csr_u32", "bitmask") for t, v in PAIRS] if FULL else
               [("csr_u16", "float16", "float16"), ("csr_u32", "float32", "bfloat16"),
                ("bitmask", "bfloat16", "bfloat16"), ("bitmask", "float32", "float16")])


def _runs(seed: int) -> list[dict]:
    """All three runs in the full sweep, else one, rotating by case."""
    runs = RUNS if FULL else [RUNS[seed % len(RUNS)]]
    return [dict(schedule=s, check_bounds=c) for s, c in runs]


def _check_all(lib, p: Problem, rng, M: int, seed: int):
    for i, run in enumerate(_runs(seed)):
        p.check_product(lib, rng, M, transpose=True, has_bias=(seed + i) % 2 == 0, **run)
        p.check_product(lib, rng, M, transpose=False, has_bias=(seed + i) % 2 == 1, **run)
        if not p.bits:
            p.check_sampled(lib, rng, M, **run)


def _lengths_problem(fmt, dtype, vdtype, lengths, K, seed):
    rng = np.random.default_rng(seed)
    mask = row_mask(rng, lengths, K)
    return Problem(rng, fmt, N=len(lengths), K=K, dtype=dtype, value_dtype=vdtype, mask=mask), rng


PATTERNS = {
    # Every other row empty, and the last three.
    "empty_rows": lambda K: [0, 5, 0, K // 3, 0, 1, 9, 0, 0, 0],
    # Nothing stored at all.
    "empty_matrix": lambda K: [0] * 6,
    # One stored value in the whole matrix.
    "single_value": lambda K: [0, 0, 0, 1, 0],
    # A full row beside empty and single-value rows.
    "uneven_rows": lambda K: [K, 0, 1, K // 2, 0, 2, K, 3, 0],
}


@pytest.mark.parametrize("M", [1, 12])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("fmt,dtype,vdtype", ROW_FORMATS)
def test_row_patterns(lib, fmt, dtype, vdtype, pattern, M):
    seed = zlib.crc32(f"{fmt}{dtype}{vdtype}{pattern}{M}".encode())
    K = 600 if fmt == "bitmask" else 333
    p, rng = _lengths_problem(fmt, dtype, vdtype, PATTERNS[pattern](K), K, seed)
    if pattern == "single_value":
        assert p.stored == 1
    _check_all(lib, p, rng, M, seed)


@pytest.mark.parametrize("M", [1, 8, 12])
@pytest.mark.parametrize("lengths", [[3000, 2, 5], [0, 1200, 0, 0, 256, 1, 0, 900, 0], [512, 256, 256, 256, 0]])
def test_long_csr_rows_take_balanced_slices(lib, M, lengths):
    """Rows long on average, decode: sp_mv_split_csr's slices of 256 stored
    values, rows across slice boundaries (and empty ones) written by the
    fix-up; rows of exactly one and two whole slices. Prefill (M = 12): the
    gather kernel, a simdgroup per row."""
    seed = zlib.crc32(f"{lengths}{M}".encode())
    p, rng = _lengths_problem("csr_u16", "float32", "float32", lengths, 3001, seed)
    assert p.plan(M).kernel == ("mv_split" if M <= 8 else "mv")
    _check_all(lib, p, rng, M, seed)


@pytest.mark.parametrize("M", [1, 12])
@pytest.mark.parametrize("pattern", ["empty_block_rows", "single_block", "all_blocks"])
def test_bsr_block_patterns(lib, pattern, M):
    seed = zlib.crc32(f"bsr{pattern}{M}".encode())
    rng = np.random.default_rng(seed)
    blocks = np.zeros((4, 3), bool)
    if pattern == "empty_block_rows":
        blocks[1] = blocks[3, 2] = True
    elif pattern == "single_block":
        blocks[2, 1] = True
    else:
        blocks[:] = True
    p = Problem(rng, "bsr", N=4 * 16, K=3 * 32, dtype="float16", value_dtype="float16", mask=blocks,
                block=(16, 32))
    _check_all(lib, p, rng, M, seed)


# (format, N, K): N and K off the 4-row, 8-column, 32-tile and 512-column steps.
ODD_SHAPES = [("csr_u16", 37, 70), ("bitmask", 37, 70), ("bitmask", 5, 33), ("bsr", 35, 45), ("nm", 37, 68),
              ("nm", 3, 520), ("nm_b8_gs32", 37, 64 * 3)]


@pytest.mark.parametrize("M", [1, 33])
@pytest.mark.parametrize("fmt,N,K", ODD_SHAPES)
def test_shapes_off_the_tiles(lib, fmt, N, K, M):
    seed = zlib.crc32(f"{fmt}{N}{K}{M}".encode())
    rng = np.random.default_rng(seed)
    extra = {"block": (7, 5), "density": 0.5} if fmt == "bsr" else {}
    p = Problem(rng, fmt, N=N, K=K, dtype="float32", value_dtype="float16", **extra)
    _check_all(lib, p, rng, M, seed)


MS = list(range(1, 10)) + [33]
M_FORMATS = [("csr_u16", {}), ("bitmask", {}), ("bsr", {"block": (16, 16), "density": 0.5}),
             ("nm", {"nm": (2, 4)}), ("nm", {"nm": (4, 8)}), ("nm_b4_gs64", {})]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("fmt,extra", M_FORMATS, ids=[f"{f}-{e.get('nm', '')}" for f, e in M_FORMATS])
def test_rows_of_x_around_the_decode_prefill_switch(lib, fmt, extra, M):
    """M = 1 .. 8 decode (sp_mv), 9 and 33 prefill (sp_mm_t; CSR's gather
    kernel in steps of 8 rows)."""
    seed = zlib.crc32(f"{fmt}{extra}{M}".encode())
    rng = np.random.default_rng(seed)
    dtype = ["float32", "float16", "bfloat16"][M % 3]
    p = Problem(rng, fmt, N=48, K=256, dtype=dtype, value_dtype=dtype, **extra)
    for run in _runs(seed):
        launch = p.check_product(lib, rng, M, has_bias=M % 2 == 0, **run)
        assert launch.kernel == ("mv" if M <= 8 or fmt == "csr_u16" else "mm_t")


@st.composite
def problems(draw):
    """A random format, dtype pair, shape, density and M (decode and prefill)."""
    fmt = draw(st.sampled_from(FORMATS))
    dtype, vdtype = draw(st.sampled_from(PAIRS))
    M = draw(st.sampled_from([1, 2, 5, 8, 9, 17, 33]))
    extra = {}
    if fmt == "bsr":
        bn, bk = draw(st.sampled_from([(16, 16), (32, 32), (64, 64), (16, 64), (8, 4), (3, 5)]))
        N, K = bn * draw(st.integers(1, 3)), bk * draw(st.integers(1, 4))
        extra = {"block": (bn, bk), "density": draw(st.sampled_from([0.0, 0.3, 1.0]))}
    elif fmt.startswith("nm"):
        n, m = (2, 4) if fmt != "nm" else draw(st.sampled_from([(1, 4), (2, 4), (3, 4), (1, 8), (4, 8), (7, 8)]))
        N = draw(st.integers(1, 40))
        K = m * draw(st.integers(1, 150)) if fmt == "nm" else 2 * 128 * draw(st.integers(1, 3))
        extra = {"nm": (n, m)}
    else:
        N, K = draw(st.integers(1, 40)), draw(st.integers(1, 1100))
        extra = {"density": draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))}
    transpose = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return fmt, dtype, vdtype, M, N, K, extra, transpose, seed


@given(case=problems())
@settings(max_examples=300 if FULL else 50, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_problems(lib, case):
    fmt, dtype, vdtype, M, N, K, extra, transpose, seed = case
    rng = np.random.default_rng(seed)
    p = Problem(rng, fmt, N=N, K=K, dtype=dtype, value_dtype=vdtype, **extra)
    for run in _runs(seed):
        p.check_product(lib, rng, M, transpose=transpose, has_bias=seed % 2 == 0, **run)
        if not p.bits:
            p.check_sampled(lib, rng, M, **run)


@pytest.mark.parametrize("fmt,M,N,K,extra", [
    ("csr_u16", 1, 256, 2048, {"density": 0.1}),
    ("csr_u16", 4, 64, 4096, {"density": 0.5}),  # long rows: balanced slices
    ("bitmask", 2, 256, 2048, {"density": 0.5}),
    ("bsr", 1, 256, 1024, {"block": (32, 32), "density": 0.25}),
    ("nm", 3, 128, 2048, {"nm": (2, 4)}),
    ("nm_b4_gs64", 1, 256, 2048, {}),
    ("bitmask", 64, 96, 512, {"density": 0.3}),
    ("bsr", 48, 128, 512, {"block": (64, 64), "density": 0.5}),
    ("nm_b8_gs128", 40, 64, 1024, {}),
])
def test_layer_sized_problems(lib, fmt, M, N, K, extra):
    """Several steps of x and several threadgroups per dimension, with the
    transposed product on the same pattern."""
    seed = zlib.crc32(f"{fmt}{M}{N}{K}".encode())
    rng = np.random.default_rng(seed)
    p = Problem(rng, fmt, N=N, K=K, dtype="bfloat16", value_dtype="bfloat16", **extra)
    p.check_product(lib, rng, M, schedule="random")
    p.check_product(lib, rng, M, transpose=False, schedule="random")
