"""Next-token samplers: greedy, or temperature with top-k then top-p filtering.

A sampler maps logits (B, vocab) to tokens (B,) with lazy MLX ops, so the
decode loop can queue the next step before the current token is known. A
random sampler draws with the ``key`` it is given (an ``mx.random.key``), or
from MLX's global generator.
"""

from typing import Callable

import mlx.core as mx

Sampler = Callable[..., mx.array]  # (logits, key=None) -> tokens


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Sampler:
    """temp 0 is greedy (argmax). Otherwise tokens are drawn from
    softmax(logits / temp), restricted to the top_k most likely (0: all) and
    then to the smallest set of them whose probability reaches top_p (1: all)."""
    if temp < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"[mlx_ext.gpt] need temp >= 0, 0 < top_p <= 1, top_k >= 0; got {temp}, {top_p}, {top_k}"
        )
    if temp == 0:
        return lambda logits, key=None: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array, key: mx.array | None = None) -> mx.array:
        logits = logits.astype(mx.float32) / temp
        if 0 < top_k < logits.shape[-1]:
            kth_largest = mx.topk(logits, top_k, axis=-1).min(axis=-1, keepdims=True)
            logits = mx.where(logits < kth_largest, -mx.inf, logits)
        if top_p < 1:
            logits = _top_p(logits, top_p)
        return mx.random.categorical(logits, axis=-1, key=key)

    return sample


def _top_p(logits: mx.array, top_p: float) -> mx.array:
    """Keeps, most likely first, each token whose predecessors hold less than top_p."""
    order = mx.argsort(-logits, axis=-1)
    probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
    keep_sorted = (mx.cumsum(probs, axis=-1) - probs) < top_p
    keep = mx.put_along_axis(mx.zeros(logits.shape, mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -mx.inf)
