"""Generates one C++ entry per launchable kernel, and the metadata Python needs.

Each entry binds the arguments with the kernel's own parameter types (taken
from a pointer to the specialization, so that template arguments and
address-space-erased types need no parsing) and calls the kernel for one
thread:

    static const auto emu_fn_3 = &::affine_qmv_fast<float, 64, 4, false>;
    EMU_EXPORT void emu_entry_3(const EmuBuiltins* b, void* const* buf, void* const* tg) {
      using F = std::remove_const_t<decltype(emu_fn_3)>;
      emu_fn_3(emu_bind::buffer<emu_bind::param_t<F, 0>>(buf[0]), ...);
    }
"""

from __future__ import annotations

from dataclasses import asdict

from .rewriter import Instance, Rewriter

# MSL builtin attribute -> field of EmuBuiltins (runtime/abi.h).
_BUILTIN_FIELD = {
    "thread_execution_width": "threads_per_simdgroup",
    "dispatch_simdgroups_per_threadgroup": "simdgroups_per_threadgroup",
    "dispatch_quadgroups_per_threadgroup": "quadgroups_per_threadgroup",
}


def _argument(inst: Instance, i: int) -> str:
    p = inst.params[i]
    param_type = f"emu_bind::param_t<F, {i}>"
    if p.kind == "buffer":
        return f"emu_bind::buffer<{param_type}>(buf[{p.index}])"
    if p.kind == "threadgroup":
        return f"emu_bind::buffer<{param_type}>(tg[{p.index}])"
    field = _BUILTIN_FIELD.get(p.builtin, p.builtin)
    return f"emu_bind::builtin<{param_type}>(b->{field})"


def entries(rewriter: Rewriter) -> str:
    """C++ appended after the rewritten source."""
    lines = ['#line 1 "<metal_emu entries>"']
    for n, inst in enumerate(rewriter.instances):
        if inst.param_list:
            # Only the explicit parameter list tells which overload or
            # deduced specialization the instantiation means.
            lines.append(f"static void (*const emu_fn_{n})({inst.param_list}) = &{inst.function};")
        else:
            lines.append(f"static const auto emu_fn_{n} = &{inst.function};")
        args = ",\n      ".join(_argument(inst, i) for i in range(len(inst.params)))
        lines += [
            f"EMU_EXPORT void emu_entry_{n}(const EmuBuiltins* b, void* const* buf,"
            " void* const* tg) {",
            "  (void)b; (void)buf; (void)tg;",
            f"  using F = std::remove_const_t<decltype(emu_fn_{n})>;",
            f"  emu_fn_{n}({args});",
            "}",
        ]
    return "\n".join(lines) + "\n"


def metadata(rewriter: Rewriter) -> dict:
    """What library.py needs to launch: kernels, their bindings, function constants."""
    return {
        "kernels": [
            {
                "host_name": inst.host_name,
                "function": inst.function,
                "entry": f"emu_entry_{n}",
                "location": inst.location,
                "params": [asdict(p) for p in inst.params],
            }
            for n, inst in enumerate(rewriter.instances)
        ],
        "function_constants": [asdict(fc) for fc in rewriter.function_constants.values()],
    }
