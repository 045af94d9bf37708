"""MLX's C++ headers of a platform this machine cannot build for (the macOS
mlx-metal wheel, the Linux mlx-cuda wheel), so that the Metal and CUDA host
code is compile-checked here against the API it will meet there.

    include = wheel_headers.mlx_include("mlx-metal", ["macosx_14_0_arm64"],
                                        marker="metal_cpp/Metal/Metal.hpp")

The wheel of the installed mlx version is fetched once with `pip download`
and only its mlx/include/ is kept, under build/wheel_headers/<package>-<version>/.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "build" / "wheel_headers"


class Unavailable(Exception):
    """A tool, header set or download a check needs is missing (a skip, not a failure)."""


def mlx_version() -> str:
    return importlib.metadata.version("mlx")


def mlx_include(package: str, platforms: list[str], *, marker: str,
                python_version: str | None = None) -> Path:
    """mlx/include of `package`'s wheel at the installed mlx version; `marker`, a
    path under it, shows that an earlier download is complete."""
    version = mlx_version()
    include = CACHE / f"{package}-{version}" / "mlx" / "include"
    if (include / marker).exists():
        return include
    wheels = CACHE / "wheels"
    platform_flags = [flag for p in platforms for flag in ("--platform", p)]
    python_flags = ["--python-version", python_version] if python_version else []
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           *python_flags, *platform_flags, f"{package}=={version}", "--dest", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise Unavailable(f"could not download {package}=={version} for {platforms} "
                          f"(network?): {proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(found[-1]) as wheel:
        wheel.extractall(include.parents[1], [n for n in wheel.namelist() if n.startswith("mlx/include/")])
    for wheel_file in found:  # the headers are all that is used
        wheel_file.unlink()
    if not (include / marker).exists():
        raise Unavailable(f"{found[-1].name} has no mlx/include/{marker}")
    return include


def assert_check_rejects_misuse(compile_file, tmp_path: Path, template: str, good: str, bad: str,
                                symbol: str) -> None:
    """A compile check that can fail: `template` with "{}" replaced by `good`
    compiles, with `bad` (a misuse of MLX's API) it does not, and the error
    names `symbol`. compile_file(path) returns the finished compiler process."""
    good_file, bad_file = tmp_path / "good.cpp", tmp_path / "bad.cpp"
    good_file.write_text(template.replace("{}", good))
    bad_file.write_text(template.replace("{}", bad))
    proc = compile_file(good_file)
    assert proc.returncode == 0, proc.stderr
    proc = compile_file(bad_file)
    assert proc.returncode != 0 and symbol in proc.stderr, proc.stderr
