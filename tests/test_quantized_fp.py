"""mlx_ext.quantized_matmul in MLX's fp modes (mxfp4, nvfp4, mxfp8) and with
batched weights, against tests/reference.py (float64) and against
mx.quantized_matmul on mx.quantize outputs.

Weights are random codes (every code of the format, but mxfp8's NaN) with
random scale bytes (reference.random_fp_quantized)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx.core as mx
import mlx_ext

from . import reference as ref
from .test_quantized_matmul import make_x

MODES = list(ref.FP_MODES)
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def assert_matches(out, x, w_q, scales, *, mode, transpose=True, bias=None):
    expected, tol = ref.quantized_matmul_with_tolerance(
        x, w_q, scales, None, out_dtype=out.dtype, transpose=transpose, mode=mode, bias=bias)
    ref.assert_within_tolerance(out, expected, tol)


@st.composite
def problems(draw):
    mode = draw(st.sampled_from(MODES))
    group_size = ref.FP_MODES[mode][0]
    transpose = draw(st.booleans())
    groups = st.integers(1, 6)
    k = group_size * draw(groups) if transpose else draw(st.integers(1, 70))
    n = draw(st.integers(1, 70)) if transpose else group_size * draw(groups)
    w_batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    # x's batch: w's with some dimensions 1 (broadcast), maybe one more in front.
    x_batch = tuple(d if draw(st.booleans()) else 1 for d in w_batch)
    x_batch = tuple(draw(st.lists(st.integers(1, 2), max_size=1))) + x_batch
    return dict(mode=mode, transpose=transpose, k=k, n=n, w_batch=w_batch, x_batch=x_batch,
                m=draw(st.sampled_from([1, 2, 3, 5, 8, 12, 13, 25])),
                dtype=draw(st.sampled_from(DTYPES)),
                layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
                with_bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(p=problems())
def test_matches_reference(isa, p):
    """Every mode x dtype x transpose x batch shape, on every ISA."""
    rng = np.random.default_rng(p["seed"])
    rows, cols = (p["n"], p["k"]) if p["transpose"] else (p["k"], p["n"])
    w_q, scales = ref.random_fp_quantized(rng, p["w_batch"] + (rows, cols), p["mode"])
    x = make_x(rng, p["x_batch"] + (p["m"], p["k"]), p["dtype"], p["layout"])
    bias = mx.array(rng.standard_normal(p["n"]), dtype=p["dtype"]) if p["with_bias"] else None
    out = mlx_ext.quantized_matmul(x, w_q, scales, transpose=p["transpose"], mode=p["mode"], bias=bias)
    assert out.dtype == p["dtype"]
    batch = np.broadcast_shapes(p["x_batch"], p["w_batch"])
    assert out.shape == batch + (p["m"], p["n"])
    assert_matches(out, x, w_q, scales, mode=p["mode"], transpose=p["transpose"], bias=bias)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_layer_sized_problem(isa, mode, transpose, m):
    """Every kernel path: GEMV rows blocks, several GEMM K and N blocks with
    ragged edges, and (nvfp4) a row and a GEMM K block ending on half a block."""
    rng = np.random.default_rng(m)
    k, n = (656, 300) if transpose else (300, 656)
    if mode != "nvfp4":
        k, n = (640, 300) if transpose else (300, 640)
    rows, cols = (n, k) if transpose else (k, n)
    w_q, scales = ref.random_fp_quantized(rng, (rows, cols), mode)
    x = mx.array(rng.standard_normal((m, k)), dtype=mx.float32)
    bias = mx.array(rng.standard_normal(n), dtype=mx.float32)
    out = mlx_ext.quantized_matmul(x, w_q, scales, transpose=transpose, mode=mode, bias=bias)
    assert_matches(out, x, w_q, scales, mode=mode, transpose=transpose, bias=bias)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 32])
@pytest.mark.parametrize("transpose", [True, False])
def test_agrees_with_mlx_on_mx_quantize_weights(mode, dtype, m, transpose):
    """mx.quantize outputs give what mx.quantized_matmul gives, never less
    accurately (MLX may accumulate float16 / bfloat16 in that type)."""
    k, n = 256, 96
    w = mx.random.normal((n, k) if transpose else (k, n), key=mx.random.key(1)).astype(dtype)
    w_q, scales = mx.quantize(w, mode=mode)
    x = mx.random.normal((2, m, k), key=mx.random.key(2)).astype(dtype)
    ours = mlx_ext.quantized_matmul(x, w_q, scales, transpose=transpose, mode=mode)
    theirs = mx.quantized_matmul(x, w_q, scales, transpose=transpose, mode=mode)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = float(mx.abs(theirs.astype(mx.float32)).max())
    exact = ref.quantized_matmul(x, w_q, scales, None, transpose=transpose, mode=mode)
    our_err = np.abs(ref.to_f64(ours) - exact).max()
    their_err = np.abs(ref.to_f64(theirs) - exact).max()
    assert our_err <= their_err * 1.01 + 4 * np.sqrt(k) * ref.EPS[mx.float32] * scale
    diff = float(mx.abs((ours - theirs).astype(mx.float32)).max())
    accumulation_eps = ref.EPS[mx.float32] if dtype == mx.float32 else ref.EPS[dtype]
    assert diff <= (4 * np.sqrt(k) * accumulation_eps + 2 * ref.EPS[dtype]) * scale


@pytest.mark.parametrize("mode", ["affine", *MODES])
@pytest.mark.parametrize("x_batch,w_batch", [((3,), (3,)), ((2, 3), (3,)), ((2, 1), (1, 4)), ((1,), (2,))])
def test_batched_w_agrees_with_mlx(mode, x_batch, w_batch):
    """Batched w (and scales, biases) broadcast against x's batch as in
    mx.quantized_matmul (where x has at least w's dimensions)."""
    w = mx.random.normal(w_batch + (40, 128), key=mx.random.key(3))
    packed = mx.quantize(w, mode=mode)
    x = mx.random.normal(x_batch + (5, 128), key=mx.random.key(4))
    ours = mlx_ext.quantized_matmul(x, *packed, mode=mode)
    theirs = mx.quantized_matmul(x, *packed, mode=mode)
    assert ours.shape == theirs.shape == np.broadcast_shapes(x_batch, w_batch) + (5, 40)
    biases = packed[2] if mode == "affine" else None
    expected, tol = ref.quantized_matmul_with_tolerance(x, packed[0], packed[1], biases, out_dtype=mx.float32,
                                                        mode=mode)
    ref.assert_within_tolerance(ours, expected, tol)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-4, atol=1e-4)


