"""What the CUDA plan tests share (tests/test_cuda_plan*.py,
test_attention_cuda_plan.py): each compiles a small C++ wrapper around its
operator's cuda_plan.h that writes a plan as JSON, with kernel launches as
[name, [grid x, y, z], threads, shared bytes] (``launch_json``), and reads it
back with launches as (name, (x, y, z), threads, shared bytes)."""

from __future__ import annotations

import ctypes
import json

import pytest

from tests import native_build

LAUNCH_JSON = r"""
static std::string launch_json(const KernelLaunch& l) {
  if (l.kernel.empty()) return "null";
  char buf[256];
  std::snprintf(buf, sizeof buf, "[\"%s\", [%lld, %lld, %lld], %d, %d]", l.kernel.c_str(),
      (long long)l.grid[0], (long long)l.grid[1], (long long)l.grid[2], l.threads, l.smem_bytes);
  return buf;
}
"""


def wrapper(header: str, plan_namespace: str, body: str) -> str:
    """The C++ source of a wrapper: `header` (an operator's cuda_plan.h), its
    namespaces, launch_json, then `body` (which defines extern "C" plan_json)."""
    return (f'#include <cstdio>\n#include <string>\n\n#include "{header}"\n\n'
            f"using namespace mlx_ext::cuda;\nusing namespace mlx_ext::cuda::{plan_namespace};\n"
            + LAUNCH_JSON + body)


def plan_library(name: str, source: str, argtypes: list):
    """The wrapper compiled and loaded (the test is skipped without a C++ compiler)."""
    try:
        lib = native_build.shared_library(name, source)
    except native_build.CompilerMissing as e:
        pytest.skip(str(e))
    lib.plan_json.restype = ctypes.c_int
    lib.plan_json.argtypes = argtypes
    return lib


def decoded(buf, needed: int, launches) -> dict:
    """The JSON plan_json wrote into `buf` (it returns the size it `needed`),
    each key of `launches` as a launch tuple (or None)."""
    assert needed <= len(buf)
    p = json.loads(buf.value)
    for key in launches:
        if p[key] is not None:
            name, grid, threads, smem = p[key]
            p[key] = (name, tuple(grid), threads, smem)
    return p
