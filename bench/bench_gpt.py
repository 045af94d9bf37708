"""Decode and prompt tokens/s of the mlx_ext GPT loop against mlx_lm.generate
and llama.cpp.

All run the same 4-bit checkpoint on the same prompt tokens with greedy
decoding, in float16 and in float32 activations (float parameters and scales
cast): the embedded kjv-byte-llama, and SmolLM2-135M-Instruct (its Q4_1 GGUF;
mlx-lm runs it converted by mlx_ext.convert) at llama-bench's pp512 / tg128.
On the GGUF, llama.cpp (llama-cpp-python, built from source for this CPU by
``make bench-gpt``; skipped when it is not installed) runs the same file with
as many threads as mlx_ext, in the same process.
Each loop is timed the same way: prompt tokens/s = prompt tokens / time until
the first new token; decode tokens/s = tokens after the first / time from the
first to the last. Each figure is the median of --repeats runs after a warm-up
run (three times as many for mlx_ext, whose runs are short: the median then
rides out other load on a shared machine). The perplexity is
``mlx_ext.gpt.perplexity`` on the package's held-out English text.

    python -m bench.bench_gpt          # -> bench/results/<machine>/gpt.{json,md}
    python -m bench.bench_gpt --sparse # pruned models -> gpt_sparse.{json,md}
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_ext import gpt
from mlx_ext.convert import convert
from mlx_ext.gpt.load import cast_parameters

from .harness import Target, copy_bandwidth, machine_info, markdown_table, render_targets, write_results

PASSAGE = (
    "And God said, Let there be light: and there was light. And God saw the light, that it was "
    "good: and God divided the light from the darkness. And God called the light Day, and the "
    "darkness he called Night. And the evening and the morning were the first day. "
)
KJV = str(gpt.DEFAULT_MODEL)
# (model, activation dtype, prompt tokens, generated tokens, KV cache bits
# (None: float), run mlx_lm): MLX's own CPU quantized matmul is very slow in
# float16 (2-3 tokens/s on the KJV model) and its float32 SmolLM2 prefill
# takes ~40 s, so mlx_lm runs the float32 float-cache rows only (the bench
# stays under ~5 minutes); every SmolLM2 row compares with llama.cpp.
CASES = [
    (KJV, mx.float32, 32, 64, None, True),
    (KJV, mx.float32, 512, 64, None, True),
    (KJV, mx.float16, 32, 64, None, False),
    ("smollm2", mx.float32, 512, 128, None, True),
    ("smollm2", mx.float32, 512, 128, 4, False),
    ("smollm2", mx.float16, 512, 128, None, False),
    ("smollm2", mx.float16, 512, 128, 4, False),
]
# The targets, against llama.cpp on the same cores.
DECODE_VS_LLAMA_CPP, PROMPT_VS_LLAMA_CPP, DECODE_OF_ROOFLINE = 2.0, 2.0, 0.6


def prompt_ids(tokenizer, length: int) -> list[int]:
    """The first `length` tokens of the passage, repeated as needed."""
    return tokenizer.encode(PASSAGE * (length // 8 + 1))[:length]


def time_mlx_ext(model_path, dtype, prompt, max_tokens, repeats, kv_bits=None):
    model, tokenizer = gpt.load(model_path, dtype=dtype, kv_bits=kv_bits)
    gpt.generate(model, tokenizer, prompt, max_tokens=4)
    runs = [gpt.generate(model, tokenizer, prompt, max_tokens=max_tokens) for _ in range(repeats)]
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return {
        "perplexity": gpt.perplexity(model, tokenizer),
        "prompt_tps": statistics.median(r.stats.prompt_tps for r in runs),
        "decode_tps": statistics.median(r.stats.generation_tps for r in runs),
        "peak_memory_mb": max(r.stats.peak_memory_bytes for r in runs) / 1e6,
        "tokens": runs[0].tokens,
        "prompt_tokens": runs[0].stats.prompt_tokens,
        "weight_bytes": weight_bytes,
    }


def time_mlx_lm(model_path, dtype, prompt, max_tokens, repeats):
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(model_path))
    cast_parameters(model, dtype)

    def run(n, prompt=prompt):
        mx.reset_peak_memory()
        start = time.perf_counter()
        tokens, stamps = [], []
        for response in stream_generate(model, tokenizer, prompt, max_tokens=n):
            stamps.append(time.perf_counter())
            tokens.append(response.token)
        return {
            "prompt_tps": response.prompt_tokens / (stamps[0] - start),
            "decode_tps": (len(tokens) - 1) / (stamps[-1] - stamps[0]),
            "peak_memory_mb": mx.get_peak_memory() / 1e6,
            "tokens": tokens,
        }

    run(4, prompt[:16])  # builds MLX's kernels; a short prompt (its float32 prefill is slow)
    runs = [run(max_tokens) for _ in range(repeats)]
    return {
        "prompt_tps": statistics.median(r["prompt_tps"] for r in runs),
        "decode_tps": statistics.median(r["decode_tps"] for r in runs),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
        "tokens": runs[0]["tokens"],
    }


def time_llama_cpp(gguf: Path, prompt, max_tokens, repeats):
    """llama.cpp on the GGUF with mlx_ext's thread count; None if llama-cpp-python
    is not installed. Timed as the other loops (greedy, the same prompt ids);
    memory: growth of the process's resident set from before loading to after
    the runs (llama.cpp allocates outside MLX)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import mlx_ext

    rss_before = resident_mb()
    threads = mlx_ext.get_num_threads()
    llm = Llama(str(gguf), n_ctx=len(prompt) + max_tokens + 8, n_batch=len(prompt), n_ubatch=len(prompt),
                n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(n):
        llm.reset()  # no prefix reuse: every run processes the whole prompt
        start = time.perf_counter()
        tokens, stamps = [], []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == n:
                break
        return {
            "prompt_tps": len(prompt) / (stamps[0] - start),
            "decode_tps": (len(tokens) - 1) / (stamps[-1] - stamps[0]),
            "tokens": tokens,
        }

    run(4)
    runs = [run(max_tokens) for _ in range(repeats)]
    result = {
        "prompt_tps": statistics.median(r["prompt_tps"] for r in runs),
        "decode_tps": statistics.median(r["decode_tps"] for r in runs),
        "resident_growth_mb": resident_mb() - rss_before,
        "tokens": runs[0]["tokens"],
        "version": __import__("llama_cpp").__version__,
    }
    del llm
    return result


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e3
    return float("nan")


def first_difference(ours: list[int], theirs: list[int]) -> str:
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if index is None and len(ours) != len(theirs):
        index = min(len(ours), len(theirs))
    return "none" if index is None else str(index)


def mlx_lm_checkpoint(model: str, folder: Path) -> str:
    """A checkpoint directory as it is; a GGUF (or named model) converted into `folder`."""
    if Path(model).is_dir():
        return model
    return str(convert(model, folder / Path(model).stem))


# Three verses of the embedded model's held-out validation set (every 50th
# verse, scripts/prepare_kjv.py), the ones tests/test_gpt.py scores.
KJV_HELD_OUT = (
    "In the beginning God created the heaven and the earth.\n"
    "And Adam gave names to all cattle, and to the fowl of the air, and to every beast of the field; "
    "but for Adam there was not found an help meet for him.\n"
    "And his brother's name was Jubal: he was the father of all such as handle the harp and organ.\n"
)
# (label, --sparsity, format, N:M bits: 0 float, None the checkpoint's)
SPARSE_CASES = [
    ("dense", None, None, None),
    ("50% unstructured", "0.5", "bitmask", None),
    ("2:4", "2:4", "nm", 0),
    ("2:4 + 4-bit", "2:4", "nm", 4),
]


def sparse_rows(models, dtype=mx.float32, prompt_tokens=32, max_tokens=64, repeats=3):
    """Pruned models (mlx_ext.sparsify.prune_model, Wanda calibrated on the
    held-out text's first tokens, as ``python -m mlx_ext.generate --sparsity``):
    perplexity before and after on held-out text the calibration did not see,
    decode tok/s and the weights' size, one row per model and SPARSE_CASES."""
    from mlx_ext.sparsify import calibration_split, prune_model

    rows = []
    for model_path in models:
        for label, sparsity, fmt, bits in SPARSE_CASES:
            model, tokenizer = gpt.load(model_path, dtype=dtype, fuse=False)  # one layout for every row
            report = None
            if sparsity is not None:
                report = prune_model(model, tokenizer, sparsity, format=fmt, bits=bits)
            prompt = prompt_ids(tokenizer, prompt_tokens)
            gpt.generate(model, tokenizer, prompt, max_tokens=4)
            runs = [gpt.generate(model, tokenizer, prompt, max_tokens=max_tokens) for _ in range(repeats)]
            held_out = calibration_split(tokenizer)[1]
            row = {
                "model": Path(model_path).name, "dtype": str(dtype).split(".")[-1], "pruning": label,
                "decode_tps": statistics.median(r.stats.generation_tps for r in runs),
                "parameter_mb": sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e6,
                "perplexity": gpt.perplexity(model, tokenizer, held_out),
                "pruned": str(report) if report else "",
            }
            if Path(model_path).resolve() == gpt.DEFAULT_MODEL.resolve():
                row["perplexity_kjv"] = gpt.perplexity(model, tokenizer, KJV_HELD_OUT)
            rows.append(row)
            print(row, flush=True)
    return rows


def sparse_main(args):
    info = machine_info()
    rows = sparse_rows(args.models, repeats=args.repeats)
    columns = [("model", "model"), ("dtype", "activations"), ("pruning", "pruning"),
               ("decode_tps", "mlx_ext decode tok/s"), ("parameter_mb", "parameters MB"),
               ("perplexity", "perplexity (held-out English)"),
               ("perplexity_kjv", "perplexity (held-out KJV verses)"), ("pruned", "layers")]
    notes = (
        "Every Linear but the head pruned by mlx_ext.sparsify (Wanda; its activation norms from "
        "the first 256 tokens of the held-out text, mlx_ext.sparsify.calibration_split), as "
        "`python -m mlx_ext.generate --sparsity ...` does. Perplexity: mlx_ext.gpt.perplexity on "
        "the rest of the held-out text (Pride and Prejudice, ch. 1) and, for the embedded model, "
        "on three of its held-out KJV verses. Decode: greedy, 64 tokens after a 32-token prompt, "
        f"median of {args.repeats} runs; float32 activations."
    )
    folder = write_results("gpt_sparse", info, rows, f"{notes}\n\n{markdown_table(rows, columns)}")
    print(f"written to {folder}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=sorted({case[0] for case in CASES}),
                        help="models of CASES to run (default: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even if installed")
    parser.add_argument("--sparse", action="store_true",
                        help="the pruned-model rows instead (-> gpt_sparse.{json,md})")
    args = parser.parse_args()
    if args.sparse:
        return sparse_main(args)

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    info = machine_info()
    info["load_average_1_5_15_min"] = load
    bandwidth = copy_bandwidth()["bytes_per_s"]
    info["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    rows = []
    llama_cpp = {}  # per model: the float32 and float16 rows compare against one run
    with tempfile.TemporaryDirectory() as converted:
        for model, dtype, prompt_tokens, max_tokens, kv_bits, with_mlx_lm in CASES:
            if model not in args.models:
                continue
            _, tokenizer = gpt.load(model)
            prompt = prompt_ids(tokenizer, prompt_tokens)
            ours = time_mlx_ext(model, dtype, prompt, max_tokens, 3 * args.repeats, kv_bits)
            if with_mlx_lm:
                checkpoint = mlx_lm_checkpoint(model, Path(converted))
                theirs = time_mlx_lm(checkpoint, dtype, prompt, max_tokens, args.repeats)
            gguf = gpt.resolve_model_path(model)
            if gguf.is_file() and model not in llama_cpp and not args.no_llama_cpp:
                llama_cpp[model] = time_llama_cpp(gguf, prompt, max_tokens, args.repeats)
            cpp = llama_cpp.get(model)
            # A decode step reads every parameter once (the tied head re-reads the embedding).
            achieved = ours["weight_bytes"] * ours["decode_tps"]
            row = {
                "model": Path(model).name,
                "dtype": str(dtype).split(".")[-1],
                "kv_cache": f"{kv_bits}-bit" if kv_bits else "float",
                "prompt_tokens": ours["prompt_tokens"],
                "generated_tokens": max_tokens,
                "mlx_ext_prompt_tps": ours["prompt_tps"],
                "mlx_ext_decode_tps": ours["decode_tps"],
                "mlx_ext_decode_weight_gb_s": achieved / 1e9,
                "mlx_ext_decode_fraction_of_copy_bw": achieved / bandwidth,
                "mlx_ext_peak_memory_mb": ours["peak_memory_mb"],
                "parameter_mb": ours["weight_bytes"] / 1e6,
                "perplexity": ours["perplexity"],
                "roofline_decode_tps": bandwidth / ours["weight_bytes"],
            }
            if with_mlx_lm:
                row.update({
                    "mlx_lm_prompt_tps": theirs["prompt_tps"],
                    "prompt_speedup": ours["prompt_tps"] / theirs["prompt_tps"],
                    "mlx_lm_decode_tps": theirs["decode_tps"],
                    "decode_speedup": ours["decode_tps"] / theirs["decode_tps"],
                    "mlx_lm_peak_memory_mb": theirs["peak_memory_mb"],
                    "first_differing_token": first_difference(ours["tokens"], theirs["tokens"]),
                })
            if cpp:
                row.update({
                    "llama_cpp_prompt_tps": cpp["prompt_tps"],
                    "llama_cpp_decode_tps": cpp["decode_tps"],
                    "prompt_vs_llama_cpp": ours["prompt_tps"] / cpp["prompt_tps"],
                    "decode_vs_llama_cpp": ours["decode_tps"] / cpp["decode_tps"],
                    "llama_cpp_resident_growth_mb": cpp["resident_growth_mb"],
                    "llama_cpp_version": cpp["version"],
                    "llama_cpp_tokens_differ_from": first_difference(ours["tokens"], cpp["tokens"]),
                })
            rows.append(row)
            print(row, flush=True)
    columns = [
        ("model", "model"), ("dtype", "activations"), ("kv_cache", "KV cache"), ("prompt_tokens", "prompt tokens"), ("generated_tokens", "generated"),
        ("mlx_ext_prompt_tps", "mlx_ext prompt tok/s"), ("mlx_lm_prompt_tps", "mlx_lm prompt tok/s"),
        ("prompt_speedup", "prompt ratio"),
        ("mlx_ext_decode_tps", "mlx_ext decode tok/s"), ("mlx_lm_decode_tps", "mlx_lm decode tok/s"),
        ("decode_speedup", "decode ratio"),
        ("llama_cpp_prompt_tps", "llama.cpp prompt tok/s"), ("prompt_vs_llama_cpp", "prompt vs llama.cpp"),
        ("llama_cpp_decode_tps", "llama.cpp decode tok/s"), ("decode_vs_llama_cpp", "decode vs llama.cpp"),
        ("mlx_ext_decode_weight_gb_s", "mlx_ext weights GB/s"),
        ("mlx_ext_decode_fraction_of_copy_bw", "of roofline"),
        ("mlx_ext_peak_memory_mb", "mlx_ext peak MB"), ("mlx_lm_peak_memory_mb", "mlx_lm peak MB"),
        ("llama_cpp_resident_growth_mb", "llama.cpp RSS growth MB"),
        ("parameter_mb", "parameters MB"), ("perplexity", "perplexity"),
        ("first_differing_token", "tokens differ from"),
        ("llama_cpp_tokens_differ_from", "llama.cpp tokens differ from"),
    ]
    table = markdown_table(rows, columns)
    targets = [
        target
        for row in rows if "llama_cpp_decode_tps" in row
        for target in (
            Target(f"{row['model']} {row['dtype']} {row['kv_cache']} KV decode >= {DECODE_VS_LLAMA_CPP}x llama.cpp tg128",
                   f"{row['decode_vs_llama_cpp']:.2f}x ({row['mlx_ext_decode_tps']:.1f} vs "
                   f"{row['llama_cpp_decode_tps']:.1f} tok/s)",
                   row["decode_vs_llama_cpp"] >= DECODE_VS_LLAMA_CPP),
            Target(f"{row['model']} {row['dtype']} {row['kv_cache']} KV decode >= {DECODE_OF_ROOFLINE} of the roofline",
                   f"{row['mlx_ext_decode_fraction_of_copy_bw']:.3f} ({row['mlx_ext_decode_tps']:.1f} of "
                   f"{row['roofline_decode_tps']:.0f} tok/s: {row['parameter_mb']:.1f} MB per token at "
                   f"{bandwidth / 1e9:.1f} GB/s)",
                   row["mlx_ext_decode_fraction_of_copy_bw"] >= DECODE_OF_ROOFLINE),
            Target(f"{row['model']} {row['dtype']} {row['kv_cache']} KV prompt >= {PROMPT_VS_LLAMA_CPP}x llama.cpp pp512",
                   f"{row['prompt_vs_llama_cpp']:.2f}x ({row['mlx_ext_prompt_tps']:.0f} vs "
                   f"{row['llama_cpp_prompt_tps']:.0f} tok/s)",
                   row["prompt_vs_llama_cpp"] >= PROMPT_VS_LLAMA_CPP),
        )
    ]
    notes = (
        f"Greedy, median of {3 * args.repeats} runs (mlx_ext) and "
        f"{args.repeats} runs (mlx_lm) after a warm-up. mlx_lm is "
        f"mlx_lm.stream_generate (what mlx_lm.generate runs), timed with the same definitions as "
        f"mlx_ext. 'tokens differ from': the first generated token where the two loops disagree "
        f"(none: all agree); in float16 mlx_ext accumulates and attends in float32 on the CPU. "
        f"smollm2: SmolLM2-135M-Instruct, Q4_1 GGUF (4-bit g32, 8-bit g32 tied embedding); mlx_lm "
        f"runs it converted by mlx_ext.convert. Perplexity: mlx_ext.gpt.perplexity on the held-out "
        f"text (Pride and Prejudice, ch. 1), per token of each model's tokenizer. llama.cpp: "
        f"llama-cpp-python built from source for this CPU (make bench-gpt), the same GGUF and "
        f"thread count, greedy (top_k=1), one run shared by the float32 and float16 rows (its "
        f"activations are its own); its memory is the growth of the process's resident set. "
        f"Roofline: the parameter bytes (read once per decoded token) at the copy bandwidth "
        f"measured at the start of this run. KV cache: float (float32 on the CPU) or quantized "
        f"along the head dim in groups of 64 (--kv-bits, mlx-lm's QuantizedKVCache layout), read "
        f"as packed codes by mlx_ext.scaled_dot_product_attention; the perplexity of a 4-bit row "
        f"is with that cache. Where a decode step's time goes when a target is missed: "
        f"gpt_decode_profile.md beside this table (python -m bench.profile_decode). "
        f"Load average at the start: {load}."
    )
    markdown = f"{notes}\n\n{table}"
    if targets:
        markdown += "\n\n" + render_targets("Targets (issue 12)", targets)
        print(render_targets("Targets (issue 12)", targets))
    folder = write_results("gpt", info, rows, markdown)
    print(table)
    print(f"written to {folder}")


if __name__ == "__main__":
    main()
