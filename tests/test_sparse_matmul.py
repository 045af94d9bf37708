"""mlx_ext.sparse_matmul against tests/reference.py (float64), every format,
every ISA compiled in."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx.core as mx
import mlx_ext
from mlx_ext import sparse

from . import reference as ref

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
EPS = {mx.float32: 2.0**-24, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}
FORMATS = ["csr", "bitmask", "bsr", "nm", "nm_q"]


def random_mask(rng, n, k, density):
    return rng.random((n, k)) < density


def make_container(fmt, w, rng, density, block=8, nm=(2, 4), bits=4, group_size=32):
    """A container of `fmt` from dense w with a random pattern at about `density`."""
    n, k = w.shape
    if fmt == "csr":
        return sparse.CSR.from_dense(w, mask=random_mask(rng, n, k, density))
    if fmt == "bitmask":
        return sparse.Bitmask.from_dense(w, mask=random_mask(rng, n, k, density))
    if fmt == "bsr":
        return sparse.BSR.from_dense(w, block=block, mask=random_mask(rng, n // block, k // block, density))
    if fmt == "nm":
        return sparse.NM.from_dense(w, *nm)
    return sparse.NM.from_dense(w, *nm, bits=bits, group_size=group_size)


def assert_matches_reference(out, x, ws, bias=None):
    expected = ref.sparse_matmul(x, ws, bias)
    magnitude = np.abs(ref.to_f64(x)) @ np.abs(ref.sparse_to_dense(ws)).T
    if bias is not None:
        magnitude = magnitude + np.abs(ref.to_f64(bias))
    k = x.shape[-1]
    # Each term meets at most k + 2 float32 roundings (dequantize, multiply,
    # accumulation), then one rounding to the output dtype.
    tol = ref.float32_accumulation_tolerance(expected, magnitude, roundings=k + 2, out_dtype=out.dtype)
    ref.assert_within_tolerance(out, expected, tol)


@st.composite
def problems(draw):
    fmt = draw(st.sampled_from(FORMATS))
    n = 8 * draw(st.integers(1, 5))
    k = 32 * draw(st.integers(1, 4)) + (draw(st.sampled_from([0, 8, 24])) if fmt in ("csr", "bitmask") else 0)
    if fmt == "nm_q":  # quantization groups of 32 compressed values, 1:4 included
        k = 128 * draw(st.integers(1, 2))
    block = draw(st.sampled_from([8, 16, 32]))
    if fmt == "bsr":
        n, k = block * draw(st.integers(1, 3)), block * draw(st.integers(1, 4))
    batch = draw(st.sampled_from([(1,), (3,), (2, 5), (17,), (40,), (2, 3, 7)]))
    return dict(
        fmt=fmt, n=n, k=k, batch=batch, block=block,
        density=draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0])),
        nm=draw(st.sampled_from([(2, 4), (4, 8), (1, 4)])),
        bits=draw(st.sampled_from([4, 8])),
        x_dtype=draw(st.sampled_from(DTYPES)),
        w_dtype=draw(st.sampled_from(DTYPES)),
        transposed_x=draw(st.booleans()),
        with_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_matches_reference(isa, p):
    rng = np.random.default_rng(p["seed"])
    w = mx.array(rng.standard_normal((p["n"], p["k"])), dtype=p["w_dtype"])
    group_size = 32 if p["k"] // p["nm"][1] * p["nm"][0] % 64 else 64
    ws = make_container(p["fmt"], w, rng, p["density"], block=p["block"], nm=p["nm"], bits=p["bits"],
                        group_size=group_size)
    shape = p["batch"] + (p["k"],)
    if p["transposed_x"]:  # a non-contiguous x: the transpose of a (K, ...) array
        x = mx.array(rng.standard_normal(shape[::-1]), dtype=p["x_dtype"]).T
    else:
        x = mx.array(rng.standard_normal(shape), dtype=p["x_dtype"])
    bias = mx.array(rng.standard_normal(p["n"]), dtype=p["w_dtype"]) if p["with_bias"] else None
    out = mlx_ext.sparse_matmul(x, ws, bias)
    assert out.dtype == (mx.zeros(1, p["x_dtype"]) + mx.zeros(1, p["w_dtype"])).dtype
    assert out.shape == tuple(x.shape[:-1]) + (p["n"],)
    assert_matches_reference(out, x, ws, bias)


@pytest.mark.parametrize("fmt", ["csr", "bitmask", "bsr"])
@pytest.mark.parametrize("case", ["all_zero", "full", "empty_rows"])
@pytest.mark.parametrize("m", [1, 6, 70])
def test_density_extremes(isa, fmt, case, m):
    rng = np.random.default_rng(1)
    n, k = 32, 64
    w = mx.array(rng.standard_normal((n, k)), dtype=mx.float32)
    if case == "all_zero":
        mask = np.zeros((n, k), bool)
    elif case == "full":
        mask = np.ones((n, k), bool)
    else:  # every other block of 8 rows empty, the rest full
        mask = np.repeat(np.arange(n // 8) % 2 == 0, 8)[:, None] & np.ones((n, k), bool)
    if fmt == "bsr":
        ws = sparse.BSR.from_dense(w, block=8, mask=mask)
    else:
        ws = getattr(sparse, {"csr": "CSR", "bitmask": "Bitmask"}[fmt]).from_dense(w, mask=mask)
    x = mx.array(rng.standard_normal((m, k)), dtype=mx.float32)
    bias = mx.array(rng.standard_normal(n), dtype=mx.float32)
    out = mlx_ext.sparse_matmul(x, ws, bias)
    assert_matches_reference(out, x, ws, bias)
    if case == "all_zero":
        np.testing.assert_array_equal(np.array(out), np.broadcast_to(np.array(bias), out.shape))


def test_large_k_uses_wide_columns():
    rng = np.random.default_rng(2)
    n, k = 4, 70000
    mask = np.zeros((n, k), bool)
    mask[:, [0, 65535, 65536, 69999]] = True
    w = mx.array(rng.standard_normal((n, k)), dtype=mx.float32)
    ws = sparse.CSR.from_dense(w, mask=mask)
    assert ws["indices"].dtype == mx.uint32
    x = mx.array(rng.standard_normal((2, k)), dtype=mx.float32)
    assert_matches_reference(mlx_ext.sparse_matmul(x, ws), x, ws)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compile_eval_and_tree(fmt):
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(3)
    w = mx.array(rng.standard_normal((16, 64)), dtype=mx.float32)
    ws = make_container(fmt, w, rng, 0.5)
    mx.eval(ws)
    names = [name for name, v in tree_flatten(ws) if isinstance(v, mx.array)]
    assert names and all(isinstance(ws[n], mx.array) for n in names)
    x = mx.array(rng.standard_normal((3, 64)), dtype=mx.float32)
    compiled = mx.compile(lambda x, ws: mlx_ext.sparse_matmul(x, ws))
    np.testing.assert_allclose(np.array(compiled(x, ws)), np.array(mlx_ext.sparse_matmul(x, ws)),
                               rtol=1e-6, atol=1e-6)
    out = mlx_ext.sparse_matmul(x, ws, stream=mx.cpu)
    assert_matches_reference(out, x, ws)


def test_vmap_over_x():
    rng = np.random.default_rng(4)
    w = mx.array(rng.standard_normal((16, 32)), dtype=mx.float32)
    ws = sparse.CSR.from_dense(w, density=0.4)
    x = mx.array(rng.standard_normal((3, 5, 32)), dtype=mx.float32)
    out = mx.vmap(lambda x: mlx_ext.sparse_matmul(x, ws), in_axes=1)(x)
    assert_matches_reference(out, mx.moveaxis(x, 1, 0), ws)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 8)])
@pytest.mark.parametrize("k", [40, 72, 264])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_nm_shapes(isa, nm, k, m):
    """N:M rows whose kept values fill no whole number of code words."""
    rng = np.random.default_rng(k)
    w = mx.array(rng.standard_normal((24, k)), dtype=mx.bfloat16)
    ws = sparse.NM.from_dense(w, *nm)
    x = mx.array(rng.standard_normal((m, k)), dtype=mx.float32)
    assert_matches_reference(mlx_ext.sparse_matmul(x, ws), x, ws)


@pytest.mark.parametrize("bits,group_size", [(0, 0), (4, 32), (4, 64), (8, 32), (8, 128)])
@pytest.mark.parametrize("k", [256, 512])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("w_dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_nm24_decode_fused(isa, bits, group_size, k, m, w_dtype):
    """2:4 rows that fill whole SIMD chunks and quantization groups: the
    decode path that reads codes and packed values in place (AVX2/AVX-512)."""
    rng = np.random.default_rng(k + bits)
    w = mx.array(rng.standard_normal((40, k)), dtype=w_dtype)
    ws = sparse.NM.from_dense(w, 2, 4, bits=bits or None, group_size=group_size or 64)
    x = mx.array(rng.standard_normal((m, k)), dtype=mx.float32)
    bias = mx.array(rng.standard_normal(40), dtype=w_dtype)
    assert_matches_reference(mlx_ext.sparse_matmul(x, ws, bias), x, ws, bias)


@pytest.mark.parametrize("m", [128, 130])
@pytest.mark.parametrize("w_dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_nm24_prefill_wide_panels(isa, m, w_dtype):
    """Float 2:4 from 128 rows of x: on AVX-512 the prefill's panels of 8
    vectors (128 rows), one whole and one partial; K ends inside a block."""
    rng = np.random.default_rng(m)
    w = mx.array(rng.standard_normal((72, 288)), dtype=w_dtype)
    ws = sparse.NM.from_dense(w, 2, 4)
    x = mx.array(rng.standard_normal((m, 288)), dtype=mx.float16)
    bias = mx.array(rng.standard_normal(72), dtype=w_dtype)
    assert_matches_reference(mlx_ext.sparse_matmul(x, ws, bias), x, ws, bias)


@pytest.mark.parametrize("block", [16, 32, 64, (16, 64)])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_bsr_blocks(isa, block, m):
    rng = np.random.default_rng(5)
    w = mx.array(rng.standard_normal((128, 192)), dtype=mx.float16)
    ws = sparse.BSR.from_dense(w, block=block, density=0.5)
    x = mx.array(rng.standard_normal((m, 192)), dtype=mx.float16)
    assert_matches_reference(mlx_ext.sparse_matmul(x, ws), x, ws)


@pytest.mark.parametrize("fmt", ["csr", "bitmask"])
@pytest.mark.parametrize("k", [7, 40, 56, 100])
@pytest.mark.parametrize("m", [1, 3])
def test_unstructured_partial_mask_words(isa, fmt, k, m):
    """Rows whose mask ends inside a word (and a byte): the decode kernels' tails."""
    rng = np.random.default_rng(k)
    w = mx.array(rng.standard_normal((20, k)), dtype=mx.float16)
    ws = make_container(fmt, w, rng, 0.6)
    x = mx.array(rng.standard_normal((m, k)), dtype=mx.float32)
    assert_matches_reference(mlx_ext.sparse_matmul(x, ws), x, ws)


def test_bitmask_without_vbmi2():
    """On AVX-512 the Bitmask decode expands its values with VBMI2 where the CPU
    has it; MLX_EXT_CPU_NO_VBMI2=1 forces the other kernel (Skylake-X, Cascade
    Lake), whose bitmask tests then run in a fresh process here."""
    import os
    import subprocess
    import sys

    if "avx512" not in mlx_ext.available_cpu_isas():
        pytest.skip("no AVX-512 on this CPU")
    env = dict(os.environ, MLX_EXT_CPU_NO_VBMI2="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "bitmask and not without_vbmi2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
