"""Bad arguments for the fp modes (mxfp4, nvfp4, mxfp8) raise ValueError or
TypeError starting with "[mlx_ext.quantized_matmul]", naming the argument,
before any kernel runs."""

import pytest

import mlx.core as mx
import mlx_ext
from tests import reference

PREFIX = r"^\[mlx_ext\.quantized_matmul\] "
MODES = list(reference.FP_MODES)


def fp_layer(mode, n=32, k=128):
    w_q, scales = mx.quantize(mx.random.normal((n, k), key=mx.random.key(0)), mode=mode)
    return mx.random.normal((3, k), key=mx.random.key(1)), w_q, scales


def call(*args, **kwargs):
    out = mlx_ext.quantized_matmul(*args, **kwargs)
    mx.eval(out)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_wrong_group_size(mode):
    x, w_q, scales = fp_layer(mode)
    wrong = 64 if reference.FP_MODES[mode][0] != 64 else 32
    with pytest.raises(ValueError, match=PREFIX + f"group_size={wrong} is not supported for mode='{mode}'"):
        call(x, w_q, scales, group_size=wrong, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_wrong_bits(mode):
    x, w_q, scales = fp_layer(mode)
    wrong = 8 if reference.FP_MODES[mode][1] == 4 else 4
    with pytest.raises(ValueError, match=PREFIX + f"bits={wrong} is not supported for mode='{mode}'"):
        call(x, w_q, scales, bits=wrong, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_biases_given(mode):
    x, w_q, scales = fp_layer(mode)
    with pytest.raises(ValueError, match=PREFIX + f"biases must be None for mode='{mode}'"):
        call(x, w_q, scales, scales, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32, mx.uint32, mx.int8])
def test_scales_not_uint8(mode, dtype):
    x, w_q, scales = fp_layer(mode)
    with pytest.raises(TypeError, match=PREFIX + f"scales must be uint8 for mode='{mode}'"):
        call(x, w_q, scales.astype(dtype), mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_scales_wrong_shape(mode):
    x, w_q, scales = fp_layer(mode)
    with pytest.raises(ValueError, match=PREFIX + r"scales must have shape \(32,\d+\), got"):
        call(x, w_q, scales[:, :1], mode=mode)


def test_k_not_a_multiple_of_the_group():
    w_q = mx.zeros((8, 3), dtype=mx.uint32)  # K = 24 at 4 bits: not a multiple of nvfp4's 16
    with pytest.raises(ValueError, match=PREFIX + r"K=24 .* is not a multiple of group_size=16"):
        call(mx.zeros((2, 24)), w_q, mx.zeros((8, 1), dtype=mx.uint8), mode="nvfp4")


@pytest.mark.parametrize("mode", MODES)
def test_inner_dimension(mode):
    x, w_q, scales = fp_layer(mode)
    with pytest.raises(ValueError, match=PREFIX + "x has inner dimension 64"):
        call(x[:, :64], w_q, scales, mode=mode)


def test_affine_defaults_are_not_fp_defaults():
    """Affine arrays passed with an fp mode fail on the scales' dtype, not in a kernel."""
    w_q, scales, _ = mx.quantize(mx.random.normal((32, 128), key=mx.random.key(0)), group_size=32, bits=4)
    with pytest.raises(TypeError, match=PREFIX + "scales must be uint8 for mode='mxfp4'"):
        call(mx.zeros((1, 128)), w_q, scales, mode="mxfp4")


@pytest.mark.parametrize("mode", MODES)
def test_scales_gradient_is_refused(mode):
    x, w_q, scales = fp_layer(mode)
    f = lambda s: mlx_ext.quantized_matmul(x, w_q, s, mode=mode).sum()  # noqa: E731
    with pytest.raises(ValueError, match=PREFIX + f"gradients with respect to the uint8 scales of mode='{mode}'"):
        mx.eval(mx.grad(f)(scales))


@pytest.mark.parametrize("mode", MODES)
def test_w_gradient_is_refused(mode):
    x, w_q, scales = fp_layer(mode)
    f = lambda w: mlx_ext.quantized_matmul(x, w, scales, mode=mode).sum()  # noqa: E731
    with pytest.raises(ValueError, match=PREFIX + "gradients with respect to the packed weights w"):
        mx.eval(mx.grad(f)(w_q))
