"""Sparse weight formats for ``mlx_ext.sparse_matmul``, and pruning.

Each container holds a matrix W of shape ``(N, K)`` (a Linear layer's weight)
as a few ``mx.array``: ``CSR``, ``Bitmask`` (a bit per element and the stored
values packed), ``BSR`` (dense blocks) and ``NM`` (n of every m consecutive
values along K, optionally quantized with MLX's affine mode).

The containers are ``mlx.nn.Module`` subclasses, i.e. dicts of arrays, so
``mx.eval``, ``tree_flatten``, ``mx.compile`` and optimizers see them; the
pattern's arrays are frozen, only the values are trainable. The static
description (format, shape, block, n:m, bits) is the string entry
``"_layout"``, which travels through ``mx.compile`` with the arrays. Shapes
are static: the number of stored values is fixed at conversion.

Raw arrays arrive in SciPy's order and are validated when a container is
built: a malformed pattern raises ``ValueError`` (``TypeError`` for a wrong
dtype) starting with ``[mlx_ext.sparse.<Format>]``. Unsorted or duplicate
column indices within a row are rejected (``from_scipy`` sorts them and sums
duplicates first, as SciPy does).
"""

import json

import numpy as np

import mlx.core as mx
import mlx.nn as nn

from ._ext import sparse_matmul_arrays

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def _fail(name, message, error=ValueError):
    raise error(f"[mlx_ext.sparse.{name}] {message}")


def _shape(name, shape):
    try:
        n, k = (int(d) for d in shape)
    except (TypeError, ValueError):
        _fail(name, f"shape must be a pair (N, K), got {shape!r}")
    if n < 1 or k < 1:
        _fail(name, f"shape must be positive, got {(n, k)}")
    return n, k


def _values(name, arg, a, ndim):
    a = a if isinstance(a, mx.array) else mx.array(np.asarray(a))
    if a.dtype not in _FLOATS:
        _fail(name, f"{arg} must be float32, float16 or bfloat16, got {a.dtype}", TypeError)
    if a.ndim != ndim:
        _fail(name, f"{arg} must be {ndim}-D, got shape {tuple(a.shape)}")
    return a


def _integers(name, arg, a, ndim=1):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        _fail(name, f"{arg} must hold integers, got {a.dtype}", TypeError)
    if a.ndim != ndim:
        _fail(name, f"{arg} must be {ndim}-D, got shape {a.shape}")
    return a.astype(np.int64)


def _row_pointers(name, arg, ptr, rows, stored):
    ptr = _integers(name, arg, ptr)
    if ptr.shape != (rows + 1,):
        _fail(name, f"{arg} must have shape ({rows + 1},), got {ptr.shape}")
    if ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] != stored:
        _fail(name, f"{arg} must start at 0, be non-decreasing and end at {stored} "
                    f"(the number of stored entries); got {ptr[:8].tolist()}...{ptr[-1]}")
    if stored >= 2**31:
        _fail(name, f"{stored} stored entries exceed the int32 row pointers")
    return mx.array(ptr.astype(np.int32))


def _sorted_columns(name, arg, cols, ptr, limit):
    """Columns in [0, limit), strictly increasing within each row."""
    if cols.size and (cols.min() < 0 or cols.max() >= limit):
        bad = cols[(cols < 0) | (cols >= limit)][0]
        _fail(name, f"{arg} has {bad}, outside [0, {limit})")
    ascending = np.diff(cols) > 0
    starts = ptr[1:-1]
    ascending[starts[(starts > 0) & (starts < cols.size)] - 1] = True  # a new row may restart
    if not np.all(ascending):
        _fail(name, f"{arg} must be sorted and without duplicates within each row")


def _to_numpy(a):
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


