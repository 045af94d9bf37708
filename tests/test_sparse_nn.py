"""mlx_ext.nn.SparseLinear and mlx_ext.sparsify."""

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx_ext
from mlx_ext import sparse
from mlx_ext.gpt import Model, ModelArgs
from mlx_ext.nn import SparseLinear

from . import reference as ref


@pytest.mark.parametrize("kwargs, kind", [
    (dict(density=0.5), "Bitmask"),
    (dict(density=0.1), "CSR"),
    (dict(density=0.5, format="bsr", block=16), "BSR"),
    (dict(pattern="2:4"), "NM"),
    (dict(pattern="4:8", method="wanda", activation_norms=np.arange(1, 129)), "NM"),
])
def test_from_linear_matches_pruned_dense(kwargs, kind):
    mx.random.seed(0)
    layer = nn.Linear(128, 32, bias=True)
    sl = SparseLinear.from_linear(layer, **kwargs)
    assert type(sl.weight).__name__ == kind
    x = mx.random.normal((5, 128))
    dense = ref.sparse_to_dense(sl.weight)
    expected = ref.to_f64(x) @ dense.T + ref.to_f64(layer.bias)
    np.testing.assert_allclose(ref.to_f64(sl(x)), expected, rtol=1e-5, atol=1e-5)
    if kind != "BSR":  # the kept entries are the layer's own weights
        stored = dense != 0
        np.testing.assert_array_equal(dense[stored], ref.to_f64(layer.weight)[stored])


def test_from_quantized_linear_keeps_bits():
    mx.random.seed(1)
    q = nn.QuantizedLinear(256, 16, bias=False, group_size=64, bits=4)
    sl = SparseLinear.from_linear(q, pattern="2:4")
    assert sl.weight.layout["bits"] == 4 and sl.weight.layout["group_size"] == 64
    w = mx.dequantize(q.weight, q.scales, q.biases, 64, 4)
    kept = np.where(sparse.prune(w, pattern="2:4"), ref.to_f64(w), 0.0)
    x = mx.random.normal((3, 256))
    # Requantizing the kept values costs at most half a step of the new groups.
    err = np.abs(ref.to_f64(sl(x)) - ref.to_f64(x) @ kept.T)
    assert np.all(err <= 0.1 * (np.abs(ref.to_f64(x)).sum(axis=1, keepdims=True) + 1))


def tiny_gpt():
    args = ModelArgs(model_type="llama", vocab_size=64, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
                     head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                     tie_word_embeddings=False)
    mx.random.seed(2)
    return Model(args)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparsify_gpt_two_of_four(method):
    model = tiny_gpt()
    tokens = mx.array(np.random.default_rng(0).integers(0, 64, (2, 12)))
    report = mlx_ext.sparsify(model, pattern="2:4", method=method, calibration=tokens)
    # 4 attention + 3 MLP projections per layer; lm_head left dense.
    assert report.replaced == {"Linear": 14} and report.left == {"Linear": 1}
    assert report.bytes_after < report.bytes_before
    assert "replaced: 14 Linear" in str(report)
    for _, layer in model.named_modules():
        if isinstance(layer, SparseLinear):
            dense = ref.sparse_to_dense(layer.weight)
            assert np.all((dense.reshape(dense.shape[0], -1, 4) != 0).sum(axis=-1) <= 2)
    cache = model.make_cache()
    cache.reserve(*tokens.shape)
    logits = model(tokens, cache)
    assert logits.shape == (2, 12, 64) and np.all(np.isfinite(np.array(logits)))


def test_sparsify_wanda_uses_the_calibration_norms():
    """A calibration batch that only excites some input columns makes Wanda
    keep those columns' weights, unlike magnitude pruning."""
    layer = nn.Linear(8, 4, bias=False)
    layer.weight = mx.array(np.tile([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0], (4, 1)), dtype=mx.float32)
    model = nn.Sequential(layer)
    x = mx.array(np.tile([10.0, 10.0, 0.01, 0.01, 10.0, 10.0, 0.01, 0.01], (3, 1)), dtype=mx.float32)
    mlx_ext.sparsify(model, pattern="2:4", method="wanda", calibration=lambda m: m(x), skip=())
    kept = ref.sparse_to_dense(model.layers[0].weight) != 0
    np.testing.assert_array_equal(kept[0], [True, True, False, False] * 2)


def test_sparsify_needs_calibration_for_wanda():
    with pytest.raises(ValueError, match=r"^\[mlx_ext\.sparsify\] method='wanda' needs"):
        mlx_ext.sparsify(tiny_gpt(), pattern="2:4", method="wanda")
