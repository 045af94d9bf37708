"""Tensor-parallel models on two local ring ranks (tests/distributed_worker.py):
a patched and sharded mlx-lm llama, mlx-lm's sharded_generate flow, the GPT
loop sharded by ``mlx_ext.shard``, and ``mlx.launch``'s command line
(``-m mlx_ext.generate --tensor-parallel``) against one process."""

import subprocess
import sys

import numpy as np
import pytest

from .distributed_launch import N_RANKS, ROOT, check_ranks, launch_worker, run_ranks
from .lm_acceptance import RTOL

pytest.importorskip("mlx_lm")

MODES = ("affine", "mxfp4")
SHARDED_KINDS = ["mlx_ext.QuantizedAllToShardedLinear", "mlx_ext.QuantizedEmbedding", "mlx_ext.QuantizedLinear",
                 "mlx_ext.QuantizedShardedToAllLinear"]


@pytest.fixture(scope="module")
def mlx_lm_run(tmp_path_factory):
    return launch_worker("mlx_lm", tmp_path_factory.mktemp("mlx_lm"))


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    return launch_worker("gpt", tmp_path_factory.mktemp("gpt"))


def relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("mode", MODES)
def test_patched_sharded_mlx_lm_model_keeps_mlx_ext_kernels_and_logits(mlx_lm_run, mode):
    """patch, model.shard(group) (which rebuilds every quantized layer as
    MLX's sharded layer), patch again: every quantized layer is mlx_ext's, and
    the logits (prefill, then a cached decode step) are the unsharded model's."""
    for rank in mlx_lm_run:
        info, arrays = rank["info"][mode], rank["arrays"]
        # 2 layers x (q, k, v, gate, up) all-to-sharded, x (o, down) sharded-to-all
        assert info["report"].startswith("replaced: 10 QuantizedAllToShardedLinear, 4 QuantizedShardedToAllLinear;")
        assert info["report"].endswith("attention: 2 Attention")
        assert info["kinds"] == SHARDED_KINDS
        for step in ("prefill", "decode"):
            want = arrays[f"{mode}/want/{step}"]
            assert relative_error(arrays[f"{mode}/got/{step}"], want) < RTOL, step
            assert relative_error(arrays[f"{mode}/unpatched/{step}"], want) < RTOL, step
        assert info["tokens"] == info["want_tokens"]
        # unpatch gives MLX's layers back, sharded as they were
        assert info["unpatched_kinds"] == [k.replace("mlx_ext.", "mlx.") for k in SHARDED_KINDS]


@pytest.mark.parametrize("label", ["2:4", "50%"])
def test_mlx_lm_model_pruned_by_sparsify_shards_with_mlx_ext_shard(mlx_lm_run, label):
    """An mlx-lm llama pruned by mlx_ext.sparsify (N:M, Bitmask) and sharded by
    mlx_ext.shard (mlx-lm's own model.shard knows only Linear and quantized
    layers): sparse sharded layers, 2 of 4 heads per rank, the unsharded
    model's logits (prefill, then a cached decode step)."""
    for rank in mlx_lm_run:
        info, arrays = rank["info"][f"sparse {label}"], rank["arrays"]
        assert info["counts"] == {"SparseAllToShardedLinear": 10, "SparseShardedToAllLinear": 4}
        assert info["n_heads"] == 2
        for step in ("prefill", "decode"):
            want = arrays[f"sparse {label}/want/{step}"]
            assert relative_error(arrays[f"sparse {label}/got/{step}"], want) < RTOL, step


def test_mlx_lm_sharded_generate_flow_on_a_patched_model(mlx_lm_run):
    """sharded_load + patch + stream_generate (mlx-lm's sharded_generate
    example) on the embedded model: the text of one unsharded process."""
    for rank in mlx_lm_run:
        info = rank["info"]
        assert info["sharded_report"].startswith("replaced: 30 QuantizedAllToShardedLinear, 1 QuantizedEmbedding, "
                                                 "12 QuantizedShardedToAllLinear; left: none")
        assert info["sharded_text"] == info["single_text"] and len(info["single_text"]) > 10


