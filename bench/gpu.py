"""GPU timing shared by the bench_*.py scripts on MLX's CUDA backend.

An empty mx.eval costs tens of microseconds there, so each timing evaluates
many independent calls at once (each on its own copy of the inputs, rotated
beyond the L2 cache) and reports time per call.
"""

from __future__ import annotations

import math
import re
import statistics
import subprocess
from typing import Callable

import mlx.core as mx

from . import harness

ROTATE_BYTES = 256 << 20  # inputs touched per eval, > 2x the L2 cache
EVAL_SECONDS = 8e-3  # calls per eval: enough for this much work (at most MAX_CALLS),
# so that MLX commits its graph of calls in pieces and records one while the GPU
# runs the last, as in a model's forward pass, which holds hundreds of calls
MAX_CALLS = 64
MIN_CALLS = 8  # an eval of 1-3 large calls costs milliseconds more than its kernels
PIPELINE_ROUNDS = 8


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown GPU"


def machine_name() -> str:
    """A results folder name from the GPU model: h200, h100, a100, l40s, else
    the model's name as a slug."""
    name = gpu_name().lower()
    for model in ["h200", "h100", "a100", "l40s"]:
        if model in name:
            return model
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def start() -> tuple[dict, dict]:
    """What every `--device gpu` bench does first: refuse without MLX's CUDA
    backend, make the GPU the default device, and measure the copy bandwidth.
    Returns the results' machine info (the GPU's name and the bandwidth
    figures included) and the bandwidth (copy_bandwidth)."""
    if not (mx.is_available(mx.gpu) and hasattr(mx, "cuda") and mx.cuda.is_available()):
        raise SystemExit("--device gpu needs MLX's CUDA backend (pip install 'mlx[cuda13]')")
    mx.set_default_device(mx.gpu)
    info = harness.machine_info(machine=machine_name())
    info["gpu"] = gpu_name()
    bw = copy_bandwidth()
    info.update({k: round(v, 1) if isinstance(v, float) else v for k, v in bw.items()})
    return info, bw


def copy_bandwidth() -> dict:
    """Device copy bandwidth, bytes read + written per second: PyTorch's
    device-to-device copy when PyTorch is there, and MLX's own elementwise
    copy (x + 0 into a new buffer); the larger is the reference."""
    nbytes = 2 << 30
    result = {}
    try:
        import torch

        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
        dst = torch.empty_like(src)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for i in range(12):
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end) / 1e3)
        result["torch_copy_GBps"] = 2 * nbytes / statistics.median(times) / 1e9
        del src, dst
        torch.cuda.empty_cache()
    except Exception as e:  # no PyTorch, or no CUDA in it
        result["torch_copy_error"] = repr(e)[:200]
    a = mx.random.normal((nbytes // 2,)).astype(mx.bfloat16)
    mx.eval(a)
    t = gpu_time(lambda j: a + 0, calls=4)
    result["mlx_copy_GBps"] = 2 * nbytes / t / 1e9
    result["copy_GBps"] = max(result.get("torch_copy_GBps", 0.0), result["mlx_copy_GBps"])
    return result


def gpu_time(make: Callable[[int], mx.array], calls: int, repeats: int = 7,
             pipelined: bool = False) -> float:
    """Median seconds per call of `make(j)` with `calls` independent calls
    per mx.eval (after one warm-up eval).

    pipelined: PIPELINE_ROUNDS rounds of `calls` calls, each round built
    and committed with mx.async_eval while the GPU still runs the round
    before, the way mlx-lm's generate loop builds token t + 1's graph while
    token t runs. MLX's per-call host cost (graph building, recording) then
    overlaps the kernels instead of adding to them."""
    def run():
        mx.eval([make(j) for j in range(calls)])

    def run_pipelined():
        previous = None
        for _ in range(PIPELINE_ROUNDS):
            outs = [make(j) for j in range(calls)]
            mx.async_eval(outs)
            if previous is not None:
                mx.eval(previous)
            previous = outs
        mx.eval(previous)

    once, per_run = (run_pipelined, calls * PIPELINE_ROUNDS) if pipelined else (run, calls)
    return harness.time_calls(lambda i: once(), warmup=1, repeats=repeats)["median_s"] / per_run


def calls_per_eval(make: Callable[[int], mx.array]) -> int:
    """Calls per eval so that one eval holds about EVAL_SECONDS of work,
    between MIN_CALLS and MAX_CALLS."""
    one = gpu_time(make, calls=1, repeats=3)
    return int(min(MAX_CALLS, max(MIN_CALLS, math.ceil(EVAL_SECONDS / one))))


def call_floor(ours: Callable[[int], mx.array], theirs: Callable[[int], mx.array]) -> dict:
    """Microseconds per call of a tiny call of the op, MAX_CALLS calls per
    eval, for mlx_ext (`ours`) and MLX (`theirs`): the per-call cost of
    building and running MLX's graph that no kernel can go under."""
    return {"floor_mlx_ext_us": 1e6 * gpu_time(ours, MAX_CALLS),
            "floor_mlx_us": 1e6 * gpu_time(theirs, MAX_CALLS)}
