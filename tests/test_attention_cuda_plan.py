"""The CUDA kernel choice of the attention (csrc/attention/cuda_plan.h), compiled
on the CPU and checked without a GPU: hand-worked cases at each boundary
(literal kernel names, grids and shared memory, worked out from the rules the
header's comments state), and properties of the key split over a sweep.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cuda_plan_harness import decoded, plan_library, wrapper

WRAPPER = wrapper("attention/cuda_plan.h", "attn_plan", r"""

extern "C" int plan_json(int B, int Hq, int Hkv, int L, int S, int D, int bits, int group_size,
    int kv_aligned, int smem_optin, const char* dtype, int cc_major, int backward, char* out, int size) {
  const Problem pr{B, Hq, Hkv, L, S, D, bits, dtype, group_size, kv_aligned != 0};
  std::string s;
  if (backward) {
    const BackwardPlan p = plan_backward(pr);
    s = "{\"dq\": " + launch_json(p.dq) + ", \"dkv\": " + launch_json(p.dkv) + "}";
  } else {
    const Plan p = plan_forward(pr, {cc_major, 0, smem_optin});
    s = std::string("{\"path\": \"") + (p.path == Path::mma ? "mma" : p.path == Path::dec ? "dec" : "vec") + "\", \"main\": " +
        launch_json(p.main) + ", \"merge\": " + launch_json(p.merge) + ", \"chunks\": " +
        std::to_string(p.chunks) + ", \"chunk_len\": " + std::to_string(p.chunk_len) +
        ", \"partial_floats\": " + std::to_string(p.partial_floats) + ", \"fits\": " +
        std::to_string(grid_fits(p.main) && (p.merge.kernel.empty() || grid_fits(p.merge))) + "}";
  }
  std::snprintf(out, size, "%s", s.c_str());
  return int(s.size()) + 1;
}
""")


@pytest.fixture(scope="module")
def lib():
    argtypes = [
        *[ctypes.c_int] * 10, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
        ctypes.c_int,
    ]
    return plan_library("attention_cuda_plan", WRAPPER, argtypes)


@dataclass(frozen=True)
class Case:
    L: int = 1
    S: int = 4096
    D: int = 128
    B: int = 1
    Hq: int = 32
    Hkv: int = 8
    bits: int = 0
    dtype: str = "bfloat16"
    cc: int = 9
    gs: int = 64
    aligned: bool = True
    smem: int = 227 * 1024  # opt-in shared memory per block (an H100/H200's)


def plan_of(lib, c: Case, backward: bool = False) -> dict:
    buf = ctypes.create_string_buffer(2048)
    n = lib.plan_json(c.B, c.Hq, c.Hkv, c.L, c.S, c.D, c.bits, c.gs, int(c.aligned), c.smem, c.dtype.encode(), c.cc,
                      int(backward), buf, len(buf))
    return decoded(buf, n, ("dq", "dkv") if backward else ("main", "merge"))


# Constants of csrc/attention/cuda_params.h and cuda_plan.h, spelled out again.
VEC_THREADS, MERGE_THREADS, MMA_THREADS, DEC_THREADS = 128, 128, 128, 128
DEC_FILL = 264  # kDecFillBlocks


def dec_smem(D, bits=0):
    # Q's 16 rows of 2 D + 16 bytes, then 4 warps x stages of K and V tiles of 16 keys:
    # 16-bit: 3 stages up to D = 128, else 2, rows of 2 D + 16 bytes;
    # codes: 4 stages, rows of D bits / 8 + 16 bytes, then scales and biases of K and V (D bytes each)
    if bits:
        return 16 * (2 * D + 16) + 4 * 4 * (2 * 16 * (D * bits // 8 + 16) + 4 * D)
    return (16 + 4 * (3 if D <= 128 else 2) * 2 * 16) * (2 * D + 16)


def cdiv(a, b):
    return -(-a // b)


def keys_per_step(D, bits):
    dmax = 64 if D <= 64 else 128 if D <= 128 else 256
    return 4 * (32 // (dmax // 8)) * (8 if bits else 4)


def test_vec_decode_4k_splits_the_keys_into_64_key_chunks(lib):
    # float32 (no tensor-core decode): 8 (batch, kv head) units of one 4-row
    # block: 1024 / 8 = 128 chunks wanted, 4096 / 128 = 32 keys, raised to the
    # 64-key minimum.
    p = plan_of(lib, Case(S=4096, dtype="float32"))
    assert p["path"] == "vec"
    assert p["main"] == ("attn_vec_float32_b0_d128", (1, 64, 8), VEC_THREADS, 0)
    assert (p["chunks"], p["chunk_len"]) == (64, 64)
    assert p["merge"] == ("attn_merge_float32", (32, 1, 1), MERGE_THREADS, 0)  # a block per row
    assert p["partial_floats"] == 64 * 32 * (128 + 2)


@pytest.mark.parametrize("S,chunk", [(32768, 256), (131072, 1024), (1000, 64), (100, 64)])
def test_vec_decode_chunks(lib, S, chunk):
    p = plan_of(lib, Case(S=S, dtype="float32"))
    assert p["chunk_len"] == chunk
    assert p["chunks"] == cdiv(S, chunk)
    assert p["main"][1] == (1, cdiv(S, chunk), 8)


@pytest.mark.parametrize("S,chunk,chunks", [
    # one 16-row block of each of the 8 kv heads: 264 / 8 = 33 chunks wanted,
    # ceil(S / 33) keys rounded up to a multiple of 64 (4 warps x 16 keys)
    (4096, 128, 32), (32768, 1024, 32), (131072, 4032, 33),
    (100, 64, 2), (0, 64, 1), (1, 64, 1),
])
def test_16bit_decode_takes_the_tensor_core_kernel(lib, S, chunk, chunks):
    p = plan_of(lib, Case(S=S))
    assert p["path"] == "dec"
    assert p["main"] == ("attn_dec_bfloat16_b0_d128", (1, chunks, 8), DEC_THREADS, dec_smem(128))
    assert dec_smem(128) == 108800  # two blocks per SM of an H100/H200 (228 KB)
    assert (p["chunks"], p["chunk_len"]) == (chunks, chunk)
    assert p["merge"] == ("attn_merge_bfloat16", (32, 1, 1), MERGE_THREADS, 0)
    assert p["partial_floats"] == chunks * 32 * (128 + 2)


def test_tensor_core_decode_row_blocks(lib):
    # G L rows of one kv head in blocks of 16: G = 4, L = 8 -> 2 blocks; 16
    # units of 8 kv heads x 2 blocks: ceil(264 / 16) = 17 chunks wanted.
    p = plan_of(lib, Case(S=8192, L=8, D=256, dtype="float16"))
    assert p["main"] == ("attn_dec_float16_b0_d256", (2, 16, 8), DEC_THREADS, dec_smem(256))
    assert p["chunk_len"] == 512  # ceil(8192 / 17) = 482 -> 512
    p = plan_of(lib, Case(S=8192, L=15, D=64, B=4, Hq=64, Hkv=4))  # 16 x 15 rows: 15 blocks x 16 units
    assert p["main"] == ("attn_dec_bfloat16_b0_d64", (15, 2, 16), DEC_THREADS, dec_smem(64))
    assert p["chunk_len"] == 4096


def test_quantized_decode_reads_codes(lib):
    p = plan_of(lib, Case(S=32768, bits=8))
    assert p["main"] == ("attn_dec_bfloat16_b8_d128", (1, 32, 8), DEC_THREADS, dec_smem(128, 8))
    assert dec_smem(128, 8) == 86272
    assert p["chunk_len"] == 1024
    p = plan_of(lib, Case(S=32768, bits=4, dtype="float16", D=256))
    assert p["main"] == ("attn_dec_float16_b4_d256", (1, 32, 8), DEC_THREADS, dec_smem(256, 4))
    # attn_vec where the codes' layout does not fit attn_dec_q
    assert plan_of(lib, Case(S=32768, bits=8, gs=128))["main"][0] == "attn_vec_bfloat16_b8_d128"  # one group
    assert plan_of(lib, Case(S=32768, bits=4, gs=32))["main"][0] == "attn_vec_bfloat16_b4_d128"  # 4-bit, 32
    assert plan_of(lib, Case(S=32768, bits=8, aligned=False))["main"][0] == "attn_vec_bfloat16_b8_d128"
    p = plan_of(lib, Case(S=32768, bits=8, dtype="float32"))
    assert p["main"][0] == "attn_vec_float32_b8_d128"
    assert p["chunk_len"] == 256  # a multiple of 64, the 8-bit kernel's keys per step
    p = plan_of(lib, Case(S=32768, bits=4, dtype="float16", L=20))
    assert p["path"] == "vec" and p["main"][0] == "attn_vec_float16_b4_d128"
    assert p["main"][1][0] == cdiv(4 * 20, 4)


def test_head_dims_pick_the_lane_layout(lib):
    assert plan_of(lib, Case(D=64, dtype="float32"))["main"][0] == "attn_vec_float32_b0_d64"
    assert plan_of(lib, Case(D=96))["main"][0] == "attn_vec_bfloat16_b0_d128"  # not a dec head dim
    assert plan_of(lib, Case(D=136))["main"][0] == "attn_vec_bfloat16_b0_d256"
    assert plan_of(lib, Case(D=256, S=64, dtype="float32"))["chunk_len"] == 64


def test_prefill_takes_the_tensor_core_kernel(lib):
    p = plan_of(lib, Case(L=8192, S=8192))
    assert p["path"] == "mma" and p["merge"] is None
    # 64 rows per block; Q plus two stages of K and V, rows of 2 D + 16 bytes
    assert p["main"] == ("attn_mma_bfloat16_d128", (128, 32, 1), MMA_THREADS, (64 + 4 * 64) * 272)
    p = plan_of(lib, Case(L=100, S=300, D=256, dtype="float16", B=2, Hq=4, Hkv=2))
    assert p["main"] == ("attn_mma_float16_d256", (2, 8, 1), MMA_THREADS, (64 + 4 * 32) * 528)


@pytest.mark.parametrize("case,path", [
    (Case(L=15, S=100), "dec"),  # below 16 queries
    (Case(L=1, S=100, dtype="float16"), "dec"),
    (Case(L=1, S=100, dtype="float32"), "vec"),  # no float32 tensor-core kernel
    (Case(L=1, S=100, bits=8), "dec"),  # quantized K/V, groups of 64: pairs of groups
    (Case(L=1, S=100, bits=4), "dec"),
    (Case(L=1, S=100, bits=8, D=256), "dec"),
    (Case(L=1, S=100, bits=8, gs=32), "vec"),  # only group size 64 checked on a GPU so far
    (Case(L=1, S=100, bits=4, gs=32), "vec"),  # (and a 4-bit word column spans 64 values)
    (Case(L=1, S=100, bits=8, D=256, gs=128), "vec"),
    (Case(L=1, S=100, bits=8, D=64), "vec"),  # one group per row
    (Case(L=1, S=100, D=96), "vec"),  # head dims of the dec instances only
    (Case(L=1, S=100, D=192), "vec"),
    (Case(L=1, S=100, cc=7), "vec"),  # below sm_80
    (Case(L=1, S=100, smem=99 * 1024), "vec"),  # sm_86 / sm_89: 99 KB < 106 KB
    (Case(L=1, S=100, D=64, smem=99 * 1024), "dec"),
    (Case(L=1, S=100, bits=8, smem=99 * 1024), "dec"),  # 84 KB
    (Case(L=1, S=100, bits=8, D=256, smem=163 * 1024), "dec"),  # sm_80's 163 KB: 160.25 KB fits
    (Case(L=1, S=100, D=256, smem=99 * 1024), "vec"),  # 140.25 KB
    (Case(L=16, S=100), "mma"),
    (Case(L=64, S=100, dtype="float32"), "vec"),  # no float32 tensor-core kernel
    (Case(L=64, S=100, bits=4), "vec"),  # quantized K/V
    (Case(L=64, S=100, D=80), "vec"),  # head dims of the mma instances only
    (Case(L=64, S=100, D=192), "mma"),
    (Case(L=64, S=100, cc=7), "vec"),  # below sm_80
])
def test_path_boundaries(lib, case, path):
    assert plan_of(lib, case)["path"] == path


def test_prefill_on_the_vec_kernel_is_not_split(lib):
    # 8192 units (4 query heads x 8192 rows / 4 per block, x 8 kv heads) fill the GPU
    p = plan_of(lib, Case(L=8192, S=8192, dtype="float32"))
    assert p["main"] == ("attn_vec_float32_b0_d128", (8192, 1, 8), VEC_THREADS, 0)
    assert (p["chunks"], p["chunk_len"]) == (1, 8192)


def test_backward(lib):
    p = plan_of(lib, Case(L=4096, S=4096), backward=True)
    assert p["dq"] == ("attn_bwd_dq_bfloat16_b0_d128", (4096, 1, 8), 128, 0)
    assert p["dkv"] == ("attn_bwd_dkv_bfloat16_d128", (4096 // 8, 1, 8), 128, 0)
    p = plan_of(lib, Case(L=37, S=45, D=64, bits=4, Hq=4, Hkv=2, B=2), backward=True)
    assert p["dq"] == ("attn_bwd_dq_bfloat16_b4_d64", (cdiv(2 * 37, 4), 1, 4), 128, 0)
    assert p["dkv"] is None  # no gradient for quantized K/V


@settings(max_examples=300, deadline=None)
@given(L=st.integers(1, 5000), S=st.integers(0, 1 << 22), D=st.sampled_from([8, 64, 96, 128, 200, 256]),
       B=st.integers(1, 4), Hkv=st.sampled_from([1, 2, 8]), G=st.sampled_from([1, 4, 7]),
       bits=st.sampled_from([0, 4, 8]), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       gs=st.sampled_from([32, 64, 128]))
def test_the_key_split_covers_every_key_once(lib, L, S, D, B, Hkv, G, bits, dtype, gs):
    c = Case(L=L, S=S, D=D, B=B, Hq=G * Hkv, Hkv=Hkv, bits=bits, dtype=dtype, gs=gs)
    p = plan_of(lib, c)
    assert p["fits"] == 1
    if p["path"] == "mma":
        assert dtype != "float32" and bits == 0 and L >= 16 and D in (64, 96, 128, 192, 256)
        return
    chunks, chunk_len = p["chunks"], p["chunk_len"]
    rows = B * G * Hkv * L
    assert 1 <= chunks <= 1024
    assert (chunks - 1) * chunk_len < max(S, 1) <= chunks * chunk_len
    assert p["partial_floats"] == chunks * rows * (D + 2)
    if p["path"] == "dec":
        assert dtype != "float32" and L < 16 and D in (64, 128, 256)
        if bits:
            assert gs == 64 and D in (128, 256)
        assert chunk_len % 64 == 0
        assert p["main"][1] == (cdiv(G * L, 16), chunks, B * Hkv)
        return
    assert chunk_len % keys_per_step(D, bits) == 0
    assert p["main"][1] == (cdiv(G * L, 4), chunks, B * Hkv)
