"""Compiles small C++ test drivers against the package's headers, cached by
content, so that tests call the very C++ the extension compiles (a kernel
plan header, a thread pool) instead of a Python copy of it.

    lib = native_build.shared_library("metal_plan", SOURCE)   # ctypes.CDLL
    exe = native_build.executable("pool_check", [path, ...])  # Path

Outputs live in $MLX_EXT_CACHE (default ~/.cache/mlx_ext)/native/, named by a
hash of the sources, every header under csrc/ and the command, so an edit to
any of them rebuilds and an unchanged tree (a fresh clone in CI) reuses them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"


class CompilerMissing(Exception):
    """No C++ compiler on PATH (tests skip)."""


def cache_root() -> Path:
    """Where the tests cache what they compile: $MLX_EXT_CACHE, else ~/.cache/mlx_ext."""
    return Path(os.environ.get("MLX_EXT_CACHE") or Path.home() / ".cache" / "mlx_ext")


def cache_dir() -> Path:
    return cache_root() / "native"


def compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise CompilerMissing("no C++ compiler (c++, g++ or clang++) on PATH")


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:20]


def _build(name: str, sources: list[Path], flags: list[str], suffix: str) -> Path:
    cxx = compiler()
    command = [cxx, "-std=c++17", "-O2", f"-I{CSRC}", *flags]
    headers = sorted(CSRC.rglob("*.h"))
    key = _digest([" ".join(command).encode()]
                  + [p.read_bytes() for p in sources]
                  + [str(p.relative_to(CSRC)).encode() + p.read_bytes() for p in headers])
    out = cache_dir() / f"{name}-{key}{suffix}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    proc = subprocess.run([*command, *map(str, sources), "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: compile failed\n{' '.join(command)}\n{proc.stderr[-6000:]}")
    tmp.replace(out)  # atomic: parallel test processes never load a half-written file
    return out


def executable(name: str, sources: list[Path], flags: list[str] = ()) -> Path:
    """An executable built from `sources` (paths), e.g. a native test."""
    return _build(name, [Path(s) for s in sources], ["-pthread", *flags], "")


def shared_library(name: str, source: str, flags: list[str] = ()) -> ctypes.CDLL:
    """`source` (C++ text defining extern "C" functions) as a loaded library."""
    src = cache_dir() / f"{name}-{_digest([source.encode()])}.cpp"
    if not src.exists():
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(source)
    return ctypes.CDLL(str(_build(name, [src], ["-shared", "-fPIC", *flags], ".so")))
