"""The GPT loop's decode-speed structure: fused projections (gpt/fuse.py) and
RoPE tables computed once per forward pass (gpt/rope.py). Each must leave the
logits as they were; against float64 they are checked by test_gpt_gguf.py and,
through mlx-lm, by test_gpt.py (both run the fused model)."""

import pytest

import mlx.core as mx

import mlx_ext
from mlx_ext import gpt
from mlx_ext.nn import MLXQuantizedSwiGLU, QuantizedLinear, QuantizedSwiGLU

from .test_gpt import HELD_OUT, our_logits, relative_error


@pytest.fixture(scope="module")
def both():
    fused, tokenizer = gpt.load()
    plain, _ = gpt.load(fuse=False)
    return fused, plain, tokenizer


def test_fused_layers(both):
    fused, plain, _ = both
    layer, ref = fused.model.layers[0], plain.model.layers[0]
    assert type(layer.self_attn.qkv_proj) is QuantizedLinear and "q_proj" not in layer.self_attn
    assert type(layer.mlp.gate_up_proj) is QuantizedSwiGLU and "up_proj" not in layer.mlp
    assert "q_proj" in ref.self_attn and "gate_up_proj" not in ref.mlp
    rows = sum(ref.self_attn[n].weight.shape[0] for n in ("q_proj", "k_proj", "v_proj"))
    assert layer.self_attn.qkv_proj.weight.shape[0] == rows


def test_fused_logits_equal_unfused(both):
    """Stacked rows are computed as they were: prefill and decode logits agree
    to float32 rounding."""
    fused, plain, tokenizer = both
    text = tokenizer.encode(HELD_OUT)[:40]
    prompt, continuation = text[:36], text[36:]
    assert relative_error(our_logits(fused, prompt, continuation), our_logits(plain, prompt, continuation)) < 1e-5


def test_unpatch_and_patch_the_fused_swiglu(both):
    fused, _, tokenizer = both
    tokens = mx.array([tokenizer.encode("And God said")])
    want = fused(tokens)
    mlx_ext.unpatch(fused)
    try:
        assert type(fused.model.layers[0].mlp.gate_up_proj) is MLXQuantizedSwiGLU
        assert relative_error(fused(tokens), want) < 1e-4
    finally:
        report = mlx_ext.patch(fused)
    assert type(fused.model.layers[0].mlp.gate_up_proj) is QuantizedSwiGLU
    assert report.replaced["MLXQuantizedSwiGLU"] == len(fused.model.layers) and not report.left


@pytest.mark.parametrize("offset,length", [(0, 5), (300, 1), (7, 3)])
def test_rope_tables_match_mx_fast_rope(offset, length):
    rope = gpt.rope.RoPE(64, 10000.0, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    x = mx.random.normal((2, 3, length, 64))
    want = mx.fast.rope(x * rope.mscale, 64, traditional=False, base=None, scale=1.0, offset=offset,
                        freqs=rope.freqs)
    assert relative_error(rope.apply(x, rope.tables(mx.array(offset), length)), want) < 1e-5
