"""Every CUDA kernel file (csrc/<op>/*.cu, any operator) compiles with nvcc for sm_90 /
sm_90a (the H100), so a broken .cu file fails CI, which has nvcc but no GPU. The
files an operator declares CUDA_KERNELS_SM90A in CMakeLists.txt (the one list the
build reads too) are compiled for sm_90a, the others for sm_90.

nvcc's outputs are cached by content in $MLX_EXT_CACHE (default ~/.cache/mlx_ext)/nvcc/:
the key is the command, nvcc's version, the .cu file and every header it can
include, so an unchanged file is not compiled again. Skipped without nvcc, and
where MLX has a CUDA backend: there the build itself compiled the kernels
(MLX_EXT_CUDA=ON) and tests/test_quantized_matmul_cuda.py runs them.

ptxas reports register spills (-Xptxas -warn-spills); some kernels spill today,
so spills are shown as a warning, not a failure.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import mlx.core as mx

from tests import native_build
from tests.cmake_operators import declared_operators

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = sorted(CSRC.glob("*/*.cu"))
# wgmma exists only in the sm_90a target (cmake/cuda.cmake builds SM90A files so too).
ARCH_FLAGS = {False: ["-arch=sm_90"], True: ["-gencode=arch=compute_90a,code=sm_90a"]}
FLAGS = ["-std=c++17", "-O3", "-cubin", "-Xptxas", "-warn-spills"]
# Two nvcc at a time at most: CI machines have two cores.
JOBS = min(2, os.cpu_count() or 1)


def find_nvcc():
    for candidate in [shutil.which("nvcc"), os.environ.get("CUDA_HOME", "") + "/bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = find_nvcc()


def declared_kernels() -> dict[str, bool]:
    """{"<op>/<name>.cu": built for sm_90a only} from the CUDA_KERNELS and
    CUDA_KERNELS_SM90A of each operator CMakeLists.txt declares."""
    return {f"{op.name}/{name}.cu": keyword == "CUDA_KERNELS_SM90A"
            for op in declared_operators()
            for keyword in ("CUDA_KERNELS", "CUDA_KERNELS_SM90A")
            for name in op.arguments.get(keyword, ())}


def included_headers(source: Path) -> list[Path]:
    """The quoted includes of `source`, transitively, resolved as nvcc does with
    -I csrc (the including file's folder first); system headers are covered by
    nvcc's version in the cache key."""
    seen: dict[Path, None] = {}
    pending = [source]
    while pending:
        path = pending.pop()
        for name in re.findall(r'^\s*#\s*include\s*"([^"]+)"', path.read_text(), re.M):
            for base in (path.parent, CSRC):
                found = (base / name).resolve()
                if found.is_file():
                    if found not in seen:
                        seen[found] = None
                        pending.append(found)
                    break
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    return subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout


def cache_dir() -> Path:
    return native_build.cache_root() / "nvcc"


def cache_key(source: Path, flags: list[str]) -> str:
    """A hash of what decides nvcc's output: the command (paths relative to the
    repository, so that every clone shares the cache), nvcc's version, and the
    text of the .cu file and of each header it can include."""
    h = hashlib.sha256()
    parts = [" ".join(flags).encode(), nvcc_version().encode()]
    for path in [source, *included_headers(source)]:
        parts += [str(path.relative_to(ROOT)).encode(), path.read_bytes()]
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:24]


def relative(source: Path) -> str:
    return str(source.relative_to(CSRC))


@dataclass
class Compiled:
    returncode: int
    log: str  # nvcc's stderr, ptxas's warnings included
    cubin: Path


