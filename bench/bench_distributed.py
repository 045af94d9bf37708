"""Tensor parallelism on this machine's loopback, and a model of it on Mac minis.

    .venv/bin/python -m bench.bench_distributed            # ~2-4 min on 2 cores
    .venv/bin/python -m bench.bench_distributed --model smollm2

Measured (two local ranks of the ring backend over 127.0.0.1, one thread each,
started by tests/distributed_launch.py with a hard timeout):
- ``all_sum`` latency and bandwidth, float32 messages of 4 B .. 64 MB;
- GPT-loop decode tokens/s of the model on 1 rank and sharded over 2
  (``mlx_ext.shard``), one thread per rank;
- the time per decode step spent in collectives: the step's 2 x layers
  all_sums of one token's hidden state, run back to back (each needs the
  previous one, as in the model), timed alone.

Then ``predict`` (below; its assumptions printed with it) estimates decode
tokens/s for 2, 4 and 8 Mac minis on 8B and 70B 4-bit models, beside the
loopback figures. Writes bench/results/<machine>/distributed.{md,json}.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from .harness import Target, machine_info, markdown_table, render_targets, write_results

SIZES = [4 << (4 * i) for i in range(7)]  # 4 B, 64 B, 1 KiB, 16 KiB, 256 KiB, 4 MiB, 64 MiB
GEN_TOKENS = 48
PROMPT = "And God said unto Moses,"

# --- The Mac mini model ------------------------------------------------------
# Published figures (assumptions, not measured here):
MAC_BANDWIDTH = {"M4 mini (120 GB/s)": 120e9, "M4 Pro mini (273 GB/s)": 273e9}  # Apple's specs
DECODE_EFFICIENCY = 0.7  # fraction of peak memory bandwidth a 4-bit decode step streams at (assumed)
LINKS = {
    # JACCL (RDMA over Thunderbolt 5, macOS 26.2+): a 4 KB all_sum between two M4 Pro Mac minis
    # in 25.5 us, 8 GB/s at 64 MB (github.com/omar-karray/mlx-jaccl-cluster). Up to 4 minis
    # (3 Thunderbolt 5 ports each) are a full mesh: one exchange per all_sum; 8 need a ring.
    "JACCL (TB5 RDMA)": {"mesh_upto": 4, "exchange_s": 25.5e-6, "step_s": 25.5e-6 / 2, "bytes_per_s": 8e9},
    # ring over TCP/IP on the Thunderbolt bridge (TB5: 80 Gb/s = 10 GB/s per direction, Apple's
    # spec): 100 us per ring step is an assumption (TCP's per-message cost; no published figure).
    "ring (TCP over TB5)": {"mesh_upto": 0, "step_s": 100e-6, "bytes_per_s": 5e9},
}
MODELS = {
    # layers, hidden size, weight bytes at 4 bits (4.5 bits/weight with group-64 scales and biases)
    "Llama-3 8B 4-bit": {"layers": 32, "hidden": 4096, "bytes": 8.0e9 * 4.5 / 8},
    "Llama-3 70B 4-bit": {"layers": 80, "hidden": 8192, "bytes": 70.6e9 * 4.5 / 8},
}
MINI_MEMORY = {"M4 mini (120 GB/s)": 32e9, "M4 Pro mini (273 GB/s)": 64e9}  # the largest of each


def all_sum_seconds(n: int, message_bytes: float, link: dict) -> float:
    """One all_sum on n ranks: on a full mesh (JACCL up to 4 minis) one
    exchange, every peer's message over its own cable at once; otherwise a
    ring all-reduce's 2 (n - 1) steps, each a step latency and a 1/n-th of
    the message (a 2-rank all_sum is 2 steps: the measured 25.5 us is 2 x 12.75)."""
    if n == 1:
        return 0.0
    if n <= link.get("mesh_upto", 0):
        return link["exchange_s"] + message_bytes / link["bytes_per_s"]
    return 2 * (n - 1) * (link["step_s"] + message_bytes / n / link["bytes_per_s"])


def predict(n: int, model: dict, mac_bandwidth: float, link: dict) -> dict:
    """Decode tokens/s: each rank streams its 1/n of the weights (memory
    bound), then 2 all_sums per layer of one token's hidden state (float16)."""
    compute = model["bytes"] / n / (mac_bandwidth * DECODE_EFFICIENCY)
    comm = 2 * model["layers"] * all_sum_seconds(n, model["hidden"] * 2, link)
    return {"compute_ms": compute * 1e3, "comm_ms": comm * 1e3, "tokens_per_s": 1 / (compute + comm)}


