"""mlx_ext.gather_quantized_swiglu (mlx-lm's SwitchGLU before its down
projection, in one primitive) against tests/reference.py (float64), its vjp
against the unfused form, and its argument checks."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx.core as mx
import mlx_ext

from . import reference as ref
from .test_gather_qmm import DTYPES, GROUP_SIZES, random_experts


def routing(rng, tokens, top_k, experts, order):
    idx = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    if order == "sorted":
        idx = np.sort(idx.reshape(-1)).reshape(tokens, top_k)
    return mx.array(idx.astype(np.uint32))


@st.composite
def problems(draw):
    group_size = draw(st.sampled_from(GROUP_SIZES))
    experts = draw(st.integers(1, 6))
    return dict(bits=draw(st.sampled_from([2, 3, 4, 8])), group_size=group_size,
                k=group_size * draw(st.integers(1, 3)), n=draw(st.integers(1, 40)), experts=experts,
                tokens=draw(st.integers(1, 20)), top_k=draw(st.integers(1, min(3, experts))),
                order=draw(st.sampled_from(["unsorted", "sorted"])), dtype=draw(st.sampled_from(DTYPES)),
                seed=draw(st.integers(0, 2**31 - 1)))


def assert_matches_reference(out, x, gate, up, lhs, rhs, **kw):
    expected, tol = ref.gather_quantized_swiglu_with_tolerance(x, gate, up, lhs, rhs, out_dtype=out.dtype, **kw)
    got = ref.to_f64(out)
    assert got.shape == expected.shape
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan), "NaN exactly where an index is out of range"
    ref.assert_within_tolerance(got[~nan], expected[~nan], tol[~nan])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None,
          max_examples=40)
@given(p=problems())
def test_matches_reference(isa, p):
    """SwitchGLU's layout: x (tokens, 1, 1, K), indices (tokens, top_k)."""
    rng = np.random.default_rng(p["seed"])
    kw = dict(bits=p["bits"], group_size=p["group_size"])
    gate = random_experts(rng, p["experts"], p["n"], p["k"], dtype=p["dtype"], **kw)
    up = random_experts(rng, p["experts"], p["n"], p["k"], dtype=p["dtype"], **kw)
    # Small x: 8-bit random weights give gate and up products in the hundreds,
    # and their product would overflow float16.
    x = mx.array(0.02 * rng.standard_normal((p["tokens"], 1, 1, p["k"])), dtype=p["dtype"])
    idx = routing(rng, p["tokens"], p["top_k"], p["experts"], p["order"])
    out = mlx_ext.gather_quantized_swiglu(x, *gate, *up, rhs_indices=idx, sorted_indices=p["order"] == "sorted",
                                          **kw)
    assert out.shape == (p["tokens"], p["top_k"], 1, p["n"])
    assert_matches_reference(out, x, gate, up, None, idx, **kw)


@pytest.mark.parametrize("tokens", [1, 6, 60])
def test_equals_the_unfused_gathers(isa, tokens):
    """Gate, up and activation as mlx-lm's SwitchGLU runs them (mlx_ext's two
    gathers, float32 activation): equal up to the output's rounding, at
    decode (GEMV) and prefill (GEMM) row counts."""
    rng = np.random.default_rng(tokens)
    gate = random_experts(rng, 8, 96, 256, 4, 64, mx.float16)
    up = random_experts(rng, 8, 96, 256, 4, 64, mx.float16)
    x = mx.array(rng.standard_normal((tokens, 1, 1, 256)), dtype=mx.float16)
    idx = routing(rng, tokens, 2, 8, "unsorted")
    fused = mlx_ext.gather_quantized_swiglu(x, *gate, *up, rhs_indices=idx)
    g = mlx_ext.gather_qmm(x, *gate, rhs_indices=idx).astype(mx.float32)
    u = mlx_ext.gather_qmm(x, *up, rhs_indices=idx).astype(mx.float32)
    unfused = (g * mx.sigmoid(g) * u).astype(mx.float16)
    np.testing.assert_allclose(np.array(fused.astype(mx.float32)), np.array(unfused.astype(mx.float32)),
                               rtol=2e-3, atol=1e-3)


