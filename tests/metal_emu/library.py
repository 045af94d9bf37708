"""Library(path).run(...): launching the kernels of one .metal file on the CPU."""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import threading
from pathlib import Path

import numpy as np

from . import build, trace
from .errors import BY_KIND, LaunchError, UnboundBufferError

MAX_BUFFERS = 31
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
BIND_DATA, BIND_UNBOUND = 1, 2

# struct formats of function constant types (packed into 8-byte slots).
_FC_FORMATS = {
    "bool": "?",
    "char": "b",
    "signed char": "b",
    "int8_t": "b",
    "uchar": "B",
    "unsigned char": "B",
    "uint8_t": "B",
    "short": "h",
    "int16_t": "h",
    "ushort": "H",
    "unsigned short": "H",
    "uint16_t": "H",
    "int": "i",
    "int32_t": "i",
    "uint": "I",
    "unsigned int": "I",
    "uint32_t": "I",
    "long": "q",
    "int64_t": "q",
    "ulong": "Q",
    "unsigned long": "Q",
    "uint64_t": "Q",
    "size_t": "Q",
    "float": "f",
    "half": "e",
}


# ctypes mirrors of runtime/abi.h.
class _Region(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("nbytes", ctypes.c_uint64),
        ("guard_lo", ctypes.c_void_p),
        ("data_lo", ctypes.c_void_p),
        ("data_hi", ctypes.c_void_p),
        ("guard_hi", ctypes.c_void_p),
    ]


class _Launch(ctypes.Structure):
    _fields_ = [
        ("entry", ctypes.c_void_p),
        ("kernel", ctypes.c_char_p),
        ("grid", ctypes.c_uint32 * 3),
        ("threadgroup", ctypes.c_uint32 * 3),
        ("buffers", ctypes.c_void_p * MAX_BUFFERS),
        ("regions", _Region * MAX_BUFFERS),
        ("binding", ctypes.c_int32 * MAX_BUFFERS),
        ("threadgroup_bytes", ctypes.c_uint32 * MAX_BUFFERS),
        ("schedule", ctypes.c_int32),
        ("poison", ctypes.c_int32),
        ("strict", ctypes.c_int32),
        ("workers", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
    ]


class _Error(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("threadgroup", ctypes.c_uint32 * 3),
        ("thread", ctypes.c_int32),
        ("simdgroup", ctypes.c_int32),
        ("lane", ctypes.c_int32),
        ("message", ctypes.c_char * 4096),
    ]


@functools.cache
def _runtime() -> ctypes.CDLL:
    rt = ctypes.CDLL(str(build.runtime_library()))
    rt.emu_launch.argtypes = [ctypes.POINTER(_Launch), ctypes.POINTER(_Error)]
    rt.emu_launch.restype = ctypes.c_int
    rt.emu_region_alloc.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(_Region)]
    rt.emu_region_alloc.restype = ctypes.c_int
    rt.emu_region_free.argtypes = [ctypes.POINTER(_Region)]
    rt.emu_poison_block.restype = ctypes.c_void_p
    sizes = (ctypes.c_size_t * 2)()
    rt.emu_struct_sizes(ctypes.byref(sizes, 0), ctypes.byref(sizes, ctypes.sizeof(ctypes.c_size_t)))
    if (sizes[0], sizes[1]) != (ctypes.sizeof(_Launch), ctypes.sizeof(_Error)):
        raise RuntimeError("library.py's ctypes structs do not match runtime/abi.h")
    return rt


# The runtime's worker memory is shared by all launches: one at a time.
_launch_lock = threading.Lock()


def _dims(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(int(d) < 1 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive sizes, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))  # type: ignore[return-value]


def _buffer_data(index: int, value):
    """The numpy array (copied in and out) or bytes (copied in) for one buffer."""
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous:
            raise ValueError(f"buffer {index}: arrays must be C-contiguous")
        return value
    if isinstance(value, np.generic):
        return value.tobytes()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(
        f"buffer {index}: expected a numpy array, numpy scalar or bytes, got "
        f"{type(value).__name__} (use e.g. np.int32(5) to fix a scalar's type)"
    )


