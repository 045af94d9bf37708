"""NumPy float64 references: the one definition of each op's meaning.

Every function takes the op's already-rounded inputs (MLX arrays or NumPy
arrays), widens them to float64 and computes exactly what the op means.
"""

import numpy as np

import mlx.core as mx


def to_f64(a) -> np.ndarray:
    """An MLX or NumPy array as float64 (bfloat16 goes through float32, exactly)."""
    if isinstance(a, mx.array):
        if a.dtype == mx.bfloat16:
            a = a.astype(mx.float32)
        a = np.array(a)
    return np.asarray(a, dtype=np.float64)


def unpack_bits(w_q, bits: int) -> np.ndarray:
    """Integers of an MLX-packed matrix: each row of uint32 words is one
    little-endian bit stream, `bits` bits per value, low bits first (3-, 5- and
    6-bit values cross word boundaries). Returns int64 of shape (rows, cols)."""
    words = np.ascontiguousarray(np.array(w_q, dtype=np.uint32))
    rows = words.shape[0]
    stream = np.unpackbits(words.view(np.uint8).reshape(rows, -1), axis=-1, bitorder="little")
    cols = stream.shape[1] // bits
    digits = stream[:, : cols * bits].reshape(rows, cols, bits).astype(np.int64)
    return (digits << np.arange(bits, dtype=np.int64)).sum(axis=-1)


def dequantize(w_q, scales, biases, group_size: int, bits: int) -> np.ndarray:
    """Affine dequantization: w = scale * q + bias per group along the rows."""
    q = unpack_bits(w_q, bits).astype(np.float64)
    s = np.repeat(to_f64(scales), group_size, axis=-1)
    b = np.repeat(to_f64(biases), group_size, axis=-1)
    return s * q + b


def quantized_matmul(x, w_q, scales, biases, *, transpose=True, group_size=64, bits=4, bias=None):
    """x @ dequantize(w).T (transpose) or x @ dequantize(w), plus bias."""
    w = dequantize(w_q, scales, biases, group_size, bits)
    out = to_f64(x) @ (w.T if transpose else w)
    if bias is not None:
        out = out + to_f64(bias)
    return out


def quantized_matmul_abs(x, w_q, scales, biases, *, transpose=True, group_size=64, bits=4):
    """|x| @ (|scale| q + |bias|): the scale of the rounding error of each output
    (dequantizing s q + b can cancel, so |w| alone would understate it)."""
    q = unpack_bits(w_q, bits).astype(np.float64)
    s = np.repeat(np.abs(to_f64(scales)), group_size, axis=-1)
    b = np.repeat(np.abs(to_f64(biases)), group_size, axis=-1)
    w = s * q + b
    return np.abs(to_f64(x)) @ (w.T if transpose else w)


def attention_kv(x, head_dim: int, group_size: int = 64, bits=None):
    """k or v of scaled_dot_product_attention as float64 (B, Hkv, S, D), with
    the magnitude of each value's terms (|scale| q + |bias| for a quantized
    (w_q, scales, biases) tuple, dequantized along D)."""
    if not isinstance(x, (tuple, list)):
        values = to_f64(x)
        return values, np.abs(values)
    w_q, scales, biases = x
    bits = bits or w_q.shape[-1] * 32 // head_dim
    lead = tuple(w_q.shape[:-1])
    codes = unpack_bits(np.array(w_q).reshape(-1, w_q.shape[-1]), bits).astype(np.float64)
    s = np.repeat(to_f64(scales).reshape(-1, scales.shape[-1]), group_size, axis=-1)
    b = np.repeat(to_f64(biases).reshape(-1, biases.shape[-1]), group_size, axis=-1)
    return (s * codes + b).reshape(lead + (head_dim,)), (np.abs(s) * codes + np.abs(b)).reshape(
        lead + (head_dim,)
    )


def attention_visible(batch, heads, q_len, kv_len, *, mask=None, window=None, kv_lengths=None):
    """Which keys each query row sees, (B, Hq, L, S) bool: the first
    kv_lengths[b] keys (clamped to [0, S]); with mask="causal" or a window,
    keys up to the row's position i + len_b - L (lower-right aligned), and with
    a window only the last `window` of those; a bool mask on top."""
    lens = np.full(batch, kv_len) if kv_lengths is None else np.clip(np.array(kv_lengths), 0, kv_len)
    j = np.arange(kv_len)
    visible = np.broadcast_to(j < lens[:, None, None, None], (batch, heads, q_len, kv_len)).copy()
    if (isinstance(mask, str) and mask == "causal") or window is not None:
        pos = np.arange(q_len)[None, :] + lens[:, None] - q_len  # (B, L)
        visible &= (j <= pos[:, None, :, None])
        if window is not None:
            visible &= j > pos[:, None, :, None] - window
    if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
        visible &= np.array(mask)
    return visible


def attention_probabilities(q, k, *, scale, mask=None, sinks=None, window=None, kv_lengths=None):
    """softmax over the visible keys (and the sinks' extra logits) of
    scale * q k^T + additive mask, in float64: (B, Hq, L, S); a row that sees
    no key and has no sink is all zeros. k: float64 (B, Hkv, S, D)."""
    q = to_f64(q)
    batch, heads, q_len, _ = q.shape
    k = np.repeat(k, heads // k.shape[1], axis=1)
    logits = scale * (q @ np.swapaxes(k, -1, -2))
    if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        logits = logits + to_f64(mask)
    visible = attention_visible(batch, heads, q_len, k.shape[2], mask=mask, window=window,
                                kv_lengths=kv_lengths)
    logits = np.where(visible, logits, -np.inf)
    sink = np.full((1, heads, 1, 1), -np.inf) if sinks is None else to_f64(sinks)[None, :, None, None]
    top = np.maximum(logits.max(axis=-1, keepdims=True, initial=-np.inf), sink)
    safe_top = np.where(np.isfinite(top), top, 0.0)
    weights = np.where(visible, np.exp(logits - safe_top), 0.0)
    total = weights.sum(axis=-1, keepdims=True) + np.exp(sink - safe_top)
    return np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)


def scaled_dot_product_attention(q, k, v, *, scale, mask=None, sinks=None, window=None,
                                 kv_lengths=None, group_size=64, bits=None):
    """mlx_ext.scaled_dot_product_attention in float64: k and v arrays or
    quantized (w_q, scales, biases) tuples; (B, Hq, L, D)."""
    head_dim = q.shape[-1]
    keys, _ = attention_kv(k, head_dim, group_size, bits)
    values, _ = attention_kv(v, head_dim, group_size, bits)
    p = attention_probabilities(q, keys, scale=scale, mask=mask, sinks=sinks, window=window,
                                kv_lengths=kv_lengths)
    return p @ np.repeat(values, q.shape[1] // values.shape[1], axis=1)
