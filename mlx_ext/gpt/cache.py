"""The key/value cache of the decoder.

Each layer owns a keys and a values buffer of shape (B, kv_heads, capacity,
head_dim) in the cache's dtype (attention runs in it), grown ahead of use in
blocks of ``BLOCK`` positions. New entries are written with ``slice_update``;
once the caller drops the old buffer, MLX updates it in place, so a decode
step copies nothing.

Two modes, told apart by the type of ``offset``:
- prefill (``offset`` a Python int): attention reads the filled prefix
  ``[:offset + L]`` with a causal mask;
- decode (``offset`` an int32 array, inside ``mx.compile``): attention reads the
  whole buffer, with unfilled positions masked, so that shapes change only when
  the buffer grows and the compiled step is traced once per block.
"""

import mlx.core as mx

BLOCK = 256


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: mx.Dtype):
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.offset = 0  # positions filled; an array while a compiled step traces
        self.capacity = 0

    @classmethod
    def decoding(cls, keys: list, values: list, offset: mx.array) -> "KVCache":
        """The cache as a compiled decode step sees it: its buffers and an array offset."""
        cache = cls(len(keys), keys[0].shape[1], keys[0].shape[3], keys[0].dtype)
        cache.keys, cache.values, cache.offset = list(keys), list(values), offset
        cache.capacity = keys[0].shape[2]
        return cache

    def reserve(self, batch: int, length: int) -> None:
        """Make room for `length` more positions (outside compiled code: it may grow)."""
        needed = self.offset + length
        if needed <= self.capacity:
            return
        grown = -(-needed // BLOCK) * BLOCK
        extra = mx.zeros((batch, self.kv_heads, grown - self.capacity, self.head_dim), self.dtype)
        for store in (self.keys, self.values):
            for i, buffer in enumerate(store):
                store[i] = extra if buffer is None else mx.concatenate([buffer, extra], axis=2)
        self.capacity = grown

    def update_and_fetch(self, layer: int, keys: mx.array, values: mx.array):
        """Stores (B, kv_heads, L, head_dim) keys and values at `offset`; returns
        the keys, values and attention mask to attend over."""
        prefill = isinstance(self.offset, int)
        start = mx.array([self.offset], mx.int32) if prefill else self.offset.reshape(1)
        self.keys[layer] = mx.slice_update(self.keys[layer], keys, start, axes=(2,))
        self.values[layer] = mx.slice_update(self.values[layer], values, start, axes=(2,))
        if prefill:
            end = self.offset + keys.shape[2]
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], "causal"
        filled = mx.arange(self.capacity) <= self.offset  # decode: L == 1
        return self.keys[layer], self.values[layer], filled
