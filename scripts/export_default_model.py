"""Quantize the trained default model with MLX and write it into the package.

Reads the float32 checkpoint of scripts/train_default_model.py, quantizes it
4-bit (group size 64) through mlx_ext's loader, and writes the mlx-lm layout
(config.json with "quantization", model.safetensors, a byte-level
tokenizer.json that both mlx_ext.gpt and mlx_lm.load read) plus a README with
the training record and the validation loss before and after quantization.

    python scripts/export_default_model.py .train-data/trained
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_ext.gpt import DEFAULT_MODEL, Model, ModelArgs, load_model

BITS, GROUP_SIZE = 4, 64
MAX_BYTES = 10_000_000
EOS = "<|endoftext|>"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 byte values (what the ByteLevel
    pre-tokenizer and decoder of the tokenizers library use)."""
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def write_tokenizer(out: Path, max_length: int) -> None:
    """Token i < 256 is byte i; 256 is the end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in byte_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def validation_loss(model, text: bytes, seq: int, windows: int) -> float:
    """Mean next-byte loss (nats) over the first `windows` windows of `seq`
    bytes of `text`, cut as the trainer cuts them (MLX's float matmuls are
    slow on CPU: the whole text would take most of an hour)."""
    n = min(windows, (len(text) - 1) // seq)
    data = mx.array(list(text[: n * seq + 1]), mx.int32)
    total = 0.0
    for i in range(n):
        window = data[i * seq : (i + 1) * seq + 1]
        logits = model(window[None, :-1])[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        total += -mx.take_along_axis(logprobs, window[1:, None], axis=-1).sum().item()
    return total / (n * seq)


def readme(config: dict, record: dict, losses: dict, size: int) -> str:
    args = record["args"]
    command = " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in args.items() if k not in ("data", "out") and v != "{}"
    )
    return f"""# kjv-byte-llama

The embedded default model of `python -m mlx_ext.generate`: a byte-level Llama
of {record['parameters'] / 1e6:.1f}M parameters ({config['num_hidden_layers']} layers, hidden size {config['hidden_size']},
{config['num_attention_heads']} attention heads sharing {config['num_key_value_heads']} key-value heads, SwiGLU width {config['intermediate_size']},
tied head). Its tokens are the 256 byte values plus `{EOS}`. It is stored
{BITS}-bit with group size {GROUP_SIZE} (float32 scales, biases and norms) in the mlx-lm
layout, so `mlx_lm.load` reads this directory too.

## Data

The King James Bible (1611; public domain) from Debian's `bible-kjv-text`
package, read with its `bible` program (`apt-get install bible-kjv`), one verse
per line without references; every 50th verse held out for validation
(`scripts/prepare_kjv.py`: {record['train_bytes']} training bytes, {record['val_bytes']} validation bytes).

## Training

```
python scripts/prepare_kjv.py
python scripts/train_default_model.py --data .train-data --out .train-data/trained {command}
python scripts/export_default_model.py .train-data/trained
```

Trained with PyTorch {record['torch']} on one {record['device']}: {record['steps_run']} steps of
{args['batch']} x {args['seq']} bytes in {record['seconds']} s (AdamW, bfloat16 autocast, cosine
schedule, dropout {args['dropout']}). Training stopped when the validation loss had not
improved for {args['patience']} evaluations; the best checkpoint (step {record['step']}) is kept.

| model | validation text | loss (nats/byte) |
|---|---|---|
| training run, bfloat16 autocast (PyTorch) | all {record['val_bytes']} bytes | {record['val_loss']:.4f} |
| float32 weights (MLX) | first {losses['windows']} x {args['seq']} bytes | {losses['float32']:.4f} |
| {BITS}-bit, group size {GROUP_SIZE}, as shipped (MLX, mlx_ext) | first {losses['windows']} x {args['seq']} bytes | {losses['quantized']:.4f} |

Training loss at the kept step: {record['train_loss']:.4f}. Checkpoint size: {size / 1e6:.2f} MB.
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trained", type=Path, help="output folder of train_default_model.py")
    parser.add_argument("--data", type=Path, default=Path(".train-data"))
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--val-windows", type=int, default=8)
    args = parser.parse_args()

    config = json.loads((args.trained / "config.json").read_text())
    record = json.loads((args.trained / "train_record.json").read_text())
    val_text = (args.data / "kjv-val.txt").read_bytes()
    record["train_bytes"] = (args.data / "kjv-train.txt").stat().st_size
    record["val_bytes"] = len(val_text)
    seq = int(record["args"]["seq"])

    float_model = Model(ModelArgs.from_config(config))
    weights = {k: v for f in sorted(args.trained.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}
    float_model.load_weights(list(float_model.sanitize(weights).items()))
    model, _ = load_model(args.trained, bits=BITS, group_size=GROUP_SIZE)
    losses = {
        "windows": args.val_windows,
        "float32": validation_loss(float_model, val_text, seq, args.val_windows),
        "quantized": validation_loss(model, val_text, seq, args.val_windows),
    }

    args.out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(args.out / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"}
    )
    quantization = {"group_size": GROUP_SIZE, "bits": BITS}
    config = {**config, "quantization": quantization, "quantization_config": quantization}
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(args.out, config["max_position_embeddings"])
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    (args.out / "README.md").write_text(readme(config, record, losses, size))
    print(f"{args.out}: {size / 1e6:.2f} MB; validation loss float32 {losses['float32']:.4f}, "
          f"{BITS}-bit {losses['quantized']:.4f} nats/byte")
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is {size} bytes, over the {MAX_BYTES} byte budget")


if __name__ == "__main__":
    main()
