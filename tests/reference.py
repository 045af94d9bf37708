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
