"""The arm64 (NEON and scalar) CPU kernels, cross-compiled and run under
qemu-user on x86-64 machines, where the extension itself cannot exercise them.
tests/native/kernel_check.cpp (quantized matmul) and attention_check.cpp
compare every kernel path against a float64 reference. On an arm64 machine
the ordinary tests run NEON natively."""

import hashlib
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
COMMON = ["csrc/common/cpu/thread_pool.cpp", "csrc/common/cpu/isa.cpp"]
SOURCES = ["tests/native/kernel_check.cpp", "csrc/quantized_matmul/cpu_driver.cpp", *COMMON]
KERNELS = ["csrc/quantized_matmul/cpu_kernels.cpp"]
HEADERS = sorted(str(p.relative_to(ROOT)) for d in ("csrc", "tests/native") for p in (ROOT / d).rglob("*.h"))

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not (shutil.which(CXX) and shutil.which(QEMU)),
    reason="needs an x86-64 host with aarch64-linux-gnu-g++ and qemu-aarch64 "
    "(tests/native/ensure_cross_tools.sh installs them on Debian as root)",
)


def build_checker(sources=SOURCES, kernels=KERNELS) -> Path:
    """Cross-compiles a checker (`kernels` once per ISA), cached by the content
    of its sources."""
    digest = hashlib.sha256()
    for name in sources + kernels + HEADERS:
        digest.update(name.encode() + (ROOT / name).read_bytes())
    out = ROOT / "build" / "arm64-check" / digest.hexdigest()[:16]
    binary = out / "kernel_check"
    if binary.exists():
        return binary
    out.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++17", "-O2", f"-I{ROOT / 'csrc'}"]
    objects = []
    for isa in ["scalar", "neon"]:
        for i, kernel in enumerate(kernels):
            obj = out / f"kernels_{isa}_{i}.o"
            subprocess.run([CXX, *flags, f"-DMLX_EXT_ISA_{isa}=1", "-c", str(ROOT / kernel), "-o", str(obj)],
                           check=True)
            objects.append(str(obj))
    subprocess.run(
        [CXX, *flags, "-static", "-pthread", "-DMLX_EXT_HAVE_ISA_scalar", "-DMLX_EXT_HAVE_ISA_neon",
         *[str(ROOT / s) for s in sources], *objects, "-o", str(binary)],
        check=True,
    )
    return binary


def test_neon_and_scalar_kernels_match_reference_under_qemu():
    result = subprocess.run([QEMU, str(build_checker())], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "ok scalar: 432 cases" in lines and "ok neon: 432 cases" in lines, result.stdout


def test_attention_kernels_match_reference_under_qemu():
    checker = build_checker(
        ["tests/native/attention_check.cpp", "csrc/attention/cpu_driver.cpp", *COMMON],
        ["csrc/attention/cpu_kernels.cpp", "csrc/attention/cpu_backward_kernels.cpp"])
    result = subprocess.run([QEMU, str(checker)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    lines = result.stdout.splitlines()
    assert "ok scalar: 72 cases" in lines and "ok neon: 72 cases" in lines, result.stdout[-3000:]