class SparseMatrix(nn.Module):
    """Common part of the formats: the layout, sizes and (de)serialisation."""

    def __init__(self, layout: dict):
        super().__init__()
        self["_layout"] = json.dumps(layout, sort_keys=True)

    _pattern_keys = ()

    def __setitem__(self, key, value):
        # A pattern replaced after construction (load_weights, update, or by
        # hand) is validated again before the next product; so is a values
        # array whose size changes.
        old = self.get(key)
        if key in self._pattern_keys or (isinstance(old, mx.array) and old.shape != value.shape):
            object.__setattr__(self, "_unchecked", True)
        super().__setitem__(key, value)

    def _check(self):
        """Validate the pattern if it changed since it was last validated."""
        if self.__dict__.get("_unchecked"):
            self._validate()
            object.__setattr__(self, "_unchecked", False)

    def _finish(self):
        object.__setattr__(self, "_unchecked", False)
        # Only float values train: the pattern (and quantized values) are fixed.
        self.freeze()
        if "data" in self:
            self.unfreeze(keys=["data"])

    @property
    def layout(self) -> dict:
        return json.loads(self["_layout"])

    @property
    def shape(self):
        return tuple(self.layout["shape"])

    @property
    def nnz(self) -> int:
        """Number of stored values (explicit zeros included)."""
        return self.layout["nnz"]

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.nnz / (n * k)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in _arrays(self))

    def save(self, path: str):
        """Write the arrays and the layout to a .safetensors file (``load`` reads it)."""
        mx.save_safetensors(path, {k: v for k, v in self.items() if isinstance(v, mx.array)},
                            metadata={"mlx_ext.sparse": self["_layout"]})

    def __repr__(self):
        return f"{type(self).__name__}(shape={self.shape}, nnz={self.nnz}, layout={self['_layout']})"


def _arrays(ws) -> list:
    """The arrays of a container (or of the plain dict mx.compile hands over), in the op's order."""
    layout = json.loads(ws["_layout"])
    return [ws[k] for k in _ORDER[layout["format"]](layout)]


_ORDER = {
    "csr": lambda l: ["data", "indices", "indptr"],
    "bitmask": lambda l: ["data", "mask", "row_ptr"],
    "bsr": lambda l: ["data", "indices", "indptr"],
    "nm": lambda l: (["w_q", "scales", "biases"] if l["bits"] else ["data"]) + ["codes"],
}


def sparse_matmul(x: mx.array, ws, bias=None, *, stream=None) -> mx.array:
    """``x @ W.T`` (+ ``bias``) for W held by a container of this module.

    Args:
        x (array): ``(..., K)``, float32, float16 or bfloat16.
        ws: a ``CSR``, ``Bitmask``, ``BSR`` or ``NM`` of shape ``(N, K)``.
        bias (array, optional): ``(N,)``.

    Returns:
        array: ``(..., N)``, dtype promoted from x, the values and bias;
        accumulated in float32.
    """
    if not isinstance(ws, dict) or "_layout" not in ws:
        raise TypeError(f"[mlx_ext.sparse_matmul] ws must be a container of mlx_ext.sparse "
                        f"(CSR, Bitmask, BSR, NM), got {type(ws).__name__}")
    if isinstance(ws, SparseMatrix):
        ws._check()
    layout = json.loads(ws["_layout"])
    return sparse_matmul_arrays(
        x, layout["format"], _arrays(ws), tuple(layout["shape"]),
        block=tuple(layout.get("block", (1, 1))), nm=(layout.get("n", 0), layout.get("m", 0)),
        bits=layout.get("bits", 0), group_size=layout.get("group_size", 0),
        bias=bias, stream=stream)


def load(path: str) -> SparseMatrix:
    """A container written by ``SparseMatrix.save``."""
    arrays, metadata = mx.load(path, return_metadata=True)
    layout = json.loads(metadata["mlx_ext.sparse"])
    cls = _CLASSES[layout["format"]]
    ws = cls.__new__(cls)
    SparseMatrix.__init__(ws, layout)
    for k, v in arrays.items():
        ws[k] = v
    ws._finish()
    ws._validate()
    return ws


