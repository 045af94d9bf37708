"""The key/value cache of the decoder.

Each layer owns a keys and a values buffer of shape (B, kv_heads, capacity,
head_dim) in the cache's dtype (attention runs in it), grown ahead of use in
blocks of ``BLOCK`` positions. New entries are written with ``slice_update``;
once the caller drops the old buffer, MLX updates it in place, so a decode
step copies nothing.

With ``bits`` (4 or 8) the cache is quantized the way mlx-lm's
``QuantizedKVCache`` is: each buffer is a ``(w_q, scales, biases)`` tuple,
``mx.quantize`` along head_dim in groups of ``group_size``: codes (B,
kv_heads, capacity, head_dim * bits / 32) uint32, scales and biases (B,
kv_heads, capacity, head_dim / group_size) in the cache's dtype. Attention
(``mlx_ext.scaled_dot_product_attention``) reads the packed codes directly.

Two modes, told apart by the type of ``offset``:
- prefill (``offset`` a Python int): attention reads the filled prefix
  ``[:offset + L]`` with a causal mask;
- decode (``offset`` an int32 array, inside ``mx.compile``): attention reads the
  whole buffer with ``kv_lengths = offset + 1`` (no dense mask), so that shapes
  change only when the buffer grows and the compiled step is traced once per
  block.
"""

from dataclasses import dataclass

import mlx.core as mx

BLOCK = 256
KV_BITS = (4, 8)


@dataclass
class Attend:
    """What attention reads for one layer: keys and values (arrays, or
    (w_q, scales, biases) tuples), and either a mask ("causal", prefill) or the
    valid length of each sequence (int32 (B,), decode)."""

    keys: mx.array | tuple
    values: mx.array | tuple
    mask: str | None
    kv_lengths: mx.array | None


class KVCache:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: mx.Dtype,
        *,
        bits: int | None = None,
        group_size: int = 64,
    ):
        if bits is not None and bits not in KV_BITS:
            raise ValueError(f"[mlx_ext.gpt] kv bits must be one of {KV_BITS} or None, got {bits}")
        if bits is not None and head_dim % group_size != 0:
            raise ValueError(
                f"[mlx_ext.gpt] kv group_size {group_size} does not divide the head dim {head_dim}"
            )
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.bits, self.group_size = bits, group_size
        self.offset = 0  # positions filled; an array while a compiled step traces
        self.capacity = 0

    @classmethod
    def decoding(cls, keys: list, values: list, offset: mx.array, *, bits=None, group_size=64) -> "KVCache":
        """The cache as a compiled decode step sees it: its buffers and an array offset."""
        first = keys[0][1] if bits is not None else keys[0]  # scales carry the dtype
        head_dim = keys[0][0].shape[3] * 32 // bits if bits is not None else first.shape[3]
        cache = cls(len(keys), first.shape[1], head_dim, first.dtype, bits=bits, group_size=group_size)
        cache.keys, cache.values, cache.offset = list(keys), list(values), offset
        cache.capacity = first.shape[2]
        return cache

    def _empty(self, batch: int, length: int):
        shape = (batch, self.kv_heads, length)
        if self.bits is None:
            return mx.zeros((*shape, self.head_dim), self.dtype)
        groups = self.head_dim // self.group_size
        return (
            mx.zeros((*shape, self.head_dim * self.bits // 32), mx.uint32),
            mx.zeros((*shape, groups), self.dtype),
            mx.zeros((*shape, groups), self.dtype),
        )

    def reserve(self, batch: int, length: int) -> None:
        """Make room for `length` more positions (outside compiled code: it may grow)."""
        needed = self.offset + length
        if needed <= self.capacity:
            return
        grown = -(-needed // BLOCK) * BLOCK
        extra = self._empty(batch, grown - self.capacity)
        for store in (self.keys, self.values):
            for i, buffer in enumerate(store):
                store[i] = extra if buffer is None else _map2(
                    lambda b, e: mx.concatenate([b, e], axis=2), buffer, extra
                )
        self.capacity = grown

    def _quantize(self, x: mx.array):
        return x if self.bits is None else tuple(mx.quantize(x, self.group_size, self.bits))

    def update_and_fetch(self, layer: int, keys: mx.array, values: mx.array) -> Attend:
        """Stores (B, kv_heads, L, head_dim) keys and values at `offset`; returns
        what to attend over."""
        prefill = isinstance(self.offset, int)
        start = mx.array([self.offset], mx.int32) if prefill else self.offset.reshape(1)

        def write(buffer, new):
            return mx.slice_update(buffer, new, start, axes=(2,))

        self.keys[layer] = _map2(write, self.keys[layer], self._quantize(keys))
        self.values[layer] = _map2(write, self.values[layer], self._quantize(values))
        if prefill:
            end = self.offset + keys.shape[2]

            def prefix(buffer):
                return buffer[:, :, :end]

            return Attend(_map(prefix, self.keys[layer]), _map(prefix, self.values[layer]), "causal", None)
        # decode (L == 1): every sequence of the batch holds offset + 1 positions
        lengths = mx.broadcast_to(self.offset.astype(mx.int32) + 1, (keys.shape[0],))
        return Attend(self.keys[layer], self.values[layer], None, lengths)


def _map(f, buffer):
    return tuple(f(b) for b in buffer) if isinstance(buffer, tuple) else f(buffer)


def _map2(f, buffer, new):
    if isinstance(buffer, tuple):
        return tuple(f(b, n) for b, n in zip(buffer, new))
    return f(buffer, new)
