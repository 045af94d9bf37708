"""What every operator's Metal emulator tests (tests/test_metal_<op>.py) share.

Data in a kernel's storage types:
    to_device, from_device, nan_filled, to_bfloat16_bits, from_bfloat16_bits
The binding table metal/<op>_bindings.h (also read by the kernels and the host
code), parsed:
    parse_bindings -> Bindings(buffers, function_constants, shape)
The host code's plan, csrc/<op>/metal_plan.h, called through C++ rather than
copied into Python:
    Planner -> Launch(kernel, host_name, groups, threads)
Running a kernel the way the host code would, and checking what it wrote:
    library_fixture (a module-scoped `lib`), RUNS, run_planned, assert_matches

    lib = library_fixture(METAL / "<op>.metal")
    PLAN = Planner("<op>_metal_plan", "<op>/metal_plan.h", ints=("M", ...), strings=("type_name",),
                   body="...return {kernel, host_name, {groups}, {threads}};")

    def test_something(lib):
        launch = PLAN(M=..., type_name="float16")
        for schedule, check_bounds in RUNS:
            out = nan_filled((M, N), "float16")
            run_planned(lib, launch, {BINDINGS.buffers["out"]: out, ...}, schedule=schedule,
                        check_bounds=check_bounds)
            assert_matches(ref.to_f64(from_device(out, "float16")), expected, tol, launch.host_name)
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests import native_build
from tests import reference as ref
from tests.metal_emu import Library, ToolchainMissing

METAL = Path(__file__).resolve().parents[1] / "metal"

# ---- storage types ---------------------------------------------------------------

# NumPy type of each kernel dtype's buffers: bfloat16 travels as its uint16 bits.
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (finite inputs)."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_device(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float array in the kernel's storage type (bfloat16 as uint16 bits)."""
    if dtype == "bfloat16":
        return to_bfloat16_bits(a)
    return np.ascontiguousarray(a, dtype=STORAGE[dtype])


def from_device(a: np.ndarray, dtype: str) -> np.ndarray:
    """A buffer of the kernel's storage type as float32 (exact)."""
    return from_bfloat16_bits(a) if dtype == "bfloat16" else a.astype(np.float32)


