"""Which kernels were launched: kept in-process for the coverage gate, and
appended (one host name per line) to the file named by $MLX_EXT_EMU_TRACE."""

from __future__ import annotations

import os
from pathlib import Path

# (resolved .metal path, host name) of every launch in this process.
launched: set[tuple[str, str]] = set()


def record(path: Path, host_name: str) -> None:
    launched.add((str(path), host_name))
    trace = os.environ.get("MLX_EXT_EMU_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(host_name + "\n")


def traced_names() -> set[str]:
    """Host names in the $MLX_EXT_EMU_TRACE file (launches of other processes too)."""
    trace = os.environ.get("MLX_EXT_EMU_TRACE")
    if not trace or not os.path.exists(trace):
        return set()
    with open(trace) as f:
        return {line.strip() for line in f if line.strip()}
