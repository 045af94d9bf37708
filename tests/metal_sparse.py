"""What the emulator tests of metal/sparse_matmul.metal share: sparse
problems in the kernels' buffers, launched as csrc/sparse_matmul/metal.cpp
launches them (the binding table parsed, metal_plan.h compiled and called),
checked against tests/reference.py.

A Problem is a random W (N, K) in one format (an mlx_ext.sparse container,
so the reference decodes exactly what the kernels read), random x (or g)
and bias; `check_product` and `check_sampled` run the planned kernel on
NaN-filled outputs and compare in float64.
"""

from __future__ import annotations

import functools
import json

import numpy as np

import mlx.core as mx
from mlx_ext import sparse

from tests import reference as ref
from tests.metal_harness import (
    METAL,
    Launch,
    Planner,
    assert_matches,
    from_device,
    nan_filled,
    parse_bindings,
    run_planned,
    to_device,
)

BINDINGS = parse_bindings(METAL / "sparse_matmul_bindings.h", prefix="SPMM", shape_struct="SpmmShape")

# (output and x dtype, values dtype) of the instantiations.
PAIRS = [("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "float16"),
         ("float32", "bfloat16")]
QUANTIZED = [(bits, gs) for bits in (4, 8) for gs in (32, 64, 128)]
# Format names as the host names spell them.
FLOAT_FORMATS = ["csr_u16", "csr_u32", "bitmask", "bsr", "nm"]
FORMATS = FLOAT_FORMATS + [f"nm_b{b}_gs{gs}" for b, gs in QUANTIZED]
FORMAT_NUMBER = {"csr": 0, "bitmask": 1, "bsr": 2, "nm": 3}

PLAN = Planner(
    "sparse_matmul_metal_plan",
    "sparse_matmul/metal_plan.h",
    ints=("format", "M", "N", "K", "stored", "transpose", "wide_columns", "bits", "group_size"),
    strings=("type_name", "value_type_name"),
    body="""
  using namespace mlx_ext::metal::sparse_plan;
  const auto f = Format(format);
  const auto launch = plan(f, M, N, K, stored, transpose != 0);
  return {launch.kernel,
          kernel_name(launch, format_name(f, wide_columns != 0, bits, group_size), type_name, value_type_name),
          {launch.groups[0], launch.groups[1], launch.groups[2]}, {launch.threads, 1, 1}};
""",
)

PLAN_SAMPLED = Planner(
    "sparse_matmul_metal_plan_sampled",
    "sparse_matmul/metal_plan.h",
    ints=("format", "N", "wide_columns"),
    strings=("value_type_name",),
    body="""
  using namespace mlx_ext::metal::sparse_plan;
  const auto launch = plan_sampled(N);
  return {launch.kernel, sampled_kernel_name(format_name(Format(format), wide_columns != 0, 0, 0), value_type_name),
          {launch.groups[0], launch.groups[1], launch.groups[2]}, {launch.threads, 1, 1}};
""",
)

PLAN_SPLIT_FIXUP = Planner(
    "sparse_matmul_metal_plan_split_fixup",
    "sparse_matmul/metal_plan.h",
    ints=("M", "N", "stored"),
    strings=("type_name",),
    body="""
  using namespace mlx_ext::metal::sparse_plan;
  const auto launch = plan_split_fixup(M, N);
  // groups[2] carries no grid dimension here: the floats of the scratch.
  return {launch.kernel, split_fixup_name(type_name),
          {launch.groups[0], launch.groups[1], split_partials(M, stored)}, {launch.threads, 1, 1}};
""",
)

# metal_plan.h's constants, in a Launch's groups: (kSliceValues, which
# metal.cpp passes in SpmmShape, kDecodeMaxRows, kLongRowValues).
PLAN_CONSTANTS = Planner(
    "sparse_matmul_metal_plan_constants",
    "sparse_matmul/metal_plan.h",
    ints=(),
    strings=(),
    body="""
  using namespace mlx_ext::metal::sparse_plan;
  return {"", "", {kSliceValues, kDecodeMaxRows, kLongRowValues}, {0, 0, 0}};
""",
)


@functools.cache
def slice_values() -> int:
    return PLAN_CONSTANTS().groups[0]

_MX = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _numpy(a: mx.array, dtype: str | None = None) -> np.ndarray:
    """An MLX array in the kernel's storage type (floats of `dtype`: bfloat16 as bits)."""
    if dtype is None:
        return np.array(a)
    return to_device(np.array(a.astype(mx.float32)), dtype)


def row_mask(rng, lengths, K) -> np.ndarray:
    """A (len(lengths), K) mask whose row r keeps lengths[r] random columns."""
    mask = np.zeros((len(lengths), K), bool)
    for r, n in enumerate(lengths):
        mask[r, rng.choice(K, size=min(int(n), K), replace=False)] = True
    return mask


class Problem:
    """W (N, K) in `fmt` (a FORMATS name) with values of `value_dtype`; x and
    the output in `dtype`. `mask` (or `density`) picks the stored elements of
    CSR / Bitmask, the stored blocks of BSR; N:M keeps the n largest of m."""

    def __init__(self, rng, fmt, *, N, K, dtype, value_dtype, density=0.3, mask=None, block=(8, 8), nm=(2, 4)):
        self.fmt, self.dtype, self.value_dtype, self.N, self.K = fmt, dtype, value_dtype, N, K
        base = fmt.split("_")[0]
        self.format = FORMAT_NUMBER[base]
        self.wide_columns = fmt == "csr_u32"
        self.bits, self.group_size = 0, 0
        w = mx.array(rng.standard_normal((N, K)), dtype=_MX[value_dtype])
        if base == "csr":
            ws = sparse.CSR.from_dense(w, mask=mask if mask is not None else rng.random((N, K)) < density)
        elif base == "bitmask":
            ws = sparse.Bitmask.from_dense(w, mask=mask if mask is not None else rng.random((N, K)) < density)
        elif base == "bsr":
            bn, bk = block
            blocks = mask if mask is not None else rng.random((N // bn, K // bk)) < density
            ws = sparse.BSR.from_dense(w, block=block, mask=blocks)
        elif fmt == "nm":
            ws = sparse.NM.from_dense(w, *nm)
        else:
            self.bits, self.group_size = (int(p.lstrip("bgs")) for p in fmt.split("_")[1:])
            ws = sparse.NM.from_dense(w, *nm, bits=self.bits, group_size=self.group_size)
        self.ws = ws
        self.layout = json.loads(ws["_layout"])
        self.block = tuple(self.layout.get("block", (1, 1)))
        self.nm = (self.layout.get("n", 0), self.layout.get("m", 0))
        # The buffers of the format, as sparse_matmul.h lays them out.
        self.buffers = {}
        b = BINDINGS.buffers
        if base == "nm":
            if self.bits:
                self.buffers[b["values"]] = _numpy(ws["w_q"])
                self.buffers[b["scales"]] = _numpy(ws["scales"], value_dtype)
                self.buffers[b["biases"]] = _numpy(ws["biases"], value_dtype)
            else:
                self.buffers[b["values"]] = _numpy(ws["data"], value_dtype)
            self.buffers[b["pattern"]] = _numpy(ws["codes"])
            self.stored = N * (K // self.nm[1] * self.nm[0])
        else:
            self.buffers[b["values"]] = _numpy(ws["data"], value_dtype)
            pattern = _numpy(ws["indices"] if base != "bitmask" else ws["mask"])
            self.buffers[b["pattern"]] = pattern.astype(np.uint32) if self.wide_columns else pattern
            self.buffers[b["row_ptr"]] = _numpy(ws["indptr"] if base != "bitmask" else ws["row_ptr"])
            self.stored = int(ws["data"].size)

    def describe(self) -> str:
        return f"{self.fmt} N={self.N} K={self.K} block={self.block} nm={self.nm} stored={self.stored}"

    def shape(self, M: int) -> np.ndarray:
        s = np.zeros((), BINDINGS.shape)
        s["M"], s["N"], s["K"] = M, self.N, self.K
        s["block_n"], s["block_k"] = self.block
        s["n"], s["m"] = self.nm
        s["slice_values"] = slice_values()
        return s

    def plan(self, M: int, transpose: bool = True) -> Launch:
        return PLAN(format=self.format, M=M, N=self.N, K=self.K, stored=self.stored, transpose=transpose,
                    wide_columns=self.wide_columns, bits=self.bits, group_size=self.group_size,
                    type_name=self.dtype, value_type_name=self.value_dtype)

    def check_product(self, lib, rng, M: int, *, transpose=True, has_bias=True, schedule="forward",
                      check_bounds=1) -> Launch:
        """out = x W^T + bias (transpose) or x W + bias, as metal.cpp runs it."""
        inner, outer = (self.K, self.N) if transpose else (self.N, self.K)
        x = to_device(rng.standard_normal((M, inner)), self.dtype)
        bias = to_device(rng.standard_normal(outer), self.dtype)
        launch = self.plan(M, transpose)
        out = nan_filled((M, outer), self.dtype)
        b = BINDINGS.buffers
        buffers = {**self.buffers, b["x"]: x, b["out"]: out, b["shape"]: self.shape(M)}
        if has_bias:
            buffers[b["bias"]] = bias
        constants = {BINDINGS.function_constants["has_bias"]: has_bias}
        if launch.kernel == "mv_split":
            # The scratch NaN-filled: the fix-up must read only what the slices wrote.
            fixup = PLAN_SPLIT_FIXUP(M=M, N=self.N, stored=self.stored, type_name=self.dtype)
            buffers[b["partials"]] = np.full(fixup.groups[2], np.nan, np.float32)
            run_planned(lib, launch, buffers, function_constants=constants, schedule=schedule,
                        check_bounds=check_bounds)
            launch_fixup = Launch(fixup.kernel, fixup.host_name, (*fixup.groups[:2], 1), fixup.threads)
            fixup_buffers = {k: buffers[k] for k in (b["row_ptr"], b["out"], b["shape"], b["partials"])}
            if has_bias:
                fixup_buffers[b["bias"]] = bias
            run_planned(lib, launch_fixup, fixup_buffers, function_constants=constants, schedule=schedule,
                        check_bounds=check_bounds)
        else:
            run_planned(lib, launch, buffers, function_constants=constants, schedule=schedule,
                        check_bounds=check_bounds)
        expected, tol = ref.sparse_matmul_with_tolerance(
            from_device(x, self.dtype), self.ws, out_dtype=self.dtype,
            bias=from_device(bias, self.dtype) if has_bias else None, transpose=transpose)
        what = f"{launch.host_name} {self.describe()} M={M} bias={has_bias} {schedule} bounds={check_bounds}"
        assert_matches(ref.to_f64(from_device(out, self.dtype)), expected, tol, what)
        return launch

    def plan_sampled(self) -> Launch:
        return PLAN_SAMPLED(format=self.format, N=self.N, wide_columns=self.wide_columns,
                            value_type_name=self.value_dtype)

    def check_sampled(self, lib, rng, M: int, *, schedule="forward", check_bounds=1) -> Launch:
        """dvalues[j] = sum_m g[m, row_j] x[m, col_j], g and x float32."""
        g = rng.standard_normal((M, self.N)).astype(np.float32)
        x = rng.standard_normal((M, self.K)).astype(np.float32)
        launch = self.plan_sampled()
        out = nan_filled(tuple(self.ws["data"].shape), self.value_dtype)
        b = BINDINGS.buffers
        buffers = {k: v for k, v in self.buffers.items() if k != b["values"]}
        buffers.update({b["g"]: g, b["x"]: x, b["out"]: out, b["shape"]: self.shape(M)})
        run_planned(lib, launch, buffers, schedule=schedule, check_bounds=check_bounds)
        expected, tol = ref.sparse_sampled_with_tolerance(g, x, self.ws, out_dtype=self.value_dtype)
        what = f"{launch.host_name} {self.describe()} M={M} {schedule} bounds={check_bounds}"
        assert_matches(ref.to_f64(from_device(out, self.value_dtype)), expected, tol, what)
        return launch
