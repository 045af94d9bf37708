"""Rotary position embeddings with the context-extension variants of Llama 3
("llama3") and Qwen ("yarn"), plus "linear" and plain ("default").

Every variant is a vector of per-pair wavelengths (``freqs``, as
``mx.fast.rope`` takes them: the angle of pair i at position p is p / freqs[i])
and a magnitude factor on q and k (YaRN's attention temperature). Dimension i
rotates with i + dims/2 (Hugging Face's ``rotate_half``; MLX's traditional=False).
"""

import math

import mlx.core as mx


def rope_parameters(dims: int, base: float, scaling: dict | None) -> tuple[mx.array, float]:
    """(freqs, mscale) for a Hugging Face ``rope_scaling`` dict (None: plain RoPE)."""
    freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return freqs, 1.0
    if rope_type == "linear":
        return freqs * scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_freqs(freqs, scaling), 1.0
    if rope_type == "yarn":
        return _yarn_freqs(freqs, dims, base, scaling)
    raise ValueError(f"[mlx_ext.gpt] unsupported rope_scaling type {rope_type!r}")


def _llama3_freqs(freqs: mx.array, scaling: dict) -> mx.array:
    """Long wavelengths are stretched by `factor`, short ones kept, the band
    between interpolated smoothly (Llama 3.1)."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelens = 2 * math.pi * freqs
    smooth = (old_context / wavelens - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smooth_freqs = freqs / ((1 - smooth) / factor + smooth)
    long = wavelens > old_context / low_freq_factor
    short = wavelens < old_context / high_freq_factor
    return mx.where(long, freqs * factor, mx.where(short, freqs, smooth_freqs))


def _yarn_freqs(freqs: mx.array, dims: int, base: float, scaling: dict) -> tuple[mx.array, float]:
    """YaRN (Qwen2.5 / Qwen3 long context): dimensions that turn fewer than
    beta_slow times over the original context are interpolated by `factor`,
    those turning more than beta_fast times are kept, with a linear ramp
    between; q and k are scaled by the attention temperature."""
    factor = scaling["factor"]
    old_context = scaling.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def correction_dim(rotations):
        return dims * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dims - 1)
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / max(high - low, 1e-3), 0, 1)
    keep = 1.0 - ramp  # 1 where the original frequency is kept
    interpolated = freqs * factor
    yarn_freqs = interpolated * freqs / (interpolated * keep + freqs * (1 - keep))

    def mscale(m):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    temperature = scaling.get("attention_factor") or (
        mscale(scaling.get("mscale", 1)) / mscale(scaling.get("mscale_all_dim", 0))
    )
    return yarn_freqs, temperature


class RoPE:
    """Applies the rotation to (B, heads, L, head_dim) at position ``offset``
    (a Python int, or an int32 array inside a compiled decode step).

    On MLX's CPU ``mx.fast.rope`` runs as a fallback graph that recomputes the
    angles' cos and sin on every call (about 20 primitives, twice per layer).
    Here they are computed once per forward pass (``tables``, shared by every
    layer's q and k) and the rotation is three elementwise ops that
    ``mx.compile`` fuses: x * cos + rotate_half(x) * sin."""

    def __init__(self, dims: int, base: float, scaling: dict | None):
        self.dims = dims
        self.freqs, self.mscale = rope_parameters(dims, base, scaling)

    def tables(self, offset, length: int) -> tuple[mx.array, mx.array]:
        """(cos, sin), each (length, dims), for positions offset .. offset +
        length - 1: cos = [c, c] and sin = [-s, s] per pair (rotate_half's
        signs folded in), both times the magnitude factor."""
        positions = (offset + mx.arange(length)).astype(mx.float32)
        angles = positions[:, None] / self.freqs[None, :]
        cos, sin = mx.cos(angles) * self.mscale, mx.sin(angles) * self.mscale
        return mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1)

    def apply(self, x: mx.array, tables: tuple[mx.array, mx.array]) -> mx.array:
        """x (..., L, dims) rotated by the (cos, sin) of `tables`."""
        cos, sin = tables
        half = self.dims // 2
        rotated = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)  # i <-> i + dims/2
        return x * cos + rotated * sin

    def __call__(self, x: mx.array, offset) -> mx.array:
        return self.apply(x, self.tables(offset, x.shape[-2]))
