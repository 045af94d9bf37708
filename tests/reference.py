"""NumPy float64 references: the one definition of each op's meaning, and
the test data and tolerances every backend's tests of an op share.

Every reference function takes the op's already-rounded inputs (MLX arrays or
NumPy arrays), widens them to float64 and computes exactly what the op means.
A tolerance bounds, per output element, how far a kernel may be from that
under a stated model of its rounding (EPS: the unit roundoff of each dtype).
Builders draw random inputs in the formats the ops read.
"""

import numpy as np

import mlx.core as mx

# Unit roundoff: rounding a value to the dtype moves it by at most EPS * |value|.
EPS = {mx.float32: 2.0**-24, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}


def to_f64(a) -> np.ndarray:
    """An MLX or NumPy array as float64 (bfloat16 goes through float32, exactly)."""
    if isinstance(a, mx.array):
        if a.dtype == mx.bfloat16:
            a = a.astype(mx.float32)
        a = np.array(a)
    return np.asarray(a, dtype=np.float64)


def eps(dtype) -> float:
    """EPS of an MLX dtype, or of its name ("bfloat16")."""
    return EPS[getattr(mx, dtype) if isinstance(dtype, str) else dtype]


def subnormal_spacing(dtype) -> float:
    """The spacing of an MLX dtype's (or its name's) subnormals: the absolute
    step below its smallest normal, which a relative tolerance misses near
    zero (float16's subnormals reach 6e-5). Half of it bounds one rounding."""
    name = dtype if isinstance(dtype, str) else str(dtype).rsplit(".", 1)[-1]
    return {"float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}[name]


def unpack_bits(w_q, bits: int) -> np.ndarray:
    """Integers of an MLX-packed matrix: each row of uint32 words is one
    little-endian bit stream, `bits` bits per value, low bits first (3-, 5- and
    6-bit values cross word boundaries). Returns int64 of shape (..., rows, cols)
    for w_q of shape (..., rows, words)."""
    words = np.ascontiguousarray(np.array(w_q, dtype=np.uint32))
    lead = words.shape[:-1]
    stream = np.unpackbits(words.reshape(-1, words.shape[-1]).view(np.uint8), axis=-1, bitorder="little")
    cols = stream.shape[1] // bits
    digits = stream[:, : cols * bits].reshape(-1, cols, bits).astype(np.int64)
    return (digits << np.arange(bits, dtype=np.int64)).sum(axis=-1).reshape(*lead, cols)


# MLX's microscaling modes (MLX 0.32.4): (group_size, bits) and how a code and
# a uint8 group scale decode (csrc/common/fp_formats.h says the same in C++).
FP_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
MODES = ("affine", *FP_MODES)


def e2m1(codes) -> np.ndarray:
    """E2M1 (1 sign, 2 exponent bits, 1 mantissa bit, bias 1): +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}."""
    c = np.asarray(codes, dtype=np.int64)
    mag = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)[c & 7]
    return np.where(c & 8, -mag, mag)


def e4m3(codes) -> np.ndarray:
    """E4M3 "fn" (bias 7, no infinities): 2^(e-7) (1 + m/8), subnormals m 2^-9,
    0x7f and 0xff NaN."""
    c = np.asarray(codes, dtype=np.int64)
    e, m = (c >> 3) & 15, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m * 2.0**-9, np.ldexp(1 + m / 8, e - 7))
    mag = np.where((c & 0x7F) == 0x7F, np.nan, mag)
    return np.where(c & 0x80, -mag, mag)


def e8m0(codes) -> np.ndarray:
    """E8M0 (an exponent, bias 127): 2^(s-127); MLX decodes 0 as 2^-127 too and 255 as inf."""
    c = np.asarray(codes, dtype=np.int64)
    return np.where(c == 255, np.inf, np.ldexp(1.0, np.maximum(c, 1) - 127) * np.where(c == 0, 0.5, 1.0))


