"""The CUDA kernel sources compile with nvcc for sm_90 / sm_90a (the H100), so a broken
.cu file fails CI, which has nvcc but no GPU. Skipped without nvcc, and where
MLX has a CUDA backend: there the build itself compiled them
(MLX_EXT_CUDA=ON) and tests/test_quantized_matmul_cuda.py runs them.
"""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "quantized_matmul").glob("*.cu"))
# wgmma exists only in the sm_90a target (cmake/cuda.cmake builds it so too).
ARCH_FLAGS = {"qmm_wgmma.cu": ["-gencode=arch=compute_90a,code=sm_90a"]}


def find_nvcc():
    for candidate in [shutil.which("nvcc"), os.environ.get("CUDA_HOME", "") + "/bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
@pytest.mark.skipif(hasattr(mx, "cuda") and mx.cuda.is_available(),
                    reason="CUDA build of MLX: the package build compiled the kernels")
def test_cuda_sources_compile_for_sm90(tmp_path):
    assert {p.name for p in SOURCES} >= {"qmv.cu", "qmv_tc.cu", "qmm_tc.cu", "qmm_wgmma.cu"}

    def compile_one(src):
        arch = ARCH_FLAGS.get(src.name, ["-arch=sm_90"])
        cmd = [NVCC, "-std=c++17", "-O3", *arch, "-cubin", f"-I{ROOT / 'csrc'}",
               "-Xptxas", "-warn-spills", "-o", str(tmp_path / (src.stem + ".cubin")), str(src)]
        return src.name, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=min(len(SOURCES), os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_one, SOURCES))
    failures = [f"{name}:\n{r.stderr[-4000:]}" for name, r in results if r.returncode != 0]
    assert not failures, "\n".join(failures)
    for name, _ in results:
        assert (tmp_path / (Path(name).stem + ".cubin")).stat().st_size > 0