def _dense_and_mask(name, w, mask, density, prune_kwargs):
    w = _values(name, "w", w, 2)
    if mask is not None and density is not None:
        _fail(name, "pass mask or density, not both")
    if density is not None:
        mask = prune(w, density=density, **prune_kwargs)
    elif mask is None:
        mask = w != 0
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(w.shape):
        _fail(name, f"mask must have the shape of w {tuple(w.shape)}, got {mask.shape}")
    return w, mask


class CSR(SparseMatrix):
    """Compressed sparse rows: ``data`` (nnz,), ``indices`` (nnz,) columns as
    uint16 when K <= 65536 (else uint32), ``indptr`` (N + 1,) int32."""

    def __init__(self, data, indices, indptr, shape):
        n, k = _shape("CSR", shape)
        data = _values("CSR", "data", data, 1)
        cols = _integers("CSR", "indices", indices)
        if cols.shape != tuple(data.shape):
            _fail("CSR", f"indices must have the shape of data {tuple(data.shape)}, got {cols.shape}")
        ptr = _row_pointers("CSR", "indptr", indptr, n, cols.size)
        _sorted_columns("CSR", "indices", cols, np.array(ptr), k)
        super().__init__({"format": "csr", "shape": [n, k], "nnz": int(cols.size)})
        self.data = data
        self.indices = mx.array(cols.astype(np.uint16 if k <= 65536 else np.uint32))
        self.indptr = ptr
        self._finish()

    _pattern_keys = ("indices", "indptr")

    def _validate(self):
        cols = np.array(self.indices).astype(np.int64)
        if cols.shape != tuple(self.data.shape):
            _fail("CSR", f"indices must have the shape of data {tuple(self.data.shape)}, got {cols.shape}")
        ptr = _row_pointers("CSR", "indptr", np.array(self.indptr), self.shape[0], cols.size)
        _sorted_columns("CSR", "indices", cols, np.array(ptr), self.shape[1])

    @classmethod
    def from_dense(cls, w, mask=None, density=None, **prune_kwargs):
        """Keep where ``mask`` is true, or the largest ``density`` fraction
        (``prune``), or the nonzeros."""
        w, mask = _dense_and_mask("CSR", w, mask, density, prune_kwargs)
        rows, cols = np.nonzero(mask)
        ptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
        data = w.reshape(-1)[mx.array(rows * w.shape[1] + cols)] if rows.size else w.reshape(-1)[:0]
        return cls(data, cols, ptr, w.shape)

    @classmethod
    def from_scipy(cls, m):
        """A ``scipy.sparse`` matrix (converted to CSR; duplicates summed, rows sorted)."""
        m = m.tocsr(copy=True)
        m.sum_duplicates()
        m.sort_indices()
        return cls(m.data, m.indices, m.indptr, m.shape)

    def to_dense(self) -> mx.array:
        n, k = self.shape
        ptr = np.array(self.indptr)
        rows = np.repeat(np.arange(n), np.diff(ptr))
        out = np.zeros((n, k), np.float32)
        out[rows, np.array(self.indices).astype(np.int64)] = _to_numpy(self.data)
        return mx.array(out).astype(self.data.dtype)


