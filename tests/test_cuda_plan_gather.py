"""The CUDA kernel choice of gather_qmm (csrc/gather_qmm/cuda_plan.h), compiled on
the CPU and checked without a GPU: hand-worked cases at each boundary (literal
kernel names and grids), and properties over a sweep (every plan names a kernel
the .cu files define, grids within CUDA's limits, the tile grid covers every
tile the grouping pass can make).
"""

from __future__ import annotations

import ctypes
import itertools
import re
from pathlib import Path

import pytest

from tests.cuda_plan_harness import decoded, plan_library, wrapper

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "gather_qmm"

WRAPPER = wrapper("gather_qmm/cuda_plan.h", "gather_plan", r"""

extern "C" int plan_json(long long P, int M, int N, int K, int E, int bits, int group_size,
    int transpose, const char* dtype, int aligned, int swiglu, char* out, int size) {
  const Plan p = plan({P, M, N, K, E, bits, group_size, transpose != 0, dtype, aligned != 0,
      swiglu != 0});
  const char* paths[] = {"decode", "tiles", "generic"};
  const std::string s = std::string("{\"path\": \"") + paths[int(p.path)] + "\", \"main\": " +
      launch_json(p.main) + ", \"group\": " + launch_json(p.group) + ", \"tile_rows\": " +
      std::to_string(p.tile_rows) + "}";
  std::snprintf(out, size, "%s", s.c_str());
  return int(s.size()) + 1;
}
""")


@pytest.fixture(scope="module")
def lib():
    argtypes = [
        ctypes.c_longlong, *[ctypes.c_int] * 7, ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
        ctypes.c_char_p, ctypes.c_int,
    ]
    return plan_library("cuda_plan_gather", WRAPPER, argtypes)


def plan(lib, P=8, M=1, N=768, K=2048, E=128, bits=4, group_size=64, transpose=True,
         dtype="bfloat16", aligned=True, swiglu=False):
    buf = ctypes.create_string_buffer(1024)
    n = lib.plan_json(P, M, N, K, E, bits, group_size, int(transpose), dtype.encode(),
                      int(aligned), int(swiglu), buf, len(buf))
    return decoded(buf, n, ("main", "group"))


def cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------
# Hand-worked cases.
# ---------------------------------------------------------------------------


def test_decode_one_token_top8(lib):
    """Qwen3-30B-A3B-like decode: 8 pairs of one row, one launch, a block per
    (pair, 16 rows of W)."""
    p = plan(lib, P=8)
    assert p["path"] == "decode" and p["group"] is None
    assert p["main"] == ("gather_tc_decode_bfloat16_b4", (8, 48, 1), 128, 0)


def test_decode_up_to_64_pair_rows(lib):
    assert plan(lib, P=64)["path"] == "decode"  # 8 tokens top-8
    assert plan(lib, P=16, M=4)["path"] == "decode"
    assert plan(lib, P=65)["path"] == "tiles"
    assert plan(lib, P=17, M=4)["path"] == "tiles"


def test_prefill_groups_then_tiles(lib):
    """512 tokens top-8: the grouping pass, then at most one partial tile per
    expert beyond the full ones: ceil(4096 / 32) + min(E, P) tiles."""
    p = plan(lib, P=4096)
    assert p["path"] == "tiles" and p["tile_rows"] == 32
    assert p["group"] == ("gather_group_bfloat16", (1, 1, 1), 1024, 0)
    assert p["main"] == ("gather_tc_tiles_bfloat16_b4_m32", (128 + 128, 48, 1), 128, 0)
    gpt = plan(lib, P=2048, N=2880, K=2880, E=32, dtype="float16")  # K % 128 != 0: partial span
    assert gpt["main"] == ("gather_tc_tiles_float16_b4_m32", (64 + 32, 180, 1), 128, 0)


def test_two_bit_tiles_are_8_rows(lib):
    p = plan(lib, P=100, bits=2)
    assert p["tile_rows"] == 8
    assert p["main"] == ("gather_tc_tiles_bfloat16_b2_m8", (13 + 100, 48, 1), 128, 0)


def test_swiglu_names(lib):
    assert plan(lib, P=8, swiglu=True)["main"][0] == "gather_tc_decode_bfloat16_b4_swiglu"
    assert plan(lib, P=800, swiglu=True)["main"][0] == "gather_tc_tiles_bfloat16_b4_m32_swiglu"
    assert plan(lib, P=8, swiglu=True, dtype="float32")["main"][0] == "gather_generic_t_float32_swiglu"


@pytest.mark.parametrize("kw", [
    dict(dtype="float32"),  # exact float32: the generic kernel
    dict(transpose=False),  # the vjp's product
    dict(bits=3), dict(bits=5), dict(bits=6),
    dict(K=2048 + 16),  # not a multiple of a 4-bit lane chunk (32 values)
    dict(aligned=False),
])
def test_generic_fallbacks(lib, kw):
    p = plan(lib, P=8, **kw)
    assert p["path"] == "generic" and p["group"] is None
    name, grid, threads, smem = p["main"]
    assert name == f"gather_generic_{'t' if kw.get('transpose', True) else 'n'}_{kw.get('dtype', 'bfloat16')}"
    assert grid == (cdiv(8 * 768, 256), 1, 1) and threads == 256 and smem == 0


