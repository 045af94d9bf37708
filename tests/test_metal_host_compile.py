"""The Metal host code compiles against the macOS mlx-metal wheel's headers
(tests/metal_host/check.py): on Linux, where no Metal build can run."""

from __future__ import annotations

import sys

import pytest

from tests.metal_host import check
from tests.wheel_headers import assert_check_rejects_misuse

pytestmark = pytest.mark.skipif(
    sys.platform == "darwin", reason="on macOS the Metal build compiles the host code for real"
)


@pytest.fixture(scope="module")
def toolchain() -> tuple[str, object]:
    try:
        compiler = check.find_compiler()
        check.standard_library_includes()
        return compiler, check.fetch_headers()
    except check.Unavailable as e:
        pytest.skip(str(e))


def test_host_sources_are_discovered():
    """Every operator's METAL_SOURCES in CMakeLists.txt is checked, a new
    operator's with no edit here: the quantized matmul's among them."""
    assert check.REPO / "csrc" / "quantized_matmul" / "metal.cpp" in check.host_sources()


@pytest.mark.parametrize("source", check.host_sources(), ids=lambda p: str(p.relative_to(check.REPO)))
def test_host_source_compiles(toolchain, source):
    compiler, include = toolchain
    proc = check.check(source, compiler, include)
    assert proc.returncode == 0, f"{source} does not compile for arm64-apple-macos14:\n{proc.stderr}"


def test_the_check_rejects_a_misuse_of_mlx_metal_api(toolchain, tmp_path):
    """A call MLX 0.32 does not declare (the command encoder by stream index)
    fails; the same file with the declared call passes."""
    compiler, include = toolchain
    template = (
        '#include "mlx/backend/metal/device.h"\n'
        "namespace mx = mlx::core;\n"
        "void encode(mx::Stream s, const mx::array& a) {\n"
        "  auto& enc = mx::metal::get_command_encoder({});\n"
        "  enc.set_input_array(a, 0);\n"
        "}\n"
    )
    assert_check_rejects_misuse(lambda path: check.check(path, compiler, include), tmp_path,
                                template, good="s", bad="s.index", symbol="get_command_encoder")
