"""A llama.cpp GGUF file as the decoder's checkpoint: weights, config and tokenizer.

``mx.load`` reads the tensors: Q4_0 / Q4_1 / Q8_0 arrive in MLX's affine
format at group size 32 (``weight`` uint32, ``scales``, ``biases``), other
quantized types dequantized to float16 (load.py quantizes those again).
llama.cpp's converter permutes the rows of Q and K so that rotary pairs are
adjacent (its "normal" RoPE); the rows are put back here in Hugging Face's
order (pairs half a head apart), so that one RoPE convention serves every
checkpoint and a converted GGUF is a plain mlx-lm llama. The permutation moves
whole rows, and quantization groups run along rows, so it is exact on the
packed weights.
"""

from pathlib import Path

import mlx.core as mx

from .tokenizer import Tokenizer, _fast_tokenizer_class

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor names -> Hugging Face's (blk.N.<name> -> model.layers.N.<name>).
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# The matrices whose rows llama.cpp permutes, with their head count's config key.
ROTARY_HEADS = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}

# Token types of llama.cpp's vocabulary: control and user-defined tokens are
# matched whole in the input, never split by BPE.
CONTROL, USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) that are GPT-2's
# byte-level split, with what each splits off first.
PRE_TOKENIZERS = {"default": [], "gpt2": [], "smollm": ["digits"]}


class GGUFError(ValueError):
    """A GGUF file that cannot be read, or holds a model this loader does not run."""


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a GGUF file, with a clear error for a file that
    is truncated or not GGUF."""
    try:
        return mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise GGUFError(
            f"[mlx_ext.gpt] cannot read {path} as GGUF (truncated download or not a GGUF file?): {e}"
        ) from e


def _value(metadata: dict, key: str, default=None):
    """A metadata value as a Python scalar (mx.load gives numbers as 0-d arrays)."""
    if key not in metadata:
        if default is None:
            raise GGUFError(f"[mlx_ext.gpt] the GGUF metadata has no {key!r}")
        return default
    value = metadata[key]
    return value.item() if isinstance(value, mx.array) else value


def config_from_metadata(metadata: dict, tensors: dict) -> dict:
    """A Hugging Face style config.json of a GGUF llama (tied embeddings
    where the file has no output matrix)."""
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"[mlx_ext.gpt] GGUF architecture {architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def get(key, default=None):
        return _value(metadata, f"{architecture}.{key}", default)

    rope_scaling = get("rope.scaling.type", "none")
    if rope_scaling not in ("none", "linear"):
        raise GGUFError(f"[mlx_ext.gpt] GGUF RoPE scaling {rope_scaling!r} is not supported (only 'linear')")

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("rope.dimension_count", hidden // heads)
    if head_dim != hidden // heads:
        raise GGUFError("[mlx_ext.gpt] partial rotary embeddings are not supported")
    return {
        "model_type": architecture,
        "vocab_size": get("vocab_size", len(metadata.get("tokenizer.ggml.tokens", []))),
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "intermediate_size": get("feed_forward_length"),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": (
            {"type": "linear", "factor": get("rope.scaling.factor")} if rope_scaling == "linear" else None
        ),
        "max_position_embeddings": get("context_length", 2048),
        "bos_token_id": _value(metadata, "tokenizer.ggml.bos_token_id", -1),
        "eos_token_id": _value(metadata, "tokenizer.ggml.eos_token_id", -1),
        "tie_word_embeddings": "output.weight" not in tensors,
    }


def hugging_face_weights(tensors: dict, config: dict) -> dict:
    """The tensors under Hugging Face names, Q and K rows in Hugging Face's
    rotary order (head counts from `config`)."""
    weights = {}
    for name, tensor in tensors.items():
        module, _, kind = name.rpartition(".")
        if module.startswith("blk."):
            _, layer, short = module.split(".", 2)
            mapped = LAYER_NAMES.get(short) and f"model.layers.{layer}.{LAYER_NAMES[short]}"
        else:
            short, mapped = module, GLOBAL_NAMES.get(module)
        if mapped is None:
            raise GGUFError(f"[mlx_ext.gpt] GGUF tensor {name!r} has no place in a llama model")
        if short in ROTARY_HEADS:
            tensor = _rotary_rows_to_hugging_face(tensor, config[ROTARY_HEADS[short]])
        weights[f"{mapped}.{kind}"] = tensor
    return weights


def _rotary_rows_to_hugging_face(tensor: mx.array, heads: int) -> mx.array:
    """Undoes llama.cpp's permute(): within each head, row 2j+t (pair j, member
    t) goes back to row t*half+j."""
    rows = tensor.shape[0]
    half = rows // heads // 2
    return tensor.reshape(heads, half, 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def tokenizer_from_metadata(metadata: dict) -> Tokenizer:
    """The GGUF's GPT-2 style byte-level BPE (``tokenizer.ggml.*``) built with
    the ``tokenizers`` library, with its chat template."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in metadata:
        raise GGUFError("[mlx_ext.gpt] the GGUF metadata has no tokenizer (tokenizer.ggml.model / tokens)")
    if model != "gpt2":
        raise GGUFError(
            f"[mlx_ext.gpt] GGUF tokenizer model {model!r} is not supported (only 'gpt2': byte-level BPE)"
        )
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"[mlx_ext.gpt] GGUF pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(PRE_TOKENIZERS)})"
        )
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    fast = _fast_tokenizer_class()(
        models.BPE({token: i for i, token in enumerate(tokens)}, merges, ignore_merges=False)
    )
    splits = [pre_tokenizers.Digits(individual_digits=True)] if "digits" in PRE_TOKENIZERS[pre] else []
    fast.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, token_types)
        if kind in (CONTROL, USER_DEFINED)
    ])

    def token_of(key):
        index = _value(metadata, key, -1)
        return tokens[index] if 0 <= index < len(tokens) else None

    bos, eos = token_of("tokenizer.ggml.bos_token_id"), token_of("tokenizer.ggml.eos_token_id")
    if _value(metadata, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        fast.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokens.index(bos))]
        )
    end_ids = {_value(metadata, f"tokenizer.ggml.{kind}_token_id", -1) for kind in ("eos", "eot")}
    return Tokenizer(
        fast,
        {i for i in end_ids if i >= 0},
        chat_template=metadata.get("tokenizer.chat_template"),
        bos_token=bos,
        eos_token=eos,
    )