def dequantize_fp(w_q, scales, mode: str) -> np.ndarray:
    """An fp-mode matrix in float64: decode(code) * decode(scale) per group along the rows."""
    group_size, bits = FP_MODES[mode]
    codes = unpack_bits(w_q, bits)
    values = e4m3(codes) if mode == "mxfp8" else e2m1(codes)
    s = np.array(scales, dtype=np.uint8)
    s = e4m3(s) if mode == "nvfp4" else e8m0(s)
    with np.errstate(invalid="ignore"):  # 0 * inf (scale byte 255) is NaN, as in MLX
        return values * np.repeat(s, group_size, axis=-1)


def dequantize(w_q, scales, biases, group_size: int = 64, bits: int = 4, mode: str = "affine") -> np.ndarray:
    """Dequantized w in float64. Affine: w = scale * q + bias per group along the
    rows; fp modes: dequantize_fp (group_size, bits and biases unused)."""
    if mode != "affine":
        return dequantize_fp(w_q, scales, mode)
    q = unpack_bits(w_q, bits).astype(np.float64)
    s = np.repeat(to_f64(scales), group_size, axis=-1)
    b = np.repeat(to_f64(biases), group_size, axis=-1)
    return s * q + b


def _times_w(x, w, transpose):
    """x @ w.T (transpose) or x @ w over the last two axes, batch axes broadcast
    as np.matmul (and mx.quantized_matmul) do; a 1-D x is one row."""
    x = np.asarray(x)
    out = (x[None] if x.ndim == 1 else x) @ (np.swapaxes(w, -1, -2) if transpose else w)
    return out[..., 0, :] if x.ndim == 1 else out


def quantized_matmul(x, w_q, scales, biases, *, transpose=True, group_size=64, bits=4, bias=None, mode="affine"):
    """x @ dequantize(w).T (transpose) or x @ dequantize(w), plus bias."""
    w = dequantize(w_q, scales, biases, group_size, bits, mode)
    out = _times_w(to_f64(x), w, transpose)
    if bias is not None:
        out = out + to_f64(bias)
    return out


def quantized_matmul_abs(x, w_q, scales, biases, *, transpose=True, group_size=64, bits=4, mode="affine"):
    """|x| @ (|scale| q + |bias|): the scale of the rounding error of each output
    (dequantizing s q + b can cancel, so |w| alone would understate it); fp
    modes: |x| @ |w|."""
    if mode != "affine":
        w = np.abs(dequantize_fp(w_q, scales, mode))
    else:
        q = unpack_bits(w_q, bits).astype(np.float64)
        s = np.repeat(np.abs(to_f64(scales)), group_size, axis=-1)
        b = np.repeat(np.abs(to_f64(biases)), group_size, axis=-1)
        w = s * q + b
    return _times_w(np.abs(to_f64(x)), w, transpose)


