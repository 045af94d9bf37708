"""metal/attention.metal in the emulator at adversarial sizes, apart from the
coverage sweep of tests/test_metal_attention.py: L and S in {1..9, 31, 32,
33, 63, 64, 65, 127, 128, 129} (tile and simdgroup edges), every head dim,
GQA ratios 1, 4 and 8, and every mask kind, against tests/reference.py.

The full product is 23 328 cases, forward and backward: about two hours in
the emulator on a 2-core machine (estimated from a random 1000-case sample,
195 s with a quarter of them also backward). CI runs a fixed sample in which
every value of each axis occurs (SAMPLE cases). Set MLX_EXT_METAL_FULL=1
for the full sweep (each case one thread order, rotated)."""

from __future__ import annotations

import itertools
import os
import random
import zlib

import numpy as np
import pytest

from .test_metal_attention import HEAD_DIMS, MASKS, TYPES, Problem, lib  # noqa: F401 (lib: fixture)

SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 128, 129]
GQA = [1, 4, 8]
SCHEDULES = [("forward", 1), ("reverse", 2), ("random", 1)]
FULL = os.environ.get("MLX_EXT_METAL_FULL") == "1"  # as tests/test_metal_sparse_edges.py
SAMPLE = 108  # forward cases in CI; a quarter as many backward ones


def _all_cases():
    return list(itertools.product(SIZES, SIZES, HEAD_DIMS, GQA, MASKS))


def _sample(n):
    """n cases drawn (fixed seed) from the full product; the test below checks
    that every value of each axis occurs."""
    return random.Random(17).sample(_all_cases(), n)


def _cases(n):
    cases = _all_cases() if FULL else _sample(n)
    return [pytest.param(*c, id=f"L{c[0]}-S{c[1]}-d{c[2]}-gqa{c[3]}-{c[4]}") for c in cases]


def _problem(L, S, D, gqa, mask, salt):
    seed = zlib.crc32(f"{salt}{L}-{S}-{D}-{gqa}-{mask}".encode())
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1 << 30))
    dtype = TYPES[k % 3]
    bits, gs = 0, 64
    if k % 4 == 1 and D % 32 == 0:  # a quarter quantized, where a group size divides D
        bits, gs = (4, 8)[k % 2], [g for g in (32, 64, 128) if D % g == 0][k % (1 + (D % 64 == 0) + (D % 128 == 0))]
    if mask == "causal":
        L = min(L, S)
    options = dict(sinks=bool(k & 8), kv_lengths=bool(k & 16))
    if mask == "causal" and k & 32:
        options["window"] = 1 + k % max(S, 1)
    return Problem(rng, B=1 + (k & 64 > 0), Hq=gqa * (1 + (k & 128 > 0)), Hkv=1 + (k & 128 > 0), L=L, S=S, D=D,
                   dtype=dtype, bits=bits, group_size=gs, mask=mask, capacity=S + (k % 3), **options), k


@pytest.mark.parametrize("L,S,D,gqa,mask", _cases(SAMPLE))
def test_forward_at_edges(lib, L, S, D, gqa, mask):  # noqa: F811 (lib is the fixture)
    p, k = _problem(L, S, D, gqa, mask, "fwd")
    schedule, check_bounds = SCHEDULES[k % 3]
    p.check_forward(lib, schedule=schedule, check_bounds=check_bounds)


@pytest.mark.parametrize("L,S,D,gqa,mask", _cases(SAMPLE // 4))
def test_backward_at_edges(lib, L, S, D, gqa, mask):  # noqa: F811
    p, k = _problem(min(L, 33), min(S, 65), D, gqa, mask, "bwd")
    schedule, check_bounds = SCHEDULES[k % 3]
    p.check_backward(lib, np.random.default_rng(k), schedule=schedule, check_bounds=check_bounds)


def test_the_sample_walks_every_value():
    cases = _sample(SAMPLE)
    for axis, values in enumerate((SIZES, SIZES, HEAD_DIMS, GQA, MASKS)):
        assert {c[axis] for c in cases} == set(values), axis
    backward = _sample(SAMPLE // 4)
    for axis, values in enumerate((HEAD_DIMS, GQA, MASKS), start=2):
        assert {c[axis] for c in backward} == set(values), axis
