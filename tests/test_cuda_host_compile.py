"""The CUDA host code (csrc/**/cuda*.cpp, csrc/common/cuda/*.cpp) compiles against
the headers of the mlx-cuda-13 wheel of the installed mlx version, on machines
without a CUDA build of MLX (CI's).

`g++ -fsyntax-only -std=c++20` (MLX's CMake target asks for C++20) with the
wheel's mlx/include, the CUDA toolkit's headers beside nvcc, and the fmt
stand-in csrc/common/cuda/shim (the wheel ships no fmt). The wheel is fetched
once with `pip download` and its headers unpacked into build/wheel_headers/
(tests/wheel_headers.py). This
shows that the host code uses MLX's CUDA API as declared; it links nothing and
runs nothing. Skipped where a tool or the download is missing, and where MLX
has a CUDA backend (the package build compiles the host code there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import mlx.core as mx

from tests.cmake_operators import declared_operators
from tests.wheel_headers import Unavailable, assert_check_rejects_misuse, mlx_include

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_28_x86_64"]

pytestmark = pytest.mark.skipif(
    hasattr(mx, "cuda") and mx.cuda.is_available(),
    reason="CUDA build of MLX: the package build compiles the host code")


def host_sources() -> list[Path]:
    """What a CUDA build compiles for the GPU: each operator's CUDA_SOURCES,
    the shared csrc/common/cuda/*.cpp, and any other cuda*.cpp."""
    declared = {path for op in declared_operators() for path in op.files("CUDA_SOURCES")}
    return sorted(declared | set(CSRC.glob("**/cuda*.cpp")) | set(CSRC.glob("common/cuda/*.cpp")))


def fetch_mlx_headers() -> Path:
    return mlx_include("mlx-cuda-13", PLATFORMS, marker="mlx/backend/cuda/device.h",
                       python_version="3.12")


def cuda_toolkit_include() -> Path:
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parents[1] / "include"] if nvcc else []
    candidates += [Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "include",
                   Path("/usr/local/cuda/include")]
    for candidate in candidates:
        if (candidate / "cuda.h").exists() and (candidate / "cuda_runtime.h").exists():
            return candidate
    raise Unavailable("no CUDA toolkit headers (cuda.h) beside nvcc, in $CUDA_HOME or "
                      "/usr/local/cuda")


def find_compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    raise Unavailable("no C++ compiler (g++ or c++) on PATH")


def command(compiler: str, source: Path, mlx_include: Path, cuda_include: Path) -> list[str]:
    return [compiler, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror",
            "-I", str(CSRC), "-isystem", str(mlx_include), "-isystem", str(cuda_include),
            "-isystem", str(CSRC / "common" / "cuda" / "shim"), str(source)]


@pytest.fixture(scope="module")
def toolchain() -> tuple[str, Path, Path]:
    try:
        return find_compiler(), fetch_mlx_headers(), cuda_toolkit_include()
    except Unavailable as e:
        pytest.skip(str(e))


def test_there_is_cuda_host_code():
    assert {str(p.relative_to(CSRC)) for p in host_sources()} >= {
        "quantized_matmul/cuda.cpp", "common/cuda/driver.cpp", "common/cuda/registry.cpp"}


@pytest.mark.parametrize("source", host_sources(), ids=lambda p: str(p.relative_to(CSRC)))
def test_host_source_compiles(toolchain, source):
    compiler, mlx_include, cuda_include = toolchain
    proc = subprocess.run(command(compiler, source, mlx_include, cuda_include),
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{source} does not compile:\n{proc.stderr}"


def test_the_check_rejects_a_misuse_of_mlx_cuda_api(toolchain, tmp_path):
    """A kernel node without its cluster shape (not a signature MLX 0.32 declares)
    fails; the same file with the declared call passes."""
    compiler, mlx_include, cuda_include = toolchain
    template = (
        '#include "mlx/backend/cuda/device.h"\n'
        "void record(mlx::core::cu::CommandEncoder& enc, CUfunction fn, void** args) {\n"
        "  enc.add_kernel_node_raw(fn, dim3(1), dim3(32), {}0, args);\n"
        "}\n"
    )
    assert_check_rejects_misuse(
        lambda path: subprocess.run(command(compiler, path, mlx_include, cuda_include),
                                    capture_output=True, text=True),
        tmp_path, template, good="dim3(1, 1, 1), ", bad="", symbol="add_kernel_node_raw")
