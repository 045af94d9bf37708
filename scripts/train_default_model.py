"""Train the embedded default model: a byte-level Llama on the King James Bible.

PyTorch, for a CUDA GPU (MLX has no CUDA build on the machine it ran on). The
architecture is exactly mlx-lm's ``llama`` (RMSNorm, RoPE on split halves,
grouped-query attention, SwiGLU, tied head), and the weights are saved in
float32 under Hugging Face Llama names, so that
scripts/export_default_model.py can quantize them with MLX. Training stops at
--time-budget seconds, --max-steps, or when the validation loss has not
improved for --patience evaluations; the best checkpoint by validation loss is
kept.

    python scripts/prepare_kjv.py                      # .train-data/kjv-{train,val}.txt
    python scripts/train_default_model.py --data .train-data --out OUT
    python scripts/export_default_model.py OUT         # -> mlx_ext/models/kjv-byte-llama/
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

# Bytes are tokens 0..255; 256 is "<|endoftext|>", which the text never contains.
CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 257,
    "hidden_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": 256,
}
SHARD_BYTES = 14_000_000  # the GPU machine returns files of at most 16 MiB


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)) * self.weight


def rope_angles(head_dim: int, length: int, theta: float, device) -> tuple:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); dimension i rotates with i + D/2 (MLX's traditional=False)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, self.n_heads, self.n_kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = d // self.n_heads
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Query head h reads key/value head h // (n_heads / n_kv), as MLX's GQA does.
        repeat = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, f = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: dict, dropout: float):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = MLP(c)
        self.dropout = dropout

    def forward(self, x, cos, sin):
        x = x + F.dropout(self.self_attn(self.input_layernorm(x), cos, sin), self.dropout, self.training)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training)


class Llama(nn.Module):
    """Parameter names are Hugging Face's: model.embed_tokens, model.layers.N..., model.norm."""

    def __init__(self, c: dict, dropout: float):
        super().__init__()
        self.config = c
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(Block(c, dropout) for _ in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        # GPT-2 init: normal(0.02), residual-branch outputs scaled down by depth.
        residual_std = 0.02 / math.sqrt(2 * c["num_hidden_layers"])
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, std=residual_std if residual else 0.02)

    def forward(self, tokens):
        c = self.config
        head_dim = c["hidden_size"] // c["num_attention_heads"]
        cos, sin = rope_angles(head_dim, tokens.shape[1], c["rope_theta"], tokens.device)
        h = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.model.norm(h) @ self.model.embed_tokens.weight.T  # tied head


def load_bytes(path: Path, device) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).to(device).long()


@torch.no_grad()
def validation_loss(model, val: torch.Tensor, seq: int, device) -> float:
    """Mean next-byte loss (nats) over the validation text cut into windows of `seq`."""
    model.eval()
    n = (len(val) - 1) // seq
    x = val[: n * seq].view(n, seq)
    y = val[1 : n * seq + 1].view(n, seq)
    total = 0.0
    for i in range(0, n, 32):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits = model(x[i : i + 32])
        targets = y[i : i + 32].flatten()
        total += F.cross_entropy(logits.float().flatten(0, 1), targets, reduction="sum").item()
    model.train()
    return total / y.numel()


def save_checkpoint(state: dict, config: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        tensor = tensor.float().contiguous()
        nbytes = 4 * tensor.numel()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    for i, shard in enumerate(shards):
        save_file(shard, str(out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(".train-data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--time-budget", type=float, default=180.0, help="seconds of training")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=json.loads, default={}, help="JSON overrides of CONFIG")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    config = {**CONFIG, **args.config}
    train = load_bytes(args.data / "kjv-train.txt", device)
    val = load_bytes(args.data / "kjv-val.txt", device)
    model = Llama(config, args.dropout).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    print(f"{n_params / 1e6:.2f}M parameters, {len(train)} train bytes, "
          f"{len(val)} validation bytes, {device}", flush=True)

    def lr_at(step, progress):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)

    offsets = torch.arange(args.seq + 1, device=device)
    best = {"val_loss": float("inf")}
    evals_since_best, step, loss, start = 0, 0, None, time.time()

    def evaluate():
        nonlocal best, evals_since_best
        val_loss = validation_loss(model, val, args.seq, device)
        improved = val_loss < best["val_loss"]
        if improved:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = {"val_loss": val_loss, "train_loss": loss.item(), "step": step, "state": state}
        evals_since_best = 0 if improved else evals_since_best + 1
        print(f"step {step:6d}  {time.time() - start:6.1f}s  train {loss.item():.4f}  "
              f"val {val_loss:.4f}{'  *' if improved else ''}", flush=True)

    while True:
        elapsed = time.time() - start
        progress = max(step / args.max_steps, elapsed / args.time_budget)
        if progress >= 1.0 or evals_since_best >= args.patience:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress)
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch, 1), device=device)
        window = train[starts + offsets]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.eval_every == 0:
            evaluate()
    if step % args.eval_every:
        evaluate()

    save_checkpoint(best.pop("state"), config, args.out)
    record = {
        **best,
        "steps_run": step,
        "seconds": round(time.time() - start, 1),
        "tokens_seen": step * args.batch * args.seq,
        "parameters": n_params,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
