"""The CUDA host code (csrc/**/cuda*.cpp, csrc/common/cuda/*.cpp) compiles against
the headers of the mlx-cuda-13 wheel of the installed mlx version, on machines
without a CUDA build of MLX (CI's).

`g++ -fsyntax-only -std=c++20` (MLX's CMake target asks for C++20) with the
wheel's mlx/include, the CUDA toolkit's headers beside nvcc, and the fmt
stand-in csrc/common/cuda/shim (the wheel ships no fmt). The wheel is fetched
once with `pip download` and its headers unpacked into build/cuda_host/. This
shows that the host code uses MLX's CUDA API as declared; it links nothing and
runs nothing. Skipped where a tool or the download is missing, and where MLX
has a CUDA backend (the package build compiles the host code there).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
CACHE = REPO / "build" / "cuda_host"
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_28_x86_64"]

pytestmark = pytest.mark.skipif(
    hasattr(mx, "cuda") and mx.cuda.is_available(),
    reason="CUDA build of MLX: the package build compiles the host code")


class Unavailable(Exception):
    """A tool, header set or download the check needs is missing (a skip, not a failure)."""


def host_sources() -> list[Path]:
    return sorted(set(CSRC.glob("**/cuda*.cpp")) | set(CSRC.glob("common/cuda/*.cpp")))


def fetch_mlx_headers() -> Path:
    """mlx/include of the mlx-cuda-13 wheel of the installed mlx, downloaded and unpacked once."""
    version = importlib.metadata.version("mlx")
    include = CACHE / f"mlx-cuda-13-{version}" / "mlx" / "include"
    if (include / "mlx" / "backend" / "cuda" / "device.h").exists():
        return include
    wheels = CACHE / "wheels"
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", *platforms, f"mlx-cuda-13=={version}", "--dest", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(f"mlx_cuda_13-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise Unavailable(f"could not download mlx-cuda-13=={version} (network?): "
                          f"{proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(found[-1]) as wheel:
        wheel.extractall(include.parents[1],
                         [n for n in wheel.namelist() if n.startswith("mlx/include/")])
    for wheel_file in found:  # the headers are all that is used
        wheel_file.unlink()
    return include


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
    assert {str(p.relative_to(CSRC)) for p in host_sources()} == {
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
    body = (
        '#include "mlx/backend/cuda/device.h"\n'
        "void record(mlx::core::cu::CommandEncoder& enc, CUfunction fn, void** args) {\n"
        "  enc.add_kernel_node_raw(fn, dim3(1), dim3(32), {CLUSTER}0, args);\n"
        "}\n"
    )
    good, bad = tmp_path / "good.cpp", tmp_path / "bad.cpp"
    good.write_text(body.replace("{CLUSTER}", "dim3(1, 1, 1), "))
    bad.write_text(body.replace("{CLUSTER}", ""))
    assert subprocess.run(command(compiler, good, mlx_include, cuda_include)).returncode == 0
    proc = subprocess.run(command(compiler, bad, mlx_include, cuda_include), capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "add_kernel_node_raw" in proc.stderr
