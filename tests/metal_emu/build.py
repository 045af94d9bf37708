"""Compiling .metal files into shared libraries, cached by content.

Pipeline: `clang++ -E` with the empty stand-in headers of include/ first on
the include path -> rewriter.py -> one C++ file (shim + rewritten source +
entries) -> `clang++ -shared`, linked against the runtime library. Both
libraries live in the cache directory ($MLX_EXT_EMU_CACHE, default
~/.cache/mlx_ext_metal_emu) under the hash of everything that shapes them:
the preprocessed source, the shim, runtime and generator sources, the
compiler's version and the flags.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import rewriter, wrappers
from .errors import CompileError, ToolchainMissing

HERE = Path(__file__).resolve().parent
STAND_INS = HERE / "include"
SHIM = HERE / "shim"
RUNTIME = HERE / "runtime"
MIN_CLANG = 17  # _Float16 and arithmetic __bf16 in C++

# What the Metal compiler would define; seen by #if in the kernels.
PREPROCESS_FLAGS = [
    "-x",
    "c++",
    "-std=c++20",
    "-E",
    "-nostdinc",
    "-nostdinc++",
    "-D__METAL__=1",
    "-D__METAL_VERSION__=310",
    "-D__HAVE_BFLOAT__=1",
]
COMMON_FLAGS = [
    "-std=c++20",
    "-O2",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
    "-fsigned-char",
    "-g0",
]
# -fexcess-precision=16: each half / bfloat operation rounds to its type, as
# on the GPU (by default clang keeps float intermediates within an expression).
# Stack-clash protection probes every page of a large frame, so that a thread
# overflowing its fiber stack hits the guard page instead of a neighbour's stack.
KERNEL_FLAGS = [
    "-fms-extensions",
    "-fno-strict-aliasing",
    "-fno-exceptions",
    "-fno-rtti",
    "-fexcess-precision=16",
    "-fstack-clash-protection",
    "-w",
]
RUNTIME_FLAGS = ["-U_FORTIFY_SOURCE", "-Wall", "-pthread"]


@functools.cache
def find_clang() -> tuple[str, str]:
    """(path, version line) of a clang++ >= 17; raises ToolchainMissing."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
        raise ToolchainMissing(
            f"the Metal emulator runs on Linux x86-64 / aarch64 only (this is {sys.platform} "
            f"{platform.machine()}); on macOS the real Metal kernels run instead"
        )
    names = [os.environ["MLX_EXT_EMU_CLANG"]] if os.environ.get("MLX_EXT_EMU_CLANG") else []
    names += ["clang++"] + [f"clang++-{v}" for v in range(25, MIN_CLANG - 1, -1)]
    for name in names:
        path = shutil.which(name)
        if not path:
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"clang version (\d+)", out)
        if m and int(m.group(1)) >= MIN_CLANG:
            return path, out.splitlines()[0]
    raise ToolchainMissing(
        f"no clang++ >= {MIN_CLANG} found (tried {', '.join(names)}); "
        "run `bash tests/metal_emu/ensure_clang.sh` as root to install Debian's clang-19"
    )


@functools.cache
def arch_flags() -> tuple[str, ...]:
    """x86-64-v3 makes half <-> float conversion one instruction (F16C), where
    the CPU has it; without it a software routine dominates half kernels."""
    if platform.machine() != "x86_64":
        return ()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    needed = ("avx2", "f16c", "fma", "bmi2", "movbe")
    return ("-march=x86-64-v3",) if all(f" {f}" in flags for f in needed) else ()


def cache_dir() -> Path:
    path = Path(os.environ.get("MLX_EXT_EMU_CACHE") or Path.home() / ".cache" / "mlx_ext_metal_emu")
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def mlx_include_dir() -> Path | None:
    """The installed MLX headers (mlx/backend/metal/kernels/...), if any."""
    spec = importlib.util.find_spec("mlx")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "include" / "mlx").is_dir():
            return Path(root) / "include"
    return None


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _sources(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def _compile(command: list[str], what: str, generated: Path | None = None) -> None:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        shown = "\n".join(lines[:80]) + ("\n..." if len(lines) > 80 else "")
        where = f" (generated source: {generated})" if generated else ""
        raise CompileError(f"compiling {what} failed{where}:\n{shown}")


def _publish(tmp: Path, final: Path) -> None:
    """Atomic, so that concurrent test processes never load a partial file."""
    os.replace(tmp, final)


@functools.cache
def runtime_library() -> Path:
    """The runtime shared library, built once per content hash."""
    clang, version = find_clang()
    sources = _sources(RUNTIME)
    flags = COMMON_FLAGS + RUNTIME_FLAGS + list(arch_flags())
    key = _digest(version, " ".join(flags), *(p.read_bytes() for p in sources))
    name = f"libmetal_emu_rt-{key}.so"
    out = cache_dir() / name
    if not out.exists():
        tmp = out.with_name(f"{name}.{os.getpid()}.tmp")
        units = [str(p) for p in sources if p.suffix in (".cpp", ".S")]
        _compile(
            [clang, *flags, f"-Wl,-soname,{name}", *units, "-o", str(tmp)], "the emulator runtime"
        )
        _publish(tmp, out)
    return out


def preprocess(path: Path) -> str:
    clang, _ = find_clang()
    includes = ["-I", str(STAND_INS)]
    if mlx_include_dir():
        includes += ["-I", str(mlx_include_dir())]
    proc = subprocess.run(
        [clang, *PREPROCESS_FLAGS, *includes, str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise CompileError(f"preprocessing {path} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def build(path: Path) -> tuple[Path, dict]:
    """(shared library, metadata) for one .metal file, from the cache when possible."""
    clang, version = find_clang()
    runtime = runtime_library()
    source = preprocess(path)
    flags = COMMON_FLAGS + KERNEL_FLAGS + list(arch_flags())
    generators = [Path(rewriter.__file__), Path(wrappers.__file__)] + _sources(SHIM)
    key = _digest(
        source, version, " ".join(flags), runtime.name, *(p.read_bytes() for p in generators)
    )
    lib = cache_dir() / f"{path.stem}-{key}.so"
    meta_path = lib.with_suffix(".json")
    if lib.exists() and meta_path.exists():
        return lib, json.loads(meta_path.read_text())
    try:
        rw = rewriter.Rewriter(source)
    except rewriter.RewriteError as e:
        raise CompileError(str(e)) from None
    generated = lib.with_suffix(".cpp")
    text = f'#include "{SHIM / "metal_emu.h"}"\n' + rw.output() + wrappers.entries(rw)
    tmp_src = generated.with_name(f"{generated.name}.{os.getpid()}.tmp")
    tmp_src.write_text(text)
    _publish(tmp_src, generated)
    tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
    command = [
        clang,
        *flags,
        "-x",
        "c++",
        str(generated),
        "-x",
        "none",
        str(runtime),
        f"-Wl,-rpath,{runtime.parent}",
        "-o",
        str(tmp),
    ]
    _compile(command, str(path), generated)
    meta = wrappers.metadata(rw)
    tmp_meta = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    _publish(tmp, lib)
    _publish(tmp_meta, meta_path)
    return lib, meta
