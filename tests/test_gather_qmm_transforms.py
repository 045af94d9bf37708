"""mlx_ext.gather_qmm under MLX's transforms: grad (x, bias) against the
float64 reference and mx.gather_qmm's own gradient, jvp, compile, streams."""

import numpy as np
import pytest

import mlx.core as mx
import mlx_ext

from . import reference as ref


def experts(e=4, n=48, k=128, seed=0):
    w = mx.random.normal((e, n, k), key=mx.random.key(seed))
    return mx.quantize(w, group_size=64, bits=4)


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("tokens", [1, 20])
def test_grad_wrt_x_and_bias(transpose, tokens):
    """dx[l] sums g[p] W[rhs[p]] over the pairs reading x[l] (repeated
    experts and repeated rows included); dbias[e] sums g over e's pairs."""
    w_q, scales, biases = experts(n=64, k=128)
    k, n = (128, 64) if transpose else (64, 128)
    rng = np.random.default_rng(tokens)
    rhs = rng.integers(0, 3, (tokens, 2))  # expert 3 gets no rows
    x = mx.random.normal((tokens, 1, 1, k), key=mx.random.key(3))
    bias = mx.random.normal((4, n), key=mx.random.key(4))
    g = mx.random.normal((tokens, 2, 1, n), key=mx.random.key(5))

    def loss(x, bias):
        y = mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=mx.array(rhs), transpose=transpose, bias=bias)
        return (y * g).sum()

    dx, dbias = mx.grad(loss, argnums=(0, 1))(x, bias)
    w = np.stack([ref.dequantize(w_q[e], scales[e], biases[e], 64, 4) for e in range(4)])
    g64 = ref.to_f64(g)[:, :, 0]
    expected_dx = np.zeros((tokens, k))
    expected_db = np.zeros((4, n))
    for t in range(tokens):
        for j in range(2):
            e = rhs[t, j]
            expected_dx[t] += g64[t, j] @ (w[e] if transpose else w[e].T)
            expected_db[e] += g64[t, j]
    np.testing.assert_allclose(ref.to_f64(dx)[:, 0, 0], expected_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ref.to_f64(dbias), expected_db, rtol=1e-5, atol=1e-5)

    def mlx_loss(x):
        return (mx.gather_qmm(x, w_q, scales, biases, rhs_indices=mx.array(rhs), transpose=transpose) * g).sum()

    np.testing.assert_allclose(ref.to_f64(dx), ref.to_f64(mx.grad(mlx_loss)(x)), rtol=1e-4, atol=1e-4)


def test_grad_matches_finite_differences():
    """Central differences in float64 of the reference along a random direction."""
    w_q, scales, biases = experts(e=3, n=32, k=64)
    lhs = np.array([0, 1, 1, 2, 0])
    rhs = np.array([2, 2, 0, 1, 2])
    x = mx.random.normal((3, 2, 64), key=mx.random.key(7))
    g = np.random.default_rng(0).standard_normal((5, 2, 32))

    def f64(x_np):
        y, _ = ref.gather_qmm_with_tolerance(x_np, w_q, scales, biases, lhs, rhs, out_dtype=mx.float32)
        return float((y * g).sum())

    dx = mx.grad(lambda x: (mlx_ext.gather_qmm(x, w_q, scales, biases, mx.array(lhs), mx.array(rhs))
                            * mx.array(g, dtype=mx.float32)).sum())(x)
    v = np.random.default_rng(1).standard_normal(x.shape)
    h = 1e-3
    x64 = ref.to_f64(x)
    fd = (f64(x64 + h * v) - f64(x64 - h * v)) / (2 * h)
    assert abs(float((ref.to_f64(dx) * v).sum()) - fd) <= 1e-4 * max(1.0, abs(fd))


def test_grad_wrt_weights_is_a_clear_error():
    w_q, scales, biases = experts()
    x = mx.random.normal((2, 1, 128), key=mx.random.key(1))
    rhs = mx.array([1, 3])
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.gather_qmm\] gradients with respect to the quantized"):
        mx.grad(lambda s: mlx_ext.gather_qmm(x, w_q, s, biases, rhs_indices=rhs).sum())(scales)


def test_jvp_matches_the_linear_map():
    w_q, scales, biases = experts()
    x = mx.random.normal((3, 2, 128), key=mx.random.key(1))
    t = mx.random.normal((3, 2, 128), key=mx.random.key(2))
    rhs = mx.array([[3, 0], [0, 0], [1, 3]])
    lhs = mx.array([[0], [1], [2]])

    def f(x):
        return mlx_ext.gather_qmm(x, w_q, scales, biases, lhs, rhs)

    _, (tangent,) = mx.jvp(f, [x], [t])
    np.testing.assert_allclose(np.array(tangent), np.array(f(t)), rtol=1e-5, atol=1e-5)


def test_compile_matches_eager_and_is_reused():
    """Under mx.compile the indices are placeholders: nothing is read at graph
    build time, and a second call with new routing reuses the graph."""
    w_q, scales, biases = experts()
    x = mx.random.normal((5, 1, 1, 128), key=mx.random.key(1))
    calls = []

    def f(x, rhs):
        calls.append(1)
        return mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=rhs)

    compiled = mx.compile(f)
    for seed in (1, 2):
        rhs = mx.random.randint(0, 4, (5, 2), key=mx.random.key(seed))
        np.testing.assert_array_equal(np.array(compiled(x, rhs)), np.array(f(x, rhs)))
    assert len(calls) == 3  # one trace, two eager calls


def test_compiled_grad():
    w_q, scales, biases = experts()
    x = mx.random.normal((5, 1, 128), key=mx.random.key(1))
    rhs = mx.array([0, 1, 1, 3, 2])
    grad = mx.grad(lambda x: mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=rhs).sum())
    np.testing.assert_allclose(np.array(mx.compile(grad)(x)), np.array(grad(x)), rtol=1e-6, atol=1e-6)


def test_explicit_cpu_stream():
    w_q, scales, biases = experts()
    x = mx.random.normal((2, 1, 128), key=mx.random.key(1))
    out = mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=mx.array([1, 2]), stream=mx.cpu)
    ref_out = mx.gather_qmm(x, w_q, scales, biases, rhs_indices=mx.array([1, 2]), stream=mx.cpu)
    np.testing.assert_allclose(np.array(out), np.array(ref_out), rtol=1e-4, atol=1e-4)
