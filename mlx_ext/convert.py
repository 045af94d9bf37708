"""Convert a GGUF llama into an mlx-lm checkpoint directory.

    python -m mlx_ext.convert model.gguf OUT_DIR      # or: --model smollm2 is a name too
    python -c "import mlx_lm; print(mlx_lm.generate(*mlx_lm.load('OUT_DIR'), 'Hello'))"

OUT_DIR gets ``model.safetensors`` (Hugging Face names, quantized layers as
MLX's affine ``weight``/``scales``/``biases``), ``config.json`` with its
``quantization`` block (the most common bits and group size, and an entry for
each layer quantized otherwise, as mlx-lm reads them), ``tokenizer.json`` and
``tokenizer_config.json`` with the chat template. The weights are those the
GPT loop runs: quantized tensors as the file stores them, others quantized
with --bits / --group-size.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import gpt


def quantization_block(model) -> dict:
    """mlx-lm's ``quantization`` config: defaults plus per-layer exceptions."""
    layers = {path: {"group_size": m.group_size, "bits": m.bits}
              for path, m in model.named_modules() if hasattr(m, "bits")}
    common = Counter(json.dumps(q, sort_keys=True) for q in layers.values()).most_common(1)[0][0]
    block = json.loads(common)
    block.update({path: q for path, q in layers.items() if q != block})
    return block


def convert(model_path: str | Path, out_dir: str | Path, *, bits: int = 4, group_size: int = 64) -> Path:
    """Writes the mlx-lm checkpoint of a GGUF file (or named model) to out_dir."""
    model, tokenizer, config = gpt.load(
        model_path, bits=bits, group_size=group_size, fuse=False, return_config=True  # the checkpoint's layers
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(out_dir / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"}
    )
    config = dict(config, quantization=quantization_block(model))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(out_dir)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_ext.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a GGUF file or a named model (smollm2)")
    parser.add_argument("out_dir")
    parser.add_argument("--bits", type=int, default=4, help="for GGUF tensors MLX dequantizes")
    parser.add_argument("--group-size", type=int, default=64, help="for GGUF tensors MLX dequantizes")
    args = parser.parse_args(argv)
    try:
        out_dir = convert(args.model, args.out_dir, bits=args.bits, group_size=args.group_size)
    except (gpt.ModelNotFoundError, gpt.GGUFError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"wrote {out_dir}: " + ", ".join(sorted(p.name for p in out_dir.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
