"""pytest plugin: choose the MLX device the tests run on.

    pytest tests --device gpu            # or MLX_EXT_TEST_DEVICE=gpu pytest tests

sets MLX's default device before any test runs, so every op test that does
not name a stream runs its kernels on that device. Without the option MLX's
own default stands (the GPU on a CUDA or Metal build of MLX, else the CPU).

On the GPU, the CPU instruction-set parametrizations (the ``isa`` fixture)
would run the same GPU kernels once per ISA: only the first ISA's copy is
kept.
"""

import os

import mlx.core as mx
import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=["cpu", "gpu"],
        default=os.environ.get("MLX_EXT_TEST_DEVICE") or None,
        help="MLX default device for the tests (env MLX_EXT_TEST_DEVICE); default: MLX's own",
    )


def pytest_configure(config):
    device = config.getoption("--device")
    if device == "gpu":
        if not mx.is_available(mx.gpu):
            raise pytest.UsageError("--device gpu: this build of MLX has no GPU backend")
        mx.set_default_device(mx.gpu)
    elif device == "cpu":
        mx.set_default_device(mx.cpu)


def pytest_collection_modifyitems(config, items):
    if mx.default_device().type != mx.DeviceType.gpu:
        return
    import mlx_ext

    first_isa = mlx_ext.available_cpu_isas()[0]
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        isa = callspec.params.get("isa") if callspec else None
        (dropped if isa not in (None, first_isa) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
