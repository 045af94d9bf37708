"""mlx_ext.nn layers: MLX's parameters and attributes, mlx_ext's matmul, the
float64 reference's numbers."""

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
import mlx_ext

from . import reference as ref


def assert_close_to_reference(out, x, layer, bias=None):
    w_q, scales, biases = layer["weight"], layer["scales"], layer["biases"]
    kw = dict(group_size=layer.group_size, bits=layer.bits)
    expected, tol = ref.quantized_matmul_with_tolerance(
        x, w_q, scales, biases, out_dtype=out.dtype, bias=bias, **kw
    )
    ref.assert_within_tolerance(out, expected, tol)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (3, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_matches_reference(dtype, bits, group_size, bias):
    mx.random.seed(bits + group_size)
    linear = nn.Linear(256, 96, bias=bias)
    if bias:
        linear.bias = mx.random.normal((96,))
    linear.update(tree_map(lambda p: p.astype(dtype), linear.parameters()))
    layer = mlx_ext.nn.QuantizedLinear.from_linear(linear, group_size, bits)
    x = mx.random.normal((3, 5, 256)).astype(dtype)
    out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == dtype
    assert_close_to_reference(out, x, layer, bias=layer.get("bias"))
    stock = nn.QuantizedLinear.from_linear(linear, group_size, bits)(x)
    tol = 1e-2 if dtype == mx.float16 else 1e-4
    np.testing.assert_allclose(
        np.array(out.astype(mx.float32)), np.array(stock.astype(mx.float32)), rtol=tol, atol=tol
    )


def test_quantized_linear_has_mlx_parameters_and_attributes():
    linear = nn.Linear(128, 64, bias=True)
    ours = mlx_ext.nn.QuantizedLinear.from_linear(linear, 32, 8)
    theirs = nn.QuantizedLinear.from_linear(linear, 32, 8)
    assert isinstance(ours, nn.QuantizedLinear)
    assert sorted(ours.keys()) == sorted(theirs.keys()) == ["bias", "biases", "scales", "weight"]
    for key in ours:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype
    assert (ours.group_size, ours.bits, ours.mode) == (32, 8, "affine")
    assert ours.trainable_parameters().keys() == theirs.trainable_parameters().keys()


def test_quantized_embedding_lookup_and_tied_head():
    mx.random.seed(1)
    embedding = nn.Embedding(300, 128)
    ours = mlx_ext.nn.QuantizedEmbedding.from_embedding(embedding, 64, 4)
    theirs = nn.QuantizedEmbedding.from_embedding(embedding, 64, 4)
    assert isinstance(ours, nn.QuantizedEmbedding)
    tokens = mx.array([[0, 299, 17], [5, 5, 1]])
    assert mx.array_equal(ours(tokens), theirs(tokens))
    h = mx.random.normal((2, 3, 128))
    logits = ours.as_linear(h)
    assert logits.shape == (2, 3, 300)
    assert_close_to_reference(logits, h, ours)


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_fp_mode_layers_compute_as_mlx(mode):
    """The fp modes' layers (issue 15) give MLX's layer's outputs."""
    theirs = nn.QuantizedLinear(64, 32, bias=True, mode=mode)
    ours = mlx_ext.nn.QuantizedLinear(64, 32, bias=True, mode=mode)
    ours.update(theirs.parameters())
    x = mx.random.normal((3, 64), key=mx.random.key(0))
    assert mx.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
