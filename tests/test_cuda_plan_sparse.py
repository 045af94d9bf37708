"""The CUDA kernel choice of the sparse matmul (csrc/sparse_matmul/cuda_plan.h),
compiled on the CPU and checked without a GPU: hand-worked cases at each
boundary (literal kernel names, grids and shared memory), and properties over a
sweep (every plan names a kernel the .cu files define, grids fit CUDA's limits,
shared memory within the limit).
"""

from __future__ import annotations

import ctypes
import itertools
import re
from pathlib import Path

import pytest

from tests.cuda_plan_harness import decoded, plan_library, wrapper

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "sparse_matmul"

WRAPPER = wrapper("sparse_matmul/cuda_plan.h", "sparse_plan", r"""

extern "C" int plan_json(int format, long long M, int N, int K, const char* dtype, int bn, int bk,
    int n, int m, int bits, int values_aligned, int pattern_aligned, int x_aligned, int transpose,
    int sm_count, int sampled, int tc_enabled, char* out, int size) {
  Problem pr{static_cast<Format>(format), M, N, K, dtype, std::string(dtype) == "float32" ? 4 : 2};
  pr.block_n = bn, pr.block_k = bk, pr.nm_n = n, pr.nm_m = m, pr.bits = bits;
  pr.values_aligned = values_aligned, pr.pattern_aligned = pattern_aligned, pr.x_aligned = x_aligned;
  pr.transpose = transpose;
  const Plan p = sampled ? plan_sampled(pr, 1000) : plan(pr, {9, 0, sm_count, tc_enabled != 0});
  const char* paths[] = {"spmv", "spmm_tc", "spmm_n", "sampled"};
  const std::string s = std::string("{\"path\": \"") + paths[int(p.path)] + "\", \"main\": " +
      launch_json(p.main) + ", \"reduce\": " + launch_json(p.reduce) + ", \"prep\": " +
      launch_json(p.prep) + ", \"vec\": " + std::to_string(p.vec) + ", \"slices\": " +
      std::to_string(p.slices) + "}";
  std::snprintf(out, size, "%s", s.c_str());
  return int(s.size()) + 1;
}
""")

FORMATS = {"csr": 0, "bitmask": 1, "bsr": 2, "nm": 3}
SM = 132


@pytest.fixture(scope="module")
def lib():
    argtypes = [
        ctypes.c_int, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
        *[ctypes.c_int] * 12, ctypes.c_char_p, ctypes.c_int,
    ]
    return plan_library("cuda_plan_sparse", WRAPPER, argtypes)


def plan(lib, fmt="csr", M=1, N=4096, K=4096, dtype="bfloat16", block=(1, 1), nm=(0, 0), bits=0,
         values_aligned=True, pattern_aligned=True, x_aligned=True, transpose=True, sm=SM,
         sampled=False, tc=True):
    buf = ctypes.create_string_buffer(2048)
    n = lib.plan_json(FORMATS[fmt], M, N, K, dtype.encode(), *block, *nm, bits,
                      int(values_aligned), int(pattern_aligned), int(x_aligned), int(transpose),
                      sm, int(sampled), int(tc), buf, len(buf))
    return decoded(buf, n, ("main", "reduce", "prep"))