def compile_cached(source: Path, sm90a: bool) -> Compiled:
    """nvcc `source` into a cubin in the cache, or the cached cubin of the same inputs."""
    flags = [*FLAGS, *ARCH_FLAGS[sm90a], "-Icsrc"]
    name = relative(source).replace("/", "_")[: -len(".cu")]
    cubin = cache_dir() / f"{name}-{cache_key(source, flags)}.cubin"
    log = cubin.with_suffix(".log")
    if cubin.exists():
        return Compiled(0, log.read_text(), cubin)
    cubin.parent.mkdir(parents=True, exist_ok=True)
    tmp = cubin.with_name(f"{cubin.name}.{os.getpid()}.tmp")
    proc = subprocess.run([NVCC, *flags, "-o", str(tmp), str(source.relative_to(ROOT))],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 0:  # the log first: a cached cubin always has its log
        log_tmp = log.with_name(f"{log.name}.{os.getpid()}.tmp")
        log_tmp.write_text(proc.stderr)
        log_tmp.replace(log)
        tmp.replace(cubin)
    else:
        tmp.unlink(missing_ok=True)
    return Compiled(proc.returncode, proc.stderr, cubin)


no_nvcc = pytest.mark.skipif(NVCC is None,
                             reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
cuda_mlx = pytest.mark.skipif(hasattr(mx, "cuda") and mx.cuda.is_available(),
                              reason="CUDA build of MLX: the package build compiled the kernels")


@pytest.fixture(scope="module")
def compiled() -> dict[str, Compiled]:
    declared = declared_kernels()
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        results = dict(zip(map(relative, SOURCES), pool.map(
            lambda s: compile_cached(s, declared.get(relative(s), False)), SOURCES)))
    spills = [f"{name}: {line.strip()}" for name, r in results.items()
              for line in r.log.splitlines() if "spilled" in line]
    if spills:
        warnings.warn(f"ptxas reports {len(spills)} kernels with register spills:\n"
                      + "\n".join(spills))
    return results


def test_every_kernel_file_is_declared_to_cmake():
    """Each csrc/<op>/*.cu is in its operator's CUDA_KERNELS or CUDA_KERNELS_SM90A
    (else the build would not embed it), and each declared one exists."""
    assert set(declared_kernels()) == set(map(relative, SOURCES))
    assert declared_kernels()["quantized_matmul/qmm_wgmma.cu"] is True
    assert declared_kernels()["quantized_matmul/qmv.cu"] is False


def test_the_cache_key_covers_every_included_header():
    qmv_tc = CSRC / "quantized_matmul" / "qmv_tc.cu"
    headers = {str(p.relative_to(CSRC)) for p in included_headers(qmv_tc)}
    assert headers == {"common/cuda/affine.cuh", "common/cuda/device.cuh", "common/math.h",
                       "quantized_matmul/cuda_params.h", "quantized_matmul/qmv_tc.cuh"}


@no_nvcc
@cuda_mlx
@pytest.mark.parametrize("source", SOURCES, ids=relative)
def test_kernel_file_compiles(compiled, source):
    result = compiled[relative(source)]
    assert result.returncode == 0, f"{relative(source)}:\n{result.log[-4000:]}"
    assert result.cubin.stat().st_size > 0


def kernel_names(cubin: Path) -> list[str]:
    """The kernels a cubin defines: its global function symbols (readelf)."""
    out = subprocess.run(["readelf", "-Ws", str(cubin)], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if " FUNC " in line and " GLOBAL " in line]


@no_nvcc
@cuda_mlx
@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not found")
def test_kernel_names_are_unique_across_operators(compiled):
    """The registry looks kernels up by name across every operator's module
    (common/cuda/registry.cpp), so a name defined twice breaks every CUDA call
    at the first lookup: sparse_matmul's reduce_partials_float32 once did."""
    seen: dict[str, str] = {}
    clashes = []
    for name, result in compiled.items():
        assert result.returncode == 0, name
        for kernel in kernel_names(result.cubin):
            if kernel in seen:
                clashes.append(f"{kernel}: {seen[kernel]} and {name}")
            seen.setdefault(kernel, name)
    assert len(seen) > 100
    assert not clashes, "kernel names defined twice:\n" + "\n".join(clashes)