def random_affine_weights(rng, rows, cols, bits, group_size):
    """A random (rows, cols) matrix in MLX's affine format, as NumPy arrays:
    uint32 words (every bit pattern is a valid packed matrix, so all values of
    every bit width occur) and float64 scales in [-0.1, 0.1) and biases in
    [-0.5, 0.5), one per group, for the caller to round to its dtype."""
    words = rng.integers(0, 2**32, size=(rows, cols * bits // 32), dtype=np.uint64)
    scales = rng.uniform(-0.1, 0.1, (rows, cols // group_size))
    biases = rng.uniform(-0.5, 0.5, (rows, cols // group_size))
    return words.astype(np.uint32), scales, biases


def random_quantized(rng, rows, cols, bits, group_size, dtype):
    """random_affine_weights as MLX arrays (w_q, scales, biases), scales and biases in dtype."""
    w_q, scales, biases = random_affine_weights(rng, rows, cols, bits, group_size)
    return mx.array(w_q), mx.array(scales, dtype=dtype), mx.array(biases, dtype=dtype)


def random_fp_quantized(rng, shape, mode):
    """A random fp-mode matrix of logical shape (..., rows, cols) as MLX arrays
    (w_q, scales): every code occurs (but mxfp8's two NaN codes), and scales
    span 2^-6 .. 2^2 (E8M0) or E4M3's normals and subnormals up to 8, so that
    values stay finite in float16."""
    group_size, bits = FP_MODES[mode]
    *lead, rows, cols = shape
    codes = rng.integers(0, 2**bits, size=(*lead, rows, cols), dtype=np.uint64)
    if mode == "mxfp8":
        codes = np.where((codes & 0x7F) == 0x7F, codes - 1, codes)
    per_word = 32 // bits
    codes = codes.reshape(*lead, rows, cols // per_word, per_word)
    words = (codes << (np.arange(per_word, dtype=np.uint64) * bits)).sum(axis=-1).astype(np.uint32)
    if mode == "nvfp4":
        scales = rng.integers(0, 0x58, size=(*lead, rows, cols // group_size))  # 0x58 = 8.0
    else:
        scales = rng.integers(127 - 6, 127 + 3, size=(*lead, rows, cols // group_size))
    return mx.array(words), mx.array(scales.astype(np.uint8))


def float32_accumulation_tolerance(expected, magnitude, *, roundings, out_dtype, rounded_operand=False):
    """The bound on |kernel - expected| for a kernel that computes a sum of
    terms in float32 and rounds it once to out_dtype. magnitude: the sum of
    |terms| (what the float32 roundings scale with); roundings: the most float32
    roundings one term meets. rounded_operand: the kernel also rounded one
    operand of each term to out_dtype (|round(w) - w| <= EPS |w|, per term)."""
    tol = 2 * roundings * EPS[mx.float32] * magnitude + eps(out_dtype) * np.abs(expected) + 1e-30
    if rounded_operand:
        tol = tol + eps(out_dtype) * magnitude
    return tol


def quantized_matmul_with_tolerance(x, w_q, scales, biases, *, out_dtype, transpose=True, group_size=64,
                                    bits=4, bias=None, w_rounded=False, mode="affine"):
    """(quantized_matmul(...), its tolerance) for a kernel that dequantizes and
    accumulates in float32 and rounds each output to out_dtype; w_rounded: it
    also rounded each dequantized weight to out_dtype."""
    kw = dict(transpose=transpose, group_size=group_size, bits=bits, mode=mode)
    expected = quantized_matmul(x, w_q, scales, biases, bias=bias, **kw)
    magnitude = quantized_matmul_abs(x, w_q, scales, biases, **kw)
    if bias is not None:
        magnitude = magnitude + np.abs(to_f64(bias))
    # Each term meets at most K + 4 float32 roundings (dequantize, multiply,
    # group scale, accumulation over K).
    tol = float32_accumulation_tolerance(expected, magnitude, roundings=x.shape[-1] + 4, out_dtype=out_dtype,
                                         rounded_operand=w_rounded)
    return expected, tol


def assert_within_tolerance(got, expected, tol, what="") -> None:
    """|got - expected| <= tol everywhere (got: an MLX or NumPy array); else
    names the element furthest past its tolerance, after `what`."""
    got = to_f64(got)
    prefix = f"{what}: " if what else ""
    assert got.shape == expected.shape, f"{prefix}shape {got.shape}, want {expected.shape}"
    err = np.abs(got - expected)
    tol = np.broadcast_to(tol, err.shape)
    assert np.all(err <= tol), prefix + _furthest_past(got, expected, err - tol, tol)


def _furthest_past(got, expected, excess, tol) -> str:
    at = np.unravel_index(np.argmax(excess), excess.shape)
    return f"max excess at {tuple(map(int, at))}: got {got[at]}, want {expected[at]} (tolerance {tol[at]:.3g})"


def gguf_llama_logits(tensors: dict, metadata: dict, tokens: list[int]) -> np.ndarray:
    """Logits (len(tokens), vocab) of a llama GGUF, from its tensors as
    ``mx.load`` reads them (llama.cpp names; Q4_0/Q4_1/Q8_0 as affine g32),
    in float64, the way llama.cpp computes: rotary pairs are adjacent
    dimensions (2i, 2i+1) of each head, causal attention over all tokens."""

    def meta(key):
        value = metadata[f"llama.{key}"]
        return value.item() if isinstance(value, mx.array) else value

    def matrix(name):
        w = tensors[f"{name}.weight"]
        if f"{name}.scales" not in tensors:
            return to_f64(w)
        scales, biases = tensors[f"{name}.scales"], tensors[f"{name}.biases"]
        bits = w.shape[-1] * 32 // (scales.shape[-1] * 32)
        if bits != 8:
            return dequantize(w, scales, biases, 32, bits)
        # 8-bit values are the bytes of the little-endian words: much faster than unpack_bits.
        q = np.array(w).view(np.uint8).astype(np.float64)
        return np.repeat(to_f64(scales), 32, axis=-1) * q + np.repeat(to_f64(biases), 32, axis=-1)

    def rms_norm(x, name):
        eps = meta("attention.layer_norm_rms_epsilon")
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * to_f64(tensors[f"{name}.weight"])

    heads, kv_heads = meta("attention.head_count"), meta("attention.head_count_kv")
    hidden = meta("embedding_length")
    head_dim = hidden // heads
    length = len(tokens)
    angles = np.arange(length)[:, None] * meta("rope.freq_base") ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]  # (L, 1, head_dim / 2)

    def rope(x):  # x: (L, heads, head_dim), pairs adjacent
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    embedding = matrix("token_embd")
    x = embedding[tokens]
    causal = np.triu(np.full((length, length), -np.inf), k=1)
    for layer in range(meta("block_count")):
        block = f"blk.{layer}"
        h = rms_norm(x, f"{block}.attn_norm")
        q = rope((h @ matrix(f"{block}.attn_q").T).reshape(length, heads, head_dim))
        k = rope((h @ matrix(f"{block}.attn_k").T).reshape(length, kv_heads, head_dim))
        v = (h @ matrix(f"{block}.attn_v").T).reshape(length, kv_heads, head_dim)
        k, v = (np.repeat(t, heads // kv_heads, axis=1) for t in (k, v))
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + causal
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        attention = np.einsum("hqk,khd->qhd", weights, v).reshape(length, hidden)
        x = x + attention @ matrix(f"{block}.attn_output").T
        h = rms_norm(x, f"{block}.ffn_norm")
        gate, up = h @ matrix(f"{block}.ffn_gate").T, h @ matrix(f"{block}.ffn_up").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ matrix(f"{block}.ffn_down").T
    head = matrix("output") if "output.weight" in tensors else embedding
    return rms_norm(x, "output_norm") @ head.T


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


def sparse_to_dense(ws) -> np.ndarray:
    """W (N, K) in float64 decoded from the raw arrays of an mlx_ext.sparse
    container (each format's layout as mlx_ext/sparse.py documents it)."""
    import json

    layout = json.loads(ws["_layout"])
    n, k = layout["shape"]
    w = np.zeros((n, k))
    fmt = layout["format"]
    if fmt == "csr":
        ptr = np.array(ws["indptr"]).astype(np.int64)
        cols = np.array(ws["indices"]).astype(np.int64)
        for r in range(n):
            w[r, cols[ptr[r]:ptr[r + 1]]] = to_f64(ws["data"])[ptr[r]:ptr[r + 1]]
    elif fmt == "bitmask":
        words = np.array(ws["mask"]).astype(np.uint64)
        stored = (words[:, :, None] >> np.arange(32, dtype=np.uint64)) & np.uint64(1)
        w[stored.reshape(n, -1)[:, :k].astype(bool)] = to_f64(ws["data"])
    elif fmt == "bsr":
        bn, bk = layout["block"]
        ptr = np.array(ws["indptr"]).astype(np.int64)
        cols = np.array(ws["indices"]).astype(np.int64)
        blocks = to_f64(ws["data"])
        for br in range(n // bn):
            for b in range(ptr[br], ptr[br + 1]):
                w[br * bn:(br + 1) * bn, cols[b] * bk:(cols[b] + 1) * bk] = blocks[b]
    else:  # nm
        nn_, m, bits = layout["n"], layout["m"], layout["bits"]
        kc = k // m * nn_
        if bits:
            values = dequantize(ws["w_q"], ws["scales"], ws["biases"], layout["group_size"], bits)
        else:
            values = to_f64(ws["data"])
        code_bits = 2 if m == 4 else 4
        codes = unpack_bits(ws["codes"], code_bits)[:, :kc]
        cols = (np.arange(kc) // nn_) * m + codes
        np.put_along_axis(w, cols, values, axis=1)
    return w


def sparse_matmul(x, ws, bias=None):
    """x @ W.T (+ bias) for the sparse W of an mlx_ext.sparse container."""
    out = to_f64(x) @ sparse_to_dense(ws).T
    if bias is not None:
        out = out + to_f64(bias)
    return out


def sparse_value_positions(ws) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of each stored value of a container with float values, in
    the order of its values array flattened: the values numbered 1, 2, ...
    and decoded by sparse_to_dense."""
    values = ws["data"]
    numbered = dict(ws)
    numbered["data"] = np.arange(1, values.size + 1, dtype=np.float64).reshape(values.shape)
    dense = sparse_to_dense(numbered)
    rows, cols = np.nonzero(dense)
    order = np.argsort(dense[rows, cols])
    return rows[order], cols[order]


def _abs_sparse_to_dense(ws) -> np.ndarray:
    """|W|, or |scale| q + |bias| for quantized values (dequantizing can cancel,
    so |W| alone would understate the rounding scale)."""
    if "scales" not in ws:
        return np.abs(sparse_to_dense(ws))
    absolute = dict(ws)
    absolute["scales"], absolute["biases"] = np.abs(to_f64(ws["scales"])), np.abs(to_f64(ws["biases"]))
    return sparse_to_dense(absolute)


def sparse_matmul_with_tolerance(x, ws, *, out_dtype, bias=None, transpose=True):
    """(x @ W.T + bias (transpose) or x @ W + bias, its tolerance) for a kernel
    that accumulates in float32 and rounds each output once to out_dtype. x is
    2-D."""
    w, w_abs = sparse_to_dense(ws), _abs_sparse_to_dense(ws)
    x64 = to_f64(x)
    expected = x64 @ (w.T if transpose else w)
    magnitude = np.abs(x64) @ (w_abs.T if transpose else w_abs)
    if bias is not None:
        expected, magnitude = expected + to_f64(bias), magnitude + np.abs(to_f64(bias))
    # Each term meets at most (reduction + 4) float32 roundings (dequantize,
    # multiply, group scale, accumulation).
    tol = float32_accumulation_tolerance(expected, magnitude, roundings=x64.shape[-1] + 4, out_dtype=out_dtype)
    return expected, tol + subnormal_spacing(out_dtype) / 2  # one rounding of a subnormal result


def sparse_sampled_with_tolerance(g, x, ws, *, out_dtype):
    """(dvalues, tolerance): dvalues[j] = sum_m g[m, row_j] x[m, col_j] for each
    stored value j (the values' gradient of sum(g * (x @ W.T))), shaped as the
    values; g (M, N) and x (M, K)."""
    rows, cols = sparse_value_positions(ws)
    g64, x64 = to_f64(g), to_f64(x)
    expected = np.einsum("mi,mi->i", g64[:, rows], x64[:, cols])
    magnitude = np.einsum("mi,mi->i", np.abs(g64[:, rows]), np.abs(x64[:, cols]))
    tol = float32_accumulation_tolerance(expected, magnitude, roundings=g64.shape[0] + 2, out_dtype=out_dtype)
    tol = tol + subnormal_spacing(out_dtype) / 2
    shape = tuple(ws["data"].shape)
    return expected.reshape(shape), tol.reshape(shape)


def gather_qmm_with_tolerance(x, w_q, scales, biases, lhs_indices, rhs_indices, *, out_dtype, transpose=True,
                              group_size=64, bits=4, bias=None):
    """mx.gather_qmm's meaning, plus an optional bias ((N,) or one row per
    matrix of w), with its tolerance: lhs/rhs indices are flat indices into
    the batch dimensions of x (..., M, K) and w (..., rows, packed); they
    broadcast, and entry p is x[lhs[p]] @ dequantize(w[rhs[p]]).T (transpose)
    + bias[rhs[p]]. None means every matrix of that batch in order. Indices out
    of range give NaN (mlx_ext's documented run-time behaviour)."""
    x64 = to_f64(x)
    xs = x64.reshape((-1,) + x64.shape[-2:])
    w_np = np.array(w_q, dtype=np.uint32)
    ws = w_np.reshape((-1,) + w_np.shape[-2:])
    ss = to_f64(scales).reshape((ws.shape[0],) + tuple(scales.shape[-2:]))
    bs = to_f64(biases).reshape(ss.shape)

    def default(batch_shape):
        return np.arange(int(np.prod(batch_shape, dtype=np.int64))).reshape(batch_shape)

    lhs = default(x64.shape[:-2]) if lhs_indices is None else np.array(lhs_indices).astype(np.int64)
    rhs = default(w_np.shape[:-2]) if rhs_indices is None else np.array(rhs_indices).astype(np.int64)
    lhs, rhs = np.broadcast_arrays(lhs, rhs)
    m = xs.shape[1]
    n = ws.shape[1] if transpose else ws.shape[2] * 32 // bits
    bias_rows = None
    if bias is not None:
        b = to_f64(bias)
        bias_rows = np.broadcast_to(b, (ws.shape[0], n)) if b.ndim == 1 else b.reshape(-1, n)
    expected = np.full(lhs.shape + (m, n), np.nan)
    tol = np.zeros_like(expected)
    kw = dict(transpose=transpose, group_size=group_size, bits=bits)
    for at in np.ndindex(*lhs.shape):
        l, r = int(lhs[at]), int(rhs[at])
        if not (0 <= l < xs.shape[0] and 0 <= r < ws.shape[0]):
            continue
        expected[at], tol[at] = quantized_matmul_with_tolerance(
            xs[l], ws[r], ss[r], bs[r], out_dtype=out_dtype,
            bias=None if bias_rows is None else bias_rows[r], **kw)
    return expected, tol


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def quantized_swiglu_with_tolerance(x, w_q, scales, biases, *, out_dtype, group_size=64, bits=4):
    """(silu(x @ gate.T) * (x @ up.T), its tolerance) for w stacking the gate
    rows over the up rows, computed by a kernel whose product is
    quantized_matmul_with_tolerance's (rounded to out_dtype, as the unfused
    layer's would be) and whose epilogue runs in float32 and rounds once to
    out_dtype. The product's errors dg, du reach the output through
    |silu'(g)| <= 1.1 and |silu(g)|."""
    both, tol = quantized_matmul_with_tolerance(
        x, w_q, scales, biases, out_dtype=out_dtype, group_size=group_size, bits=bits
    )
    half = both.shape[-1] // 2
    g, u = both[..., :half], both[..., half:]
    expected = silu(g) * u
    tol = (1.1 * np.abs(u) * tol[..., :half] + np.abs(silu(g)) * tol[..., half:]
           + (eps(out_dtype) + 8 * EPS[mx.float32]) * np.abs(expected) + 1e-30)
    return expected, tol


def gather_quantized_swiglu_with_tolerance(x, gate, up, lhs_indices, rhs_indices, *, out_dtype, group_size=64,
                                           bits=4):
    """(silu(g) * u, its tolerance) with g and u gather_qmm_with_tolerance's
    products of x with the gate and up stacks ((w, scales, biases) each,
    transpose=True), each rounded to out_dtype as the unfused products would
    be, the epilogue in float32 rounded once; NaN where an index is out of
    range. The products' errors reach the output as in
    quantized_swiglu_with_tolerance."""
    kw = dict(out_dtype=out_dtype, group_size=group_size, bits=bits)
    g, tol_g = gather_qmm_with_tolerance(x, *gate, lhs_indices, rhs_indices, **kw)
    u, tol_u = gather_qmm_with_tolerance(x, *up, lhs_indices, rhs_indices, **kw)
    expected = silu(g) * u
    tol = (1.1 * np.abs(u) * tol_g + np.abs(silu(g)) * tol_u
           + (eps(out_dtype) + 8 * EPS[mx.float32]) * np.abs(expected) + subnormal_spacing(out_dtype) + 1e-30)
    return expected, tol


def rms_norm_with_tolerance(x, weight, epsilon: float, *, out_dtype):
    """(x / sqrt(mean(x^2) + epsilon) * weight over the last axis, its
    tolerance) for a kernel that works in float32 (about D + 8 roundings reach
    each output through the mean square) and rounds once to out_dtype."""
    x64 = to_f64(x)
    r = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + epsilon)
    w = np.ones(x64.shape[-1]) if weight is None else to_f64(weight)
    expected = x64 * r * w
    tol = ((x64.shape[-1] + 8) * EPS[mx.float32] + eps(out_dtype)) * np.abs(expected) + subnormal_spacing(out_dtype) + 1e-30
    return expected, tol
