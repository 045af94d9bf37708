"""mlx-lm's attention through ``mlx_ext.scaled_dot_product_attention``.

mlx-lm's attention modules call ``scaled_dot_product_attention(queries, keys,
values, cache=, scale=, mask=, sinks=)``, a name each model file imports from
``mlx_lm.models.base``: it picks ``mx.fast.scaled_dot_product_attention`` for
a plain cache and ``quantized_scaled_dot_product_attention`` (which
materialises the float32 scores) for a ``QuantizedKVCache`` (one with ``bits``).

Routing is per model instance, not per model file:
- the model file's global name is bound once to ``_dispatch``, which calls
  mlx_ext only while a routed module is running (a context variable says so)
  and mlx-lm's own function otherwise, so unpatched models in the same process
  are unaffected;
- a routed attention module gets a subclass of its class (the same name, so
  ``isinstance`` and the reports still hold) whose ``__call__`` sets that
  variable; ``unroute`` gives it its class back.

Calls the op cannot take (head dims that are not a multiple of 8 or above 256,
keys and values of different head dims as in MLA, sinks with a quantized
cache, a GPU stream in a build without GPU attention kernels) go to mlx-lm's
function unchanged. On a GPU a plain cache stays with MLX's fused attention
except where MLX has none (prefill at head dims above 128); the quantized
cache, which MLX runs unfused, comes to mlx_ext. ``calls`` counts where routed calls went ("mlx_ext" or
"mlx-lm"), which is how a user (and tests/lm_acceptance.py) can see it.
"""

import contextvars
import sys
from collections import Counter

import mlx.core as mx
import mlx.nn as nn

from . import _ext

_ROUTED = contextvars.ContextVar("mlx_ext_routed_attention", default=False)
_NAME = "scaled_dot_product_attention"
_FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)
_MAX_HEAD_DIM = 256

calls: Counter = Counter()


def route(model: nn.Module) -> Counter:
    """Route the attention modules of an mlx-lm model through mlx_ext; returns
    their counts by type name."""
    routed = Counter()
    for module in model.modules():
        cls = type(module)
        if getattr(cls, "_mlx_ext_unrouted", None) is None:
            model_file = _attention_globals(cls)
            if model_file is not None:
                _install_dispatch(model_file)
                module.__class__ = _routed_class(cls)
        if getattr(type(module), "_mlx_ext_unrouted", None) is not None:
            routed[cls.__name__] += 1
    return routed


def unroute(model: nn.Module) -> Counter:
    """Give routed attention modules their own class back; returns their counts."""
    restored = Counter()
    for module in model.modules():
        original = getattr(type(module), "_mlx_ext_unrouted", None)
        if original is not None:
            module.__class__ = original
            restored[original.__name__] += 1
    return restored


def _attention_globals(cls: type) -> dict | None:
    """The globals of the file defining `cls.__call__` when that calls the
    file's scaled_dot_product_attention and the name is mlx-lm's (or already
    our dispatcher); else None."""
    call = getattr(cls, "__call__", None)
    code = getattr(call, "__code__", None)
    if code is None or _NAME not in code.co_names:
        return None
    bound = call.__globals__.get(_NAME)
    if bound is None or _original_of(bound) is not _mlx_lm_attention():
        return None
    return call.__globals__


def _mlx_lm_attention():
    base = sys.modules.get("mlx_lm.models.base")
    return getattr(base, _NAME, None)


def _original_of(function):
    return getattr(function, "_mlx_ext_original", function)


_ROUTED_CLASSES: dict[type, type] = {}


def _routed_class(cls: type) -> type:
    routed = _ROUTED_CLASSES.get(cls)
    if routed is None:

        def __call__(self, *args, **kwargs):
            token = _ROUTED.set(True)
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                _ROUTED.reset(token)

        routed = type(
            cls.__name__,
            (cls,),
            {"__call__": __call__, "__module__": cls.__module__, "_mlx_ext_unrouted": cls},
        )
        _ROUTED_CLASSES[cls] = routed
    return routed


def _install_dispatch(model_file: dict) -> None:
    original = model_file[_NAME]
    if getattr(original, "_mlx_ext_original", None) is not None:
        return  # installed by an earlier patch

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if _ROUTED.get():
            out = _through_mlx_ext(queries, keys, values, cache, scale, mask, sinks)
            calls["mlx-lm" if out is None else "mlx_ext"] += 1
            if out is not None:
                return out
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention._mlx_ext_original = original
    model_file[_NAME] = scaled_dot_product_attention


def _through_mlx_ext(queries, keys, values, cache, scale, mask, sinks):
    """mlx_ext's attention for mlx-lm's arguments, or None where it cannot take them."""
    quantized = hasattr(cache, "bits")
    if quantized and sinks is not None:
        return None  # mlx-lm refuses this pair; let it say so
    head_dim = queries.shape[-1]
    key_dim = keys[0].shape[-1] * 32 // cache.bits if quantized else keys.shape[-1]
    value_dim = values[0].shape[-1] * 32 // cache.bits if quantized else values.shape[-1]
    if (
        queries.ndim != 4
        or queries.dtype not in _FLOAT_TYPES
        or head_dim % 8
        or head_dim > _MAX_HEAD_DIM
        or key_dim != head_dim
        or value_dim != head_dim
        or not _runs_on_default_stream()
    ):
        return None
    if not quantized and mx.default_device() != mx.cpu and not _ours_on_gpu(queries.shape, _on_cuda()):
        return None  # MLX's own fused GPU attention (cuDNN / Metal), faster there or not measured
    extra = {"bits": cache.bits, "group_size": cache.group_size} if quantized else {}
    return _ext.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=mask, sinks=sinks, **extra
    )


def _ours_on_gpu(queries_shape, on_cuda: bool) -> bool:
    """Whether a plain (unquantized) cache goes to mlx_ext on a GPU, from
    same-process measurements against mx.fast (bench/results/h200/attention.md,
    H200, bf16, 32 q / 8 kv heads, D=128):
    - one-row decode on CUDA: ours takes 0.82x / 0.41x / 0.27x of mx.fast's time
      at 4K / 32K / 128K keys;
    - prefill at head dims up to 128: cuDNN is faster (ours 0.27x its rate at 8K);
    - prefill above 128, where MLX falls back to unfused attention (beyond cuDNN
      and MLX's Metal prefill kernels): ours 2.7-3.3x at 8K.
    On Metal nothing has been timed (no Apple GPU here), so only the last case
    comes to mlx_ext there."""
    rows, head_dim = queries_shape[2], queries_shape[-1]
    if rows > 1:
        return head_dim > 128
    return on_cuda


def _on_cuda() -> bool:
    return hasattr(mx, "cuda") and mx.cuda.is_available()


def _runs_on_default_stream() -> bool:
    return mx.default_device() == mx.cpu or _ext.gpu_kernels()[_NAME]
