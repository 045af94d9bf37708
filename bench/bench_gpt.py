"""Decode and prompt tokens/s of the mlx_ext GPT loop against mlx_lm.generate.

Both run the same 4-bit checkpoint on the same prompt tokens with greedy
decoding, in float16 and in float32 activations (float parameters and scales
cast): the embedded kjv-byte-llama, and SmolLM2-135M-Instruct (its Q4_1 GGUF;
mlx-lm runs it converted by mlx_ext.convert) at llama-bench's pp512 / tg128.
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
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_ext import gpt
from mlx_ext.convert import convert
from mlx_ext.gpt.load import cast_parameters

from .harness import copy_bandwidth, machine_info, markdown_table, write_results

PASSAGE = (
    "And God said, Let there be light: and there was light. And God saw the light, that it was "
    "good: and God divided the light from the darkness. And God called the light Day, and the "
    "darkness he called Night. And the evening and the morning were the first day. "
)
KJV = str(gpt.DEFAULT_MODEL)
# (model, activation dtype, prompt tokens, generated tokens): MLX's own CPU
# quantized matmul is very slow in float16, so the float16 rows stay short.
CASES = [
    (KJV, mx.float32, 32, 64),
    (KJV, mx.float32, 512, 64),
    (KJV, mx.float16, 32, 64),
    ("smollm2", mx.float32, 512, 128),
    ("smollm2", mx.float16, 32, 16),
]


def prompt_ids(tokenizer, length: int) -> list[int]:
    """The first `length` tokens of the passage, repeated as needed."""
    return tokenizer.encode(PASSAGE * (length // 8 + 1))[:length]


def time_mlx_ext(model_path, dtype, prompt, max_tokens, repeats):
    model, tokenizer = gpt.load(model_path, dtype=dtype)
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

    def run(n):
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

    run(4)
    runs = [run(max_tokens) for _ in range(repeats)]
    return {
        "prompt_tps": statistics.median(r["prompt_tps"] for r in runs),
        "decode_tps": statistics.median(r["decode_tps"] for r in runs),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
        "tokens": runs[0]["tokens"],
    }


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
            model, tokenizer = gpt.load(model_path, dtype=dtype)
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sparse", action="store_true",
                        help="the pruned-model rows instead (-> gpt_sparse.{json,md})")
    args = parser.parse_args()
    if args.sparse:
        return sparse_main(args)

    info = machine_info()
    bandwidth = copy_bandwidth()["bytes_per_s"]
    info["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    rows = []
    with tempfile.TemporaryDirectory() as converted:
        for model, dtype, prompt_tokens, max_tokens in CASES:
            if model not in args.models:
                continue
            _, tokenizer = gpt.load(model)
            prompt = prompt_ids(tokenizer, prompt_tokens)
            ours = time_mlx_ext(model, dtype, prompt, max_tokens, 3 * args.repeats)
            checkpoint = mlx_lm_checkpoint(model, Path(converted))
            theirs = time_mlx_lm(checkpoint, dtype, prompt, max_tokens, args.repeats)
            # A decode step reads every parameter once (the tied head re-reads the embedding).
            achieved = ours["weight_bytes"] * ours["decode_tps"]
            row = {
                "model": Path(model).name,
                "dtype": str(dtype).split(".")[-1],
                "prompt_tokens": ours["prompt_tokens"],
                "generated_tokens": max_tokens,
                "mlx_ext_prompt_tps": ours["prompt_tps"],
                "mlx_lm_prompt_tps": theirs["prompt_tps"],
                "prompt_speedup": ours["prompt_tps"] / theirs["prompt_tps"],
                "mlx_ext_decode_tps": ours["decode_tps"],
                "mlx_lm_decode_tps": theirs["decode_tps"],
                "decode_speedup": ours["decode_tps"] / theirs["decode_tps"],
                "mlx_ext_decode_weight_gb_s": achieved / 1e9,
                "mlx_ext_decode_fraction_of_copy_bw": achieved / bandwidth,
                "mlx_ext_peak_memory_mb": ours["peak_memory_mb"],
                "mlx_lm_peak_memory_mb": theirs["peak_memory_mb"],
                "parameter_mb": ours["weight_bytes"] / 1e6,
                "perplexity": ours["perplexity"],
                "first_differing_token": first_difference(ours["tokens"], theirs["tokens"]),
            }
            rows.append(row)
            print(row, flush=True)
    columns = [
        ("model", "model"), ("dtype", "activations"), ("prompt_tokens", "prompt tokens"), ("generated_tokens", "generated"),
        ("mlx_ext_prompt_tps", "mlx_ext prompt tok/s"), ("mlx_lm_prompt_tps", "mlx_lm prompt tok/s"),
        ("prompt_speedup", "prompt ratio"),
        ("mlx_ext_decode_tps", "mlx_ext decode tok/s"), ("mlx_lm_decode_tps", "mlx_lm decode tok/s"),
        ("decode_speedup", "decode ratio"),
        ("mlx_ext_decode_weight_gb_s", "mlx_ext weights GB/s"),
        ("mlx_ext_decode_fraction_of_copy_bw", "of copy bandwidth"),
        ("parameter_mb", "parameters MB"), ("perplexity", "perplexity"),
        ("first_differing_token", "tokens differ from"),
    ]
    table = markdown_table(rows, columns)
    notes = (
        f"Greedy, median of {3 * args.repeats} runs (mlx_ext) and "
        f"{args.repeats} runs (mlx_lm) after a warm-up. mlx_lm is "
        f"mlx_lm.stream_generate (what mlx_lm.generate runs), timed with the same definitions as "
        f"mlx_ext. 'tokens differ from': the first generated token where the two loops disagree "
        f"(none: all agree); in float16 mlx_ext accumulates and attends in float32 on the CPU. "
        f"smollm2: SmolLM2-135M-Instruct, Q4_1 GGUF (4-bit g32, 8-bit g32 tied embedding); mlx_lm "
        f"runs it converted by mlx_ext.convert. Perplexity: mlx_ext.gpt.perplexity on the held-out "
        f"text (Pride and Prejudice, ch. 1), per token of each model's tokenizer."
    )
    folder = write_results("gpt", info, rows, f"{notes}\n\n{table}")
    print(table)
    print(f"written to {folder}")


if __name__ == "__main__":
    main()