def test_run_time_out_of_range_indices_give_nan():
    rng = np.random.default_rng(0)
    gate = random_experts(rng, 3, 8, 64, 4, 64, mx.float32)
    up = random_experts(rng, 3, 8, 64, 4, 64, mx.float32)
    x = mx.array(rng.standard_normal((2, 1, 1, 64)), dtype=mx.float32)
    idx = mx.array([[0, 2], [1, 0]], dtype=mx.uint32) * 3  # lazy: known only when run, 3 and 6 out of range
    out = mlx_ext.gather_quantized_swiglu(x, *gate, *up, rhs_indices=idx)
    assert_matches_reference(out, x, gate, up, None, np.array(idx))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_vjp_matches_the_unfused_form(dtype):
    """d/dx through the fused op equals d/dx through two gathers and MLX's
    silu; the other inputs have no gradient."""
    rng = np.random.default_rng(1)
    gate = random_experts(rng, 4, 24, 128, 4, 64, dtype)
    up = random_experts(rng, 4, 24, 128, 4, 64, dtype)
    x = mx.array(rng.standard_normal((5, 1, 1, 128)), dtype=dtype)
    idx = routing(rng, 5, 2, 4, "unsorted")
    cot = mx.array(rng.standard_normal((5, 2, 1, 24)), dtype=dtype)

    def fused(x):
        return (mlx_ext.gather_quantized_swiglu(x, *gate, *up, rhs_indices=idx) * cot).sum()

    def unfused(x):
        g = mlx_ext.gather_qmm(x, *gate, rhs_indices=idx).astype(mx.float32)
        u = mlx_ext.gather_qmm(x, *up, rhs_indices=idx).astype(mx.float32)
        return ((g * mx.sigmoid(g) * u).astype(dtype) * cot).sum()

    tol = 1e-4 if dtype == mx.float32 else 3e-2
    np.testing.assert_allclose(np.array(mx.grad(fused)(x).astype(mx.float32)),
                               np.array(mx.grad(unfused)(x).astype(mx.float32)), rtol=tol, atol=tol)
    _, tangent = mx.jvp(lambda x: mlx_ext.gather_quantized_swiglu(x, *gate, *up, rhs_indices=idx), [x], [x])
    _, tangent_unfused = mx.jvp(lambda x: unfused_out(x, gate, up, idx, dtype), [x], [x])
    np.testing.assert_allclose(np.array(tangent[0].astype(mx.float32)),
                               np.array(tangent_unfused[0].astype(mx.float32)), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=r"\[mlx_ext.gather_quantized_swiglu\].*only defined with respect to x"):
        mx.grad(lambda s: mlx_ext.gather_quantized_swiglu(x, gate[0], s, gate[2], *up, rhs_indices=idx).sum())(
            gate[1])


def unfused_out(x, gate, up, idx, dtype):
    g = mlx_ext.gather_qmm(x, *gate, rhs_indices=idx).astype(mx.float32)
    u = mlx_ext.gather_qmm(x, *up, rhs_indices=idx).astype(mx.float32)
    return (g * mx.sigmoid(g) * u).astype(dtype)


def test_compiles():
    rng = np.random.default_rng(2)
    gate = random_experts(rng, 4, 16, 64, 4, 64, mx.float16)
    up = random_experts(rng, 4, 16, 64, 4, 64, mx.float16)
    x = mx.array(rng.standard_normal((3, 1, 1, 64)), dtype=mx.float16)
    idx = routing(rng, 3, 2, 4, "unsorted")
    fn = mx.compile(lambda x, idx: mlx_ext.gather_quantized_swiglu(x, *gate, *up, rhs_indices=idx))
    eager = mlx_ext.gather_quantized_swiglu(x, *gate, *up, rhs_indices=idx)
    assert mx.array_equal(fn(x, idx), eager)


def test_argument_errors_name_the_op_and_argument():
    rng = np.random.default_rng(3)
    gate = random_experts(rng, 4, 16, 64, 4, 64, mx.float16)
    up = random_experts(rng, 4, 16, 64, 4, 64, mx.float16)
    x = mx.array(rng.standard_normal((3, 1, 1, 64)), dtype=mx.float16)
    op = r"\[mlx_ext.gather_quantized_swiglu\] "
    with pytest.raises(ValueError, match=op + "w_up must have the shape of w_gate"):
        mlx_ext.gather_quantized_swiglu(x, *gate, up[0][:, :8], up[1][:, :8], up[2][:, :8])
    with pytest.raises(ValueError, match=op + "scales_up must have shape"):
        mlx_ext.gather_quantized_swiglu(x, *gate, up[0], up[1][:, :8], up[2])
    with pytest.raises(TypeError, match=op + "w_gate must be uint32"):
        mlx_ext.gather_quantized_swiglu(x, gate[0].astype(mx.int32), *gate[1:], *up)
    with pytest.raises(ValueError, match=op + "biases_gate are required"):
        mlx_ext.gather_quantized_swiglu(x, gate[0], gate[1], None, *up)
    with pytest.raises(ValueError, match=op + "rhs_indices holds values"):
        mlx_ext.gather_quantized_swiglu(x, *gate, *up, rhs_indices=mx.array([[0, 4]] * 3))
    with pytest.raises(TypeError, match=op + "scales_up .* give different output dtypes"):
        mlx_ext.gather_quantized_swiglu(x, *gate, up[0], up[1].astype(mx.float32), up[2].astype(mx.float32))
