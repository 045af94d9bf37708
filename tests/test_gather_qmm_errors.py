"""Every bad input to mlx_ext.gather_qmm raises a ValueError or TypeError that
starts with "[mlx_ext.gather_qmm]" and names the argument, before any kernel
runs."""

import pytest

import mlx.core as mx
import mlx_ext

PREFIX = r"^\[mlx_ext\.gather_qmm\] "


@pytest.fixture
def layer():
    w = mx.random.normal((4, 32, 128), key=mx.random.key(0))
    w_q, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((3, 1, 128), key=mx.random.key(1))
    return x, w_q, scales, biases


def call(x, w_q, scales, biases, rhs=mx.array([0, 1, 3]), **kwargs):
    out = mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=rhs, **kwargs)
    mx.eval(out)
    return out


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8", "bogus"])
def test_unsupported_mode(layer, mode):
    with pytest.raises(ValueError, match=PREFIX + f"mode='{mode}'"):
        call(*layer, mode=mode)


@pytest.mark.parametrize("bits", [1, 7])
def test_unsupported_bits(layer, bits):
    with pytest.raises(ValueError, match=PREFIX + f"bits={bits}"):
        call(*layer, bits=bits)


def test_unsupported_group_size(layer):
    with pytest.raises(ValueError, match=PREFIX + "group_size=16"):
        call(*layer, group_size=16)


def test_biases_missing(layer):
    x, w_q, scales, _ = layer
    with pytest.raises(ValueError, match=PREFIX + "biases are required"):
        call(x, w_q, scales, None)


def test_weights_not_uint32(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(TypeError, match=PREFIX + "w must be uint32"):
        call(x, w_q.astype(mx.int32), scales, biases)


def test_x_needs_rows(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + "x must have at least two dimensions"):
        call(x.reshape(-1), w_q, scales, biases)


def test_non_floating_x(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(TypeError, match=PREFIX + "x must be float32"):
        call(x.astype(mx.int32), w_q, scales, biases)


def test_mismatched_inner_dimension(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + "x has inner dimension 64"):
        call(x[..., :64], w_q, scales, biases)


def test_scales_wrong_shape(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + r"scales must have shape \(4,32,2\)"):
        call(x, w_q, scales[:3], biases)


def test_biases_wrong_dtype(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(TypeError, match=PREFIX + "biases must have the dtype of scales"):
        call(x, w_q, scales, biases.astype(mx.float16))


def test_non_integer_indices(layer):
    with pytest.raises(TypeError, match=PREFIX + "rhs_indices must have an integer dtype"):
        call(*layer, rhs=mx.array([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("rhs", [[0, 4, 1], [-1, 0, 0]])
def test_known_rhs_out_of_range(layer, rhs):
    with pytest.raises(ValueError, match=PREFIX + r"rhs_indices holds values in .* must lie in \[0, 4\)"):
        call(*layer, rhs=mx.array(rhs))


def test_known_lhs_out_of_range(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + r"lhs_indices holds values in \[0, 3\]"):
        mlx_ext.gather_qmm(x, w_q, scales, biases, mx.array([0, 3]), mx.array([0, 1]))


def test_indices_do_not_broadcast(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + "lhs_indices with shape"):
        mlx_ext.gather_qmm(x, w_q, scales, biases, mx.array([0, 1, 2]), mx.array([0, 1]))


@pytest.mark.parametrize("shape", [(31,), (3, 32), (4, 1, 32)])
def test_wrong_bias_shape(layer, shape):
    with pytest.raises(ValueError, match=PREFIX + "bias must have shape"):
        call(*layer, bias=mx.zeros(shape))


def test_gpu_stream_refused(layer):
    if not mx.is_available(mx.gpu):
        pytest.skip("no GPU device in this MLX build")
    if mlx_ext.gpu_kernels()["gather_qmm"]:
        pytest.skip("this build has GPU kernels for gather_qmm")
    with pytest.raises(ValueError, match=PREFIX + "stream=.* is a GPU stream"):
        call(*layer, stream=mx.gpu)
