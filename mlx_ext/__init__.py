"""mlx_ext: fused quantized, sparse and attention operators for MLX.

``import mlx_ext`` and call its ops like MLX's own: they are lazy graph nodes
that work under ``mx.eval``, ``mx.compile`` and ``mx.grad`` on any stream.
"""

import mlx.core as _mx  # loads libmlx before _ext, which links against it

from ._build_info import MLX_VERSION as _BUILT_WITH_MLX

if _mx.__version__ != _BUILT_WITH_MLX:
    raise ImportError(
        f"mlx_ext was built against mlx {_BUILT_WITH_MLX} but mlx {_mx.__version__} "
        f"is installed; the C++ ABI must match exactly. Reinstall mlx_ext "
        f"(pip install --force-reinstall --no-binary mlx_ext mlx_ext) or install "
        f"mlx=={_BUILT_WITH_MLX}."
    )

from ._ext import (  # noqa: E402
    available_cpu_isas,
    gather_qmm,
    gather_quantized_swiglu,
    get_cpu_isa,
    get_num_threads,
    gpu_kernels,
    quantized_matmul,
    quantized_swiglu,
    rms_norm,
    scaled_dot_product_attention,
    set_cpu_isa,
    set_num_threads,
)
from . import nn, sparse  # noqa: E402
from .sparse import sparse_matmul  # noqa: E402
from .sparsify import SparsifyReport, sparsify  # noqa: E402
from .lm import patch, unpatch  # noqa: E402
from .distributed import shard  # noqa: E402
from . import gpt  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "available_cpu_isas",
    "gather_qmm",
    "gather_quantized_swiglu",
    "get_cpu_isa",
    "get_num_threads",
    "gpu_kernels",
    "gpt",
    "nn",
    "patch",
    "quantized_matmul",
    "quantized_swiglu",
    "rms_norm",
    "scaled_dot_product_attention",
    "set_cpu_isa",
    "set_num_threads",
    "shard",
    "sparse",
    "sparse_matmul",
    "sparsify",
    "SparsifyReport",
    "unpatch",
]
