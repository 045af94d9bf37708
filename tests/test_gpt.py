"""The GPT loop (mlx_ext.gpt, python -m mlx_ext.generate) against mlx-lm's
models, itself, and the embedded default model."""

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

import mlx_ext
from mlx_ext import gpt
from mlx_ext.gpt.rope import RoPE
from mlx_ext.generate import main as cli_main

mlx_lm = pytest.importorskip("mlx_lm")

LLAMA3 = {
    "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 300,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "max_position_embeddings": 1024,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}
QWEN2_YARN = {
    "model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "vocab_size": 300,
    "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 4096,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
}
QWEN3 = {
    "model_type": "qwen3", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-6,
    "vocab_size": 300, "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 4096,
}
# Held-out verses (every 50th verse is validation text; the model never trained on these).
HELD_OUT = (
    "In the beginning God created the heaven and the earth.\n"
    "And Adam gave names to all cattle, and to the fowl of the air, and to every beast of the field; "
    "but for Adam there was not found an help meet for him.\n"
    "And his brother's name was Jubal: he was the father of all such as handle the harp and organ.\n"
)


def relative_error(got, want) -> float:
    return (mx.abs(got - want).max() / mx.abs(want).max()).item()


@pytest.fixture(scope="module")
def embedded():
    return gpt.load(return_config=True)


@pytest.mark.parametrize(
    "scaling",
    [None, {"type": "linear", "factor": 2.0}, LLAMA3["rope_scaling"], QWEN2_YARN["rope_scaling"]],
    ids=["default", "linear", "llama3", "yarn"],
)
def test_rope_matches_mlx_lm(scaling):
    from mlx_lm.models.rope_utils import initialize_rope

    x = mx.random.normal((1, 4, 7, 64))
    theirs = initialize_rope(64, 10000.0, False, scaling, max_position_embeddings=4096)
    assert relative_error(RoPE(64, 10000.0, scaling)(x, 5), theirs(x, offset=5)) < 1e-5


def save_checkpoint(folder, model, config):
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))


