"""Perplexity of a model on a text, and the English text the package ships for it.

``HELD_OUT_TEXT``: the opening of chapter 1 of Jane Austen's *Pride and
Prejudice* (1813; public domain; Project Gutenberg eBook #1342), with straight
quotes. It is "held out" from this package's own tuning and tests of
generation, not necessarily from a model's pretraining data.
"""

import math
from pathlib import Path

import mlx.core as mx

from .generation import PREFILL_CHUNK
from .model import Model
from .tokenizer import Tokenizer

HELD_OUT_TEXT = Path(__file__).resolve().parent / "held_out.txt"


def perplexity(model: Model, tokenizer: Tokenizer, text: str | None = None) -> float:
    """exp(mean negative log-likelihood) of every token of `text` (default:
    HELD_OUT_TEXT) given the tokens before it; the first token is given.
    The text runs through the cache in chunks, so any length fits."""
    ids = tokenizer.encode(HELD_OUT_TEXT.read_text() if text is None else text)
    if len(ids) < 2:
        raise ValueError("[mlx_ext.gpt] perplexity needs a text of at least two tokens")
    cache = model.make_cache()
    total = 0.0
    for start in range(0, len(ids) - 1, PREFILL_CHUNK):
        inputs = ids[start : min(start + PREFILL_CHUNK, len(ids) - 1)]
        targets = mx.array(ids[start + 1 : start + 1 + len(inputs)])
        logits = model(mx.array([inputs]), cache)[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        total -= mx.take_along_axis(logprobs, targets[:, None], axis=-1).sum().item()
    return math.exp(total / (len(ids) - 1))
