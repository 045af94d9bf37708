"""The Metal-on-CPU emulator: runs the package's .metal kernels on Linux.

    from tests.metal_emu import Library
    lib = Library("metal/quantized.metal")
    lib.run("qmv_float16_gs64_b4", {0: w, 1: scales, ...}, grid=..., threadgroup=...)

See README.md for what it can and cannot show.
"""

from .build import find_clang
from .errors import (
    BarrierMismatchError,
    CompileError,
    DeadlockError,
    DivergentCollectiveError,
    EmulatorError,
    FunctionConstantError,
    KernelFault,
    LaunchError,
    OutOfBoundsError,
    StackOverflowError,
    StrictError,
    ThreadgroupMemoryError,
    ToolchainMissing,
    UnboundBufferError,
)
from .library import Library

__all__ = [
    "BarrierMismatchError",
    "CompileError",
    "DeadlockError",
    "DivergentCollectiveError",
    "EmulatorError",
    "FunctionConstantError",
    "KernelFault",
    "LaunchError",
    "Library",
    "OutOfBoundsError",
    "StackOverflowError",
    "StrictError",
    "ThreadgroupMemoryError",
    "ToolchainMissing",
    "UnboundBufferError",
    "find_clang",
]
