"""mlx_ext.patch / unpatch on mlx-lm models.

A representative subset of the acceptance sweep (tests/lm_acceptance.py runs
every config of mlx-lm's test_all_models): a llama, a tied-embedding qwen3,
and two MoE models, quantized 4-bit gs64 with their quant_predicate.
"""

import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx_ext
from mlx_ext.gpt import DEFAULT_MODEL

from .lm_acceptance import RTOL, build_quantized, check_config, prefill_and_decode

pytest.importorskip("mlx_lm")

LLAMA = {
    "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 1000,
    "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64},
}
QWEN3_TIED = {
    "model_type": "qwen3", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-6,
    "vocab_size": 1000, "max_position_embeddings": 1000, "rope_theta": 1e6, "tie_word_embeddings": True,
}
QWEN3_MOE = {
    "model_type": "qwen3_moe", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
    "vocab_size": 1000, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "moe_intermediate_size": 64, "rope_theta": 1000.0,
    "tie_word_embeddings": False, "max_position_embeddings": 1000, "norm_topk_prob": True,
}
MIXTRAL = {
    "model_type": "mixtral", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 1000,
    "num_local_experts": 4, "num_experts_per_tok": 2,
}


@pytest.mark.parametrize(
    "config,replaced,left,fused,attention",
    [
        # 7 projections per layer + lm_head; the embedding
        (LLAMA, {"QuantizedLinear": 15, "QuantizedEmbedding": 1}, {}, {}, {"Attention": 2}),
        (QWEN3_TIED, {"QuantizedLinear": 14, "QuantizedEmbedding": 1}, {}, {}, {"Attention": 2}),
        # 4 attention projections + the router per layer (8-bit by quant_predicate) + lm_head;
        # the experts' gate/up/down (QuantizedSwitchLinear, through gather_qmm), and per
        # layer the experts' gate, up and SwiGLU as one gather_quantized_swiglu
        (QWEN3_MOE, {"QuantizedLinear": 11, "QuantizedEmbedding": 1, "QuantizedSwitchLinear": 6}, {},
         {"SwitchGLU": 2}, {"Attention": 2}),
        (MIXTRAL, {"QuantizedLinear": 11, "QuantizedEmbedding": 1, "QuantizedSwitchLinear": 6}, {},
         {"SwitchGLU": 2}, {"MixtralAttention": 2}),
    ],
    ids=["llama", "qwen3-tied", "qwen3_moe", "mixtral"],
)
@pytest.mark.parametrize("kv_bits", [4, 8])
def test_patched_logits_match(config, replaced, left, fused, attention, kv_bits):
    """Plain cache (patched) and QuantizedKVCache (attention routed), against
    the unpatched model; every attention call went through mlx_ext."""
    result = check_config(config, kv_bits=kv_bits)
    assert result.status == "pass", result.reason
    assert result.prefill_rel < RTOL and result.decode_rel < RTOL
    assert result.quantized_kv_rel < RTOL  # not NaN: the quantized run happened
    assert result.tokens_agree
    calls, of, total = result.attention_calls.split()
    assert int(calls) == int(total) > 0
    expected = "; ".join(
        f"{label}: " + (", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "none")
        for label, counts in (("replaced", replaced), ("left", left), ("fused", fused), ("attention", attention))
        if counts or label != "fused"  # the report lists `fused` only where a model has some
    )
    assert result.patch_report == expected


def test_routing_is_per_model_and_unpatch_restores_mlx_attention():
    from mlx_ext import lm_attention

    patched, stock = build_quantized(LLAMA), build_quantized(LLAMA)
    attention_type = type(patched.model.layers[0].self_attn)
    mlx_ext.patch(patched)
    assert isinstance(patched.model.layers[0].self_attn, attention_type)
    assert type(patched.model.layers[0].self_attn) is not attention_type

    lm_attention.calls.clear()
    prefill_and_decode(stock)  # the same model file, not patched: MLX's attention
    assert lm_attention.calls.total() == 0
    prefill_and_decode(patched)
    assert lm_attention.calls == {"mlx_ext": 4}  # 2 layers, prefill and decode

    report = mlx_ext.unpatch(patched)
    assert report.attention == {"Attention": 2}
    assert type(patched.model.layers[0].self_attn) is attention_type
    lm_attention.calls.clear()
    prefill_and_decode(patched)
    assert lm_attention.calls.total() == 0


@pytest.mark.parametrize("rows, head_dim, on_cuda, ours", [
    (1, 128, True, True),  # CUDA decode: measured faster than mx.fast
    (1, 128, False, False),  # Metal decode: not timed, MLX's fused kernel
    (7, 128, True, False),  # prefill at D <= 128: cuDNN / Metal are faster or untimed
    (7, 128, False, False),
    (7, 192, True, True),  # prefill above 128: MLX runs unfused attention
    (7, 256, False, True),
])
def test_gpu_routing_of_a_plain_cache(rows, head_dim, on_cuda, ours):
    from mlx_ext import lm_attention

    assert lm_attention._ours_on_gpu((1, 8, rows, head_dim), on_cuda) is ours


def test_patch_shares_arrays_keeps_attributes_and_unpatch_restores():
    model = build_quantized(QWEN3_MOE)
    want_prefill, want_decode = prefill_and_decode(model)
    router = model.model.layers[0].mlp.gate
    assert type(router) is nn.QuantizedLinear and router.bits == 8

    report = mlx_ext.patch(model)
    patched = model.model.layers[0].mlp.gate
    assert type(patched) is mlx_ext.nn.QuantizedLinear
    assert patched["weight"] is router["weight"] and patched["scales"] is router["scales"]
    assert (patched.group_size, patched.bits, patched.mode) == (64, 8, "affine")
    assert patched.trainable_parameters() == {}
    assert mlx_ext.patch(model).replaced == {}  # nothing left to patch

    back = mlx_ext.unpatch(model)
    assert back.replaced == report.replaced
    restored = model.model.layers[0].mlp.gate
    assert type(restored) is nn.QuantizedLinear and restored["weight"] is router["weight"]
    prefill, decode = prefill_and_decode(model)
    assert mx.array_equal(prefill, want_prefill) and mx.array_equal(decode, want_decode)


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
@pytest.mark.parametrize("config", [LLAMA, QWEN3_MOE], ids=["llama", "qwen3_moe"])
def test_fp_mode_models_are_patched(config, mode):
    """A model quantized in an fp mode (as mlx_lm.convert --q-mode writes it):
    its fp-mode layers are replaced too (the MoE router stays 8-bit affine, by
    quant_predicate), and the logits agree."""
    result = check_config(config, mode)
    assert result.status == "pass", result.reason
    assert result.tokens_agree
    assert "QuantizedLinear(mode=" not in result.patch_report
    assert "QuantizedEmbedding(mode=" not in result.patch_report


def test_subclasses_are_left_alone():
    class Fused(nn.QuantizedLinear):
        pass

    model = nn.Sequential(
        nn.QuantizedLinear(64, 64, bias=False),
        Fused(64, 64, bias=False),
        nn.QuantizedLinear(64, 64, bias=False, mode="mxfp4"),
        nn.Linear(64, 64),
    )
    report = mlx_ext.patch(model)
    assert report.replaced == {"QuantizedLinear": 2}
    assert report.left == {"Fused": 1}
    expected = [mlx_ext.nn.QuantizedLinear, Fused, mlx_ext.nn.QuantizedLinear, nn.Linear]
    assert [type(m) for m in model.layers] == expected


def test_mlx_lm_generate_on_patched_embedded_model():
    from mlx_lm import generate, load

    model, tokenizer = load(str(DEFAULT_MODEL))
    prompt = "In the beginning God created"
    stock = generate(model, tokenizer, prompt, max_tokens=40)
    report = mlx_ext.patch(model)
    assert report.replaced == {"QuantizedLinear": 42, "QuantizedEmbedding": 1} and report.left == {}
    patched = generate(model, tokenizer, prompt, max_tokens=40)
    assert patched == stock
    assert len(patched) >= 30 and " unto " in patched  # readable KJV English


def test_generate_with_a_4bit_kv_cache_peaks_lower_when_patched():
    """mlx-lm's quantized attention materialises the float32 scores of
    (heads, prompt chunk, keys); mlx_ext's reads the packed cache in tiles."""
    from mlx_lm import generate, load

    model, tokenizer = load(str(DEFAULT_MODEL))
    prompt = "In the beginning God created the heaven and the earth. " * 75  # ~4K byte tokens

    def peak() -> int:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        generate(model, tokenizer, prompt, max_tokens=2, kv_bits=4, kv_group_size=32,
                 quantized_kv_start=0, prefill_step_size=4096)
        return mx.get_peak_memory() - base

    stock = peak()
    report = mlx_ext.patch(model)
    assert sum(report.attention.values()) > 0
    patched = peak()
    print(f"peak above the model: stock {stock / 2**20:.1f} MiB, patched {patched / 2**20:.1f} MiB")
    assert patched < stock / 2
