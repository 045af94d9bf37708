"""mlx_ext.quantized_matmul under MLX's transforms: grad/vjp (x, scales, biases, bias),
jvp, vmap, compile, and streams."""

import numpy as np
import pytest

import mlx.core as mx
import mlx_ext

from . import reference as ref


def quantized_layer(n=48, k=128, bits=4, group_size=64, seed=0):
    w = mx.random.normal((n, k), key=mx.random.key(seed))
    return mx.quantize(w, group_size=group_size, bits=bits)


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("m", [1, 20])
def test_grad_wrt_x_and_bias(transpose, m):
    w_q, scales, biases = quantized_layer(n=64, k=128)
    rows, cols = 64, 128
    k, n = (cols, rows) if transpose else (rows, cols)
    x = mx.random.normal((2, m, k), key=mx.random.key(3))
    bias = mx.random.normal((n,), key=mx.random.key(4))
    g = mx.random.normal((2, m, n), key=mx.random.key(5))

    def loss(x, bias):
        y = mlx_ext.quantized_matmul(x, w_q, scales, biases, transpose=transpose, bias=bias)
        return (y * g).sum()

    dx, dbias = mx.grad(loss, argnums=(0, 1))(x, bias)
    w = ref.dequantize(w_q, scales, biases, 64, 4)
    expected_dx = ref.to_f64(g) @ (w if transpose else w.T)
    np.testing.assert_allclose(ref.to_f64(dx), expected_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ref.to_f64(dbias), ref.to_f64(g).sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)
    assert dx.dtype == x.dtype and dbias.dtype == bias.dtype


def test_grad_keeps_dtype_of_half_x():
    w_q, scales, biases = quantized_layer()
    x = mx.random.normal((4, 128), key=mx.random.key(1)).astype(mx.float16)
    dx = mx.grad(lambda x: mlx_ext.quantized_matmul(x, w_q, scales, biases).astype(mx.float32).sum())(x)
    assert dx.dtype == mx.float16
    expected = ref.dequantize(w_q, scales, biases, 64, 4).sum(axis=0)
    np.testing.assert_allclose(ref.to_f64(dx), np.broadcast_to(expected, (4, 128)), rtol=2e-3, atol=2e-3)


def test_grad_wrt_packed_w_is_a_clear_error():
    w_q, scales, biases = quantized_layer()
    x = mx.random.normal((4, 128), key=mx.random.key(1))

    def f(*a):
        return mlx_ext.quantized_matmul(*a).sum()

    with pytest.raises(ValueError, match=r"^\[mlx_ext\.quantized_matmul\] gradients with respect to the packed weights w"):
        mx.grad(f, argnums=1)(x, w_q, scales, biases)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (8, 128)])
