"""The minimal GPT inference loop on mlx_ext layers.

    model, tokenizer, config = mlx_ext.gpt.load()          # the embedded default model
    result = mlx_ext.gpt.generate(model, tokenizer, "And God said", max_tokens=100)

``python -m mlx_ext.generate`` is its command line.
"""

from .generation import Generation, GenerationStats, compiled_decode_step, generate, generate_tokens
from .load import DEFAULT_MODEL, ModelNotFoundError, load, load_model, resolve_model_path
from .model import Model, ModelArgs
from .sampling import make_sampler
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "Generation",
    "GenerationStats",
    "Model",
    "ModelArgs",
    "ModelNotFoundError",
    "Tokenizer",
    "compiled_decode_step",
    "generate",
    "generate_tokens",
    "load",
    "load_model",
    "make_sampler",
    "resolve_model_path",
]