class Library:
    """The kernels of one .metal file, compiled for the CPU (see README.md).

    `Library(path)` preprocesses, rewrites and compiles the file (cached by
    content); `host_names` lists its launchable kernels.
    """

    def __init__(self, path):
        self.path = Path(path).resolve()
        lib_path, meta = build.build(self.path)
        self._rt = _runtime()
        self._lib = ctypes.CDLL(str(lib_path))
        self._kernels = {k["host_name"]: k for k in meta["kernels"]}
        self._constants = {fc["name"]: fc for fc in meta["function_constants"]}

    @property
    def host_names(self) -> list[str]:
        return list(self._kernels)

    def run(
        self,
        host_name: str,
        buffers,
        grid=(1, 1, 1),
        threadgroup=(1, 1, 1),
        function_constants=None,
        threadgroup_memory=None,
        schedule: str = "forward",
        check_bounds: int = 1,
        poison: bool = True,
        strict: bool = False,
        workers: int = 1,
    ) -> None:
        """Runs kernel `host_name` over a grid, like MLX's dispatch_threads.

        buffers: {index: value} or a sequence indexed by [[buffer(i)]] (None =
            unbound). Values: numpy arrays (C-contiguous; copied in, and
            written back in place after the run), numpy scalars or bytes for
            `constant T&` arguments (copied in only).
        grid: total threads per dimension (int or 1-3 ints); groups at the
            upper edges are partial, as with dispatch_threads.
        threadgroup: threads per threadgroup (at most 1024).
        function_constants: {name or [[function_constant]] index: value}.
        threadgroup_memory: {index: bytes} for [[threadgroup(i)]] arguments.
        schedule: order in which a group's threads run between scheduling
            points: "forward", "reverse" or "random" ($MLX_EXT_EMU_SEED seeds it).
        check_bounds: 0 none (arrays used in place), 1 a guard zone right
            after each buffer, 2 right before it.
        poison: threadgroup memory and reads of inactive lanes are NaN
            (all bits set) instead of zero.
        strict: reads of inactive lanes, and barriers reached after other
            threads of the group returned, are errors.
        workers: OS threads running threadgroups (1 = deterministic).

        Raises an EmulatorError subclass naming kernel, threadgroup, thread
        and lane for each diagnostic (see errors.py).
        """
        kernel = self._kernels.get(host_name)
        if kernel is None:
            raise KeyError(
                f"{self.path.name} has no kernel '{host_name}'; it has {self.host_names}"
            )
        if schedule not in SCHEDULES or check_bounds not in (0, 1, 2) or int(workers) < 1:
            raise ValueError(
                f"bad schedule={schedule!r}, check_bounds={check_bounds!r} or workers={workers!r}"
            )
        if not isinstance(buffers, dict):
            buffers = {i: v for i, v in enumerate(buffers) if v is not None}
        constants = self._function_constants(function_constants or {})
        launch = _Launch()
        launch.kernel = host_name.encode()
        launch.grid[:] = _dims(grid, "grid")
        launch.threadgroup[:] = _dims(threadgroup, "threadgroup")
        launch.schedule = SCHEDULES[schedule]
        launch.poison, launch.strict, launch.workers = int(poison), int(strict), int(workers)
        launch.seed = int(os.environ.get("MLX_EXT_EMU_SEED", "0"))
        launch.entry = ctypes.cast(getattr(self._lib, kernel["entry"]), ctypes.c_void_p).value
        self._bind_threadgroup_memory(kernel, threadgroup_memory or {}, constants, launch)
        params = {p["index"]: p for p in kernel["params"] if p["kind"] == "buffer"}
        for index in buffers:
            if index not in params:
                raise ValueError(f"kernel '{host_name}' has no [[buffer({index})]]")
        with _launch_lock:
            trace.record(self.path, host_name)
            self._lib.emu_set_function_constants(*constants, len(self._constants))
            regions, copies = [], []
            try:
                for index, param in params.items():
                    self._bind_buffer(
                        launch,
                        index,
                        param,
                        buffers.get(index),
                        constants,
                        check_bounds,
                        regions,
                        copies,
                    )
                error = _Error()
                self._rt.emu_launch(ctypes.byref(launch), ctypes.byref(error))
                if error.kind == 0:
                    for array, address in copies:
                        if array.flags.writeable and array.nbytes:
                            ctypes.memmove(array.ctypes.data, address, array.nbytes)
            finally:
                for region in regions:
                    self._rt.emu_region_free(ctypes.byref(region))
        if error.kind != 0:
            thread = error.thread if error.thread >= 0 else None
            raise BY_KIND[error.kind](
                error.message.decode(errors="replace"),
                kernel=host_name,
                threadgroup=tuple(error.threadgroup),
                thread=thread,
                simdgroup=error.simdgroup if thread is not None else None,
                lane=error.lane if thread is not None else None,
            )

    def _function_constants(self, given: dict):
        """Slot values and set-flags for the file's function constants."""
        n = max(len(self._constants), 1)
        values, present = (ctypes.c_uint64 * n)(), (ctypes.c_uint8 * n)()
        by_index = {fc["index"]: fc for fc in self._constants.values()}
        for key, value in given.items():
            fc = self._constants.get(key) if isinstance(key, str) else by_index.get(key)
            if fc is None:
                raise ValueError(f"{self.path.name} declares no function constant {key!r}")
            fmt = _FC_FORMATS.get(fc["type"])
            if fmt is None:
                raise TypeError(
                    f"function constant '{fc['name']}' has unsupported type {fc['type']}"
                )
            packed = struct.pack("<" + fmt, value).ljust(8, b"\0")
            values[fc["slot"]] = int.from_bytes(packed, "little")
            present[fc["slot"]] = 1
        return values, present

    def _guard_on(self, param: dict, constants) -> bool:
        """False when the parameter's function_constant guard is unset or false."""
        fc = self._constants.get(param["guard"])
        if fc is None:
            return True
        values, flags = constants
        return bool(flags[fc["slot"]]) and values[fc["slot"]] != 0

    def _bind_threadgroup_memory(
        self, kernel: dict, sizes: dict, constants, launch: _Launch
    ) -> None:
        for p in kernel["params"]:
            if p["kind"] != "threadgroup":
                continue
            if p["index"] not in sizes and self._guard_on(p, constants):
                raise LaunchError(
                    f"kernel '{kernel['host_name']}': threadgroup_memory has no size for "
                    f"[[threadgroup({p['index']})]] '{p['name']}'",
                    kernel=kernel["host_name"],
                )
            launch.threadgroup_bytes[p["index"]] = int(sizes.get(p["index"], 0))

    def _bind_buffer(
        self, launch, index, param, value, constants, check_bounds, regions, copies
    ) -> None:
        """Points [[buffer(index)]] at a guarded copy of `value`, at the array
        itself (check_bounds=0), at a bare guard zone (an unbound pointer) or at
        the poison block (a reference its function constant switched off)."""
        kernel = launch.kernel.decode()
        if value is None:
            launch.binding[index] = BIND_UNBOUND
            if param["reference"]:
                if self._guard_on(param, constants):
                    raise UnboundBufferError(
                        f"kernel '{kernel}': [[buffer({index})]] '{param['name']}' is a "
                        "reference and must be bound (clang may read a reference even where "
                        "the kernel does not)",
                        kernel=kernel,
                    )
                launch.buffers[index] = self._rt.emu_poison_block()
                return
            data = b""
        else:
            launch.binding[index] = BIND_DATA
            data = _buffer_data(index, value)
            if isinstance(data, np.ndarray) and check_bounds == 0:
                launch.buffers[index] = data.ctypes.data
                return
        is_array = isinstance(data, np.ndarray)
        nbytes = data.nbytes if is_array else len(data)
        region = launch.regions[index]
        side = 2 if check_bounds == 2 else 1
        if self._rt.emu_region_alloc(nbytes, side, ctypes.byref(region)) != 0:
            raise MemoryError(f"cannot map {nbytes} bytes for buffer {index}")
        regions.append(region)
        launch.buffers[index] = region.data
        if nbytes:
            ctypes.memmove(region.data, data.ctypes.data if is_array else data, nbytes)
        if is_array:
            copies.append((data, region.data))