def test_grad_wrt_scales_and_biases(bits, group_size, transpose, dtype):
    """d/d scale = sum over the group of dW * q, d/d bias = sum of dW, where dW
    is g^T x (transpose) or x^T g: the gradient MLX defines, for QAT / DWQ."""
    rows, cols = (48, 256) if transpose else (256, 128)
    w_q, scales, biases = quantized_layer(n=rows, k=cols, bits=bits, group_size=group_size)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    k, n = (cols, rows) if transpose else (rows, cols)
    x = mx.random.normal((2, 3, k), key=mx.random.key(3)).astype(dtype)
    g = mx.random.normal((2, 3, n), key=mx.random.key(4))

    def loss(s, b, fn):
        y = fn(x, w_q, s, b, transpose=transpose, group_size=group_size, bits=bits)
        return (y.astype(mx.float32) * g).sum()

    ds, db = mx.grad(loss, argnums=(0, 1))(scales, biases, mlx_ext.quantized_matmul)
    assert ds.dtype == dtype and db.dtype == dtype
    dw = ref.to_f64(g).reshape(-1, n).T @ ref.to_f64(x).reshape(-1, k)  # (n, k)
    dw = (dw if transpose else dw.T).reshape(rows, cols // group_size, group_size)
    q = ref.unpack_bits(w_q, bits).reshape(rows, cols // group_size, group_size)
    want_ds, want_db = (dw * q).sum(-1), dw.sum(-1)
    tol = 2e-3 if dtype == mx.float16 else 1e-4
    if dtype == mx.float32 and mx.default_device() == mx.gpu:
        # dW is an MLX matmul; on CUDA float32 GEMMs round their inputs to TF32
        # (MLX_ENABLE_TF32=1 by default: 2^-11 per operand), CPU bound x ~20.
        tol = 2e-3
    for got, want in [(ds, want_ds), (db, want_db)]:
        scale = np.abs(want).max()
        np.testing.assert_allclose(ref.to_f64(got), want, rtol=tol, atol=tol * scale)
    # The same as MLX's own vjp.
    mds, mdb = mx.grad(loss, argnums=(0, 1))(scales, biases, mx.quantized_matmul)
    np.testing.assert_allclose(ref.to_f64(ds), ref.to_f64(mds), rtol=tol, atol=tol * np.abs(want_ds).max())
    np.testing.assert_allclose(ref.to_f64(db), ref.to_f64(mdb), rtol=tol, atol=tol * np.abs(want_db).max())


def test_group_size_and_bits_default_as_in_mlx():
    """None takes the mode's defaults, and the arguments after biases may be
    positional, as in mx.quantized_matmul's signature."""
    w_q, scales, biases = quantized_layer()  # group size 64, 4 bits: affine's defaults
    x = mx.random.normal((3, 128), key=mx.random.key(1))
    want = mlx_ext.quantized_matmul(x, w_q, scales, biases, transpose=True, group_size=64, bits=4)
    for got in [mlx_ext.quantized_matmul(x, w_q, scales, biases),
                mlx_ext.quantized_matmul(x, w_q, scales, biases, group_size=None, bits=None),
                mlx_ext.quantized_matmul(x, w_q, scales, biases, True, None, None, "affine")]:
        assert mx.array_equal(got, want).item()


def test_jvp_matches_the_linear_map():
    w_q, scales, biases = quantized_layer()
    x = mx.random.normal((3, 128), key=mx.random.key(1))
    bias = mx.zeros((48,))
    tx = mx.random.normal((3, 128), key=mx.random.key(2))
    tb = mx.random.normal((48,), key=mx.random.key(3))
    f = lambda x, b: mlx_ext.quantized_matmul(x, w_q, scales, biases, bias=b)
    (out,), (tangent,) = mx.jvp(f, [x, bias], [tx, tb])
    expected = ref.to_f64(tx) @ ref.dequantize(w_q, scales, biases, 64, 4).T + ref.to_f64(tb)
    np.testing.assert_allclose(ref.to_f64(tangent), expected, rtol=1e-4, atol=1e-4)


def test_vmap_over_x():
    w_q, scales, biases = quantized_layer()
    xs = mx.random.normal((5, 128, 3), key=mx.random.key(1))  # mapped axis last
    f = lambda x: mlx_ext.quantized_matmul(x, w_q, scales, biases)
    out = mx.vmap(f, in_axes=2)(xs)
    assert out.shape == (3, 5, 48)
    expected = np.moveaxis(ref.to_f64(xs), 2, 0) @ ref.dequantize(w_q, scales, biases, 64, 4).T
    np.testing.assert_allclose(ref.to_f64(out), expected, rtol=1e-4, atol=1e-4)


def test_vmap_over_weights_is_a_clear_error():
    w_q, scales, biases = quantized_layer()
    x = mx.random.normal((3, 128), key=mx.random.key(1))
    f = lambda s: mlx_ext.quantized_matmul(x, w_q, s, biases)
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.quantized_matmul\] vmap over w"):
        mx.vmap(f)(mx.stack([scales, scales]))


def test_compile_matches_eager_and_is_reused():
    """A second call with the same shape replays the compiled graph: MLX runs
    the Python function only to trace it, once per input shape."""
    w_q, scales, biases = quantized_layer()
    bias = mx.random.normal((48,), key=mx.random.key(7))

    def layer(x):
        return mx.maximum(mlx_ext.quantized_matmul(x, w_q, scales, biases, bias=bias), 0.0) * 2.0

    traced = []

    def traced_layer(x):
        traced.append(x.shape)
        return layer(x)

    compiled = mx.compile(traced_layer)
    for m in [1, 1, 17]:
        x = mx.random.normal((m, 128), key=mx.random.key(m))
        np.testing.assert_array_equal(np.array(compiled(x)), np.array(layer(x)))
    assert traced == [(1, 128), (17, 128)]


def test_compiled_grad():
    w_q, scales, biases = quantized_layer()
    x = mx.random.normal((4, 128), key=mx.random.key(1))
    f = lambda x: mlx_ext.quantized_matmul(x, w_q, scales, biases).square().sum()
    np.testing.assert_allclose(np.array(mx.compile(mx.grad(f))(x)), np.array(mx.grad(f)(x)), rtol=1e-6)


def test_explicit_cpu_stream():
    w_q, scales, biases = quantized_layer()
    x = mx.random.normal((2, 128), key=mx.random.key(1))
    s = mx.new_stream(mx.cpu)
    out = mlx_ext.quantized_matmul(x, w_q, scales, biases, stream=s)
    np.testing.assert_array_equal(np.array(out), np.array(mlx_ext.quantized_matmul(x, w_q, scales, biases, stream=mx.cpu)))
