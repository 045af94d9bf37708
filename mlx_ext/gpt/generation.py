"""The generation loop: chunked prefill, then one compiled decode step per
token, each queued (``mx.async_eval``) before the previous token is read, so
graph building and sampling overlap the computation."""

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx

from .cache import KVCache
from .model import Model
from .sampling import Sampler, make_sampler
from .tokenizer import Tokenizer

PREFILL_CHUNK = 512


def compiled_decode_step(model: Model, cache: KVCache | None = None) -> Callable:
    """(token (B, 1), keys, values, offset array) -> (logits (B, vocab), keys, values),
    for caches quantized like `cache` (None: like model.make_cache()'s).
    The weights are constants of the trace: build a new step after changing layers."""
    like = cache if cache is not None else model.make_cache()
    bits, group_size = like.bits, like.group_size

    def step(token, keys, values, offset):
        cache = KVCache.decoding(keys, values, offset, bits=bits, group_size=group_size)
        logits = model(token, cache)[:, -1]
        return logits, cache.keys, cache.values

    return mx.compile(step)


def generate_tokens(
    model: Model,
    prompt: list[int],
    *,
    max_tokens: int,
    sampler: Sampler,
    cache: KVCache | None = None,
    key: mx.array | None = None,
    kv_bits: int | None = None,
    kv_group_size: int | None = None,
) -> Iterator[int]:
    """Yields up to max_tokens token ids that follow `prompt` (batch of one)
    and what `cache` already holds (None: nothing). Every yielded token but the
    last is in the cache when it is yielded. `key` (mx.random.key) makes the
    draws of a random sampler its own, leaving MLX's global generator alone.
    `kv_bits` / `kv_group_size`: a new cache's quantization (Model.make_cache)."""
    if not prompt or max_tokens < 1:
        raise ValueError("[mlx_ext.gpt] need a non-empty prompt and max_tokens >= 1")
    cache = cache if cache is not None else model.make_cache(kv_bits, kv_group_size)

    def sample(logits):
        nonlocal key
        if key is None:
            return sampler(logits)
        key, draw = mx.random.split(key)
        return sampler(logits, key=draw)

    tokens = mx.array(prompt, mx.int32)[None]
    for start in range(0, len(prompt), PREFILL_CHUNK):
        logits = model(tokens[:, start : start + PREFILL_CHUNK], cache)
        if start + PREFILL_CHUNK < len(prompt):
            mx.eval(cache.keys, cache.values)
    token = sample(logits[:, -1])
    mx.async_eval(token)
    step = compiled_decode_step(model, cache)
    for _ in range(max_tokens - 1):
        cache.reserve(1, 1)
        offset = mx.array(cache.offset, mx.int32)
        logits, cache.keys, cache.values = step(token[:, None], cache.keys, cache.values, offset)
        cache.offset += 1
        next_token = sample(logits)
        mx.async_eval(next_token)
        yield token.item()
        token = next_token
    yield token.item()


@dataclass
class GenerationStats:
    prompt_tokens: int
    prompt_seconds: float  # from the start until the first new token is known
    generated_tokens: int
    generation_seconds: float  # from the first new token until the last
    peak_memory_bytes: int

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds

    @property
    def generation_tps(self) -> float:
        """Tokens after the first, per second: the decode rate."""
        if self.generated_tokens < 2:
            return math.nan
        return (self.generated_tokens - 1) / self.generation_seconds


@dataclass
class Generation:
    tokens: list[int]  # without the end-of-sequence token
    text: str
    stats: GenerationStats
    end_token: int | None = None  # the end-of-sequence token that stopped it (None: max_tokens did)


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    cache: KVCache | None = None,
    kv_bits: int | None = None,
    kv_group_size: int | None = None,
) -> Generation:
    """Generates until an end-of-sequence token or max_tokens; `on_text`
    receives the text as it is produced. `prompt` is text or token ids; it
    follows what `cache` holds (None: a new cache, quantized with `kv_bits`
    (4 or 8) in groups of `kv_group_size` along head_dim as mlx-lm's
    QuantizedKVCache is; default the model's, set by gpt.load). `seed` seeds
    this generation's own random key (MLX's global generator is left alone)."""
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    sampler = sampler or make_sampler()
    key = mx.random.key(seed) if seed is not None else None
    stream = tokenizer.stream()
    tokens: list[int] = []
    end_token = None
    mx.reset_peak_memory()
    start = first = time.perf_counter()
    steps = generate_tokens(model, prompt_ids, max_tokens=max_tokens, sampler=sampler, cache=cache, key=key,
                            kv_bits=kv_bits, kv_group_size=kv_group_size)
    for n, token in enumerate(steps):
        if n == 0:
            first = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            end_token = token
            break
        tokens.append(token)
        text = stream.add(token)
        if on_text is not None and text:
            on_text(text)
    end = time.perf_counter()
    stats = GenerationStats(
        prompt_tokens=len(prompt_ids),
        prompt_seconds=first - start,
        generated_tokens=len(tokens),
        generation_seconds=end - first,
        peak_memory_bytes=mx.get_peak_memory(),
    )
    return Generation(tokens, tokenizer.decode(tokens), stats, end_token)