def cdiv(a, b):
    return -(-a // b)


def x_bytes(K, slot):
    """spmv_x_bytes of cuda_params.h, spelt out again."""
    pad = 1 if slot >= 4 else 4 // slot
    return (K + cdiv(K, 32) * pad) * slot


def test_decode_one_row_bitmask(lib):
    p = plan(lib, "bitmask", M=1, N=14336)
    # x: 4096 columns + 128 pads of 2 bytes; blocks: 4 per SM (160 KB / 8.4 KB > 4).
    assert p["main"] == ("spmv_bitmask_bfloat16_m1", (4 * SM, 1, 1), 256, x_bytes(4096, 2))
    assert p["path"] == "spmv" and p["vec"] == 0 and p["prep"] is None


def test_decode_rows_pick_the_x_tile(lib):
    assert plan(lib, "nm", M=3, nm=(2, 4))["main"][0] == "spmv_nm4_bfloat16_m4"
    p = plan(lib, "nm", M=16, nm=(2, 4))
    assert p["main"] == ("spmv_nm4_bfloat16_m16", (SM, 1, 1), 256, x_bytes(4096, 32))
    assert p["vec"] == 1
    # 32 rows: two tiles of 16 (the tensor cores only above 32 rows).
    assert plan(lib, "nm", M=32, nm=(2, 4))["main"][1] == (SM, 2, 1)
    # float32 x of 16 rows does not fit 140 KB: tiles of 4.
    assert plan(lib, "csr", M=16, dtype="float32")["main"][0] == "spmv_csr_float32_m4"


def test_decode_small_w_has_a_block_per_eight_rows(lib):
    p = plan(lib, "csr", M=1, N=40, K=64)
    assert p["main"][1] == (5, 1, 1)


def test_x_too_large_for_shared_memory_reads_global(lib):
    p = plan(lib, "csr", M=1, K=80000)
    assert p["main"][0] == "spmv_csr_bfloat16_m1_xg" and p["main"][3] == 0


def test_grid_y_is_capped_the_kernels_loop_over_tiles(lib):
    assert plan(lib, "csr", M=70000, K=80000, dtype="float32")["main"][1] == (512, 65535, 1)
    assert plan(lib, "csr", M=600000, transpose=False)["main"][1][2] == 65535


def test_quantized_nm_names(lib):
    assert plan(lib, "nm", nm=(2, 4), bits=4)["main"][0] == "spmv_nm4_q4_bfloat16_m1"
    assert plan(lib, "nm", nm=(4, 8), bits=8, M=9)["main"][0] == "spmv_nm8_q8_bfloat16_m16"
    assert plan(lib, "nm", nm=(2, 4), bits=4)["vec"] == 0


def test_vector_loads_need_alignment(lib):
    assert plan(lib, "csr")["vec"] == 1
    assert plan(lib, "csr", pattern_aligned=False)["vec"] == 0
    assert plan(lib, "bsr", block=(32, 12), N=4096, K=4092)["vec"] == 0
    assert plan(lib, "bsr", block=(32, 32))["vec"] == 1
    assert plan(lib, "nm", nm=(3, 8), K=4096 + 8)["vec"] == 0  # kc = 1539 not a multiple of 8


def test_prefill_tensor_cores(lib):
    p = plan(lib, "nm", M=2048, N=14336, nm=(2, 4))
    assert p["main"] == ("spmm_tc_nm24_bfloat16", (112, 16, 1), 256, 0)
    assert plan(lib, "bsr", M=2048, block=(64, 64))["main"] == ("spmm_tc_bsr64_bfloat16",
                                                                 (64, 16, 1), 256, 0)
    assert plan(lib, "bitmask", M=33, dtype="float16")["main"][0] == "spmm_tc_bitmask_float16"
    assert plan(lib, "csr", M=33)["path"] == "spmm_tc"


@pytest.mark.parametrize("kw", [
    dict(M=32), dict(dtype="float32"), dict(K=4096 + 16), dict(x_aligned=False),
    dict(values_aligned=False)])
def test_prefill_falls_back_to_decode_kernels(lib, kw):
    args = dict(M=2048) | kw
    assert plan(lib, "csr", **args)["path"] == "spmv"


def test_prefill_can_be_turned_off(lib):
    """MLX_EXT_CUDA_SPARSE_TC=0: the decode kernels, 16 rows of x per block."""
    p = plan(lib, "nm", M=2048, nm=(2, 4), tc=False)
    assert p["main"][0] == "spmv_nm4_bfloat16_m16" and p["main"][1][1] == 128


def test_prefill_not_for_other_structures(lib):
    assert plan(lib, "nm", M=2048, nm=(4, 8))["path"] == "spmv"
    assert plan(lib, "nm", M=2048, nm=(2, 4), bits=4)["path"] == "spmv"
    assert plan(lib, "bsr", M=2048, block=(16, 32))["path"] == "spmv"
    assert plan(lib, "bsr", M=2048, block=(64, 48))["path"] == "spmv"


def test_transposed_product_slices(lib):
    p = plan(lib, "csr", M=1, transpose=False)
    # 16 blocks of columns: 64 slices (the cap), partials summed by reduce.
    assert p["main"] == ("spmm_n_csr_bfloat16_m1", (16, 64, 1), 256, 0)
    assert p["reduce"] == ("sparse_reduce_partials_bfloat16", (16, 1, 1), 256, 0)
    q = plan(lib, "bitmask", M=4096, transpose=False)
    assert q["main"] == ("spmm_n_bitmask_bfloat16_m8", (16, 1, 512), 256, 0)
    assert q["slices"] == 1 and q["reduce"] is None
    assert q["prep"] == ("bitmask_prefix", (16, 1, 1), 256, 0)
    # Few rows of W: at least 16 per slice.
    assert plan(lib, "nm", nm=(2, 4), M=1, N=40, transpose=False)["slices"] == 2


def test_sampled(lib):
    p = plan(lib, "bitmask", sampled=True, dtype="float32")
    assert p["main"] == ("sampled_bitmask_float32", (4, 1, 1), 256, 0)
    assert p["prep"][0] == "bitmask_prefix"
    assert plan(lib, "nm", nm=(3, 8), sampled=True)["main"][0] == "sampled_nm8_bfloat16"


def defined_kernels() -> set[str]:
    """The extern "C" names the .cu files define, expanded from their macros
    by hand: the names each macro pastes, for each argument list it is given."""
    names = set()
    dtypes = ["float32", "float16", "bfloat16"]
    decode = ["csr", "bitmask", "bsr", "nm4", "nm8", "nm4_q4", "nm4_q8", "nm8_q4", "nm8_q8"]
    for d, f in itertools.product(dtypes, decode):
        names |= {f"spmv_{f}_{d}_m{mt}" for mt in (1, 4, 16)} | {f"spmv_{f}_{d}_m1_xg"}
        names |= {f"spmm_n_{f}_{d}_m{mt}" for mt in (1, 8)}
    for d, f in itertools.product(dtypes, ["csr", "bitmask", "bsr", "nm4", "nm8"]):
        names.add(f"sampled_{f}_{d}")
    names |= {f"sparse_reduce_partials_{d}" for d in dtypes} | {"bitmask_prefix"}
    for d, f in itertools.product(["float16", "bfloat16"], ["nm24", "bitmask", "csr", "bsr64", "bsr32"]):
        names.add(f"spmm_tc_{f}_{d}")
    return names


def test_the_macros_define_the_expected_names():
    """Each macro's pasted name, as the .cu files spell it."""
    text = "".join((CSRC / f).read_text() for f in ("spmv.cu", "sparse_grad.cu", "spmm_tc.cu"))
    for pattern in ["spmv_##FNAME##_##DT##_m##MT##SUFFIX", "spmm_n_##FNAME##_##DT##_m##MT",
                    "sampled_##FNAME##_##DT", "sparse_reduce_partials_##DT", "spmm_tc_##NAME##_##DT"]:
        assert pattern in text
    assert re.search(r"SPMV_ONE\(T, DT, FNAME, F, CB, BITS, 1, false, _xg\)", text)


def test_every_plan_names_a_defined_kernel(lib):
    names = defined_kernels()
    layouts = [("csr", {}), ("bitmask", {}), ("bsr", dict(block=(32, 32))),
               ("bsr", dict(block=(64, 64))), ("bsr", dict(block=(16, 8))),
               ("nm", dict(nm=(2, 4))), ("nm", dict(nm=(1, 4))), ("nm", dict(nm=(3, 8))),
               ("nm", dict(nm=(2, 4), bits=4)), ("nm", dict(nm=(4, 8), bits=8))]
    for (fmt, kw), M, dtype, transpose, K in itertools.product(
            layouts, [1, 2, 5, 17, 33, 300, 70000], ["float32", "float16", "bfloat16"],
            [True, False], [512, 4096, 60000]):
        p = plan(lib, fmt, M=M, K=K, dtype=dtype, transpose=transpose, **kw)
        for key in ("main", "reduce", "prep"):
            if p[key] is None:
                continue
            name, grid, threads, smem = p[key]
            assert name in names, (fmt, kw, M, dtype, transpose, name)
            assert 1 <= grid[0] < 2**31 and 1 <= grid[1] <= 65535 and 1 <= grid[2] <= 65535
            assert threads == 256 and 0 <= smem <= 140 * 1024
        if not transpose:
            continue
        if p["path"] == "spmv" and not p["main"][0].endswith("_xg"):
            mt = int(p["main"][0].rsplit("_m", 1)[1])
            assert p["main"][3] == x_bytes(K, mt * (4 if dtype == "float32" else 2))
            assert p["main"][1][1] == min(cdiv(M, mt), 65535)
        if fmt != "nm" or kw.get("bits", 0) == 0:
            sp = plan(lib, fmt, M=M, K=K, dtype=dtype, sampled=True, **kw)
            assert sp["main"][0] in names