def nan_filled(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """An output buffer of NaNs (0xFFFF is a bfloat16 NaN): what a kernel leaves
    unwritten stays NaN, and assert_matches names it."""
    return np.full(shape, 0xFFFF if dtype == "bfloat16" else np.nan, STORAGE[dtype])


# ---- the binding table -------------------------------------------------------------

# NumPy types of the MSL scalar members a shape struct may have.
_MEMBER_TYPES = {"int": np.int32, "uint": np.uint32, "float": np.float32}


@dataclass(frozen=True)
class Bindings:
    buffers: dict[str, int]  # "w" for #define <PREFIX>_BUFFER_W 0
    function_constants: dict[str, int]  # "has_bias" for #define <PREFIX>_FC_HAS_BIAS 0
    shape: np.dtype  # the shape struct's layout: np.zeros((), shape) is its value


def parse_bindings(path: Path, prefix: str, shape_struct: str) -> Bindings:
    """The buffer indices, function constant indices and shape struct that
    `path` (e.g. metal/quantized_matmul_bindings.h, prefix "QMM", shape_struct
    "QmmShape") declares for the kernels and the host code."""
    text = Path(path).read_text()
    buffers = {k.lower(): int(v) for k, v in re.findall(rf"#define {prefix}_BUFFER_(\w+) (\d+)", text)}
    constants = {k.lower(): int(v) for k, v in re.findall(rf"#define {prefix}_FC_(\w+) (\d+)", text)}
    body = re.search(rf"struct {shape_struct} \{{(.*?)\}};", text, re.S).group(1)
    members = re.findall(r"^\s*(\w+) (\w+);", body, re.M)
    unknown = [t for t, _ in members if t not in _MEMBER_TYPES]
    assert not unknown, f"{path}: {shape_struct} has members of types {unknown} this parser does not know"
    return Bindings(buffers, constants, np.dtype([(name, _MEMBER_TYPES[t]) for t, name in members]))


# ---- the host code's plan ------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """A kernel launch as the host code makes it: dispatchThreadgroups(groups, threads)."""

    kernel: str  # the kernel function the plan chose, e.g. qmv_fast
    host_name: str  # its instantiation, e.g. qmv_fast_float16_gs64_b4
    groups: tuple[int, int, int]  # threadgroups per grid dimension
    threads: tuple[int, int, int]  # threads per threadgroup

    @property
    def grid(self) -> tuple[int, int, int]:
        """Total threads per dimension (the emulator's grid, as dispatchThreads')."""
        return tuple(g * t for g, t in zip(self.groups, self.threads))


_PLAN_WRAPPER = """\
#include <cstdint>
#include <cstring>
#include <string>

#include "{header}"

namespace {{
struct PlannedLaunch {{
  std::string kernel, host_name;
  int64_t groups[3];
  int64_t threads[3];
}};

PlannedLaunch planned(const int64_t* ints, const char* const* strings) {{
{arguments}
{body}
}}

bool copy(const std::string& s, char* out, int64_t size) {{
  if (int64_t(s.size()) >= size) return false;
  std::memcpy(out, s.c_str(), s.size() + 1);
  return true;
}}
}} // namespace

extern "C" int planned_launch(const int64_t* ints, const char* const* strings, char* kernel,
    char* host_name, int64_t name_size, int64_t* groups, int64_t* threads) {{
  const PlannedLaunch launch = planned(ints, strings);
  for (int i = 0; i < 3; ++i) {{
    groups[i] = launch.groups[i];
    threads[i] = launch.threads[i];
  }}
  return copy(launch.kernel, kernel, name_size) && copy(launch.host_name, host_name, name_size);
}}
"""


class Planner:
    """A csrc/<op>/metal_plan.h called from Python, so that the tests launch
    what the host code launches from one definition of it.

    `body` is C++ that sees `header`, the int64_t arguments named in `ints` and
    the const char* ones named in `strings`, and returns
    {kernel, host_name, {groups}, {threads}}. The wrapper is compiled by
    tests/native_build.py (cached by content) at the first call; without a C++
    compiler that test skips."""

    def __init__(self, name: str, header: str, *, ints: tuple[str, ...], strings: tuple[str, ...], body: str):
        arguments = [f"  const int64_t {n} = ints[{i}];" for i, n in enumerate(ints)]
        arguments += [f"  const char* const {n} = strings[{i}];" for i, n in enumerate(strings)]
        self.name, self.ints, self.strings = name, ints, strings
        self.source = _PLAN_WRAPPER.format(header=header, arguments="\n".join(arguments), body=body)
        self._function = None

    def _load(self):
        if self._function is None:
            try:
                library = native_build.shared_library(self.name, self.source)
            except native_build.CompilerMissing as e:
                pytest.skip(str(e))
            self._function = library.planned_launch
            self._function.restype = ctypes.c_int
        return self._function

    def __call__(self, **arguments) -> Launch:
        assert set(arguments) == {*self.ints, *self.strings}, f"{self.name} takes {self.ints + self.strings}"
        ints = (ctypes.c_int64 * max(len(self.ints), 1))(*(int(arguments[n]) for n in self.ints))
        strings = (ctypes.c_char_p * max(len(self.strings), 1))(*(arguments[n].encode() for n in self.strings))
        kernel, host_name = ctypes.create_string_buffer(256), ctypes.create_string_buffer(256)
        groups, threads = (ctypes.c_int64 * 3)(), (ctypes.c_int64 * 3)()
        ok = self._load()(ints, strings, kernel, host_name, ctypes.c_int64(256), groups, threads)
        assert ok, f"{self.name}: a kernel name longer than 255 characters"
        return Launch(kernel.value.decode(), host_name.value.decode(), tuple(groups), tuple(threads))


# ---- running and checking --------------------------------------------------------------


def load_library(path: Path) -> Library:
    """Library(path), or a skip where the emulator's clang is missing."""
    try:
        return Library(path)
    except ToolchainMissing as e:
        pytest.skip(str(e))


def library_fixture(path: Path):
    """A module-scoped fixture named `lib`: the kernels of one .metal file,
    compiled once (and cached across runs). In a test module:
        lib = library_fixture(METAL / "<op>.metal")"""

    @pytest.fixture(scope="module", name="lib")
    def fixture() -> Library:
        return load_library(path)

    return fixture


# (schedule, check_bounds) of the runs each kernel gets: threads in order, in
# reverse and at random between scheduling points (a missing barrier shows in
# one of them), a guard zone after each buffer and, once, before it.
RUNS = (("forward", 1), ("reverse", 2), ("random", 1))


def run_planned(lib: Library, launch: Launch, buffers: dict, *, function_constants=None, schedule="forward",
                check_bounds=1) -> None:
    """Runs `launch` on `buffers` ({index: array}, outputs written back),
    with threadgroup memory and buffer slack poisoned and strict mode on."""
    lib.run(
        launch.host_name,
        buffers,
        grid=launch.grid,
        threadgroup=launch.threads,
        function_constants=function_constants,
        schedule=schedule,
        check_bounds=check_bounds,
        poison=True,
        strict=True,
    )


def assert_matches(got: np.ndarray, expected: np.ndarray, tol, what: str) -> None:
    """`got` (float64, from a nan_filled buffer) was written everywhere and is
    within `tol` of `expected`; a failure names the worst element after `what`."""
    assert not np.isnan(got).any(), f"{what}: outputs left unwritten (NaN) at {np.argwhere(np.isnan(got))[:5]}"
    ref.assert_within_tolerance(got, expected, tol, what)
