"""Exceptions of the emulator. A diagnostic from a run names the kernel, the
threadgroup, and where one thread is concerned its index, simdgroup and lane
(as attributes and in the message)."""

from __future__ import annotations


class ToolchainMissing(RuntimeError):
    """No usable clang++ (or not Linux): the emulator cannot run here."""


class CompileError(RuntimeError):
    """The .metal file could not be preprocessed, rewritten or compiled."""


class EmulatorError(RuntimeError):
    """A diagnostic raised by a kernel run."""

    def __init__(
        self, message: str, kernel: str, threadgroup=None, thread=None, simdgroup=None, lane=None
    ):
        super().__init__(message)
        self.kernel = kernel
        self.threadgroup = threadgroup
        self.thread = thread
        self.simdgroup = simdgroup
        self.lane = lane


class DeadlockError(EmulatorError):
    """No thread can proceed: a collective waits for lanes held at a barrier."""


class BarrierMismatchError(EmulatorError):
    """The threads of a group wait at different threadgroup_barrier calls."""


class DivergentCollectiveError(EmulatorError):
    """The lanes of a simdgroup are at different collectives."""


class OutOfBoundsError(EmulatorError):
    """A buffer (or threadgroup memory) was accessed outside its bounds."""


class UnboundBufferError(EmulatorError):
    """A [[buffer(i)]] the kernel uses was not bound."""


class ThreadgroupMemoryError(EmulatorError):
    """More than 32 KiB of threadgroup memory."""


class StackOverflowError(EmulatorError):
    """A thread overflowed its fiber stack."""


class StrictError(EmulatorError):
    """Under strict=True: a read of an inactive lane, or a barrier reached
    after other threads of the group returned."""


class KernelFault(EmulatorError):
    """Any other invalid memory access (a wild or misaligned pointer)."""


class FunctionConstantError(EmulatorError):
    """A function constant was read but not set."""


class LaunchError(EmulatorError, ValueError):
    """Invalid launch parameters."""


# Indexed by EmuErrorKind (runtime/abi.h).
BY_KIND = [
    None,
    DeadlockError,
    BarrierMismatchError,
    DivergentCollectiveError,
    OutOfBoundsError,
    UnboundBufferError,
    ThreadgroupMemoryError,
    StackOverflowError,
    StrictError,
    KernelFault,
    FunctionConstantError,
    LaunchError,
]
