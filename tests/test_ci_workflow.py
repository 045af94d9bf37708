""".github/workflows/ci.yml: valid against GitHub's workflow schema
(check-jsonschema's vendored copy, offline), and running what the README
promises: `make test` on Linux, and on Apple Silicon the Metal build with
the tests on the GPU stream."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKFLOW = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "ci.yml"


def _lint(path: Path) -> subprocess.CompletedProcess:
    if shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("check-jsonschema is not installed (it is in the Makefile's REQS)")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True, text=True,
    )


def _workflow() -> dict:
    from ruamel.yaml import YAML  # check-jsonschema's YAML parser

    return YAML(typ="safe").load(WORKFLOW.read_text())


def test_workflow_passes_the_schema():
    proc = _lint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_linter_rejects_a_broken_workflow(tmp_path):
    broken = tmp_path / "ci.yml"
    broken.write_text(WORKFLOW.read_text().replace("timeout-minutes: 60", "timeout-minutes: soon", 1))
    proc = _lint(broken)
    assert proc.returncode != 0 and "timeout-minutes" in proc.stdout


def _runs(job: dict) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def test_linux_job_runs_make_test():
    linux = _workflow()["jobs"]["linux"]
    assert linux["runs-on"].startswith("ubuntu-")
    assert "make test" in _runs(linux)


def test_macos_job_builds_with_metal_and_tests_on_the_gpu():
    macos = _workflow()["jobs"]["macos-metal"]
    assert "macos-14" in macos["runs-on"]  # the first Apple Silicon label
    assert macos["env"]["MLX_EXT_TEST_DEVICE"] == "gpu"
    runs = _runs(macos)
    assert runs[0] == "make build" and runs[-1] == "make test"
    assert any("mlx_ext.metallib" in run and "stream=mx.gpu" in run for run in runs)
