"""The CPU thread pool's dispatch cost, alone and through MLX.

    python -m bench.bench_thread_pool
    python -m bench.bench_thread_pool --baseline 94372f3 --baseline-ext old_ext.so

Dispatch: bench/cpu/thread_pool.cpp (compiled against csrc/common/cpu/
thread_pool.cpp) times parallel_for call by call with 1..128 trivial tasks,
back to back and after 20 us of caller work. GEMV: a 576x576 4-bit (group 64)
float32 quantized_matmul at M=1, 200 of them chained in one graph (each
output is the next input), in microseconds per matmul: mx.eval of a graph
built beforehand.

--baseline COMMIT also compiles the pool of COMMIT, and --baseline-ext a copy
of the extension (mlx_ext/_ext*.so) built at that commit; the two versions
then run in alternation (A, B, A, B, ...), each in its own process, so that
noise from other work on the machine hits both. Figures are medians over
--rounds runs of per-run medians; for the GEMV also the best run, closest to
an idle machine (other processes on a 2-core machine halve what a second
thread can do).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from . import harness

from tests import native_build

ROOT = native_build.REPO

POOL = "csrc/common/cpu/thread_pool.cpp"
CHAIN = 200
GEMV = dict(n=576, k=576, bits=4, group_size=64)


def dispatch_executable(commit: str | None) -> Path:
    """The microbenchmark linked with the pool of `commit` (None: the working tree)."""
    pool = ROOT / POOL
    if commit:
        text = subprocess.run(["git", "show", f"{commit}:{POOL}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        pool = Path(tempfile.mkdtemp()) / "thread_pool.cpp"
        pool.write_text(text)
    return native_build.executable("bench_thread_pool", [ROOT / "bench/cpu/thread_pool.cpp", pool])


def run_dispatch(exe: Path, calls: int) -> dict:
    out = subprocess.run([str(exe), str(calls)], check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        threads, n_tasks, gap_us, ns = line.split()
        result[int(threads), int(n_tasks), int(gap_us)] = float(ns)
    return result


def gemv_worker(ext: str | None, repeats: int) -> dict:
    """In a fresh process: us per chained GEMV for 1 and 2 threads."""
    import mlx.core as mx

    if ext:  # the baseline's extension in place of the installed one
        import importlib.util

        spec = importlib.util.spec_from_file_location("mlx_ext._ext", ext)
        module = importlib.util.module_from_spec(spec)
        sys.modules["mlx_ext._ext"] = module
        spec.loader.exec_module(module)
    import mlx_ext

    n, k, bits, group_size = GEMV["n"], GEMV["k"], GEMV["bits"], GEMV["group_size"]
    w, scales, biases = mx.quantize(mx.random.normal((n, k), key=mx.random.key(0)) / k**0.5,
                                    group_size=group_size, bits=bits)
    x0 = mx.random.normal((1, k), key=mx.random.key(1))
    mx.eval(w, scales, biases, x0)

    def chain():
        x = x0
        for _ in range(CHAIN):
            x = mlx_ext.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
        return x

    result = {}
    for threads in (1, 2):
        mlx_ext.set_num_threads(threads)
        graphs = [chain() for _ in range(repeats + 2)]
        seconds = harness.time_calls(lambda i: mx.eval(graphs[i]), repeats=repeats)["median_s"]
        result[threads] = seconds / CHAIN * 1e6
    return result


def run_gemv(ext: str | None, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_thread_pool", "--gemv-worker", "--repeats", str(repeats)]
    out = subprocess.run(cmd + (["--ext", ext] if ext else []), cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return {int(t): v for t, v in json.loads(out).items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a commit whose pool to measure alongside")
    parser.add_argument("--baseline-ext", help="the extension (.so) built at --baseline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5000, help="back-to-back calls per dispatch case")
    parser.add_argument("--repeats", type=int, default=15, help="timed chains per GEMV case")
    parser.add_argument("--gemv-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ext", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gemv_worker:
        print(json.dumps(gemv_worker(args.ext, args.repeats)))
        return

    variants = {}
    if args.baseline:
        variants["before"] = (dispatch_executable(args.baseline), args.baseline_ext)
    variants["after"] = (dispatch_executable(None), None)
    dispatch = {v: [] for v in variants}
    gemv = {v: [] for v in variants if v == "after" or args.baseline_ext}
    for r in range(args.rounds):
        for v, (exe, ext) in variants.items():
            dispatch[v].append(run_dispatch(exe, args.calls))
            if v in gemv:
                gemv[v].append(run_gemv(ext, args.repeats))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = []
    for case in dispatch["after"][0]:
        threads, n_tasks, gap_us = case
        row = {"benchmark": "dispatch", "threads": threads, "n_tasks": n_tasks, "gap_us": gap_us}
        for v in dispatch:
            row[f"{v}_ns"] = round(statistics.median(run[case] for run in dispatch[v]))
        rows.append(row)
    for threads in (1, 2):
        row = {"benchmark": "gemv_576x576_4bit_m1_chained", "threads": threads}
        for v in gemv:
            runs = [run[threads] for run in gemv[v]]
            row.update({f"{v}_us": statistics.median(runs), f"{v}_best_us": min(runs), f"{v}_runs_us": runs})
        rows.append(row)

    label = {"before": f"before (pool of {args.baseline})", "after": "after" if args.baseline else "this tree"}
    info = harness.machine_info()
    info.pop("mlx_ext_threads", None)  # each case sets its own
    info["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    dispatch_cols = [("threads", "threads"), ("n_tasks", "tasks"), ("gap_us", "caller work between calls, us")]
    dispatch_cols += [(f"{v}_ns", f"{label[v]}, ns per call") for v in dispatch]
    gemv_cols = [("threads", "threads")]
    gemv_cols += [(f"{v}_us", f"{label[v]}, us per matmul") for v in gemv]
    gemv_cols += [(f"{v}_best_us", f"{label[v]}, best run") for v in gemv]
    markdown = (
        f"Each figure is the median over {args.rounds} runs of each version (run alternately) of "
        f"the run's median; 'best run' is the lowest run median.\n\n"
        f"## parallel_for dispatch\n\nMedian wall time of one call with n trivial tasks "
        f"({args.calls} calls back to back, {args.calls // 5} after 20 us of caller work each).\n\n"
        + harness.markdown_table([r for r in rows if r["benchmark"] == "dispatch"], dispatch_cols)
        + f"\n\n## 576x576 4-bit GEMV at M=1 through MLX\n\n{CHAIN} mlx_ext.quantized_matmul "
        f"chained in one graph (float32, group 64), median of {args.repeats} graphs per run.\n\n"
        + harness.markdown_table([r for r in rows if r["benchmark"] != "dispatch"], gemv_cols)
    )
    folder = harness.write_results("thread_pool", info, rows, markdown)
    print(markdown)
    print(f"written to {folder}")


if __name__ == "__main__":
    main()
