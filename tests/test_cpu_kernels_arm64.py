"""The arm64 (NEON and scalar) CPU kernels of every operator, cross-compiled
and run under qemu-user on x86-64 machines, where the extension itself cannot
exercise them. On an arm64 machine the ordinary tests run NEON natively.

Each operator with ISA_SOURCES in CMakeLists.txt has a checker,
tests/native/<op>_kernels_check.cpp, that drives its kernels against a float64
reference and prints "ok <isa>: <n> cases" per ISA. It is linked with the
operator's ISA_SOURCES compiled once per ISA, the MLX-free common CPU sources
and the sources of its "// sources:" line; its "// cases per isa:" line says
how many cases each ISA must pass. Binaries are cached by the content they are
built from in $MLX_EXT_CACHE/arm64 (default ~/.cache/mlx_ext/arm64).
"""

from __future__ import annotations

import hashlib
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import native_build
from tests.cmake_operators import Operator, declared_operators

ROOT = Path(__file__).resolve().parent.parent
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
ISAS = ("scalar", "neon")
CSRC = ROOT / "csrc"
COMMON_SOURCES = [CSRC / "common" / "cpu" / "isa.cpp", CSRC / "common" / "cpu" / "thread_pool.cpp"]
FLAGS = ["-std=c++17", "-O2"]
OPERATORS = [op for op in declared_operators() if op.files("ISA_SOURCES")]


@dataclass(frozen=True)
class Checker:
    path: Path
    sources: list[Path]  # what its "// sources:" line names
    cases: int  # its "// cases per isa:"


def checker_of(op: Operator) -> Checker:
    path = ROOT / "tests" / "native" / f"{op.name}_kernels_check.cpp"
    assert path.exists(), f"{op.name} has ISA_SOURCES: add {path.relative_to(ROOT)} (see this file's docstring)"
    text = path.read_text()
    sources = [ROOT / name for line in re.findall(r"^// sources:(.*)$", text, re.M) for name in line.split()]
    cases = re.search(r"^// cases per isa: (\d+)$", text, re.M)
    assert cases, f"{path.relative_to(ROOT)}: no '// cases per isa: <n>' line"
    return Checker(path, sources, int(cases.group(1)))


def cache_dir() -> Path:
    """arm64/ beside tests/native_build.py's native/ ($MLX_EXT_CACHE, default ~/.cache/mlx_ext)."""
    return native_build.cache_root() / "arm64"


def _digest(files: list[Path]) -> str:
    """Of the command and of every file's path in the repository and content:
    the same tree gives the same name wherever it is cloned."""
    h = hashlib.sha256(" ".join([CXX, *FLAGS, *ISAS]).encode())
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:20]


def _compile(command: list) -> None:
    proc = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, command))}\n{proc.stderr[-6000:]}"


def build(op: Operator, checker: Checker) -> Path:
    """The op's checker, cross-compiled for aarch64 (static), from the cache if built before."""
    isa_sources = op.files("ISA_SOURCES")
    sources = [checker.path, *checker.sources, *COMMON_SOURCES]
    headers = sorted(CSRC.rglob("*.h"))
    binary = cache_dir() / f"{checker.path.stem}-{_digest(isa_sources + sources + headers)}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as tmp:
        objects = []
        for isa in ISAS:
            for source in isa_sources:
                objects.append(Path(tmp) / f"{source.stem}_{isa}.o")
                _compile([CXX, *FLAGS, f"-I{CSRC}", f"-DMLX_EXT_ISA_{isa}=1", "-c", source, "-o", objects[-1]])
        linked = Path(tmp) / binary.name
        defines = [f"-DMLX_EXT_HAVE_ISA_{isa}" for isa in ISAS]
        _compile([CXX, *FLAGS, f"-I{CSRC}", "-static", "-pthread", *defines, *sources, *objects, "-o", linked])
        linked.replace(binary)  # atomic: a parallel run never starts a half-written binary
    return binary


@pytest.fixture(scope="module")
def cross_tools() -> None:
    if platform.machine() != "x86_64" or not (shutil.which(CXX) and shutil.which(QEMU)):
        pytest.skip("needs an x86-64 host with aarch64-linux-gnu-g++ and qemu-aarch64 "
                    "(tests/native/ensure_cross_tools.sh installs them on Debian as root)")


def test_every_operator_with_cpu_kernels_has_a_checker():
    assert "quantized_matmul" in [op.name for op in OPERATORS]
    for op in OPERATORS:
        assert checker_of(op).cases > 0


@pytest.mark.parametrize("op", OPERATORS, ids=lambda op: op.name)
def test_neon_and_scalar_kernels_match_reference_under_qemu(cross_tools, op):
    checker = checker_of(op)
    result = subprocess.run([QEMU, str(build(op, checker))], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for isa in ISAS:
        assert f"ok {isa}: {checker.cases} cases" in lines, result.stdout