@pytest.mark.parametrize("label", ["fused", "unfused", "kv4"])
def test_gpt_loop_sharded_greedy_tokens_equal_one_ranks(gpt_run, label):
    """mlx_ext.shard on the embedded model (8 heads, 2 KV heads): per rank 4
    heads, 1 KV head in its cache; the greedy tokens of the unsharded run,
    with the fused q/k/v and gate/up projections, without them, and with a
    4-bit KV cache."""
    layers = 6
    counts = {"fused": {"QuantizedAllToShardedLinear": layers, "QuantizedAllToShardedSwiGLU": layers,
                        "QuantizedShardedToAllLinear": 2 * layers},
              "unfused": {"QuantizedAllToShardedLinear": 5 * layers, "QuantizedShardedToAllLinear": 2 * layers}}
    for rank in gpt_run:
        info = rank["info"][label]
        assert info["sharded"] == info["single"] and len(info["single"]) == 24
        assert (info["n_heads"], info["kv_heads"]) == (4, 1)
        assert info["counts"] == counts.get(label, counts["fused"])


def test_gpt_loop_pruned_to_every_sparse_format_shards(gpt_run):
    """Every projection a SparseLinear (N:M with 4-bit and float values, CSR,
    Bitmask, BSR): shard keeps each rank's rows or columns in its format
    (sparse.submatrix) and the greedy tokens are the unsharded run's."""
    layers = 6
    for rank in gpt_run:
        info = rank["info"]["sparse"]
        assert info["formats"] == ["NM", "CSR", "Bitmask", "BSR", "NM", "Bitmask", "NM"]
        assert info["counts"] == {"SparseAllToShardedLinear": 5 * layers, "SparseShardedToAllLinear": 2 * layers}
        assert (info["n_heads"], info["kv_heads"]) == (4, 1)
        assert info["nnz"] == [256 * 256, 512 * 256]  # half of each rank's q rows, down columns
        assert info["sharded"] == info["single"] and len(info["single"]) == 24


@pytest.mark.parametrize("label", ["uneven", "uneven-unfused", "uneven-float"])
def test_gpt_loop_uneven_split_matches_one_rank(gpt_run, label):
    """9 query heads on 3 KV heads and 5 intermediate groups over 2 ranks
    (SmolLM2-135M's layout): rank 0 6 + 2 heads and 3 groups, rank 1 3 + 1
    and 2; logits and greedy tokens of the unsharded model. Quantized
    (fused and not) and float (MLX's AllToShardedLinear / ShardedToAllLinear,
    whose intermediate width splits by column: 80 + 80)."""
    inters = (80, 80) if label == "uneven-float" else (96, 64)
    for rank, (heads, kv_heads, inter) in zip(gpt_run, [(6, 2, inters[0]), (3, 1, inters[1])]):
        info, arrays = rank["info"][label], rank["arrays"]
        assert (info["n_heads"], info["kv_heads"], info["intermediate"]) == (heads, kv_heads, inter)
        assert relative_error(arrays[f"{label}/sharded"], arrays[f"{label}/single"]) < RTOL
        assert info["sharded"] == info["single"]


def text_of(stdout: str) -> str:
    """The generated text: the lines between the bracketed header lines and
    the speed line."""
    lines = stdout.splitlines()
    body = [line for line in lines if not line.startswith("[")]
    return "\n".join(body[: next(i for i, line in enumerate(body) if line.startswith("mlx_ext "))]).strip()


def test_tensor_parallel_command_prints_one_stream_equal_to_one_process():
    argv = ["-m", "mlx_ext.generate", "--max-tokens", "32"]
    single = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    ranks = run_ranks([*argv, "--tensor-parallel"], N_RANKS, timeout=120)
    check_ranks(ranks)
    assert "[tensor parallel: 2 ranks; sharded " in ranks[0].stdout
    assert all(r.stdout == "" for r in ranks[1:])  # one stream, from rank 0
    assert text_of(ranks[0].stdout) == text_of(single.stdout)
    assert len(text_of(single.stdout)) > 32
