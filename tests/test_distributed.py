"""Tensor parallelism over mx.distributed: two local ranks on the ring backend.

Each test's ranks run tests/distributed_worker.py (one launch per scenario,
shared by the tests of that scenario through a module fixture) under a hard
timeout, retried once with a warning (tests/distributed_launch.py). The
splitting helpers and shard's argument checks run in this process.
"""

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlx.core as mx
import mlx.nn as nn
import mlx_ext
from mlx_ext import distributed
from mlx_ext import nn as ext_nn

from . import reference as ref
from .distributed_launch import N_RANKS, launch_worker, run_ranks


# name, kind, mode, bits, group_size, bias, x shape (..., K), N
CASES = [
    ("a2s-affine4", "all-to-sharded", "affine", 4, 64, True, (2, 3, 256), 96),
    ("a2s-affine8", "all-to-sharded", "affine", 8, 32, False, (1, 128), 64),
    ("a2s-affine3", "all-to-sharded", "affine", 3, 128, False, (5, 256), 32),
    ("a2s-mxfp4", "all-to-sharded", "mxfp4", 4, 32, True, (3, 128), 64),
    ("a2s-nvfp4", "all-to-sharded", "nvfp4", 4, 16, False, (1, 64), 32),
    ("a2s-mxfp8", "all-to-sharded", "mxfp8", 8, 32, False, (4, 128), 64),
    ("s2a-affine4", "sharded-to-all", "affine", 4, 64, True, (2, 3, 256), 96),
    ("s2a-affine6", "sharded-to-all", "affine", 6, 32, False, (1, 128), 64),
    ("s2a-mxfp4", "sharded-to-all", "mxfp4", 4, 32, True, (3, 128), 64),
    ("s2a-nvfp4", "sharded-to-all", "nvfp4", 4, 16, False, (1, 64), 32),
    ("s2a-mxfp8", "sharded-to-all", "mxfp8", 8, 32, False, (4, 256), 64),
]


def weights(rng, mode, bits, group_size, n, k):
    if mode == "affine":
        return ref.random_quantized(rng, n, k, bits, group_size, mx.float32)
    w_q, scales = ref.random_fp_quantized(rng, (n, k), mode)
    return w_q, scales, None


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers")
    rng = np.random.default_rng(19)
    inputs, cases, problems = {}, [], {}
    for name, kind, mode, bits, gs, bias, x_shape, n in CASES:
        w_q, scales, biases = weights(rng, mode, bits, gs, n, x_shape[-1])
        x = mx.array(rng.standard_normal(x_shape).astype(np.float32))
        b = mx.array(rng.standard_normal(n).astype(np.float32)) if bias else None
        cot = mx.array(rng.standard_normal((*x_shape[:-1], n)).astype(np.float32))
        for key, value in (("x", x), ("w_q", w_q), ("scales", scales), ("biases", biases), ("bias", b),
                           ("cot", cot)):
            if value is not None:
                inputs[f"{name}/{key}"] = np.array(value)
        cases.append({"name": name, "kind": kind, "mode": mode, "bits": bits, "group_size": gs, "bias": bias})
        problems[name] = (x, w_q, scales, biases, b, cot, mode, bits, gs)
    np.savez(out / "inputs.npz", **inputs)
    (out / "cases.json").write_text(json.dumps(cases))
    return launch_worker("layers", out), problems


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sharded_layer_matches_the_unsharded_product(layer_run, case):
    """Rank outputs against the float64 product of the whole layer: the
    all-to-sharded slices side by side, the sharded-to-all sum on every rank."""
    ranks, problems = layer_run
    name, kind = case[0], case[1]
    x, w_q, scales, biases, b, cot, mode, bits, gs = problems[name]
    expected, tol = ref.quantized_matmul_with_tolerance(
        x, w_q, scales, biases, out_dtype=mx.float32, group_size=gs, bits=bits, bias=b, mode=mode)
    ys = [r["arrays"][f"{name}/y"] for r in ranks]
    if kind == "all-to-sharded":
        got = np.concatenate(ys, axis=-1)
    else:
        np.testing.assert_array_equal(ys[0], ys[1])  # every rank holds the same sum
        got, tol = ys[0], 2 * tol  # one more rounding: the sum of the two partial products
    ref.assert_within_tolerance(got, expected, tol, name)
    for r in ranks:  # MLX's layer, patched: the same arrays through the same op
        np.testing.assert_array_equal(r["arrays"][f"{name}/y_patched"], r["arrays"][f"{name}/y"])


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == "all-to-sharded"],
                         ids=[c[0] for c in CASES if c[1] == "all-to-sharded"])
