"""A Llama-family decoder: Llama 2/3, Qwen2 (q/k/v biases) and Qwen3 (q/k norms).

RMSNorm, RoPE (with Llama 3 / YaRN scaling), grouped-query attention, SwiGLU,
tied or untied LM head. Module and parameter names are Hugging Face's, so
checkpoints load as they are. Layers are declared as float ``nn.Linear`` /
``nn.Embedding``; the loader (load.py) quantizes them and swaps in the
``mlx_ext.nn`` layers, which is what every forward pass then runs through.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .. import nn as ext_nn
from .._ext import scaled_dot_product_attention as fused_attention
from .cache import Attend, KVCache
from .rope import RoPE

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """From a Hugging Face / mlx-lm config.json (either rope field layout)."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"[mlx_ext.gpt] model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = config.get("rope_theta", rope.pop("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        heads = config["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            intermediate_size=config["intermediate_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope,
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        qkv_bias = args.model_type == "qwen2"
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        if args.model_type == "qwen3":
            self.q_norm = ext_nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = ext_nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = RoPE(hd, args.rope_theta, args.rope_scaling)
        self.scale = hd**-0.5

    def __call__(self, x: mx.array, cache: KVCache, layer: int, rope_tables=None) -> mx.array:
        B, L, _ = x.shape
        if rope_tables is None:
            rope_tables = self.rope.tables(cache.offset, L)
        if "qkv_proj" in self:  # fused at load (fuse.py): one product, rows q, k, v
            nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = mx.split(self.qkv_proj(x), [nq, nq + nkv], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _as_dtype(self.rope.apply(q.transpose(0, 2, 1, 3), rope_tables), cache.dtype)
        k = _as_dtype(self.rope.apply(k.transpose(0, 2, 1, 3), rope_tables), cache.dtype)
        v = _as_dtype(v.transpose(0, 2, 1, 3), cache.dtype)
        out = attend(q, cache.update_and_fetch(layer, k, v), self.scale, cache)
        return self.o_proj(_as_dtype(out, x.dtype).transpose(0, 2, 1, 3).reshape(B, L, -1))


def attend(q: mx.array, a: Attend, scale: float, cache: KVCache) -> mx.array:
    """Attention of q (B, Hq, L, D) over what the cache gives. On the CPU:
    mlx_ext's fused op, which reads quantized keys/values as packed codes and
    takes the decode step's valid lengths (no dense mask, no L x S scores). It
    has no GPU kernels: there, MLX's attention, with the lengths as a mask and
    a quantized cache dequantized."""
    if mx.default_device() == mx.cpu:
        return fused_attention(
            q, a.keys, a.values, scale=scale, mask=a.mask, kv_lengths=a.kv_lengths,
            group_size=cache.group_size, bits=cache.bits,
        )
    keys, values, mask = a.keys, a.values, a.mask
    if cache.bits is not None:
        keys, values = (mx.dequantize(*t, cache.group_size, cache.bits) for t in (keys, values))
    if a.kv_lengths is not None:
        mask = (mx.arange(keys.shape[2]) < a.kv_lengths[:, None])[:, None, None, :]
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)


def _as_dtype(x: mx.array, dtype: mx.Dtype) -> mx.array:
    return x if x.dtype == dtype else x.astype(dtype)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:  # fused at load (fuse.py): SwiGLU in the product's epilogue
            return self.down_proj(self.gate_up_proj(x))
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = ext_nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = ext_nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = MLP(args)

    def __call__(self, x: mx.array, cache: KVCache, layer: int, rope_tables=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache, layer, rope_tables)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = ext_nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.kv_bits, self.kv_group_size = None, 64  # make_cache's defaults
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: KVCache | None = None) -> mx.array:
        """Logits (B, L, vocab) of the (B, L) tokens that follow the cache's
        contents (None: a fresh cache), which then holds them too (its offset
        advanced by L)."""
        if cache is None:
            cache = self.make_cache()
        if isinstance(cache.offset, int):  # outside a compiled step: room is made here
            cache.reserve(tokens.shape[0], tokens.shape[1])
        h = self.model.embed_tokens(tokens)
        # every layer rotates at the same positions: the cos/sin tables once
        rope_tables = self.model.layers[0].self_attn.rope.tables(cache.offset, tokens.shape[1])
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cache, i, rope_tables)
        cache.offset = cache.offset + tokens.shape[1]
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype: that of the float parameters."""
        return self.model.norm.weight.dtype

    def make_cache(self, kv_bits: int | None = None, kv_group_size: int | None = None) -> KVCache:
        """An empty cache; `kv_bits` 4 or 8 quantizes it along head_dim in
        groups of `kv_group_size` (mlx-lm's QuantizedKVCache). The defaults are
        the model's `kv_bits` / `kv_group_size` (set by gpt.load; None: float)."""
        # MLX's CPU matmul has no fast half-precision path: there, keys, values
        # and attention stay float32 (faster and more accurate, twice the memory).
        dtype = mx.float32 if mx.default_device() == mx.cpu else self.dtype
        return KVCache(
            self.args.num_hidden_layers, self.args.num_key_value_heads, self.args.head_dim, dtype,
            bits=self.kv_bits if kv_bits is None else kv_bits,
            group_size=kv_group_size or self.kv_group_size,
        )

    def sanitize(self, weights: dict) -> dict:
        """Drops what checkpoints carry beyond the parameters: precomputed RoPE
        tables, and the copy of the tied head."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
            weights.pop("lm_head.scales", None)
            weights.pop("lm_head.biases", None)
        return weights
