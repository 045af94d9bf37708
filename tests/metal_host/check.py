"""Compile-checks the Metal host code on Linux: every operator's METAL_SOURCES
(CMakeLists.txt) and any other csrc/**/metal*.cpp.

The sources are compiled with `clang++ -fsyntax-only -target
arm64-apple-macos14 -D_METAL_` against the headers of the macOS
`mlx-metal` wheel of the installed mlx version (MLX's Metal backend headers
and metal-cpp), fetched once with `pip download` (tests/wheel_headers.py).
Apple's system headers that metal-cpp includes are replaced by the minimal
stand-ins of include/; the C and C++ standard library headers are Debian's
aarch64 cross headers (g++-aarch64-linux-gnu), which share arm64 macOS's
LP64 data model. So this shows that the host code uses MLX's and metal-cpp's
API as declared; it links nothing and runs nothing.

    python -m tests.metal_host.check     # prints each command and its result
"""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

from tests.cmake_operators import declared_operators
from tests.wheel_headers import Unavailable, mlx_include

REPO = Path(__file__).resolve().parents[2]
STAND_INS = Path(__file__).resolve().parent / "include"
PLATFORM = "macosx_14_0_arm64"
CROSS_ROOT = Path("/usr/aarch64-linux-gnu/include")


def host_sources() -> list[Path]:
    """What a Metal build compiles for the GPU: each operator's METAL_SOURCES,
    and shared code named metal*.cpp."""
    declared = {path for op in declared_operators() for path in op.files("METAL_SOURCES")}
    return sorted(declared | set(REPO.glob("csrc/**/metal*.cpp")))


def fetch_headers() -> Path:
    """mlx/include of the macOS mlx-metal wheel of the installed mlx."""
    return mlx_include("mlx-metal", [PLATFORM], marker="metal_cpp/Metal/Metal.hpp")


def standard_library_includes() -> list[str]:
    """-isystem flags for the aarch64 cross libstdc++ and glibc headers."""
    versions = sorted(glob.glob(str(CROSS_ROOT / "c++" / "*")), key=lambda p: int(Path(p).name.split(".")[0]))
    if not versions or not (CROSS_ROOT / "stdlib.h").exists():
        raise Unavailable(f"no aarch64 cross C/C++ headers under {CROSS_ROOT} "
                          "(apt-get install g++-aarch64-linux-gnu)")
    cxx = Path(versions[-1])
    dirs = [cxx, cxx / "aarch64-linux-gnu", CROSS_ROOT]
    return [flag for d in dirs for flag in ("-isystem", str(d))]


def command(compiler: str, source: Path, include: Path) -> list[str]:
    return [
        compiler, "-fsyntax-only", "-target", "arm64-apple-macos14", "-std=c++20",
        "-D_METAL_", "-DACCELERATE_NEW_LAPACK", "-Wall", "-Wextra", "-Werror",
        # Linux's libc headers in place of Darwin's: no builtin C++ library
        # search, glibc's full API, and clang's Darwin nullability macros off
        # (glibc defines a __nonnull of its own).
        "-nostdinc++", "-nostdlibinc", "-D_GNU_SOURCE", "-U__nonnull", "-U__nullable",
        "-isystem", str(STAND_INS), *standard_library_includes(),
        "-isystem", str(include), "-isystem", str(include / "metal_cpp"),
        "-I", str(REPO / "csrc"), str(source),
    ]


def find_compiler() -> str:
    from tests.metal_emu import ToolchainMissing, find_clang

    try:
        return find_clang()[0]
    except ToolchainMissing as e:
        raise Unavailable(str(e)) from None


def check(source: Path, compiler: str | None = None, include: Path | None = None) -> subprocess.CompletedProcess:
    """Compiles one source; returns the finished process (returncode 0 = it compiles)."""
    compiler = compiler or find_compiler()
    include = include or fetch_headers()
    return subprocess.run(command(compiler, source, include), capture_output=True, text=True)


def main() -> int:
    failed = 0
    for source in host_sources():
        proc = check(source)
        print(f"{source.relative_to(REPO)}: {'ok' if proc.returncode == 0 else 'FAILED'}")
        sys.stdout.write(proc.stderr)
        failed += proc.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
