"""Shared pytest configuration and the fixtures every operator's tests use.

Hypothesis profiles: ``ci`` (the default) is derandomized with a fixed example
budget so CI is deterministic; ``thorough`` explores far more. Select with
``MLX_EXT_HYPOTHESIS_PROFILE=thorough``.

Fixtures: ``isa`` runs a test once per CPU instruction set compiled into
mlx_ext (any operator with CPU kernels takes it).
"""

import os

# MLX's CUDA backend runs float32 matmuls on TF32 tensor cores unless told not
# to (MLX_ENABLE_TF32, read at its first matmul). Tests compare mlx_ext's
# float32 results with MLX's own (mx.fast attention, autodiff through
# mx.matmul) at float32 tolerances, so the GPU runs keep MLX in full float32.
# It changes nothing on the CPU or on Metal.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import pytest
from hypothesis import HealthCheck, settings

import mlx_ext

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("MLX_EXT_HYPOTHESIS_PROFILE", "ci"))

# The Metal emulator's coverage gate (records launches, enforces at the end)
# and the choice of MLX device for the op tests.
pytest_plugins = [
    "tests.metal_emu.pytest_plugin",
    "tests.device_option",  # --device gpu / MLX_EXT_TEST_DEVICE=gpu
]


@pytest.fixture(params=mlx_ext.available_cpu_isas())
def isa(request):
    """Run a test once per compiled-in instruction set, the scalar fallback included
    (process-wide: every CPU kernel the test runs uses it; tests/device_option.py
    keeps one copy on the GPU)."""
    mlx_ext.set_cpu_isa(request.param)
    yield request.param
    mlx_ext.set_cpu_isa("auto")
