"""Generate text with the mlx_ext GPT loop.

    python -m mlx_ext.generate --compare            # the embedded KJV model, no download
    python -m mlx_ext.generate --model PATH_OR_HUB_ID --prompt "..." --max-tokens 100
    python -m mlx_ext.generate --model smollm2 --chat "What is the capital of France?"
    python -m mlx_ext.generate --model smollm2 --chat     # an interactive chat

    python -m mlx_ext.generate --sparsity 2:4        # pruned first (Wanda), then generates

    mlx.launch -n 2 --python .venv/bin/python -m mlx_ext.generate --model smollm2 --tensor-parallel

``--tensor-parallel`` shards the model across the ranks of
``mx.distributed.init()`` (``mlx_ext.shard``: heads and the MLP split, two
all_sums per layer); every rank runs the same loop, rank 0 alone prints.

``--compare`` runs the same generation again with MLX's own quantized layers
(``mlx_ext.unpatch``) on the same weights, and prints both speeds and whether
the tokens agree.
"""

import argparse
import os
import sys

import mlx.core as mx

from . import gpt, unpatch
from .distributed import shard
from .sparsify import parse_sparsity, prune_model

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mlx_ext.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(gpt.DEFAULT_MODEL),
                        help="a named model (smollm2), a GGUF file, a checkpoint directory or a Hugging "
                             "Face hub id (default: the embedded KJV model)")
    parser.add_argument("--prompt", default="And God said unto Moses,")
    parser.add_argument("--chat", nargs="?", const="", metavar="TEXT",
                        help="a chat turn in the model's chat template (instead of --prompt); "
                             "without TEXT, an interactive chat")
    parser.add_argument("--max-tokens", type=positive_int, default=200)
    parser.add_argument("--temp", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: no limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", type=int, default=4, help="for checkpoints stored unquantized")
    parser.add_argument("--group-size", type=int, default=64, help="for checkpoints stored unquantized")
    parser.add_argument("--kv-bits", type=int, choices=(4, 8),
                        help="quantize the key/value cache (as mlx-lm's --kv-bits; default: float)")
    parser.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=64,
                        help="group size of the quantized key/value cache, along the head dim")
    parser.add_argument("--dtype", choices=DTYPES, help="activation dtype (default: the checkpoint's)")
    parser.add_argument("--compare", action="store_true",
                        help="also run with MLX's quantized matmul and compare speed and tokens")
    parser.add_argument("--tensor-parallel", action="store_true",
                        help="shard the model across the ranks of mx.distributed (run under mlx.launch); "
                             "rank 0 prints")
    add_sparsity_args(parser)
    return parser.parse_args(argv)


def tensor_parallel(model) -> None:
    """--tensor-parallel: shards `model` over mx.distributed's group; every
    rank but 0 prints nothing from here on (its stdout goes to /dev/null)."""
    group = mx.distributed.init()
    counts = shard(model, group)
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")
    layers = ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "nothing (a group of one)"
    print(f"[tensor parallel: {group.size()} ranks; sharded {layers}]")


SPARSE_FORMATS = ("nm", "bitmask", "csr", "bsr")


def sparsity_arg(text: str) -> str:
    try:
        parse_sparsity(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_sparsity_args(parser: argparse.ArgumentParser) -> None:
    """--sparsity and its companions: prune the loaded model (mlx_ext.sparsify,
    Wanda calibrated on the package's held-out text) before generating."""
    group = parser.add_argument_group("pruning")
    group.add_argument("--sparsity", type=sparsity_arg, metavar="N:M|FRACTION",
                       help="prune every Linear but the head: a pattern along K (2:4, 4:8) or the "
                            "fraction of weights removed (0.5)")
    group.add_argument("--sparse-format", choices=SPARSE_FORMATS,
                       help="storage of the pruned weights (default: nm for a pattern, bitmask "
                            "from 30%% density, else csr)")
    group.add_argument("--sparse-bits", type=int, choices=(0, 4, 8),
                       help="N:M values: 0 float, 4 or 8 affine (default: the checkpoint's bits)")
    group.add_argument("--sparse-method", choices=("wanda", "magnitude"), default="wanda")


def prune(model, tokenizer, args) -> None:
    """The --sparsity step: prunes `model` in place and says what it did."""
    if args.sparsity is None:
        return
    if args.sparse_format is not None and (args.sparse_format == "nm") != (":" in args.sparsity):
        raise SystemExit("[mlx_ext.generate] --sparse-format nm goes with an n:m --sparsity, "
                         "the others with a fraction")
    report = prune_model(model, tokenizer, args.sparsity, format=args.sparse_format,
                         bits=args.sparse_bits, method=args.sparse_method)
    print(f"[pruned to {args.sparsity} ({args.sparse_method}): {report}]")


def timed_generate(model, tokenizer, prompt, args, sampler, on_text=None) -> gpt.Generation:
    """A two-token warm-up first (MLX builds the compiled decode step's kernels
    on first use, seconds on a cold cache), then the generation that is timed."""
    gpt.generate(model, tokenizer, prompt, max_tokens=2, sampler=sampler, seed=args.seed)
    return gpt.generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler,
                        seed=args.seed, on_text=on_text)