def prediction_rows() -> list[dict]:
    rows = []
    for model_name, model in MODELS.items():
        for mac, bw in MAC_BANDWIDTH.items():
            for link_name, link in LINKS.items():
                for n in (1, 2, 4, 8):
                    fits = model["bytes"] / n < 0.75 * MINI_MEMORY[mac]  # macOS keeps ~25% for itself
                    p = predict(n, model, bw, link)
                    rows.append({"model": model_name, "mac": mac, "link": link_name if n > 1 else "-",
                                 "minis": n, "fits": "yes" if fits else "no", **p})
    # one row per (model, mac, n=1) is enough
    seen, unique = set(), []
    for r in rows:
        key = (r["model"], r["mac"], r["link"], r["minis"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


ASSUMPTIONS = f"""\
Assumptions of the prediction (published figures, not measured here):
- decode is memory bound: each rank streams its 1/n of the weights once per token at
  {DECODE_EFFICIENCY:.0%} of the Mac's peak memory bandwidth (M4 mini 120 GB/s, M4 Pro mini 273 GB/s);
  attention over the KV cache, the embedding and the LM head are left out (small at short contexts);
- weights at 4.5 bits each (4-bit codes, a float16 scale and bias per 64): 8B 4.5 GB, 70B 39.7 GB;
  a configuration "fits" when its share is under 75% of the largest mini (M4 32 GB, M4 Pro 64 GB);
- two all_sums per layer (after attention's o_proj and the MLP's down_proj) of one token's
  hidden state in float16 (8 KB for 8B, 16 KB for 70B);
- JACCL: 25.5 us and 8 GB/s for an all_sum between two M4 Pro minis over Thunderbolt 5 RDMA
  (github.com/omar-karray/mlx-jaccl-cluster); up to 4 minis are a full mesh (3 Thunderbolt 5 ports
  each): one 25.5 us exchange per all_sum; 8 minis are a ring: 2 (n - 1) steps of 12.75 us plus
  message / n / bandwidth;
- ring backend over TCP on Thunderbolt 5 (10 GB/s per direction): 2 (n - 1) steps of 100 us plus
  message / n / 5 GB/s (assumed: TCP's per-message cost dominates; no published figure);
- the last column puts this machine's loopback all_sum in the ring's place (2 (n - 1) steps of half
  the measured 4-byte all_sum, at the best measured bandwidth);
- no overlap of communication with compute (MLX runs them in order within a step)."""


# --- The ranks' side -----------------------------------------------------------


def rank_main(args) -> None:
    import mlx.core as mx

    import mlx_ext
    from mlx_ext import gpt

    mlx_ext.set_num_threads(1)
    # the 1-rank run has no hostfile: a group of one (a ring of one would wait for peers)
    group = mx.distributed.init(backend="ring", strict=True) if os.environ.get("MLX_HOSTFILE") else \
        mx.distributed.init()
    n = group.size()
    result = {"ranks": n}
    if n > 1 and not args.skip_all_sum:
        sweep = []
        for size in SIZES:
            a = mx.ones((size // 4,), mx.float32)
            mx.eval(a)
            repeats = 50 if size <= 1 << 16 else 10 if size <= 1 << 22 else 3
            times = []
            for i in range(repeats + 2):
                t0 = time.perf_counter()
                mx.eval(mx.distributed.all_sum(a, group=group, stream=mx.cpu))
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            sweep.append({"bytes": size, "median_s": statistics.median(times)})
        result["all_sum"] = sweep
    model, tokenizer = gpt.load(args.model)
    if n > 1:
        # the control: both ranks decode the whole model at once, no collectives
        # (what sharing this machine's cores costs by itself)
        gpt.generate(model, tokenizer, PROMPT, max_tokens=4)
        result["unsharded_side_by_side_tokens_per_s"] = gpt.generate(
            model, tokenizer, PROMPT, max_tokens=GEN_TOKENS).stats.generation_tps
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))  # both done
        mlx_ext.shard(model, group)
    gpt.generate(model, tokenizer, PROMPT, max_tokens=4)  # warm-up: the compiled step's kernels
    runs = [gpt.generate(model, tokenizer, PROMPT, max_tokens=GEN_TOKENS) for _ in range(2)]
    result["tokens_per_s"] = max(r.stats.generation_tps for r in runs)
    result["tokens"] = runs[0].tokens
    args_ = model.args
    result["layers"], result["hidden"] = args_.num_hidden_layers, args_.hidden_size
    if n > 1:
        # the collectives of one decode step alone: 2 x layers all_sums of
        # one token's hidden state (float32 on the CPU), each on the last's output
        h = mx.ones((1, 1, args_.hidden_size), mx.float32)
        mx.eval(h)

        def step():
            x = h
            for _ in range(2 * args_.num_hidden_layers):
                x = mx.distributed.all_sum(x, group=group, stream=mx.cpu) * 0.5
            mx.eval(x)

        for _ in range(3):
            step()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        result["collective_s_per_step"] = statistics.median(times)
    if group.rank() == 0:
        Path(args.out).write_text(json.dumps(result))


# --- The driver ------------------------------------------------------------------


def launch(argv: list[str], n: int, timeout: float) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.distributed_launch import check_ranks, run_ranks

    if n == 1:
        import subprocess

        env = {k: v for k, v in os.environ.items() if k not in ("MLX_HOSTFILE", "MLX_RANK")}
        subprocess.run([sys.executable, *argv], check=True, timeout=timeout, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
        return
    check_ranks(run_ranks(argv, n, timeout))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_distributed")
    parser.add_argument("--model", default=None, help="a GPT-loop model (default: the embedded one)")
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-all-sum", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank:
        rank_main(args)
        return 0
    from mlx_ext import gpt

    model = args.model or str(gpt.DEFAULT_MODEL)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    load_before = os.getloadavg()
    one, two = tmp / f"bench_distributed_1_{os.getpid()}.json", tmp / f"bench_distributed_2_{os.getpid()}.json"
    base = ["-m", "bench.bench_distributed", "--rank", "--model", model]
    print("1 rank ...", flush=True)
    launch(base + ["--out", str(one)], 1, 240)
    print("2 ranks ...", flush=True)
    launch(base + ["--out", str(two)], 2, 300)
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    one.unlink(), two.unlink()

    load = os.getloadavg()
    info = machine_info()
    info.update({"model": args.model or f"the embedded model ({Path(model).name})",
                 "ranks_threads": "1 mlx_ext thread per rank (mlx_ext_threads above: the driver's)",
                 "backend": "ring over 127.0.0.1 (tests/distributed_launch.py)",
                 "load_average_before": " ".join(f"{x:.1f}" for x in load_before),
                 "load_average_after": " ".join(f"{x:.1f}" for x in load)})
    sweep = [{"bytes": s["bytes"], "latency_us": s["median_s"] * 1e6,
              "GB_per_s": s["bytes"] / s["median_s"] / 1e9} for s in r2["all_sum"]]
    step_s = 1 / r2["tokens_per_s"]
    coll = r2["collective_s_per_step"]
    gen = [{"ranks": 1, "tokens_per_s": r1["tokens_per_s"], "step_ms": 1e3 / r1["tokens_per_s"],
            "collective_ms": 0.0, "collective_fraction": 0.0},
           {"ranks": 2, "tokens_per_s": r2["tokens_per_s"], "step_ms": step_s * 1e3,
            "collective_ms": coll * 1e3, "collective_fraction": coll / step_s},
           {"ranks": "2, each the whole model (control)", "tokens_per_s": r2["unsharded_side_by_side_tokens_per_s"],
            "step_ms": 1e3 / r2["unsharded_side_by_side_tokens_per_s"]}]
    same = r1["tokens"] == r2["tokens"]
    predictions = prediction_rows()
    small = sweep[0]["latency_us"]
    loopback = {"step_s": small * 1e-6 / 2, "bytes_per_s": max(s["GB_per_s"] for s in sweep) * 1e9}
    for row in predictions:  # the same model with this machine's loopback as the link, for scale
        if row["minis"] > 1:
            model_ = MODELS[row["model"]]
            row["tokens_per_s_loopback_link"] = predict(row["minis"], model_, MAC_BANDWIDTH[row["mac"]],
                                                        loopback)["tokens_per_s"]
    targets = [
        Target("2-rank greedy tokens equal 1 rank's", f"{'yes' if same else 'no'} ({len(r1['tokens'])} tokens)",
               same),
        Target("all_sum sweep 4 B .. 64 MB measured", f"{len(sweep)} sizes", len(sweep) == len(SIZES)),
    ]
    md = "\n\n".join([
        "## all_sum on loopback (2 ranks, ring, float32)",
        markdown_table(sweep, [("bytes", "bytes"), ("latency_us", "median us"), ("GB_per_s", "GB/s (size / time)")]),
        f"## GPT-loop decode ({Path(model).name}, {r1['layers']} layers, hidden {r1['hidden']})",
        markdown_table(gen, [("ranks", "ranks"), ("tokens_per_s", "tokens/s"), ("step_ms", "ms / token"),
                             ("collective_ms", f"ms in {2 * r1['layers']} all_sums"),
                             ("collective_fraction", "fraction of the step")]),
        "## Predicted decode tokens/s on Mac minis (a model, not a measurement)",
        ASSUMPTIONS,
        markdown_table(predictions, [("model", "model"), ("mac", "mini"), ("link", "link"), ("minis", "minis"),
                                     ("fits", "fits"), ("compute_ms", "weights ms"), ("comm_ms", "all_sum ms"),
                                     ("tokens_per_s", "tokens/s"),
                                     ("tokens_per_s_loopback_link", "tokens/s with this loopback's all_sum")]),
        render_targets("Targets", targets),
    ])
    print(md)
    folder = write_results("distributed", info, sweep + gen + predictions, md)
    print(f"\nwrote {folder}/distributed.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