def test_all_to_sharded_x_gradient_is_summed_over_the_group(layer_run, case):
    ranks, problems = layer_run
    name = case[0]
    x, w_q, scales, biases, b, cot, mode, bits, gs = problems[name]
    w = ref.dequantize(w_q, scales, biases, gs, bits, mode)
    expected = ref.to_f64(cot) @ w
    tol = ref.float32_accumulation_tolerance(expected, np.abs(ref.to_f64(cot)) @ np.abs(w),
                                             roundings=w.shape[0] + 4, out_dtype=mx.float32)
    for r in ranks:
        ref.assert_within_tolerance(r["arrays"][f"{name}/dx"], expected, 2 * tol, f"{name} rank dx")


@pytest.mark.parametrize("case", CASES[:1] + CASES[6:7], ids=["a2s", "s2a"])
def test_patch_retypes_mlx_sharded_layers_and_unpatch_restores(layer_run, case):
    ranks, _ = layer_run
    name, kind = case[0], case[1]
    mlx_name = "QuantizedAllToShardedLinear" if kind == "all-to-sharded" else "QuantizedShardedToAllLinear"
    for r in ranks:
        info = r["info"][name]
        assert info["patched_type"] == mlx_name and info["unpatched_type"] == mlx_name
        assert info["report"].startswith(f"replaced: 1 {mlx_name}; left: none")
    # the classes subclass MLX's (mlx-lm's isinstance checks still hold)
    assert issubclass(ext_nn.QuantizedAllToShardedLinear, mlx_ext.nn.nn.QuantizedAllToShardedLinear)
    assert issubclass(ext_nn.QuantizedShardedToAllLinear, mlx_ext.nn.nn.QuantizedShardedToAllLinear)


# --- In-process: the row / column split and shard's checks -------------------


@given(st.lists(st.integers(1, 12), min_size=1, max_size=3), st.integers(1, 4), st.integers(1, 3))
def test_each_ranks_rows_of_every_segment_rebuild_the_matrix(sizes, n, width):
    """Rank r keeps its dealt share of every segment (q, k, v of a fused
    qkv_proj; gate, up), in segment order: read back segment by segment and
    rank by rank, the ranks' rows are the whole matrix, in order."""
    a = mx.arange(sum(sizes) * width).reshape(sum(sizes), width)
    offsets = np.cumsum([0, *sizes[:-1]])
    shares = [[distributed.deal(size, n, r) for size in sizes] for r in range(n)]
    parts = [np.array(distributed._rows(a, [(o + s, o + e) for o, (s, e) in zip(offsets, shares[r])]))
             for r in range(n)]
    rebuilt = []
    for i in range(len(sizes)):
        for r in range(n):
            before = sum(e - s for s, e in shares[r][:i])
            s, e = shares[r][i]
            rebuilt.append(parts[r][before : before + e - s])
    np.testing.assert_array_equal(np.concatenate(rebuilt), np.array(a))


class _Group:
    """Stands for an mx.distributed group where only its size is read."""

    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n

    def rank(self):
        return 0


@pytest.fixture(scope="module")
def embedded():
    from mlx_ext import gpt

    return gpt.load()[0]


@pytest.mark.parametrize("n", [3, 4])
def test_shard_names_the_argument_when_a_rank_would_get_no_kv_head(embedded, n):
    with pytest.raises(ValueError, match=r"^\[mlx_ext.shard\] model.args.num_key_value_heads = 2 is fewer "
                                         rf"than the group size {n}"):
        distributed.shard(embedded, _Group(n))
    assert embedded.model.layers[0].self_attn.n_heads == 8  # nothing changed