def print_text(text: str) -> None:
    print(text, end="", flush=True)


def interactive_chat(model, tokenizer, args, sampler) -> None:
    """Turns read from stdin until end of input; the cache is kept across turns."""
    session = gpt.ChatSession(model, tokenizer)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print()
            return
        reply = session.ask(text, max_tokens=args.max_tokens, sampler=sampler, seed=args.seed, on_text=print_text)
        print(f"\n[{describe('mlx_ext', reply.stats)}]")


def describe(label: str, stats: gpt.GenerationStats) -> str:
    return (
        f"{label:8s} prompt {stats.prompt_tokens} tokens at {stats.prompt_tps:.1f} tokens/s, "
        f"generation {stats.generated_tokens} tokens at {stats.generation_tps:.1f} tokens/s, "
        f"peak memory {stats.peak_memory_bytes / 1e6:.1f} MB"
    )


def agreement(ours: list[int], theirs: list[int]) -> str:
    if ours == theirs:
        return f"yes, all {len(ours)}"
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"no, they differ from token {first} on ({len(ours)} and {len(theirs)} tokens)"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer, config = gpt.load(
            args.model, bits=args.bits, group_size=args.group_size, dtype=DTYPES.get(args.dtype),
            kv_bits=args.kv_bits, kv_group_size=args.kv_group_size, return_config=True,
            fuse=args.sparsity is None,  # pruning works on the checkpoint's own projections
        )
    except (gpt.ModelNotFoundError, gpt.GGUFError, ValueError) as e:  # load's errors say what is wrong
        print(e, file=sys.stderr)
        return 1
    if args.chat is not None and tokenizer.chat_template is None:
        print(f"[mlx_ext.gpt] {args.model} has no chat template: give it a --prompt instead", file=sys.stderr)
        return 1
    prune(model, tokenizer, args)
    if args.tensor_parallel:
        if args.chat == "":
            print("[mlx_ext.generate] --tensor-parallel needs --prompt or --chat TEXT (ranks share no stdin)",
                  file=sys.stderr)
            return 1
        try:
            tensor_parallel(model)
        except ValueError as e:  # shard's errors name what cannot be split
            print(e, file=sys.stderr)
            return 1
    sampler = gpt.make_sampler(args.temp, args.top_p, args.top_k)
    print(f"[{args.model}: {config['model_type']}, {model.dtype}, sampler temp={args.temp} "
          f"top_p={args.top_p} top_k={args.top_k} seed={args.seed}]")
    if args.chat == "":
        interactive_chat(model, tokenizer, args, sampler)
        return 0
    if args.chat is not None:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.chat}], add_generation_prompt=True
        )
        print(f"> {args.chat}")
    else:
        prompt = args.prompt
        print(prompt, end="", flush=True)
    ours = timed_generate(model, tokenizer, prompt, args, sampler, on_text=print_text)
    print("\n")
    print(describe("mlx_ext", ours.stats))
    if args.compare:
        unpatch(model)
        stock = timed_generate(model, tokenizer, prompt, args, sampler)
        print(describe("MLX", stock.stats))
        print(f"decode speed-up {ours.stats.generation_tps / stock.stats.generation_tps:.1f}x, "
              f"prompt speed-up {ours.stats.prompt_tps / stock.stats.prompt_tps:.1f}x; "
              f"tokens agree: {agreement(ours.tokens, stock.tokens)}")
        if stock.tokens != ours.tokens:
            print(f"MLX's text: {stock.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
