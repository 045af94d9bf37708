"""mlx_ext.gather_qmm against tests/reference.py (float64) and mx.gather_qmm.

Weights are random uint32 words with random scales and biases (every value
of every bit width occurs). Indices are drawn so that experts repeat, some
experts get no rows, and the order is sorted or not.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx.core as mx
import mlx_ext

from . import reference as ref

BITS = [2, 3, 4, 5, 6, 8]
GROUP_SIZES = [32, 64, 128]
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def random_experts(rng, experts, rows, cols, bits, group_size, dtype):
    """A stack of `experts` random affine matrices (E, rows, packed)."""
    parts = [ref.random_affine_weights(rng, rows, cols, bits, group_size) for _ in range(experts)]
    w_q, scales, biases = (np.stack(p) for p in zip(*parts))
    return mx.array(w_q), mx.array(scales, dtype=dtype), mx.array(biases, dtype=dtype)


def assert_matches_reference(out, x, w_q, scales, biases, lhs, rhs, **kw):
    expected, tol = ref.gather_qmm_with_tolerance(x, w_q, scales, biases, lhs, rhs, out_dtype=out.dtype, **kw)
    got = ref.to_f64(out)
    assert got.shape == expected.shape
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan), "NaN exactly where an index is out of range"
    ref.assert_within_tolerance(got[~nan], expected[~nan], tol[~nan])


@st.composite
def problems(draw):
    bits = draw(st.sampled_from(BITS))
    group_size = draw(st.sampled_from(GROUP_SIZES))
    transpose = draw(st.booleans())
    if transpose:
        k, n = group_size * draw(st.integers(1, 3)), draw(st.integers(1, 40))
    else:
        k, n = draw(st.integers(1, 40)), group_size * draw(st.integers(1, 2))
    experts = draw(st.integers(1, 6))
    # Routing: (tokens, top_k) expert choices, x one matrix per token.
    tokens = draw(st.integers(1, 20))
    top_k = draw(st.integers(1, min(3, experts)))
    order = draw(st.sampled_from(["unsorted", "sorted"]))
    return dict(bits=bits, group_size=group_size, transpose=transpose, k=k, n=n, experts=experts,
                tokens=tokens, top_k=top_k, order=order, m=draw(st.sampled_from([1, 2, 3, 13])),
                dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.sampled_from([None, "shared", "per_expert"])),
                seed=draw(st.integers(0, 2**31 - 1)))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(p=problems())
def test_matches_reference(isa, p):
    rng = np.random.default_rng(p["seed"])
    rows, cols = (p["n"], p["k"]) if p["transpose"] else (p["k"], p["n"])
    w_q, scales, biases = random_experts(rng, p["experts"], rows, cols, p["bits"], p["group_size"], p["dtype"])
    # Experts drawn from a subset: some repeat, some get no rows.
    used = rng.choice(p["experts"], size=max(1, p["experts"] - 1), replace=False)
    rhs = rng.choice(used, size=(p["tokens"], p["top_k"]))
    lhs = np.broadcast_to(np.arange(p["tokens"])[:, None], rhs.shape)
    x = mx.array(rng.standard_normal((p["tokens"], p["m"], p["k"])), dtype=p["dtype"])
    sorted_indices = p["order"] == "sorted"
    if sorted_indices:  # as mlx-lm's SwitchGLU sorts: flat pairs in expert order
        flat = np.argsort(rhs.ravel(), kind="stable")
        lhs, rhs = lhs.ravel()[flat], rhs.ravel()[flat]
    bias = None
    if p["bias"] == "shared":
        bias = mx.array(rng.standard_normal(p["n"]), dtype=p["dtype"])
    elif p["bias"] == "per_expert":
        bias = mx.array(rng.standard_normal((p["experts"], p["n"])), dtype=p["dtype"])
    kw = dict(transpose=p["transpose"], group_size=p["group_size"], bits=p["bits"])
    out = mlx_ext.gather_qmm(x, w_q, scales, biases, mx.array(lhs), mx.array(rhs), sorted_indices=sorted_indices,
                             bias=bias, **kw)
    assert out.dtype == p["dtype"]
    assert_matches_reference(out, x, w_q, scales, biases, lhs, rhs, bias=bias, **kw)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("tokens", [1, 6, 60])
def test_layer_sized_routing(isa, bits, transpose, tokens):
    """Big enough for the GEMV and the GEMM (an expert with >= 12 rows) in the
    same call, ragged blocks, and top-4 of 8 experts unsorted."""
    rng = np.random.default_rng(bits * 1000 + tokens)
    k, n = (384, 200) if transpose else (200, 384)
    rows, cols = (n, k) if transpose else (k, n)
    w_q, scales, biases = random_experts(rng, 8, rows, cols, bits, 64, mx.float32)
    rhs = np.stack([rng.permutation(8)[:4] for _ in range(tokens)])
    x = mx.array(rng.standard_normal((tokens, 1, 1, k)), dtype=mx.float32)  # SwitchGLU's layout
    kw = dict(transpose=transpose, group_size=64, bits=bits)
    out = mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=mx.array(rhs), **kw)
    assert out.shape == (tokens, 4, 1, n)
    assert_matches_reference(out, x, w_q, scales, biases, None, rhs, **kw)


def test_batch_shapes_broadcast():
    """Batch dimensions on x and w, 2-D indices broadcasting against 1-D ones,
    and no indices at all (every matrix in order)."""
    rng = np.random.default_rng(3)
    w_q, scales, biases = random_experts(rng, 6, 24, 64, 4, 32, mx.float32)
    w_q, scales, biases = (a.reshape((2, 3) + a.shape[1:]) for a in (w_q, scales, biases))
    x = mx.array(rng.standard_normal((4, 1, 5, 64)), dtype=mx.float32)
    lhs = np.array([[0], [3], [1]])
    rhs = np.array([5, 0, 2, 2])
    out = mlx_ext.gather_qmm(x, w_q, scales, biases, mx.array(lhs), mx.array(rhs), group_size=32)
    assert out.shape == (3, 4, 5, 24)
    assert_matches_reference(out, x, w_q, scales, biases, lhs, rhs, group_size=32)
    x6 = mx.array(rng.standard_normal((2, 3, 2, 64)), dtype=mx.float32)
    out = mlx_ext.gather_qmm(x6, w_q, scales, biases, group_size=32)
    assert out.shape == (2, 3, 2, 24)
    assert_matches_reference(out, x6, w_q, scales, biases, None, None, group_size=32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4, 40])
@pytest.mark.parametrize("sort", [False, True])
def test_agrees_with_mlx(dtype, tokens, sort):
    """Weights from mx.quantize, routing as mlx-lm's SwitchGLU passes it:
    the same values as mx.gather_qmm within its accumulation error."""
    k = 256
    w = mx.random.normal((8, 96, k), key=mx.random.key(1)).astype(dtype)
    w_q, scales, biases = mx.quantize(w, group_size=64, bits=4)
    rhs = mx.random.randint(0, 8, (tokens, 2), key=mx.random.key(3)).astype(mx.uint32)
    x = mx.random.normal((tokens, 1, 1, k), key=mx.random.key(2)).astype(dtype)
    lhs = None
    if sort:
        flat = rhs.flatten()
        order = mx.argsort(flat)
        lhs, rhs = (order // 2).astype(mx.uint32), flat[order]
        x = x.reshape(tokens, 1, k)
    ours = mlx_ext.gather_qmm(x, w_q, scales, biases, lhs, rhs, sorted_indices=sort)
    theirs = mx.gather_qmm(x, w_q, scales, biases, lhs, rhs, sorted_indices=sort)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = float(mx.abs(theirs.astype(mx.float32)).max())
    diff = float(mx.abs((ours - theirs).astype(mx.float32)).max())
    accumulation_eps = ref.EPS[mx.float32] if dtype == mx.float32 else ref.EPS[dtype]
    assert diff <= (4 * np.sqrt(k) * accumulation_eps + 2 * ref.EPS[dtype]) * scale


def test_run_time_out_of_range_indices_give_nan():
    """Indices computed lazily (not known when the op is called) that fall
    outside the batch read nothing: their blocks are NaN, the others exact."""
    rng = np.random.default_rng(5)
    w_q, scales, biases = random_experts(rng, 3, 16, 64, 4, 64, mx.float32)
    x = mx.array(rng.standard_normal((2, 1, 64)), dtype=mx.float32)
    rhs = mx.array([0, 7, 2, 1]) + mx.array(0)  # lazy: checked at run time
    lhs = mx.array([0, 1, 5, 1]) + mx.array(0)
    out = mlx_ext.gather_qmm(x, w_q, scales, biases, lhs, rhs)
    assert_matches_reference(out, x, w_q, scales, biases, np.array([0, 1, 5, 1]), np.array([0, 7, 2, 1]))
    assert np.isnan(np.array(out[1:3])).all() and not np.isnan(np.array(out[::3])).any()