def test_k_multiples_per_bit_width(lib):
    """A lane reads 16 bytes of a W row: 128 / bits values."""
    for bits, ok, bad in [(2, 64 * 3, 32 * 3), (4, 32 * 3, 16 * 3), (8, 16 * 3, 8 * 3)]:
        assert plan(lib, bits=bits, K=ok, group_size=16)["path"] == "decode"
        assert plan(lib, bits=bits, K=bad, group_size=8)["path"] == "generic"


# ---------------------------------------------------------------------------
# Properties over a sweep.
# ---------------------------------------------------------------------------


def defined_kernels() -> set[str]:
    """The extern "C" names gather_tc.cu and gather_generic.cu define, expanded
    from their macros by hand (test_the_macros_define_the_expected_names)."""
    names = set()
    for d in ["float16", "bfloat16"]:
        for bits, mt in [(2, 8), (4, 32), (8, 32)]:
            for sw in ["", "_swiglu"]:
                names |= {f"gather_tc_decode_{d}_b{bits}{sw}", f"gather_tc_tiles_{d}_b{bits}_m{mt}{sw}"}
        names.add(f"gather_group_{d}")
    for d in ["float32", "float16", "bfloat16"]:
        names |= {f"gather_generic_t_{d}", f"gather_generic_t_{d}_swiglu", f"gather_generic_n_{d}"}
    return names


def test_the_macros_define_the_expected_names():
    tc = (CSRC / "gather_tc.cu").read_text()
    for pattern in ["gather_tc_decode_##NAME##_b##BITS##SUFFIX", "gather_tc_tiles_##NAME##_b##BITS##_m##MT##SUFFIX",
                    "gather_group_##NAME"]:
        assert pattern in tc
    assert "GATHER_PER_BITS(T, NAME, 2, 8) GATHER_PER_BITS(T, NAME, 4, 32) GATHER_PER_BITS(T, NAME, 8, 32)" in tc
    assert re.search(r"GATHER_PER_TYPE\(bf16, bfloat16\)\s*GATHER_PER_TYPE\(f16, float16\)", tc)
    generic = (CSRC / "gather_generic.cu").read_text()
    for pattern in ["gather_generic_t_##NAME(", "gather_generic_t_##NAME##_swiglu(", "gather_generic_n_##NAME("]:
        assert pattern in generic
    assert re.search(r"GATHER_GENERIC\(float, float32\)\s*GATHER_GENERIC\(f16, float16\)\s*"
                     r"GATHER_GENERIC\(bf16, bfloat16\)", generic)


def test_every_plan_names_a_defined_kernel(lib):
    names = defined_kernels()
    for P, M, (N, K, E), bits, dtype, transpose, swiglu in itertools.product(
            [1, 8, 64, 65, 4096, 70000], [1, 3], [(768, 2048, 128), (2880, 2880, 32), (37, 320, 3)],
            [2, 3, 4, 8], ["float32", "float16", "bfloat16"], [True, False], [False, True]):
        if swiglu and not transpose:
            continue
        p = plan(lib, P=P, M=M, N=N, K=K, E=E, bits=bits, dtype=dtype, transpose=transpose,
                 swiglu=swiglu, group_size=32 if K % 64 else 64)
        for key in ("main", "group"):
            if p[key] is None:
                continue
            name, grid, threads, smem = p[key]
            assert name in names, (P, M, N, K, bits, dtype, transpose, swiglu, name)
            assert 1 <= grid[0] < 2**31 and 1 <= grid[1] <= 65535 and grid[2] == 1
            assert smem == 0
        assert (p["group"] is not None) == (p["path"] == "tiles")
        if p["path"] == "decode":
            assert P * M <= 64 and p["main"][1][:2] == (P, cdiv(N, 16))
        if p["path"] == "tiles":
            # The grouping pass makes sum_e ceil(rows_e / T) <= rows / T + (experts with rows) tiles.
            t = p["tile_rows"]
            assert p["main"][1][0] == cdiv(P * M, t) + min(E, P)


def worst_case_tiles(counts, M, t):
    return sum(cdiv(c * M, t) for c in counts)


def test_the_tile_bound_holds_for_adversarial_routings():
    """The bound the plan's grid uses, against the tile count of the grouping
    pass for routings that maximise partial tiles."""
    for P, E, M, t in [(4096, 128, 1, 32), (100, 128, 1, 8), (65, 64, 3, 32), (1000, 7, 2, 32)]:
        for counts in ([1] * min(E, P) + [0] * (E - min(E, P)),
                       [P] + [0] * (E - 1),
                       [P // E + (e < P % E) for e in range(E)],
                       [t // M + 1] * (P // (t // M + 1))):
            counts = counts[:E]
            assert worst_case_tiles(counts, M, t) <= cdiv(sum(counts) * M, t) + min(E, P)
