"""Every kernel host name instantiated in a directory's .metal files.

    python -m tests.metal_emu.inventory metal/

prints them one per line. `missing_launches` compares them with the kernels
launched so far (trace.py): the coverage gate of tests/test_metal_coverage.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import build, rewriter, trace
from .errors import CompileError, ToolchainMissing


def metal_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).resolve().rglob("*.metal"))


def host_names(path: Path) -> list[str]:
    """Launchable kernels of one file: [[host_name]] instantiations and plain kernels."""
    try:
        rw = rewriter.Rewriter(build.preprocess(Path(path)))
    except rewriter.RewriteError as e:
        raise CompileError(str(e)) from None
    return [inst.host_name for inst in rw.instances]


def missing_launches(directory: Path, launched: set[tuple[str, str]] | None = None) -> list[str]:
    """`file: host_name` of each kernel under `directory` never launched, judged
    by `launched` ((path, host name) pairs; default: this process's launches)
    and the host names in $MLX_EXT_EMU_TRACE."""
    launched = trace.launched if launched is None else launched
    traced = trace.traced_names()
    missing = []
    for path in metal_files(directory):
        for name in host_names(path):
            if (str(path), name) not in launched and name not in traced:
                missing.append(f"{path.name}: {name}")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="directory searched for .metal files")
    args = parser.parse_args(argv)
    try:
        for path in metal_files(args.directory):
            for name in host_names(path):
                print(name)
    except (ToolchainMissing, CompileError) as e:
        print(f"inventory: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