def test_batched_w_with_vector_and_matrix_x():
    """x with fewer dimensions than w: matmul's broadcasting (a 1-D x is one row)."""
    w_q, scales = mx.quantize(mx.random.normal((3, 16, 64), key=mx.random.key(5)), mode="mxfp4")
    for shape in [(64,), (4, 64)]:
        x = mx.random.normal(shape, key=mx.random.key(6))
        out = mlx_ext.quantized_matmul(x, w_q, scales, mode="mxfp4")
        assert out.shape == (3,) + shape[:-1] + (16,)
        assert_matches(out, x, w_q, scales, mode="mxfp4")


@pytest.mark.parametrize("mode", MODES)
def test_defaults_are_the_modes(mode):
    w_q, scales = mx.quantize(mx.random.normal((8, 64), key=mx.random.key(7)), mode=mode)
    x = mx.random.normal((2, 64), key=mx.random.key(8))
    a = mlx_ext.quantized_matmul(x, w_q, scales, mode=mode)
    b = mlx_ext.quantized_matmul(x, w_q, scales, group_size=ref.FP_MODES[mode][0], bits=ref.FP_MODES[mode][1],
                                 mode=mode)
    assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("m", [1, 20])
def test_vjp_wrt_x_and_bias(mode, transpose, m):
    """d/dx sum(c * out) = c W (transpose) or c W^T, d/dbias = sum of c over rows."""
    rng = np.random.default_rng(9)
    k, n = 128, 64
    w_q, scales = ref.random_fp_quantized(rng, (n, k) if transpose else (k, n), mode)
    x = mx.array(rng.standard_normal((2, m, k)), dtype=mx.float32)
    bias = mx.array(rng.standard_normal(n), dtype=mx.float32)
    c = mx.array(rng.standard_normal((2, m, n)), dtype=mx.float32)
    f = lambda x, b: (c * mlx_ext.quantized_matmul(x, w_q, scales, transpose=transpose, mode=mode,  # noqa: E731
                                                   bias=b)).sum()
    dx, db = mx.grad(f, argnums=(0, 1))(x, bias)
    w = ref.dequantize_fp(w_q, scales, mode)
    expected_dx = ref.to_f64(c) @ (w if transpose else w.T)
    magnitude = np.abs(ref.to_f64(c)) @ np.abs(w if transpose else w.T)
    tol = ref.float32_accumulation_tolerance(expected_dx, magnitude, roundings=n + 4, out_dtype=mx.float32)
    ref.assert_within_tolerance(dx, expected_dx, tol, "dx")
    np.testing.assert_allclose(np.array(db), ref.to_f64(c).sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_transforms(mode):
    """mx.compile, vmap over x and the jvp w.r.t. x give the plain call's result."""
    w_q, scales = mx.quantize(mx.random.normal((32, 64), key=mx.random.key(10)), mode=mode)
    x = mx.random.normal((3, 4, 64), key=mx.random.key(11))
    f = lambda x: mlx_ext.quantized_matmul(x, w_q, scales, mode=mode)  # noqa: E731
    plain = f(x)
    np.testing.assert_allclose(np.array(mx.compile(f)(x)), np.array(plain), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(mx.vmap(f, in_axes=1, out_axes=1)(x)), np.array(plain), rtol=1e-6,
                               atol=1e-6)
    _, jvp = mx.jvp(f, [x], [x])
    np.testing.assert_allclose(np.array(jvp[0]), np.array(plain), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("m", [1, 20])
def test_mxfp8_nan_codes_decode_as_nan(isa, transpose, m):
    """E4M3 codes 0x7f / 0xff are NaN, as mx.dequantize decodes them: the
    outputs that read one are NaN, the others are not."""
    k = n = 64
    codes = np.full((n, k) if transpose else (k, n), 0x38, dtype=np.uint8)  # 1.0
    codes[5, 7] = 0xFF
    w_q = mx.array(codes.view(np.uint32))
    scales = mx.array(np.full((codes.shape[0], codes.shape[1] // 32), 127, dtype=np.uint8))
    x = mx.ones((m, k))
    out = np.array(mlx_ext.quantized_matmul(x, w_q, scales, transpose=transpose, mode="mxfp8"))
    nan_column = 5 if transpose else 7
    assert np.isnan(out[:, nan_column]).all()
    assert np.isfinite(np.delete(out, nan_column, axis=1)).all()
