"""Every bad input to mlx_ext.quantized_matmul raises a ValueError or TypeError
that starts with "[mlx_ext.quantized_matmul]" and names the argument, before
any kernel runs."""

import pytest

import mlx.core as mx
import mlx_ext

PREFIX = r"^\[mlx_ext\.quantized_matmul\] "


@pytest.fixture
def layer():
    w = mx.random.normal((32, 128), key=mx.random.key(0))
    w_q, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((3, 128), key=mx.random.key(1))
    return x, w_q, scales, biases


def call(x, w_q, scales, biases, **kwargs):
    out = mlx_ext.quantized_matmul(x, w_q, scales, biases, **kwargs)
    mx.eval(out)
    return out


@pytest.mark.parametrize("bits", [0, 1, 7, 16, -4])
def test_unsupported_bits(layer, bits):
    with pytest.raises(ValueError, match=PREFIX + f"bits={bits} is not supported"):
        call(*layer, bits=bits)


@pytest.mark.parametrize("group_size", [0, 16, 48, 256])
def test_unsupported_group_size(layer, group_size):
    with pytest.raises(ValueError, match=PREFIX + f"group_size={group_size} is not supported"):
        call(*layer, group_size=group_size)


def test_unsupported_mode(layer):
    with pytest.raises(ValueError, match=PREFIX + "mode='fp3' is not supported"):
        call(*layer, mode="fp3")


def test_k_not_a_multiple_of_group_size():
    w_q = mx.zeros((8, 12), dtype=mx.uint32)  # K = 96 at 4 bits
    scales = mx.zeros((8, 1))
    with pytest.raises(ValueError, match=PREFIX + r"K=96 .* is not a multiple of group_size=64"):
        call(mx.zeros((2, 96)), w_q, scales, scales)


def test_n_not_a_multiple_of_group_size_when_not_transposed():
    w_q = mx.zeros((64, 12), dtype=mx.uint32)  # (K=64, N=96) at 4 bits
    scales = mx.zeros((64, 1))
    with pytest.raises(ValueError, match=PREFIX + r"N=96 .* is not a multiple of group_size=64"):
        call(mx.zeros((2, 64)), w_q, scales, scales, transpose=False)


def test_packed_width_not_a_whole_number_of_values():
    w_q = mx.zeros((8, 5), dtype=mx.uint32)  # 160 bits per row: not a multiple of 3
    scales = mx.zeros((8, 1))
    with pytest.raises(ValueError, match=PREFIX + r"w with shape \(8,5\) cannot hold 3-bit values"):
        call(mx.zeros((2, 53)), w_q, scales, scales, bits=3, group_size=32)


@pytest.mark.parametrize("dtype", [mx.int32, mx.float32, mx.uint8])
def test_weights_not_uint32(layer, dtype):
    x, w_q, scales, biases = layer
    with pytest.raises(TypeError, match=PREFIX + "w must be uint32"):
        call(x, w_q.astype(dtype), scales, biases)


def test_weights_1d(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + r"w must have at least 2 dimensions"):
        call(x, w_q[0], scales, biases)


@pytest.mark.parametrize("which", ["scales", "biases"])
def test_batched_weights_scales_without_the_batch(layer, which):
    x, w_q, scales, biases = layer
    args = dict(scales=scales[None], biases=biases[None])
    args[which] = args[which][0]
    with pytest.raises(ValueError, match=PREFIX + which + r" must have the batch dimensions of w"):
        call(x, w_q[None], **args)


def test_batch_dimensions_do_not_broadcast(layer):
    x, w_q, scales, biases = layer
    stack = lambda a: mx.stack([a, a, a])  # noqa: E731
    with pytest.raises(ValueError, match=PREFIX + r"the batch dimensions of x .* do not broadcast"):
        call(mx.stack([x, x]), stack(w_q), stack(scales), stack(biases))


def test_scales_wrong_shape(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + r"scales must have shape \(32,2\), got \(32,1\)"):
        call(x, w_q, scales[:, :1], biases)


def test_biases_wrong_shape(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + r"biases must have shape \(32,2\), got \(31,2\)"):
        call(x, w_q, scales, biases[:31])


def test_scales_wrong_dtype(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(TypeError, match=PREFIX + "scales must be float32, float16 or bfloat16"):
        call(x, w_q, scales.astype(mx.int32), biases)


def test_biases_dtype_differs_from_scales(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(TypeError, match=PREFIX + "biases must have the dtype of scales"):
        call(x, w_q, scales, biases.astype(mx.float16))


def test_biases_missing(layer):
    x, w_q, scales, _ = layer
    with pytest.raises(ValueError, match=PREFIX + "biases are required"):
        call(x, w_q, scales, None)


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.bool_])
def test_non_floating_x(layer, dtype):
    x, w_q, scales, biases = layer
    with pytest.raises(TypeError, match=PREFIX + "x must be float32, float16 or bfloat16"):
        call(x.astype(dtype), w_q, scales, biases)


def test_scalar_x(layer):
    _, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + "x must have at least one dimension"):
        call(mx.array(1.0), w_q, scales, biases)


def test_mismatched_inner_dimension(layer):
    _, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + r"x has inner dimension 127 .* expects 128"):
        call(mx.zeros((3, 127)), w_q, scales, biases)


def test_mismatched_inner_dimension_not_transposed(layer):
    _, w_q, scales, biases = layer
    with pytest.raises(ValueError, match=PREFIX + r"x has inner dimension 128 .* expects 32"):
        call(mx.zeros((3, 128)), w_q, scales, biases, transpose=False)


@pytest.mark.parametrize("shape", [(31,), (33,), (1, 32), ()])
def test_wrong_bias_length(layer, shape):
    with pytest.raises(ValueError, match=PREFIX + r"bias must have shape \(32,\)"):
        call(*layer, bias=mx.zeros(shape))


def test_non_floating_bias(layer):
    with pytest.raises(TypeError, match=PREFIX + "bias must be float32"):
        call(*layer, bias=mx.zeros((32,), dtype=mx.int32))


def test_wrong_python_types_are_type_errors(layer):
    x, w_q, scales, biases = layer
    with pytest.raises(TypeError):
        mlx_ext.quantized_matmul(x.tolist(), w_q, scales, biases)
    with pytest.raises(TypeError):
        mlx_ext.quantized_matmul(x, w_q, scales, biases, bits="4")