def mlx_lm_logits(model, prompt, continuation):
    """mlx-lm's prefill logits, then one cached decode step per continuation token."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array([prompt]), cache=cache)]
    out += [model(mx.array([[t]]), cache=cache) for t in continuation]
    return mx.concatenate(out, axis=1)


def our_logits(model, prompt, continuation):
    """Our prefill logits, then one compiled decode step per continuation token."""
    cache = model.make_cache()
    out = [model(mx.array([prompt]), cache)]
    assert cache.offset == len(prompt)
    step = gpt.compiled_decode_step(model)
    for t in continuation:
        cache.reserve(1, 1)
        offset = mx.array(cache.offset)
        logits, cache.keys, cache.values = step(mx.array([[t]]), cache.keys, cache.values, offset)
        cache.offset += 1
        out.append(logits[:, None])
    return mx.concatenate(out, axis=1)


@pytest.mark.parametrize("config", [LLAMA3, QWEN2_YARN, QWEN3], ids=["llama3", "qwen2-yarn", "qwen3"])
@pytest.mark.parametrize("stored", ["quantized", "float"])
def test_model_matches_mlx_lm(tmp_path, config, stored):
    """The same checkpoint through mlx-lm (MLX's layers) and through our loader
    (stored quantized, or float and quantized on load): logits of a prefill and
    of decode steps agree."""
    from mlx_lm.utils import _get_classes, quantize_model

    mx.random.seed(3)
    model_class, args_class = _get_classes(config)
    theirs = model_class(args_class.from_dict(config))
    theirs.update(tree_map(lambda p: p.astype(mx.float32), theirs.parameters()))
    if stored == "float":
        save_checkpoint(tmp_path, theirs, config)
        nn.quantize(theirs, 64, 4)
    else:
        theirs, quantized_config = quantize_model(theirs, config, 64, 4)
        save_checkpoint(tmp_path, theirs, quantized_config)
    ours, _ = gpt.load_model(tmp_path)
    assert relative_error(ours(mx.array([[5, 6, 7]])), theirs(mx.array([[5, 6, 7]]))) < 1e-4  # no cache given
    assert all(type(m) is not nn.QuantizedLinear for _, m in ours.named_modules())
    assert type(ours.model.layers[0].mlp.down_proj) is mlx_ext.nn.QuantizedLinear
    prompt, continuation = list(range(3, 40)), [7, 250, 11, 60]
    got = our_logits(ours, prompt, continuation)
    assert relative_error(got, mlx_lm_logits(theirs, prompt, continuation)) < 1e-4


def test_decode_across_cache_blocks_matches_one_prefill(embedded):
    """Compiled decode steps over the cache's block boundary (256) give the
    logits of one prefill of the whole sequence."""
    model, tokenizer, _ = embedded
    text = tokenizer.encode(HELD_OUT * 3)[:262]
    prompt, continuation = text[:250], text[250:]
    stepped = our_logits(model, prompt, continuation)
    whole = our_logits(model, text, [])
    assert relative_error(stepped[:, 249:], whole[:, 249:]) < 1e-4


def test_greedy_generation_is_its_own_argmax(embedded):
    model, tokenizer, _ = embedded
    prompt = tokenizer.encode("And the LORD spake unto Moses, saying,")
    tokens = list(gpt.generate_tokens(model, prompt, max_tokens=30, sampler=gpt.make_sampler()))
    logits = our_logits(model, prompt + tokens[:-1], [])
    assert mx.argmax(logits[0, len(prompt) - 1 :], axis=-1).tolist() == tokens


def test_embedded_model_predicts_held_out_kjv(embedded):
    model, tokenizer, config = embedded
    files = list(gpt.DEFAULT_MODEL.iterdir())
    assert sum(f.stat().st_size for f in files) <= 10_000_000
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    ids = tokenizer.encode(HELD_OUT)
    logits = our_logits(model, ids[:-1], [])[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    loss = -mx.take_along_axis(logprobs, mx.array(ids[1:])[:, None], axis=-1).mean().item()
    assert loss < 1.2  # nats per byte; about 5.5 for a uniform guess


def test_byte_tokenizer_and_streaming(embedded):
    _, tokenizer, _ = embedded
    assert tokenizer.encode("Amen é") == list("Amen é".encode())
    assert tokenizer.eos_token_ids == {256}
    stream = tokenizer.stream()
    pieces = [stream.add(t) for t in "Né!".encode()]
    assert pieces == ["N", "", "é", "!"]  # é is two bytes: held back until complete


def test_sampling_distributions():
    logits = mx.broadcast_to(mx.array([2.0, 1.5, 1.0, 0.0, -1.0]), (20000, 5))
    probs = np.array(mx.softmax(logits[0]))

    def frequencies(sampler, seed=0):
        mx.random.seed(seed)
        return np.bincount(np.array(sampler(logits)), minlength=5) / logits.shape[0]

    assert (np.array(gpt.make_sampler()(logits)) == 0).all()
    assert (frequencies(gpt.make_sampler(1.0, top_k=1)) == [1, 0, 0, 0, 0]).all()
    np.testing.assert_allclose(frequencies(gpt.make_sampler(1.0)), probs, atol=0.015)
    hot = np.exp(np.log(probs) / 2.0)
    np.testing.assert_allclose(frequencies(gpt.make_sampler(2.0)), hot / hot.sum(), atol=0.015)
    top3 = probs * [1, 1, 1, 0, 0]
    np.testing.assert_allclose(frequencies(gpt.make_sampler(1.0, top_k=3)), top3 / top3.sum(), atol=0.015)
    # probs are 0.44, 0.27, 0.16, ...: top_p 0.6 keeps the first two (0.44 < 0.6 <= 0.71)
    top2 = probs * [1, 1, 0, 0, 0]
    np.testing.assert_allclose(frequencies(gpt.make_sampler(1.0, top_p=0.6)), top2 / top2.sum(), atol=0.015)
    assert (frequencies(gpt.make_sampler(1.0), seed=5) == frequencies(gpt.make_sampler(1.0), seed=5)).all()
    with pytest.raises(ValueError):
        gpt.make_sampler(1.0, top_p=0.0)


def test_seeded_sampled_generation_repeats(embedded):
    model, tokenizer, _ = embedded
    sampler = gpt.make_sampler(0.8, top_p=0.95, top_k=40)
    mx.random.seed(11)
    expected_draw = mx.random.uniform().item()
    mx.random.seed(11)
    first = gpt.generate(model, tokenizer, "And", max_tokens=40, sampler=sampler, seed=7)
    assert mx.random.uniform().item() == expected_draw  # the global generator was left alone
    again = gpt.generate(model, tokenizer, "And", max_tokens=40, sampler=sampler, seed=7)
    other = gpt.generate(model, tokenizer, "And", max_tokens=40, sampler=sampler, seed=8)
    assert first.tokens == again.tokens != other.tokens
    stats = first.stats
    assert stats.prompt_tokens == 3 and stats.generated_tokens == 40
    assert stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.peak_memory_bytes > 0


def test_float16_activations(embedded):
    model, tokenizer = gpt.load(dtype=mx.float16)
    assert model.dtype == mx.float16
    result = gpt.generate(model, tokenizer, "And God said", max_tokens=20)
    assert result.stats.generated_tokens == 20 and result.text.strip()


def test_unknown_hub_id_offline_fails_clearly():
    with pytest.raises(gpt.ModelNotFoundError, match="mlx-ext-tests/no-such-model.*could not be downloaded"):
        gpt.resolve_model_path("mlx-ext-tests/no-such-model")


def test_unsupported_architecture_fails_clearly():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        gpt.ModelArgs.from_config({"model_type": "gpt2"})


def test_cli_compare(capsys):
    assert cli_main(["--prompt", "And the LORD said unto", "--max-tokens", "24", "--compare"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"[{gpt.DEFAULT_MODEL}: llama, mlx.core.float32")
    assert "mlx_ext  prompt 22 tokens" in out and "generation 24 tokens" in out
    assert "MLX      prompt 22 tokens" in out
    assert "tokens agree: yes, all 24" in out


def test_cli_chat_needs_a_chat_template(capsys):
    assert cli_main(["--chat", "Hello"]) == 1
    assert "has no chat template" in capsys.readouterr().err


def test_cli_offline_hub_id(capsys):
    assert cli_main(["--model", "mlx-ext-tests/no-such-model"]) == 1
    assert "could not be downloaded" in capsys.readouterr().err


def test_gpt_is_an_attribute_of_mlx_ext():
    """`import mlx_ext; mlx_ext.gpt` works in a fresh interpreter (here the
    test module's own imports would hide a missing import)."""
    import subprocess
    import sys

    code = "import mlx_ext; print(mlx_ext.gpt.load.__name__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "load\n"