@given(st.integers(1, 100), st.integers(1, 8))
def test_deal_gives_each_rank_a_contiguous_near_equal_share(total, n):
    shares = [distributed.deal(total, n, r) for r in range(n)]
    assert shares[0][0] == 0 and shares[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    sizes = [b - a for a, b in shares]
    assert max(sizes) - min(sizes) <= 1


def test_shard_refuses_a_split_inside_sparse_blocks(embedded):
    """k_proj as BSR blocks of 128 rows: 2 ranks' split of its 128 rows (one KV
    head of 64 each) would cut a block; refused before anything changes."""
    attn = embedded.model.layers[0].self_attn
    fused = attn.qkv_proj
    q, k, v = (ext_nn.SparseLinear.from_linear(nn.Linear(512, n), density=0.5, format="bsr", block=128)
               for n in (512, 128, 128))
    del attn["qkv_proj"]
    attn.q_proj, attn.k_proj, attn.v_proj = q, k, v
    try:
        with pytest.raises(ValueError, match=r"^\[mlx_ext.shard\] model.layers.0.self_attn.k_proj: a BSR split at "
                                             r"\[0, 64\] cuts its blocks of 128 rows"):
            distributed.shard(embedded, _Group(2))
        assert type(attn.q_proj) is ext_nn.SparseLinear  # nothing changed
    finally:
        for name in ("q_proj", "k_proj", "v_proj"):
            del attn[name]
        attn.qkv_proj = fused


@pytest.mark.parametrize("fmt", [dict(density=0.3, format="csr"), dict(density=0.5, format="bitmask"),
                                 dict(density=0.5, format="bsr", block=16), dict(pattern="2:4", bits=0),
                                 dict(pattern="2:4", bits=4, group_size=32), dict(pattern="4:8", bits=8, group_size=32)])
def test_sparse_submatrix_keeps_the_pattern_and_values(fmt):
    """sparse.submatrix (what shard gives each rank): rows from several ranges
    and a column range, in the same format, exactly the dense slice, with the
    same stored positions (explicit zeros included)."""
    from mlx_ext import sparse

    layer = ext_nn.SparseLinear.from_linear(nn.Linear(128, 64), **fmt)
    w = layer.weight
    dense, stored = np.array(w.to_dense()), sparse.stored_mask(w)
    rows, cols = [(0, 16), (32, 48)], (64, 128)
    take = np.r_[0:16, 32:48]
    for sub, want in [(sparse.submatrix(w, rows=rows), (take, slice(None))),
                      (sparse.submatrix(w, cols=cols), (slice(None), slice(64, 128))),
                      (sparse.submatrix(w, rows=rows, cols=cols), (take, slice(64, 128)))]:
        assert type(sub) is type(w) and sub.layout.get("bits") == w.layout.get("bits")
        np.testing.assert_array_equal(np.array(sub.to_dense()), dense[want[0]][:, want[1]])
        np.testing.assert_array_equal(sparse.stored_mask(sub), stored[want[0]][:, want[1]])
    unit = sparse.split_units(w)
    if unit != (1, 1):
        with pytest.raises(ValueError, match="whole"):
            sparse.submatrix(w, rows=[(0, unit[0] + 1)] if unit[0] > 1 else None,
                             cols=(0, unit[1] + 1) if unit[1] > 1 else None)


def test_a_group_of_one_leaves_the_model_alone(embedded):
    assert distributed.shard(embedded, _Group(1)) == Counter()
    assert type(embedded.model.layers[0].mlp.gate_up_proj) is ext_nn.QuantizedSwiGLU


def test_a_hung_launch_is_killed_retried_once_and_reported():
    """The hard timeout: ranks that never finish are killed, the launch is
    retried once with a warning, and the second timeout raises (no hang)."""
    from .distributed_launch import LaunchTimeout

    with pytest.warns(RuntimeWarning, match="retrying once"), pytest.raises(LaunchTimeout, match="killed"):
        run_ranks(["-c", "import time; time.sleep(600)"], N_RANKS, timeout=1.0)