def _pack_bits(mask):
    """Bool (N, K) -> uint32 (N, ceil(K / 32)): bit k % 32 of word k // 32."""
    n, k = mask.shape
    padded = np.zeros((n, -(-k // 32) * 32), bool)
    padded[:, :k] = mask
    return np.packbits(padded, axis=1, bitorder="little").view(np.uint32)


def _unpack_bits(words, k):
    words = np.ascontiguousarray(np.asarray(words, dtype=np.uint32))
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").astype(bool)
    return bits[:, :k]


class Bitmask(SparseMatrix):
    """A bit per element of W and the stored values packed row after row:
    ``data`` (nnz,), ``mask`` (N, ceil(K / 32)) uint32 (bit k % 32 of word
    k // 32 marks W[n, k] stored), ``row_ptr`` (N + 1,) int32 (derived)."""

    def __init__(self, data, mask, shape):
        """``mask``: bool (N, K), or packed uint32 (N, ceil(K / 32))."""
        n, k = _shape("Bitmask", shape)
        data = _values("Bitmask", "data", data, 1)
        mask = np.asarray(mask)
        if mask.dtype == bool:
            if mask.shape != (n, k):
                _fail("Bitmask", f"a bool mask must have shape {(n, k)}, got {mask.shape}")
            words = _pack_bits(mask)
        else:
            if mask.dtype != np.uint32:
                _fail("Bitmask", f"mask must be bool or uint32, got {mask.dtype}", TypeError)
            if mask.shape != (n, -(-k // 32)):
                _fail("Bitmask", f"a packed mask must have shape {(n, -(-k // 32))}, got {mask.shape}")
            words = mask
            if k % 32 and np.any(words[:, -1] >> np.uint32(k % 32)):
                _fail("Bitmask", f"mask has bits set past column K={k}")
        counts = _unpack_bits(words, k).sum(axis=1)
        if counts.sum() != data.size:
            _fail("Bitmask", f"data holds {data.size} values but the mask marks {counts.sum()}")
        super().__init__({"format": "bitmask", "shape": [n, k], "nnz": int(data.size)})
        self.data = data
        self.mask = mx.array(words)
        self.row_ptr = _row_pointers("Bitmask", "row_ptr", np.concatenate([[0], np.cumsum(counts)]),
                                     n, data.size)
        self._finish()

    _pattern_keys = ("mask", "row_ptr")

    def _validate(self):
        n, k = self.shape
        words = np.array(self.mask)
        if k % 32 and np.any(words[:, -1] >> np.uint32(k % 32)):
            _fail("Bitmask", f"mask has bits set past column K={k}")
        ptr = _row_pointers("Bitmask", "row_ptr", np.array(self.row_ptr), n, self.data.size)
        if np.any(np.diff(np.array(ptr)) != _unpack_bits(words, k).sum(axis=1)):
            _fail("Bitmask", "row_ptr does not count the bits of the mask's rows")

    @classmethod
    def from_dense(cls, w, mask=None, density=None, **prune_kwargs):
        w, mask = _dense_and_mask("Bitmask", w, mask, density, prune_kwargs)
        flat = np.flatnonzero(mask)
        data = w.reshape(-1)[mx.array(flat)] if flat.size else w.reshape(-1)[:0]
        return cls(data, mask, w.shape)

    def to_dense(self) -> mx.array:
        n, k = self.shape
        out = np.zeros((n, k), np.float32)
        out[_unpack_bits(np.array(self.mask), k)] = _to_numpy(self.data)
        return mx.array(out).astype(self.data.dtype)


class BSR(SparseMatrix):
    """Block sparse rows: ``data`` (nnzb, bn, bk) dense blocks, ``indices``
    (nnzb,) int32 block columns, ``indptr`` (N / bn + 1,) int32."""

    def __init__(self, data, indices, indptr, shape):
        n, k = _shape("BSR", shape)
        data = _values("BSR", "data", data, 3)
        bn, bk = data.shape[1:]
        if bn < 1 or bk < 1 or n % bn or k % bk:
            _fail("BSR", f"blocks of shape {(bn, bk)} do not divide the shape {(n, k)}")
        cols = _integers("BSR", "indices", indices)
        if cols.shape != (data.shape[0],):
            _fail("BSR", f"indices must have shape ({data.shape[0]},), got {cols.shape}")
        ptr = _row_pointers("BSR", "indptr", indptr, n // bn, cols.size)
        _sorted_columns("BSR", "indices", cols, np.array(ptr), k // bk)
        super().__init__({"format": "bsr", "shape": [n, k], "block": [bn, bk],
                          "nnz": int(data.size)})
        self.data = data
        self.indices = mx.array(cols.astype(np.int32))
        self.indptr = ptr
        self._finish()

    _pattern_keys = ("indices", "indptr")

    def _validate(self):
        (n, k), (bn, bk) = self.shape, self.layout["block"]
        cols = np.array(self.indices).astype(np.int64)
        ptr = _row_pointers("BSR", "indptr", np.array(self.indptr), n // bn, cols.size)
        _sorted_columns("BSR", "indices", cols, np.array(ptr), k // bk)

    @classmethod
    def from_dense(cls, w, block=32, mask=None, density=None):
        """Keep the blocks where ``mask`` (of W's shape, or one entry per
        block) has any true entry, or the ``density`` fraction of blocks
        with the largest L2 norm, or the blocks holding a nonzero."""
        w = _values("BSR", "w", w, 2)
        n, k = w.shape
        bn, bk = (block, block) if isinstance(block, int) else block
        if n % bn or k % bk:
            _fail("BSR", f"block {(bn, bk)} does not divide the shape {(n, k)}")
        blocks = _to_numpy(w).reshape(n // bn, bn, k // bk, bk).transpose(0, 2, 1, 3)
        if mask is not None and density is not None:
            _fail("BSR", "pass mask or density, not both")
        if density is not None:
            norms = np.sqrt((blocks.astype(np.float64) ** 2).sum(axis=(2, 3)))
            keep = _top_fraction(norms.reshape(1, -1), density).reshape(norms.shape)
        elif mask is not None:
            mask = np.asarray(mask, bool)
            if mask.shape == (n, k):
                mask = mask.reshape(n // bn, bn, k // bk, bk).any(axis=(1, 3))
            if mask.shape != (n // bn, k // bk):
                _fail("BSR", f"mask must have shape {(n, k)} or {(n // bn, k // bk)}, got {mask.shape}")
            keep = mask
        else:
            keep = np.abs(blocks).sum(axis=(2, 3)) > 0
        br, bc = np.nonzero(keep)
        ptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
        data = mx.array(blocks[br, bc]).astype(w.dtype) if br.size else mx.zeros((0, bn, bk), w.dtype)
        return cls(data, bc, ptr, (n, k))

    def to_dense(self) -> mx.array:
        n, k = self.shape
        bn, bk = self.layout["block"]
        ptr = np.array(self.indptr)
        br = np.repeat(np.arange(n // bn), np.diff(ptr))
        out = np.zeros((n // bn, k // bk, bn, bk), np.float32)
        out[br, np.array(self.indices)] = _to_numpy(self.data)
        return mx.array(out.transpose(0, 2, 1, 3).reshape(n, k)).astype(self.data.dtype)


def _code_bits(m):
    return 2 if m == 4 else 4


def _pack_codes(codes, m):
    """Positions (N, kc) in [0, m) -> uint32 words, code_bits each, low first."""
    bits = _code_bits(m)
    per = 32 // bits
    n, kc = codes.shape
    padded = np.zeros((n, -(-kc // per) * per), np.uint64)
    padded[:, :kc] = codes
    shifts = (np.arange(per, dtype=np.uint64) * bits)
    return (padded.reshape(n, -1, per) << shifts).sum(axis=-1).astype(np.uint32)


def _unpack_codes(words, kc, m):
    bits = _code_bits(m)
    per = 32 // bits
    words = np.asarray(words, dtype=np.uint64)
    shifts = np.arange(per, dtype=np.uint64) * bits
    codes = (words[..., None] >> shifts) & np.uint64((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :kc].astype(np.int64)


class NM(SparseMatrix):
    """n of every m consecutive values along K (2:4, 4:8): the kept values
    ``data`` (N, K n / m) (or ``w_q``, ``scales``, ``biases``: MLX's affine
    quantization of them, ``bits`` 4 or 8) and ``codes`` (N, words) uint32,
    the position in [0, m) of each kept value within its group, 2 bits each
    for m = 4 and 4 bits for m = 8."""

    def __init__(self, data, codes, shape, n=2, m=4, *, bits=None, group_size=64):
        """``data``: (N, K n / m) float kept values; ``codes``: (N, K n / m)
        integer positions, strictly increasing within each group of n.
        ``bits`` (4 or 8) quantizes the values with ``mx.quantize``."""
        rows, k = _shape("NM", shape)
        if m not in (4, 8) or not 0 < n < m:
            _fail("NM", f"n:m={n}:{m} is not supported; m must be 4 or 8 and 0 < n < m")
        if k % m:
            _fail("NM", f"K={k} is not a multiple of m={m}")
        kc = k // m * n
        data = _values("NM", "data", data, 2)
        if tuple(data.shape) != (rows, kc):
            _fail("NM", f"data must have shape {(rows, kc)}, got {tuple(data.shape)}")
        codes = _integers("NM", "codes", codes, 2)
        if codes.shape != (rows, kc):
            _fail("NM", f"codes must have shape {(rows, kc)}, got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= m):
            _fail("NM", f"codes must lie in [0, {m}), got {codes[(codes < 0) | (codes >= m)][0]}")
        if n > 1 and np.any(np.diff(codes.reshape(rows, -1, n), axis=-1) <= 0):
            _fail("NM", "codes must be strictly increasing within each group of n")
        layout = {"format": "nm", "shape": [rows, k], "n": n, "m": m, "nnz": rows * kc,
                  "bits": 0, "group_size": 0}
        if bits is not None:
            if bits not in (4, 8):
                _fail("NM", f"bits={bits} is not supported; use 4 or 8")
            if group_size not in (32, 64, 128) or kc % group_size:
                _fail("NM", f"group_size={group_size} must be 32, 64 or 128 and divide K n / m = {kc}")
            layout.update(bits=bits, group_size=group_size)
        super().__init__(layout)
        if bits is None:
            self.data = data
        else:
            self.w_q, self.scales, self.biases = mx.quantize(data, group_size, bits)
        self.codes = mx.array(_pack_codes(codes, m))
        self._finish()

    _pattern_keys = ("codes",)

    def _validate(self):
        rows, k = self.shape
        n, m = self.layout["n"], self.layout["m"]
        codes = _unpack_codes(np.array(self.codes), k // m * n, m)
        if codes.size and codes.max() >= m:
            _fail("NM", f"codes must lie in [0, {m}), got {codes.max()}")
        if n > 1 and np.any(np.diff(codes.reshape(rows, -1, n), axis=-1) <= 0):
            _fail("NM", "codes must be strictly increasing within each group of n")

    @classmethod
    def from_dense(cls, w, n=2, m=4, *, mask=None, bits=None, group_size=64, **prune_kwargs):
        """Keep, per group of m along K, the n entries of ``mask`` (at most n
        true per group; missing ones are stored as zeros), or by default the
        n of largest magnitude (``prune(w, pattern="n:m")``)."""
        w = _values("NM", "w", w, 2)
        rows, k = w.shape
        if m not in (4, 8) or not 0 < n < m or k % m:
            _fail("NM", f"n:m={n}:{m} needs m in (4, 8), 0 < n < m and m dividing K={k}")
        if mask is None:
            mask = prune(w, pattern=f"{n}:{m}", **prune_kwargs)
        mask = np.asarray(mask, bool)
        if mask.shape != (rows, k):
            _fail("NM", f"mask must have shape {(rows, k)}, got {mask.shape}")
        groups = mask.reshape(rows, -1, m)
        if np.any(groups.sum(axis=-1) > n):
            _fail("NM", f"mask keeps more than {n} of some group of {m}")
        # Kept positions first (stable: lowest positions among equals), then sorted.
        order = np.argsort(~groups, axis=-1, kind="stable")[..., :n]
        codes = np.sort(order, axis=-1)
        keep = np.take_along_axis(groups, codes, axis=-1)
        cols = (np.arange(k // m)[None, :, None] * m + codes).reshape(rows, -1)
        flat = mx.array((np.arange(rows)[:, None] * k + cols).reshape(-1))
        data = mx.where(mx.array(keep.reshape(-1)), w.reshape(-1)[flat], 0).astype(w.dtype)
        return cls(data.reshape(rows, -1), codes.reshape(rows, -1), (rows, k), n, m,
                   bits=bits, group_size=group_size)

    def kept_values(self) -> mx.array:
        """The kept values (dequantized when quantized), (N, K n / m)."""
        l = self.layout
        if l["bits"]:
            return mx.dequantize(self.w_q, self.scales, self.biases, l["group_size"], l["bits"])
        return self.data

    def to_dense(self) -> mx.array:
        rows, k = self.shape
        l = self.layout
        kc = k // l["m"] * l["n"]
        codes = _unpack_codes(np.array(self.codes), kc, l["m"])
        cols = (np.arange(kc) // l["n"]) * l["m"] + codes
        out = np.zeros((rows, k), np.float32)
        np.put_along_axis(out, cols, _to_numpy(self.kept_values()), axis=1)
        return mx.array(out).astype(self.kept_values().dtype)


_CLASSES = {"csr": CSR, "bitmask": Bitmask, "bsr": BSR, "nm": NM}


def stored_mask(w: SparseMatrix) -> np.ndarray:
    """Bool (N, K): where ``w`` stores a value (explicit zeros included)."""
    n, k = w.shape
    l = w.layout
    if l["format"] == "bitmask":
        return _unpack_bits(np.array(w.mask), k)
    mask = np.zeros((n, k), bool)
    if l["format"] == "csr":
        ptr = np.array(w.indptr)
        mask[np.repeat(np.arange(n), np.diff(ptr)), np.array(w.indices).astype(np.int64)] = True
    elif l["format"] == "bsr":
        bn, bk = l["block"]
        ptr = np.array(w.indptr)
        blocks = np.zeros((n // bn, k // bk), bool)
        blocks[np.repeat(np.arange(n // bn), np.diff(ptr)), np.array(w.indices)] = True
        mask = np.repeat(np.repeat(blocks, bn, axis=0), bk, axis=1)
    else:
        kc = k // l["m"] * l["n"]
        cols = (np.arange(kc) // l["n"]) * l["m"] + _unpack_codes(np.array(w.codes), kc, l["m"])
        np.put_along_axis(mask, cols, True, axis=1)
    return mask


def split_units(w: SparseMatrix) -> tuple[int, int]:
    """The rows and the columns a split of ``w`` must keep together: BSR's
    blocks, N:M's groups of m columns (of a whole quantization group of kept
    values when they are quantized), single ones otherwise."""
    l = w.layout
    if l["format"] == "bsr":
        return tuple(l["block"])
    if l["format"] == "nm":
        return 1, l["m"] * l["group_size"] // l["n"] if l["bits"] else l["m"]
    return 1, 1


def submatrix(w: SparseMatrix, rows=None, cols=None) -> SparseMatrix:
    """The rows (a list of [start, stop) ranges, concatenated) and the
    columns [start, stop) of ``w``, in its format, with the same stored
    pattern and values (tensor parallelism: ``mlx_ext.shard``). BSR needs
    whole blocks, N:M whole groups of m columns (and of the quantization
    group for quantized values, which are sliced, not quantized again)."""
    n, k = w.shape
    l = w.layout
    rows = rows or [(0, n)]
    c0, c1 = cols or (0, k)
    name = type(w).__name__
    unit_n, unit_k = split_units(w)
    if any(a % unit_n or b % unit_n for a, b in rows) or c0 % unit_k or c1 % unit_k:
        _fail(name, f"rows {rows} and columns {(c0, c1)} must be multiples of {(unit_n, unit_k)} "
                    f"(whole {'blocks' if l['format'] == 'bsr' else 'groups'})")
    take = np.concatenate([np.arange(a, b) for a, b in rows])
    mask = stored_mask(w)[take, c0:c1]
    shape = (len(take), c1 - c0)
    if l["format"] == "nm" and l["bits"]:
        # Slice the quantized arrays: quantizing dequantized values again would move them.
        per = l["n"] / l["m"]
        q0, q1 = int(c0 * per), int(c1 * per)
        idx = mx.array(take)
        codes = _unpack_codes(np.array(w.codes), k // l["m"] * l["n"], l["m"])[take, q0:q1]
        out = NM(mx.zeros((shape[0], q1 - q0), w.scales.dtype), codes, shape, l["n"], l["m"])
        width = w.w_q.shape[1] * 32 // l["bits"]
        out.w_q = w.w_q[idx, q0 * w.w_q.shape[1] // width : q1 * w.w_q.shape[1] // width]
        out.scales = w.scales[idx, q0 // l["group_size"] : q1 // l["group_size"]]
        out.biases = w.biases[idx, q0 // l["group_size"] : q1 // l["group_size"]]
        del out["data"]
        out["_layout"] = json.dumps(dict(out.layout, bits=l["bits"], group_size=l["group_size"]), sort_keys=True)
        out._finish()
        return out
    dense = w.to_dense()[mx.array(take), c0:c1]
    if l["format"] == "bsr":
        return BSR.from_dense(dense, block=tuple(l["block"]), mask=mask)
    if l["format"] == "nm":
        return NM.from_dense(dense, l["n"], l["m"], mask=mask)
    return type(w).from_dense(dense, mask=mask)


def _top_fraction(scores, density):
    """Bool mask keeping, in each row of ``scores``, the round(density * K)
    largest entries (ties: lower column first)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"[mlx_ext.sparse.prune] density must lie in [0, 1], got {density}")
    rows, k = scores.shape
    keep = int(round(density * k))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    mask = np.zeros((rows, k), bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def prune(w, density=None, pattern=None, method="magnitude", activation_norms=None) -> np.ndarray:
    """The mask (bool NumPy array of w's shape) of the weights to keep.

    Either ``density`` (the fraction kept in every row, to within one element)
    or ``pattern="n:m"`` (exactly n kept of every m consecutive along K).
    ``method="magnitude"`` scores |w|; ``"wanda"`` scores |w| times the
    input's column norms ``activation_norms`` (K,), as in Wanda (Sun et al.).
    """
    w = np.abs(_to_numpy(w) if isinstance(w, mx.array) else np.asarray(w)).astype(np.float64)
    if w.ndim != 2:
        raise ValueError(f"[mlx_ext.sparse.prune] w must be 2-D, got shape {w.shape}")
    if method == "magnitude":
        scores = w
    elif method == "wanda":
        if activation_norms is None:
            raise ValueError("[mlx_ext.sparse.prune] method='wanda' needs activation_norms")
        norms = activation_norms
        norms = _to_numpy(norms) if isinstance(norms, mx.array) else np.asarray(norms)
        norms = np.abs(norms.astype(np.float64).reshape(-1))
        if norms.shape != (w.shape[1],):
            raise ValueError(f"[mlx_ext.sparse.prune] activation_norms must have shape "
                             f"({w.shape[1]},), got {norms.shape}")
        scores = w * norms
    else:
        raise ValueError(f"[mlx_ext.sparse.prune] method must be 'magnitude' or 'wanda', got {method!r}")
    if (density is None) == (pattern is None):
        raise ValueError("[mlx_ext.sparse.prune] pass exactly one of density and pattern")
    if density is not None:
        return _top_fraction(scores, density)
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except (AttributeError, ValueError):
        raise ValueError(f"[mlx_ext.sparse.prune] pattern must be 'n:m', got {pattern!r}") from None
    if not 0 < n <= m or w.shape[1] % m:
        raise ValueError(f"[mlx_ext.sparse.prune] pattern {pattern!r} needs 0 < n <= m and m "
                         f"dividing K={w.shape[1]}")
    rows, k = w.shape
    return _top_fraction(scores.reshape(-1, m), n / m).reshape(rows, k)
