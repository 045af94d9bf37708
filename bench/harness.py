"""Timing and reporting shared by the bench_*.py scripts.

Every figure is a median over repeats after warm-up; inputs rotate over
several copies so that weights come from memory, not a warm cache; results go
to bench/results/<machine>/<name>.{json,md} with the machine they ran on, and
a plot of them to <name>.png (bench/plot.py).
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import math
import os
import platform
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

from .plot import Plot, write_png

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        import subprocess

        out = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """A directory name for this CPU machine: <os>-<arch>-<cpu>-<cores>c,
    e.g. linux-x86_64-amd-epyc-2c."""
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    return f"{platform.system().lower()}-{platform.machine()}-{cpu}-{os.cpu_count()}c"


def machine_info(machine: str | None = None) -> dict:
    """What the results ran on. machine names the results folder (e.g.
    gpu.machine_name()); None: this CPU machine's name. MLX_EXT_BENCH_MACHINE,
    when set, names it instead (a user's override)."""
    import mlx.core as mx

    info = {
        "machine": os.environ.get("MLX_EXT_BENCH_MACHINE") or machine or machine_name(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import mlx_ext

        info["mlx_ext_cpu_isa"] = mlx_ext.get_cpu_isa()
        info["mlx_ext_threads"] = mlx_ext.get_num_threads()
    except ImportError:
        pass
    return info


def read_each_once(fn: Callable[[int], object], count: int, max_call_s: float = 0.5) -> None:
    """fn(i) for each of `count` rotated inputs, before timing them: a buffer's
    first read after it was written is up to 2x slower on this VM (NumPy's
    14336x4096 float32 GEMV: 17-21 ms, then 8 ms), which would otherwise fall
    on the timed calls of whichever implementation meets fresh copies first.
    Skipped when one call takes over `max_call_s` (too slow for it to matter)."""
    t0 = time.perf_counter()
    fn(0)
    if time.perf_counter() - t0 > max_call_s:
        return
    for i in range(1, count):
        fn(i)


def time_calls(fn: Callable[[int], object], *, warmup: int = 2, repeats: int = 10,
               min_seconds: float = 0.0) -> dict:
    """Median wall time of fn(i) (i counts calls, to rotate inputs); fn must
    block until its work is done (mx.eval). Repeats until both `repeats` calls
    and `min_seconds` have passed."""
    calls = 0
    for _ in range(warmup):
        fn(calls)
        calls += 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn(calls)
        times.append(time.perf_counter() - t0)
        calls += 1
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux's sysfs reports (a VM may report its host's
    whole L3), else 64 MiB."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=64 << 20)


def rotation_count(nbytes: int) -> int:
    """How many copies of an input of `nbytes` to rotate over so that together
    they exceed the last-level cache: no call then finds its input cached."""
    return max(1, math.ceil(1.1 * last_level_cache_bytes() / nbytes))


def copy_bandwidth(nbytes: int = 256 << 20, threads: Iterable[int] | None = None) -> dict:
    """Memory copy bandwidth in bytes moved (read + written) per second, the
    STREAM convention: the best of NumPy copies split over 1..cores threads
    (NumPy releases the GIL while copying)."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = {}
    for t in threads or range(1, (os.cpu_count() or 1) + 1):
        parts = np.array_split(np.arange(src.size), t)
        bounds = [(p[0], p[-1] + 1) for p in parts]

        def copy_all(_i):
            workers = [
                threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

        timing = time_calls(copy_all, warmup=1, repeats=5)
        best[t] = 2 * src.nbytes / timing["median_s"]
    threads_best = max(best, key=best.get)
    return {"bytes_per_s": best[threads_best], "threads": threads_best, "by_threads": best}


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """columns: (key, header) pairs; floats are printed with 3 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)


def print_row(row: dict) -> None:
    """One row as key=value pairs, printed as soon as it is measured."""
    print("  ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}"
                    for key, val in row.items()), flush=True)


def find_row(rows: Iterable[dict], **match) -> dict | None:
    """The first row whose columns have the given values (None if there is none:
    a --quick run holds few rows)."""
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


class Target(NamedTuple):
    """A speed target checked against a run: what it asks, what was measured."""
    name: str
    value: str
    met: bool


def render_targets(title: str, targets: Iterable[Target]) -> str:
    """A markdown section: one '- MET: name: value' (or NOT MET) line per target."""
    return f"## {title}\n\n" + "\n".join(
        f"- {'MET' if t.met else 'NOT MET'}: {t.name}: {t.value}" for t in targets)


def write_results(name: str, info: dict, rows: list[dict], markdown: str,
                  plot: Plot | None = None) -> Path:
    """Writes bench/results/<machine>/<name>.json and .md, and <name>.png when
    given a plot (and matplotlib is there); returns the folder."""
    folder = RESULTS_DIR / info["machine"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in info.items())
    (folder / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{markdown}\n")
    if plot:
        write_png(folder / f"{name}.json", plot)
    return folder
