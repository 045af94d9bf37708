"""The package is typed: py.typed, and the stub nanobind generates for _ext
installed beside the module."""

from pathlib import Path

import mlx_ext
from mlx_ext import _ext


def test_ext_has_an_installed_type_stub():
    stub = Path(_ext.__file__).with_name("_ext.pyi")
    assert stub.exists()
    text = stub.read_text()
    for name in mlx_ext.__all__:
        if hasattr(_ext, name):
            assert f"def {name}(" in text
    assert "def quantized_matmul(x: mlx.core.array, w: mlx.core.array" in text


def test_package_is_marked_typed():
    assert (Path(mlx_ext.__file__).parent / "py.typed").exists()
