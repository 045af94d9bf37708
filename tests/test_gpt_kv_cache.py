"""The GPT loop's key/value cache: attention through mlx_ext's fused op
(causal prefill, decode by valid lengths), and the quantized cache
(--kv-bits / --kv-group-size, mlx-lm's QuantizedKVCache layout)."""

import pytest

import mlx.core as mx

from mlx_ext import gpt
from mlx_ext.generate import main as cli_main
from mlx_ext.gpt.cache import KVCache

from .test_gpt import HELD_OUT, our_logits, relative_error


@pytest.fixture(scope="module")
def embedded():
    return gpt.load()


class DequantizedCache(KVCache):
    """A float cache holding what a quantized cache holds, dequantized: the
    quantized cache's logits must equal this one's up to float32 rounding
    (attention then differs only in reading codes instead of floats)."""

    def __init__(self, model, bits, group_size):
        args = model.args
        super().__init__(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, mx.float32)
        self.kv_bits, self.kv_group_size = bits, group_size

    def _quantize(self, x):
        q = mx.quantize(x, self.kv_group_size, self.kv_bits)
        return mx.dequantize(*q, self.kv_group_size, self.kv_bits)


def stepped_logits(model, cache, prompt, continuation):
    """Prefill of `prompt`, then one call per continuation token, outside compiled code."""
    out = [model(mx.array([prompt]), cache)]
    out += [model(mx.array([[t]]), cache) for t in continuation]
    return mx.concatenate(out, axis=1)


def sequence(tokenizer):
    """250 prompt tokens and 12 more: the decode steps cross the cache's 256 block."""
    text = tokenizer.encode(HELD_OUT * 3)[:262]
    return text[:250], text[250:]


@pytest.fixture(scope="module")
def one_layer():
    """The embedded model cut to its first layer: there the keys and values
    written to the cache do not depend on attention, so the quantized cache
    and the dequantized one hold exactly the same values (deeper, a 1e-6
    rounding difference in attention flips a quantization step of the next
    layer's keys)."""
    model, tokenizer = gpt.load()
    model.model.layers = model.model.layers[:1]
    model.args.num_hidden_layers = 1
    return model, tokenizer


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 64), (4, 32), (8, 32)])
def test_quantized_cache_reads_the_codes(one_layer, bits, group_size):
    """Prefill and compiled decode steps over a quantized cache give the logits
    of a float cache holding the dequantized keys and values."""
    model, tokenizer = one_layer
    prompt, continuation = sequence(tokenizer)
    model.kv_bits, model.kv_group_size = bits, group_size
    try:
        got = our_logits(model, prompt, continuation)
    finally:
        model.kv_bits, model.kv_group_size = None, 64
    want = stepped_logits(model, DequantizedCache(model, bits, group_size), prompt, continuation)
    assert relative_error(got, want) < 1e-4


# Measured on the embedded model (prompt 250 + 12 decode steps, group size
# 64): the largest logit error relative to the largest logit is 5e-3 with
# 8 bits and 0.17 with 4 bits (0.06 at group size 32), the greedy choice agrees
# at 99.6% and 94.7% of the 262 positions. The bounds leave about 2x room.
@pytest.mark.parametrize("bits,bound,agree", [(8, 1.5e-2, 0.98), (4, 0.35, 0.9)])
def test_quantized_cache_close_to_float(embedded, bits, bound, agree):
    model, tokenizer = embedded
    prompt, continuation = sequence(tokenizer)
    want = our_logits(model, prompt, continuation)
    model.kv_bits = bits
    try:
        got = our_logits(model, prompt, continuation)
    finally:
        model.kv_bits = None
    assert relative_error(got, want) < bound
    assert (got[0].argmax(-1) == want[0].argmax(-1)).mean().item() >= agree


def test_greedy_tokens_of_an_8_bit_cache_match_the_float_cache(embedded):
    model, tokenizer = embedded
    prompt = tokenizer.encode("And the LORD spake unto Moses, saying,")
    float_run = gpt.generate(model, tokenizer, prompt, max_tokens=40)
    quantized = gpt.generate(model, tokenizer, prompt, max_tokens=40, kv_bits=8, kv_group_size=32)
    assert quantized.tokens == float_run.tokens


def test_decode_step_traces_once_per_cache_block(embedded):
    """The compiled step reads the whole buffer with kv_lengths (no mask that
    grows with the offset): it is traced again only when the buffer grows."""
    model, tokenizer = embedded
    traces = []

    class Counting:
        def __call__(self, tokens, cache):
            traces.append(cache.capacity)
            return model(tokens, cache)

        def make_cache(self, *args):
            return model.make_cache(*args)

    for bits in (None, 4):
        traces.clear()
        cache = model.make_cache(kv_bits=bits)
        model(mx.array([tokenizer.encode(HELD_OUT)[:250]]), cache)
        step = gpt.compiled_decode_step(Counting(), cache)
        token = mx.array([[5]])
        for _ in range(10):  # positions 250..259: the buffer grows from 256 to 512 once
            cache.reserve(1, 1)
            logits, cache.keys, cache.values = step(token, cache.keys, cache.values, mx.array(cache.offset))
            cache.offset += 1
            mx.eval(logits)
        assert traces == [256, 512]


def test_load_kv_bits(embedded):
    model, tokenizer = gpt.load(kv_bits=4, kv_group_size=32)
    cache = model.make_cache()
    assert (cache.bits, cache.group_size) == (4, 32)
    result = gpt.generate(model, tokenizer, "And God said", max_tokens=8)
    assert result.stats.generated_tokens == 8
    assert isinstance(cache.keys, list)
    model(mx.array([[1, 2, 3]]), cache)
    w_q, scales, biases = cache.keys[0]
    assert w_q.dtype == mx.uint32 and w_q.shape == (1, 2, 256, 64 * 4 // 32)
    assert scales.shape == biases.shape == (1, 2, 256, 2)


@pytest.mark.parametrize("kwargs,message", [
    ({"kv_bits": 3}, "kv_bits must be one of"),
    ({"kv_bits": 4, "kv_group_size": 128}, "kv group_size 128 does not divide the head dim 64"),
])
def test_bad_kv_quantization_fails_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gpt.load(**kwargs)


@pytest.mark.parametrize("argv", [["--kv-bits", "3"], ["--kv-bits", "four"], ["--kv-group-size", "48"]])
def test_cli_bad_kv_arguments_are_argparse_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_cli_kv_bits(capsys):
    assert cli_main(["--prompt", "And the LORD said unto", "--max-tokens", "8", "--kv-bits", "8"]) == 0
    assert "generation 8 tokens" in capsys.readouterr().out


def test_cli_kv_group_size_not_dividing_the_head_dim(capsys):
    assert cli_main(["--max-tokens", "4", "--kv-bits", "4", "--kv-group-size", "128"]) == 1
    assert "does not divide the head dim" in capsys.readouterr().err
