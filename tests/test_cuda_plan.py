"""The CUDA kernel choice of the quantized matmul (csrc/quantized_matmul/cuda_plan.h),
compiled on the CPU and checked without a GPU.

Two kinds of expectations, both written from the kernel choice as eval_gpu made
it before it became a header (csrc/quantized_matmul/cuda.cpp at 94372f3), never
from the header itself: hand-worked cases at every boundary (literal kernel
names and grids), and `choice_of_eval_gpu`, a line-by-line transcription of that
eval_gpu, compared with the header over a sweep of shapes, bit widths, dtypes,
alignments and GPUs.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass

import pytest

from tests.cuda_plan_harness import decoded, plan_library, wrapper

WRAPPER = wrapper("quantized_matmul/cuda_plan.h", "qmm_plan", r"""
static const char* path_name(Path p) {
  switch (p) {
    case Path::qmv_tc: return "qmv_tc";
    case Path::wgmma: return "wgmma";
    case Path::qmv_t: return "qmv_t";
    case Path::tensor_core: return "tensor_core";
    case Path::generic_t: return "generic_t";
    case Path::qmv_n: return "qmv_n";
    case Path::generic_n: return "generic_n";
  }
  return "?";
}


// The plan as JSON in out (size bytes); returns the length needed.
extern "C" int plan_json(long long M, int N, int K, int bits, int group_size, int transpose,
    const char* dtype, int x_aligned, int w_aligned, int cc_major, int cc_minor,
    int wgmma_loaded, int wgmma_enabled, char* out, int size) {
  const Plan p = plan({M, N, K, bits, group_size, transpose != 0, dtype, x_aligned != 0,
      w_aligned != 0}, {cc_major, cc_minor, wgmma_loaded != 0, wgmma_enabled != 0});
  const std::string s = std::string("{\"path\": \"") + path_name(p.path) + "\", \"main\": " +
      launch_json(p.main) + ", \"reduce\": " + launch_json(p.reduce) + ", \"prep_scales\": " +
      launch_json(p.prep_scales) + ", \"prep_x\": " + launch_json(p.prep_x) +
      ", \"k_split\": " + std::to_string(p.k_split) + ", \"parts\": " + std::to_string(p.parts) +
      ", \"gemm_rows\": " + std::to_string(p.gemm_rows) + ", \"n_pad\": " +
      std::to_string(p.n_pad) + ", \"m_pad\": " + std::to_string(p.m_pad) + "}";
  std::snprintf(out, size, "%s", s.c_str());
  return int(s.size()) + 1;
}
""")


@pytest.fixture(scope="module")
def lib():
    argtypes = [
        ctypes.c_longlong, *[ctypes.c_int] * 5, ctypes.c_char_p, *[ctypes.c_int] * 6,
        ctypes.c_char_p, ctypes.c_int,
    ]
    return plan_library("cuda_plan", WRAPPER, argtypes)


@dataclass(frozen=True)
class Case:
    M: int
    N: int = 4096
    K: int = 4096
    bits: int = 4
    group_size: int = 64
    transpose: bool = True
    dtype: str = "bfloat16"
    x_aligned: bool = True
    w_aligned: bool = True
    cc: tuple[int, int] = (9, 0)
    wgmma_loaded: bool = True
    wgmma_enabled: bool = True


def plan_of(lib, c: Case) -> dict:
    buf = ctypes.create_string_buffer(2048)
    n = lib.plan_json(c.M, c.N, c.K, c.bits, c.group_size, int(c.transpose), c.dtype.encode(),
                      int(c.x_aligned), int(c.w_aligned), c.cc[0], c.cc[1], int(c.wgmma_loaded),
                      int(c.wgmma_enabled), buf, len(buf))
    return decoded(buf, n, ("main", "reduce", "prep_scales", "prep_x"))


def launches(p: dict) -> list:
    """The kernels in launch order, as eval_gpu records them."""
    return [p[k] for k in ("prep_scales", "prep_x", "main", "reduce") if p[k] is not None]


# ---------------------------------------------------------------------------
# Constants of csrc/quantized_matmul/cuda_params.h, spelled out again here.
# ---------------------------------------------------------------------------


def cdiv(a, b):
    return -(-a // b)


def qmv_t_loads(bits):
    return 2 if bits == 8 else 3 if bits in (3, 6) else 5 if bits == 5 else 1


def qmv_t_rows_per_warp(bits):
    return 2 if qmv_t_loads(bits) > 2 else 4


def qmv_t_values_per_chunk(bits):
    return qmv_t_loads(bits) * 128 // bits


def tc_config(bm, bn, wm, wn, stages):
    """(BM, BN, THREADS, SMEM) of TcConfig."""
    threads = wm * wn * 32
    stage = bm * 128 * 2 + 4 * (2 * 4 * bn + 4 * bm)
    return bm, bn, threads, stages * stage + 2 * bn * 128 * 2


TC_LARGE = tc_config(128, 128, 2, 4, 3)
TC_SMALL = tc_config(32, 64, 1, 4, 4)


def wg_smem_bytes(bits):
    stage = 256 * 64 * 2 + 128 * (8 * bits + 16 if bits == 8 else 8 * bits)
    stages = min((227 * 1024 - 1024) // (stage + 16), 8)
    return 1024 + stages * (stage + 16)


def test_the_transcribed_constants():
    """A few of the constants above, worked out by hand."""
    assert TC_LARGE == (128, 128, 256, 3 * (32768 + 4 * (1024 + 512)) + 65536)
    assert TC_SMALL == (32, 64, 128, 4 * (8192 + 4 * (512 + 128)) + 32768)
    assert wg_smem_bytes(4) == 1024 + 6 * (32768 + 4096 + 16)  # six stages of 4-bit W
    assert wg_smem_bytes(8) == 1024 + 5 * (32768 + 10240 + 16)  # 80-byte rows: five stages


# ---------------------------------------------------------------------------
# eval_gpu's kernel choice at 94372f3, transcribed statement by statement (kernel
# names with MLX's dtype spelling, which that commit's successor adopted).
# ---------------------------------------------------------------------------


def choice_of_eval_gpu(c: Case) -> list:
    M, N, K, bits, t = c.M, c.N, c.K, c.bits, c.dtype
    b = f"_b{bits}"
    aligned = c.x_aligned and c.w_aligned
    elements = M * N
    if c.transpose:
        half_x = t != "float32"
        sm90 = c.cc == (9, 0)
        four_or_eight = bits in (4, 8)
        qmv_tc_rows = (8 if M <= 8 and (bits == 2 or four_or_eight)
                       else (16 if M <= 16 else 32) if M <= 32 and four_or_eight else 0)
        if half_x and qmv_tc_rows and K > 0 and K % (512 // bits) == 0 and aligned:
            rows = "" if qmv_tc_rows == 8 else f"_m{qmv_tc_rows}"
            return [(f"qmv_tc_{t}{b}{rows}", (cdiv(N, 16), cdiv(M, qmv_tc_rows), 1), 128, 0)]
        if (half_x and sm90 and M > 64 and K > 0 and K % 64 == 0 and aligned and c.wgmma_enabled
                and c.wgmma_loaded):
            return [(f"qmm_t_wgmma_{t}{b}", (cdiv(N, 128), cdiv(M, 256), 1), 384,
                     wg_smem_bytes(bits))]
        qmv_ok = K > 0 and K % qmv_t_values_per_chunk(bits) == 0 and aligned
        tc_ok = K > 0 and K % 128 == 0 and aligned
        if qmv_ok and (M <= 8 or not tc_ok) and cdiv(M, 8) <= 65535:
            mt = 1 if M == 1 else 8
            rows = 8 * qmv_t_rows_per_warp(bits)
            return [(f"qmv_t_{t}{b}_m{mt}", (cdiv(N, rows), cdiv(M, mt), 1), 256, 0)]
        if tc_ok:  # run_tensor_core
            G = K // c.group_size
            planes = t == "float32"
            rows = 3 * M if planes else M
            n_pad, m_pad = cdiv(N, 4) * 4, cdiv(rows, 4) * 4
            out = [(f"qmm_prep_scales_{t}", (cdiv(G * n_pad, 256), 1, 1), 256, 0),
                   (f"qmm_prep_x_{t}", (cdiv(G * m_pad * 32, 256), 1, 1), 256, 0)]
            bm, bn, threads, smem = TC_SMALL if rows <= 64 else TC_LARGE
            name = f"qmm_t_tc_{'planes' if planes else t}{b}_{'s' if rows <= 64 else 'l'}"
            out.append((name, (cdiv(N, bn), cdiv(rows, bm), 1), threads, smem))
            if planes:
                out.append(("reduce_partials_float32", (cdiv(M * N, 256), 1, 1), 256, 0))
            return out
        return [(f"qmm_generic_t_{t}", (cdiv(elements, 256), 1, 1), 256, 0)]

    if not (K > 0 and c.w_aligned and cdiv(M, 4) <= 65535):
        return [(f"qmm_generic_n_{t}", (cdiv(elements, 256), 1, 1), 256, 0)]
    mt = 1 if M <= 1 else 2 if M <= 2 else 4
    blocks = cdiv(N // 32, 64) * cdiv(M, mt)
    k_split = min(cdiv(1024, blocks), 64, max(1, K // 16))
    name = f"qmv_n_{t}{b}_m{mt}"
    grid_x, grid_z = cdiv(N // 32, 64), cdiv(M, mt)
    if k_split == 1:
        return [(name, (grid_x, 1, grid_z), 64, 0)]
    return [(name, (grid_x, k_split, grid_z), 64, 0),
            (f"reduce_partials_{t}", (cdiv(elements, 256), 1, 1), 256, 0)]


# ---------------------------------------------------------------------------
# Hand-worked cases: (case, path, launches). N = K = 4096, 4-bit, group 64,
# bfloat16, aligned, an H100 with the Hopper GEMM unless said otherwise.
# ---------------------------------------------------------------------------

SM80 = (8, 0)
WG4 = wg_smem_bytes(4)
HAND = [
    # The tensor-core GEMV: 8-row blocks up to 8 rows, 16-row up to 16, 32-row up to 32.
    (Case(M=1), "qmv_tc", [("qmv_tc_bfloat16_b4", (256, 1, 1), 128, 0)]),
    (Case(M=8), "qmv_tc", [("qmv_tc_bfloat16_b4", (256, 1, 1), 128, 0)]),
    (Case(M=9), "qmv_tc", [("qmv_tc_bfloat16_b4_m16", (256, 1, 1), 128, 0)]),
    (Case(M=16), "qmv_tc", [("qmv_tc_bfloat16_b4_m16", (256, 1, 1), 128, 0)]),
    (Case(M=17), "qmv_tc", [("qmv_tc_bfloat16_b4_m32", (256, 1, 1), 128, 0)]),
    (Case(M=32, dtype="float16"), "qmv_tc", [("qmv_tc_float16_b4_m32", (256, 1, 1), 128, 0)]),
    (Case(M=8, bits=2), "qmv_tc", [("qmv_tc_bfloat16_b2", (256, 1, 1), 128, 0)]),
    (Case(M=12, bits=8, N=100), "qmv_tc", [("qmv_tc_bfloat16_b8_m16", (7, 1, 1), 128, 0)]),
    # 2-bit W has only the 8-row GEMV: 9 rows go to the small mma.sync GEMM.
    (Case(M=9, bits=2), "tensor_core",
     [("qmm_prep_scales_bfloat16", (1024, 1, 1), 256, 0),  # 64 groups x 4096 / 256
      ("qmm_prep_x_bfloat16", (96, 1, 1), 256, 0),  # 64 groups x 12 rows x 32 / 256
      ("qmm_t_tc_bfloat16_b2_s", (64, 1, 1), 128, TC_SMALL[3])]),
    # 33 to 64 rows: the small GEMM (the Hopper GEMM starts above 64 rows).
    (Case(M=33), "tensor_core",
     [("qmm_prep_scales_bfloat16", (1024, 1, 1), 256, 0),
      ("qmm_prep_x_bfloat16", (288, 1, 1), 256, 0),  # 64 x 36 x 32 / 256
      ("qmm_t_tc_bfloat16_b4_s", (64, 2, 1), 128, TC_SMALL[3])]),
    (Case(M=64), "tensor_core",
     [("qmm_prep_scales_bfloat16", (1024, 1, 1), 256, 0),
      ("qmm_prep_x_bfloat16", (512, 1, 1), 256, 0),
      ("qmm_t_tc_bfloat16_b4_s", (64, 2, 1), 128, TC_SMALL[3])]),
    (Case(M=65), "wgmma", [("qmm_t_wgmma_bfloat16_b4", (32, 1, 1), 384, WG4)]),
    (Case(M=300, N=300, K=448), "wgmma", [("qmm_t_wgmma_bfloat16_b4", (3, 2, 1), 384, WG4)]),
    # No Hopper GEMM: an A100, an H100 with it off or not loaded, a GPU past sm_90.
    *[(Case(M=65, cc=cc, wgmma_loaded=loaded, wgmma_enabled=enabled), "tensor_core",
       [("qmm_prep_scales_bfloat16", (1024, 1, 1), 256, 0),
        ("qmm_prep_x_bfloat16", (544, 1, 1), 256, 0),  # 64 x 68 x 32 / 256
        ("qmm_t_tc_bfloat16_b4_l", (32, 1, 1), 256, TC_LARGE[3])])
      for cc, loaded, enabled in [(SM80, False, True), ((9, 0), True, False),
                                  ((9, 0), False, True), ((10, 0), True, True)]],
    # float32 x: never the tensor-core GEMV nor the Hopper GEMM. One row: qmv_t;
    # more: the GEMM on 3 M rows of bfloat16 planes, summed by reduce_partials.
    (Case(M=1, dtype="float32"), "qmv_t", [("qmv_t_float32_b4_m1", (128, 1, 1), 256, 0)]),
    (Case(M=8, dtype="float32"), "qmv_t", [("qmv_t_float32_b4_m8", (128, 1, 1), 256, 0)]),
    (Case(M=21, dtype="float32"), "tensor_core",
     [("qmm_prep_scales_float32", (1024, 1, 1), 256, 0),
      ("qmm_prep_x_float32", (512, 1, 1), 256, 0),  # 64 x 64 x 32 / 256: 63 rows padded to 64
      ("qmm_t_tc_planes_b4_s", (64, 2, 1), 128, TC_SMALL[3]),
      ("reduce_partials_float32", (336, 1, 1), 256, 0)]),  # 21 x 4096 / 256
    (Case(M=22, dtype="float32", cc=SM80), "tensor_core",
     [("qmm_prep_scales_float32", (1024, 1, 1), 256, 0),
      ("qmm_prep_x_float32", (544, 1, 1), 256, 0),
      ("qmm_t_tc_planes_b4_l", (32, 1, 1), 256, TC_LARGE[3]),
      ("reduce_partials_float32", (352, 1, 1), 256, 0)]),
    # 3-, 5- and 6-bit W: no tensor-core GEMV; qmv_t with 16 rows of W a block.
    (Case(M=1, bits=3), "qmv_t", [("qmv_t_bfloat16_b3_m1", (256, 1, 1), 256, 0)]),
    (Case(M=8, bits=5), "qmv_t", [("qmv_t_bfloat16_b5_m8", (256, 1, 1), 256, 0)]),
    (Case(M=2, bits=6, dtype="float16"), "qmv_t", [("qmv_t_float16_b6_m8", (256, 1, 1), 256, 0)]),
    # K not a multiple of the tensor-core GEMV's 128 (4-bit): qmv_t, for any
    # number of rows while K % 128 != 0 rules out the mma.sync GEMM too.
    (Case(M=1, K=96, group_size=32), "qmv_t", [("qmv_t_bfloat16_b4_m1", (128, 1, 1), 256, 0)]),
    (Case(M=100, K=96, group_size=32), "qmv_t", [("qmv_t_bfloat16_b4_m8", (128, 13, 1), 256, 0)]),
    # ... until 8-row tiles overflow grid.y: the generic kernel.
    (Case(M=8 * 65535, N=64, K=96, group_size=32), "qmv_t",
     [("qmv_t_bfloat16_b4_m8", (2, 65535, 1), 256, 0)]),
    (Case(M=8 * 65535 + 1, N=64, K=96, group_size=32), "generic_t",
     [("qmm_generic_t_bfloat16", (131071, 1, 1), 256, 0)]),  # 524281 x 64 / 256
    # K a multiple of no kernel's chunk (3 bits, K = 64): the generic kernel.
    (Case(M=1, bits=3, K=64), "generic_t", [("qmm_generic_t_bfloat16", (16, 1, 1), 256, 0)]),
    # Misaligned x or w: the generic kernel whatever the rows.
    (Case(M=3, x_aligned=False), "generic_t", [("qmm_generic_t_bfloat16", (48, 1, 1), 256, 0)]),
    (Case(M=100, w_aligned=False, dtype="float32"), "generic_t",
     [("qmm_generic_t_float32", (1600, 1, 1), 256, 0)]),
    # transpose=False: 2 blocks of 1024 columns for one row: K cut into 64
    # slices (1024 / 2 blocks, capped at 64); float partials, then their sum.
    (Case(M=1, transpose=False), "qmv_n",
     [("qmv_n_bfloat16_b4_m1", (2, 64, 1), 64, 0),
      ("reduce_partials_bfloat16", (16, 1, 1), 256, 0)]),
    # K = 40: at most 40 / 16 = 2 slices.
    (Case(M=2, N=192, K=40, transpose=False, dtype="float32"), "qmv_n",
     [("qmv_n_float32_b4_m2", (1, 2, 1), 64, 0), ("reduce_partials_float32", (2, 1, 1), 256, 0)]),
    # K = 16: one slice, direct stores; 9 rows in tiles of 4.
    (Case(M=9, N=192, K=16, transpose=False), "qmv_n",
     [("qmv_n_bfloat16_b4_m4", (1, 1, 3), 64, 0)]),
    # Enough blocks already: 32 x 256 tiles of 4 rows = 8192 >= 1024.
    (Case(M=1024, N=65536, transpose=False, bits=3), "qmv_n",
     [("qmv_n_bfloat16_b3_m4", (32, 1, 256), 64, 0)]),
    # 1024 / (32 x 16 blocks) = 2 slices.
    (Case(M=64, N=65536, transpose=False, dtype="float16"), "qmv_n",
     [("qmv_n_float16_b4_m4", (32, 2, 16), 64, 0),
      ("reduce_partials_float16", (16384, 1, 1), 256, 0)]),
    # Misaligned w, or 4-row tiles past grid.z: the generic kernel.
    (Case(M=3, transpose=False, w_aligned=False), "generic_n",
     [("qmm_generic_n_bfloat16", (48, 1, 1), 256, 0)]),
    (Case(M=4 * 65535, N=64, K=16, transpose=False), "qmv_n",
     [("qmv_n_bfloat16_b4_m4", (1, 1, 65535), 64, 0)]),
    (Case(M=4 * 65535 + 1, N=64, K=16, transpose=False), "generic_n",
     [("qmm_generic_n_bfloat16", (65536, 1, 1), 256, 0)]),  # 262141 x 64 / 256, rounded up
    # x's alignment does not matter to qmv_n.
    (Case(M=3, transpose=False, x_aligned=False, cc=SM80), "qmv_n",
     [("qmv_n_bfloat16_b4_m4", (2, 64, 1), 64, 0),
      ("reduce_partials_bfloat16", (48, 1, 1), 256, 0)]),
]


@pytest.mark.parametrize("case, path, expected", HAND,
                         ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(HAND)])
def test_hand_worked_case(lib, case, path, expected):
    p = plan_of(lib, case)
    assert p["path"] == path
    assert launches(p) == expected
    assert choice_of_eval_gpu(case) == expected  # the transcription agrees with the hand


def test_k_split_and_parts(lib):
    """k_split is QmmParams::k_split of the GEMV; parts the slices reduce_partials sums."""
    one = plan_of(lib, Case(M=1, transpose=False))
    assert (one["k_split"], one["parts"]) == (64, 64)
    direct = plan_of(lib, Case(M=9, N=192, K=16, transpose=False))
    assert (direct["k_split"], direct["parts"], direct["reduce"]) == (1, 1, None)
    planes = plan_of(lib, Case(M=21, dtype="float32"))
    assert (planes["k_split"], planes["parts"], planes["gemm_rows"]) == (1, 3, 63)
    assert (planes["n_pad"], planes["m_pad"]) == (4096, 64)
    ragged = plan_of(lib, Case(M=33, N=71, K=256))
    assert (ragged["gemm_rows"], ragged["n_pad"], ragged["m_pad"]) == (33, 72, 36)


SWEEP_ROWS = [1, 2, 3, 7, 8, 9, 12, 15, 16, 17, 20, 31, 32, 33, 40, 63, 64, 65, 66, 100, 129, 300]


def sweep():
    for transpose, bits, group_size, dtype in itertools.product(
            [True, False], [2, 3, 4, 5, 6, 8], [32, 64, 128], ["float32", "float16", "bfloat16"]):
        # K of one to three groups, 448 (7 x 64: no multiple of 128), 4096.
        for K in sorted({group_size, 2 * group_size, 3 * group_size, 448, 4096}):
            if K % group_size:
                continue
            for M in SWEEP_ROWS:
                N = 71 if transpose else 3 * group_size
                yield Case(M=M, N=N, K=K, bits=bits, group_size=group_size, transpose=transpose,
                           dtype=dtype)
    # GPUs, the Hopper GEMM's switches and the alignments.
    for cc, loaded, enabled, xa, wa, transpose in itertools.product(
            [(8, 0), (8, 9), (9, 0), (10, 0)], [True, False], [True, False], [True, False],
            [True, False], [True, False]):
        for M, K, dtype in itertools.product([1, 9, 33, 65, 300], [448, 512],
                                             ["float16", "float32"]):
            yield Case(M=M, N=300 if transpose else 192, K=K, bits=4, group_size=64,
                       transpose=transpose, dtype=dtype, cc=cc, wgmma_loaded=loaded,
                       wgmma_enabled=enabled, x_aligned=xa, w_aligned=wa)


def test_plan_matches_eval_gpu_over_a_sweep(lib):
    paths = set()
    count = 0
    for case in sweep():
        p = plan_of(lib, case)
        assert launches(p) == choice_of_eval_gpu(case), case
        paths.add(p["path"])
        count += 1
    assert count > 5000
    # Every path is reached.
    assert paths == {"qmv_tc", "wgmma", "qmv_t", "tensor_core", "generic_t", "qmv_n", "generic_n"}
