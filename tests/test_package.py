"""The package around the ops: import-time checks and the public surface."""

import subprocess
import sys

import mlx.core as mx
import mlx_ext


def test_import_refuses_a_different_mlx_version():
    code = (
        "import mlx.core as mx\n"
        "mx.__version__ = '0.0.1'\n"
        "try:\n"
        "    import mlx_ext\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from mlx_ext._build_info import MLX_VERSION

    assert f"mlx_ext was built against mlx {MLX_VERSION} but mlx 0.0.1 is installed" in out.stdout


def test_built_against_the_running_mlx():
    from mlx_ext._build_info import MLX_VERSION

    assert MLX_VERSION == mx.__version__


def test_public_api():
    for name in ["quantized_matmul", "set_num_threads", "get_num_threads", "set_cpu_isa",
                 "get_cpu_isa", "available_cpu_isas"]:
        assert name in mlx_ext.__all__ and callable(getattr(mlx_ext, name))
    assert "x @ dequantize(w).T" in mlx_ext.quantized_matmul.__doc__
