"""The coverage gate: every kernel instantiated under metal/ must be launched
by the test suite (in the emulator), so that no Metal kernel lands without
having run. tests/metal_emu/pytest_plugin.py runs this file after all others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.metal_emu import Library, ToolchainMissing, find_clang, inventory, trace
from tests.metal_emu.pytest_plugin import GATE_FILE, active_key, deselected_key

REPO = Path(__file__).resolve().parents[1]
GATE_FIXTURE = REPO / "tests" / "metal_emu" / "fixtures" / "gate"


def _require_clang() -> None:
    try:
        find_clang()
    except ToolchainMissing as e:
        pytest.skip(str(e))


def _partial_selection(request: pytest.FixtureRequest) -> str | None:
    """Why this run may not launch every kernel (a partial selection), or None."""
    config = request.config
    collected = {item.path.name for item in request.session.items}
    deselected = config.stash[deselected_key]
    for test in sorted((REPO / "tests").glob("test_metal_*.py")):
        if test.name == GATE_FILE:
            continue
        if test.name not in collected:
            return f"{test.name} was not collected"
        if test.name in deselected:
            return f"tests of {test.name} were deselected"
        if any("::" in arg and Path(arg.split("::")[0]).name == test.name for arg in config.args):
            return f"only some tests of {test.name} were selected"
    return None


def test_gate_reports_a_kernel_that_never_ran(tmp_path, monkeypatch):
    _require_clang()
    monkeypatch.setenv("MLX_EXT_EMU_TRACE", str(tmp_path / "trace.txt"))
    kernels = GATE_FIXTURE / "two_kernels.metal"
    assert inventory.host_names(kernels) == ["emu_gate_scale_float", "emu_gate_scale_half"]
    assert inventory.missing_launches(GATE_FIXTURE, launched=set()) == [
        "two_kernels.metal: emu_gate_scale_float",
        "two_kernels.metal: emu_gate_scale_half",
    ]
    x, y = np.arange(32, dtype=np.float32), np.zeros(32, np.float32)
    Library(kernels).run("emu_gate_scale_float", [x, y], grid=32, threadgroup=32)
    np.testing.assert_array_equal(y, 2 * x)
    assert (str(kernels), "emu_gate_scale_float") in trace.launched
    assert (tmp_path / "trace.txt").read_text() == "emu_gate_scale_float\n"
    # Seen in-process, and through the trace file (as from another process).
    assert inventory.missing_launches(GATE_FIXTURE) == ["two_kernels.metal: emu_gate_scale_half"]
    assert inventory.missing_launches(GATE_FIXTURE, launched=set()) == [
        "two_kernels.metal: emu_gate_scale_half"
    ]


def test_inventory_command_lists_host_names():
    _require_clang()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.metal_emu.inventory", str(GATE_FIXTURE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["emu_gate_scale_float", "emu_gate_scale_half"]


def test_every_instantiated_kernel_is_launched(request):
    if not request.config.stash.get(active_key, False):
        pytest.fail(
            "the gate needs tests/conftest.py to declare "
            'pytest_plugins = ["tests.metal_emu.pytest_plugin"]'
        )
    reason = _partial_selection(request)
    if reason:
        pytest.skip(f"coverage gate not enforced on a partial run: {reason}")
    _require_clang()
    missing = inventory.missing_launches(REPO / "metal")
    assert not missing, (
        "Metal kernels instantiated but never launched by the tests:\n  " + "\n  ".join(missing)
    )
