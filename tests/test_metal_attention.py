"""metal/attention.metal in the emulator, against tests/reference.py.

Kernels are launched exactly as csrc/attention/metal.cpp launches them: the
same binding table (metal/attention_bindings.h, parsed), the same kernel
choice and grids (csrc/attention/metal_plan.h itself, compiled and called).
Every instantiation runs under the three runs of tests/metal_harness.py
(thread orders, bounds-check sides), with poisoned threadgroup memory, strict
mode and NaN-filled outputs (test_every_instantiation). The adversarial sizes
are in tests/test_metal_attention_sizes.py.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import mlx.core as mx

from tests.metal_harness import (
    METAL,
    Planner,
    assert_matches,
    from_device,
    library_fixture,
    nan_filled,
    parse_bindings,
    run_planned,
    to_device,
)

from . import reference as ref

BINDINGS = parse_bindings(METAL / "attention_bindings.h", prefix="ATTN", shape_struct="AttnShape")
lib = library_fixture(METAL / "attention.metal")

TYPES = ["float32", "float16", "bfloat16"]
HEAD_DIMS = [64, 80, 96, 128, 192, 256]
MX_TYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MASKS = ["none", "causal", "bool", "additive"]

# which: 0 the forward's main kernel, 1 attn_merge, 2 attn_dq, 3 attn_dkv.
PLAN = Planner(
    "attention_metal_plan",
    "attention/metal_plan.h",
    ints=("B", "Hq", "Hkv", "L", "S", "D", "bits", "cores", "which"),
    strings=("type_name",),
    body="""
  namespace plan = mlx_ext::metal::attention_plan;
  const int64_t chunks = plan::decode(L) ? plan::decode_chunks(B, Hq, Hkv, L, S, cores) : 1;
  const plan::Launch launch = which == 0 ? plan::forward(B, Hq, Hkv, L, chunks)
      : which == 1 ? plan::merge(B, Hq, L)
      : which == 2 ? plan::backward_dq(B, Hq, L) : plan::backward_dkv(B, Hkv, S);
  return {launch.kernel, plan::kernel_name(launch, type_name, D, int(bits)),
          {launch.groups[0], launch.groups[1], launch.groups[2]}, {launch.threads, 1, 1}};
""",
)


def _broadcast_strides(shape) -> list[int]:
    strides, stride = [0] * 4, 1
    for i in range(3, -1, -1):
        strides[i] = 0 if shape[i] == 1 else stride
        stride *= shape[i]
    return strides


class Problem:
    """A random attention call in the kernels' storage types. K/V live in a
    cache of `capacity` >= S keys per head and are read in place (row strides),
    as metal.cpp binds a slice of a cache."""

    def __init__(self, rng, *, B, Hq, Hkv, L, S, D, dtype, bits=0, group_size=64, mask="none",
                 window=None, kv_lengths=False, sinks=False, mask_shape=None, capacity=None, scale=None,
                 cores=10):
        self.B, self.Hq, self.Hkv, self.L, self.S, self.D = B, Hq, Hkv, L, S, D
        self.dtype, self.bits, self.group_size, self.cores = dtype, bits, group_size, cores
        self.mask_kind, self.window = mask, window
        self.scale = D**-0.5 if scale is None else scale
        self.describe = dict(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, D=D, bits=bits, gs=group_size, mask=mask,
                             window=window, kv_lengths=kv_lengths, sinks=sinks)
        cap = S if capacity is None else capacity
        self.capacity = cap
        self.q = to_device(rng.standard_normal((B, Hq, L, D)), dtype)
        if bits:
            self.k = self._quantized(rng, (B, Hkv, cap, D))
            self.v = self._quantized(rng, (B, Hkv, cap, D))
        else:
            self.k = (to_device(rng.standard_normal((B, Hkv, cap, D)), dtype),)
            self.v = (to_device(rng.standard_normal((B, Hkv, cap, D)), dtype),)
        self.mask = None
        if mask in ("bool", "additive"):
            dims = mask_shape or (B, Hq, L, S)
            if mask == "bool":
                self.mask = (rng.random(dims) < 0.7).astype(np.uint8)
            else:
                self.mask = rng.normal(0.0, 2.0, dims).astype(np.float32)
                self.mask[rng.random(dims) < 0.1] = -np.inf  # -inf entries: keys left out
        self.sinks = rng.standard_normal(Hq).astype(np.float32) if sinks else None
        self.kv_lengths = rng.integers(-2, S + 3, size=B).astype(np.int32) if kv_lengths else None

    def _quantized(self, rng, shape):
        b, h, s, d = shape
        words = rng.integers(0, 2**32, size=(b, h, s, d * self.bits // 32), dtype=np.uint64).astype(np.uint32)
        scales = to_device(rng.uniform(-0.2, 0.2, (b, h, s, d // self.group_size)), self.dtype)
        biases = to_device(rng.uniform(-1.0, 1.0, (b, h, s, d // self.group_size)), self.dtype)
        return words, scales, biases

    # ---- the reference ----

    def _kv_f64(self, x):
        """K or V as the reference takes it (the first S keys of the cache)."""
        if self.bits:
            w, s, b = (a[:, :, : self.S] for a in x)
            return (w, from_device(np.ascontiguousarray(s), self.dtype),
                    from_device(np.ascontiguousarray(b), self.dtype))
        return from_device(np.ascontiguousarray(x[0][:, :, : self.S]), self.dtype)

    def reference_kwargs(self) -> dict:
        mask = {"none": None, "causal": "causal"}.get(self.mask_kind)
        if self.mask is not None:
            mask = mx.array(self.mask.astype(bool)) if self.mask_kind == "bool" else mx.array(self.mask)
        kw = dict(scale=self.scale, mask=mask, window=self.window,
                  sinks=None if self.sinks is None else mx.array(self.sinks),
                  kv_lengths=None if self.kv_lengths is None else mx.array(self.kv_lengths))
        if self.bits:
            kw.update(group_size=self.group_size, bits=self.bits)
        return kw

    def q_f64(self):
        return ref.to_f64(from_device(self.q, self.dtype))

    def expected(self):
        """(out, its tolerance, lse) in float64."""
        q, k, v, kw = self.q_f64(), self._kv_f64(self.k), self._kv_f64(self.v), self.reference_kwargs()
        out = ref.scaled_dot_product_attention(q, k, v, **kw)
        tol = ref.attention_tolerance(MX_TYPES[self.dtype], q, k, v, **kw)
        return out, tol, self.reference_lse()

    def logits(self):
        """scale q k^T + additive mask, -inf where a key is not seen: (B, Hq, L, S)."""
        kw = self.reference_kwargs()
        keys, _ = ref.attention_kv(self._kv_f64(self.k), self.D, self.group_size, self.bits or None)
        keys = np.repeat(keys, self.Hq // self.Hkv, axis=1)
        logits = self.scale * (self.q_f64() @ np.swapaxes(keys, -1, -2))
        if self.mask_kind == "additive":
            logits = logits + self.mask.astype(np.float64)
        visible = ref.attention_visible(self.B, self.Hq, self.L, self.S, mask=kw["mask"], window=self.window,
                                        kv_lengths=kw["kv_lengths"])
        return np.where(visible, logits, -np.inf)

    def reference_lse(self):
        logits = self.logits()
        if self.sinks is not None:
            sink = np.broadcast_to(self.sinks.astype(np.float64)[None, :, None, None], (self.B, self.Hq, self.L, 1))
            logits = np.concatenate([logits, sink], axis=-1)
        top = logits.max(axis=-1, initial=-np.inf)
        safe = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            return np.log(np.exp(logits - safe[..., None]).sum(axis=-1)) + safe

    # ---- launching ----

    def plan(self, which=0):
        return PLAN(B=self.B, Hq=self.Hq, Hkv=self.Hkv, L=self.L, S=self.S, D=self.D, bits=self.bits,
                    cores=self.cores, which=which, type_name=self.dtype)

    def function_constants(self):
        fc = BINDINGS.function_constants
        return {fc["mask_bool"]: self.mask_kind == "bool", fc["mask_additive"]: self.mask_kind == "additive",
                fc["has_sinks"]: self.sinks is not None, fc["has_kv_lengths"]: self.kv_lengths is not None}

    def shape(self, chunks=1):
        sh = np.zeros((), BINDINGS.shape)
        for name in ("D", "B", "Hq", "Hkv", "L", "S"):
            sh[name] = getattr(self, name)
        sh["group_size"] = self.group_size
        sh["causal"] = int(self.mask_kind == "causal" or self.window is not None)
        sh["window"] = self.window or 0
        sh["scale"] = self.scale
        sh["chunks"] = chunks
        sh["chunk_len"] = -(-self.S // chunks) if self.S else 0
        cap = self.capacity
        for prefix in ("k", "v"):
            for suffix in ("", "s", "b"):
                sh[f"{prefix}{suffix}_bs"] = self.Hkv * cap
                sh[f"{prefix}{suffix}_hs"] = cap
        if self.mask is not None:
            for name, stride in zip(("mask_b", "mask_h", "mask_l", "mask_s"), _broadcast_strides(self.mask.shape)):
                sh[name] = stride
        return sh

    def inputs(self) -> dict:
        buf = BINDINGS.buffers
        bound = {buf["q"]: self.q, buf["k"]: self.k[0], buf["v"]: self.v[0]}
        if self.bits:
            bound.update({buf["k_scales"]: self.k[1], buf["k_biases"]: self.k[2], buf["v_scales"]: self.v[1],
                          buf["v_biases"]: self.v[2]})
        if self.mask is not None:
            bound[buf["mask"]] = self.mask
        if self.sinks is not None:
            bound[buf["sinks"]] = self.sinks
        if self.kv_lengths is not None:
            bound[buf["kv_lengths"]] = self.kv_lengths
        return bound

    def forward(self, lib, schedule="forward", check_bounds=1):
        """Runs what metal.cpp runs; returns (launches, out float64, lse)."""
        buf = BINDINGS.buffers
        launch = self.plan()
        chunks = launch.groups[0] if launch.kernel == "attn_decode" else 1
        out = nan_filled((self.B, self.Hq, self.L, self.D), self.dtype)
        lse = np.full((self.B, self.Hq, self.L), np.nan, np.float32)
        bound = self.inputs()
        bound[buf["shape"]] = self.shape(chunks)
        launches = [launch]
        kw = dict(function_constants=self.function_constants(), schedule=schedule, check_bounds=check_bounds)
        if chunks == 1:
            bound.update({buf["out"]: out, buf["lse"]: lse})
            run_planned(lib, launch, bound, **kw)
        else:
            rows = (chunks, self.B, self.Hq, self.L)
            part = {buf["partial_m"]: np.full(rows, np.nan, np.float32),
                    buf["partial_l"]: np.full(rows, np.nan, np.float32),
                    buf["partial_acc"]: np.full(rows + (self.D,), np.nan, np.float32)}
            run_planned(lib, launch, {**bound, **part}, **kw)
            merge = self.plan(which=1)
            launches.append(merge)
            merged = {buf["out"]: out, buf["lse"]: lse, buf["shape"]: bound[buf["shape"]], **part}
            if self.sinks is not None:
                merged[buf["sinks"]] = self.sinks
            run_planned(lib, merge, merged, **kw)
        return launches, ref.to_f64(from_device(out, self.dtype)), lse.astype(np.float64)

    def check_forward(self, lib, schedule="forward", check_bounds=1):
        launches, got, lse = self.forward(lib, schedule, check_bounds)
        out, tol, lse_expected = self.expected()
        what = f"{[l.host_name for l in launches]} {self.describe} {schedule}"
        assert_matches(got, out, tol, what)
        assert_lse_matches(lse, lse_expected, self, what)
        return launches

    # ---- backward ----

    def gradients(self, d_out):
        """(dq, dk, dv, their tolerances, delta) in float64 for the cotangent d_out."""
        G = self.Hq // self.Hkv
        logits = self.logits()
        lse = self.reference_lse()
        with np.errstate(invalid="ignore"):
            p = np.where(np.isfinite(logits), np.exp(logits - np.where(np.isfinite(lse), lse, 0)[..., None]), 0.0)
        keys, key_mag = ref.attention_kv(self._kv_f64(self.k), self.D, self.group_size, self.bits or None)
        values, value_mag = ref.attention_kv(self._kv_f64(self.v), self.D, self.group_size, self.bits or None)
        keys, values = np.repeat(keys, G, axis=1), np.repeat(values, G, axis=1)
        key_mag, value_mag = np.repeat(key_mag, G, axis=1), np.repeat(value_mag, G, axis=1)
        q = self.q_f64()
        out = p @ values
        delta = np.sum(d_out * out, axis=-1)
        dp = d_out @ np.swapaxes(values, -1, -2)
        ds = p * (dp - delta[..., None])
        dq = self.scale * ds @ keys
        dk = self.scale * np.swapaxes(ds, -1, -2) @ q
        dv = np.swapaxes(p, -1, -2) @ d_out

        def per_kv_head(x):
            return x.reshape(self.B, self.Hkv, G, self.S, self.D).sum(axis=2)

        # Magnitudes: the same products over absolute values, with |ds| bounded
        # by p (|dp| + |delta|); float32 errors of about (S + D + 8) roundings each.
        dp_mag = np.abs(d_out) @ np.swapaxes(value_mag, -1, -2)
        ds_mag = p * (dp_mag + np.abs(delta)[..., None])
        logit_err = (self.D + 8) * 2.0**-24 * self.scale * (np.abs(q) @ np.swapaxes(key_mag, -1, -2))
        ds_mag = ds_mag * (1 + 4 * logit_err) + p * 4 * logit_err * (dp_mag + np.abs(delta)[..., None])
        eps32 = 2.0**-24 * 4 * (self.S + self.D + 16)
        out_eps = ref.eps(self.dtype)
        mags = (self.scale * ds_mag @ key_mag, self.scale * per_kv_head(np.swapaxes(ds_mag, -1, -2) @ np.abs(q)),
                per_kv_head(np.swapaxes(p, -1, -2) @ np.abs(d_out)))
        grads = (dq, per_kv_head(dk), per_kv_head(dv))
        subnormal = ref.subnormal_spacing(self.dtype)
        tols = tuple(eps32 * m + 8 * logit_err.max() * m + out_eps * np.abs(g) + subnormal for g, m in zip(grads, mags))
        return grads, tols, delta, lse

    def check_backward(self, lib, rng, schedule="forward", check_bounds=1):
        buf = BINDINGS.buffers
        d_out_dev = to_device(rng.standard_normal((self.B, self.Hq, self.L, self.D)), self.dtype)
        d_out = ref.to_f64(from_device(d_out_dev, self.dtype))
        grads, tols, delta, lse = self.gradients(d_out)
        bound = self.inputs()
        bound.update({buf["shape"]: self.shape(), buf["lse"]: lse.astype(np.float32),
                      buf["delta"]: delta.astype(np.float32), buf["d_out"]: d_out_dev})
        kw = dict(function_constants=self.function_constants(), schedule=schedule, check_bounds=check_bounds)
        dq = nan_filled((self.B, self.Hq, self.L, self.D), self.dtype)
        dq_launch = self.plan(which=2)
        run_planned(lib, dq_launch, {**bound, buf["dq"]: dq}, **kw)
        what = f"{dq_launch.host_name} {self.describe} {schedule}"
        assert_matches(ref.to_f64(from_device(dq, self.dtype)), grads[0], tols[0], what)
        launches = [dq_launch]
        if not self.bits:
            dkv = self.plan(which=3)
            dk = nan_filled((self.B, self.Hkv, self.S, self.D), self.dtype)
            dv = nan_filled((self.B, self.Hkv, self.S, self.D), self.dtype)
            dkv_bound = {i: a for i, a in bound.items() if i != buf["sinks"]}
            run_planned(lib, dkv, {**dkv_bound, buf["dk"]: dk, buf["dv"]: dv}, **kw)
            what = f"{dkv.host_name} {self.describe} {schedule}"
            assert_matches(ref.to_f64(from_device(dk, self.dtype)), grads[1], tols[1], what + " dk")
            assert_matches(ref.to_f64(from_device(dv, self.dtype)), grads[2], tols[2], what + " dv")
            launches.append(dkv)
        return launches


def assert_lse_matches(got, expected, p: Problem, what):
    """-inf exactly where a row sees nothing; else within the logits' float32
    error (D + 8 roundings of |scale| |q| |k|) plus the sum's."""
    assert np.array_equal(np.isneginf(got), np.isneginf(expected)), f"{what}: lse -inf at the wrong rows"
    finite = np.isfinite(expected)
    keys, key_mag = ref.attention_kv(p._kv_f64(p.k), p.D, p.group_size, p.bits or None)
    key_mag = np.repeat(key_mag, p.Hq // p.Hkv, axis=1)
    logit_err = (p.D + 8) * 2.0**-24 * p.scale * (np.abs(p.q_f64()) @ np.swapaxes(key_mag, -1, -2)).max(axis=-1)
    tol = 4 * logit_err + 2.0**-24 * (p.S + 16) * (1 + np.abs(expected))
    ref.assert_within_tolerance(np.where(finite, got, 0), np.where(finite, expected, 0), np.where(finite, tol, 0),
                                what + " lse")


# ---- every instantiation ---------------------------------------------------------

# The quantized formats each head dim has: (bits, group size) pairs whose group
# size divides D (D = 80 has none).
def _formats(D):
    yield 0, 64
    for bits in (4, 8):
        sizes = [gs for gs in (32, 64, 128) if D % gs == 0]
        if sizes:
            yield bits, sizes[(D // 32 + bits) % len(sizes)]  # vary the group size across D


# The three runs of each forward instantiation, one per harness run (schedule,
# check_bounds): every mask kind, window, kv_lengths and sinks, and (decode)
# split-K with attn_merge once.
FORWARD_RUNS = [
    ("forward", 1, dict(mask="causal", sinks=True, kv_lengths=True)),
    ("reverse", 2, dict(mask="bool", window=None, sinks=False, kv_lengths=False, mask_shape=(1, 2, 1, None))),
    ("random", 1, dict(mask="additive", window=5, sinks=True, kv_lengths=True, mask_shape=(2, 1, None, None))),
]


def _sized(mask_shape, B, Hq, L, S):
    if mask_shape is None:
        return None
    return tuple(n if m is None else m for n, m in zip((B, Hq, L, S), mask_shape))


def _forward_cases():
    for kernel in ("attn_decode", "attn_prefill"):
        for dtype in TYPES:
            for D in HEAD_DIMS:
                for bits, gs in _formats(D):
                    yield pytest.param(kernel, dtype, D, bits, gs, id=f"{kernel}-{dtype}-d{D}-b{bits}-gs{gs}")


def _forward_problem(kernel, dtype, D, bits, gs, run):
    """Small shapes that reach every path of `kernel`: decode L = 3 with GQA 2
    (6 rows of 8), S = 37 one pass, S = 520 split in two chunks (run 1);
    prefill L = 33 (a second, 1-row tile), S = 40 (a partial key block)."""
    schedule, check_bounds, options = FORWARD_RUNS[run]
    B, Hq, Hkv = 2, 2, 1
    if kernel == "attn_decode":
        L, S = 3, (520 if run == 1 else 37)
    else:
        L, S = 33, 40
    options = dict(options)
    options["mask_shape"] = _sized(options.get("mask_shape"), B, Hq, L, S)
    seed = zlib.crc32(f"{kernel}{dtype}{D}{bits}{run}".encode())
    return Problem(np.random.default_rng(seed), B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, D=D, dtype=dtype, bits=bits,
                   group_size=gs, capacity=S + 3, **options)


@pytest.mark.parametrize("kernel,dtype,D,bits,gs", list(_forward_cases()))
def test_every_forward_instantiation(lib, kernel, dtype, D, bits, gs):
    for run in range(3):
        p = _forward_problem(kernel, dtype, D, bits, gs, run)
        schedule, check_bounds, _ = FORWARD_RUNS[run]
        launches = p.check_forward(lib, schedule=schedule, check_bounds=check_bounds)
        assert launches[0].kernel == kernel
        if kernel == "attn_decode":
            assert len(launches) == (2 if run == 1 else 1)  # split-K and attn_merge once


def _backward_cases():
    for dtype in TYPES:
        for D in HEAD_DIMS:
            for bits, gs in _formats(D):
                yield pytest.param(dtype, D, bits, gs, id=f"backward-{dtype}-d{D}-b{bits}-gs{gs}")


BACKWARD_RUNS = [
    ("forward", 1, dict(mask="causal", window=4, sinks=True, kv_lengths=True)),
    ("reverse", 2, dict(mask="bool", mask_shape=(1, None, 1, None))),
    ("random", 1, dict(mask="additive", kv_lengths=True, sinks=True)),
]


@pytest.mark.parametrize("dtype,D,bits,gs", list(_backward_cases()))
def test_every_backward_instantiation(lib, dtype, D, bits, gs):
    """attn_dq (every K/V format) and attn_dkv (float K/V): L = 5, S = 11,
    GQA 2, each mask kind once."""
    for run, (schedule, check_bounds, options) in enumerate(BACKWARD_RUNS):
        B, Hq, Hkv, L, S = 2, 4, 2, 5, 11
        options = dict(options)
        options["mask_shape"] = _sized(options.get("mask_shape"), B, Hq, L, S)
        rng = np.random.default_rng(zlib.crc32(f"bw{dtype}{D}{bits}{run}".encode()))
        p = Problem(rng, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, D=D, dtype=dtype, bits=bits, group_size=gs,
                    capacity=S + 2, **options)
        launches = p.check_backward(lib, rng, schedule=schedule, check_bounds=check_bounds)
        assert [l.kernel for l in launches] == (["attn_dq"] if bits else ["attn_dq", "attn_dkv"])


def test_every_instantiation_is_covered(lib):
    """The coverage cases, planned by metal_plan.h, launch every instantiation."""
    planned = set()
    for case in _forward_cases():
        for run in range(3):
            p = _forward_problem(*case.values, run)
            launch = p.plan()
            planned.add(launch.host_name)
            if launch.kernel == "attn_decode" and launch.groups[0] > 1:
                planned.add(p.plan(which=1).host_name)
    for dtype, D, bits, gs in (case.values for case in _backward_cases()):
        p = Problem(np.random.default_rng(0), B=1, Hq=1, Hkv=1, L=5, S=11, D=D, dtype=dtype, bits=bits, group_size=gs)
        planned.add(p.plan(which=2).host_name)
        if not bits:
            planned.add(p.plan(which=3).host_name)
    assert sorted(planned) == sorted(lib.host_names)


# ---- head dims between the instantiated ones ---------------------------------------


@pytest.mark.parametrize("D,bits,gs,kernel_dim", [(8, 0, 64, 64), (24, 0, 64, 64), (72, 0, 64, 80),
                                                  (104, 0, 64, 128), (160, 4, 32, 192), (224, 8, 32, 256),
                                                  (248, 0, 64, 256)])
@pytest.mark.parametrize("L", [2, 35])
def test_head_dims_between_instantiations(lib, D, bits, gs, kernel_dim, L):
    """Any multiple of 8 up to 256 (what the op takes) runs on the next
    instantiated head dim with the columns past D zero: nothing past D is read
    (bounds guards) or written (NaN-filled outputs stay exact)."""
    dtype = TYPES[D % 3]
    rng = np.random.default_rng(D + L)
    for run, (schedule, check_bounds) in enumerate((("forward", 2), ("random", 1))):
        p = Problem(rng, B=2, Hq=4, Hkv=2, L=L, S=41, D=D, dtype=dtype, bits=bits, group_size=gs,
                    mask=["causal", "bool"][run], sinks=True, kv_lengths=run == 0, capacity=43)
        launches = p.check_forward(lib, schedule=schedule, check_bounds=check_bounds)
        assert f"_d{kernel_dim}" in launches[0].host_name, launches[0].host_name
        p.check_backward(lib, rng, schedule=schedule, check_bounds=check_bounds)


# ---- the host code's plan ----------------------------------------------------------


def test_plan_is_metal_plan_h():
    """Decode up to 8 query rows, split-K only for long S on a GPU the call
    leaves idle, prefill beyond; the backward's grids."""
    def plan(which=0, **kw):
        args = dict(B=1, Hq=32, Hkv=8, L=1, S=4096, D=128, bits=0, cores=10, which=which, type_name="float16")
        args.update(kw)
        launch = PLAN(**args)
        return launch.host_name, launch.groups, launch.threads[0]

    assert plan() == ("attn_decode_float16_d128", (3, 8, 1), 128)  # 8 groups of 20 wanted: 3 chunks
    assert plan(cores=4) == ("attn_decode_float16_d128", (1, 8, 1), 128)
    assert plan(S=511) == ("attn_decode_float16_d128", (1, 8, 1), 128)  # no two chunks of 256
    assert plan(Hq=8, Hkv=1, S=1024, bits=4) == ("attn_decode_float16_d128_q4", (4, 1, 1), 128)
    assert plan(L=8, Hq=2, Hkv=1, B=3) == ("attn_decode_float16_d128", (4, 2, 3), 128)
    assert plan(L=9, bits=8, D=256) == ("attn_prefill_float16_d256_q8", (1, 32, 1), 128)
    assert plan(L=65, B=2) == ("attn_prefill_float16_d128", (3, 32, 2), 128)
    assert plan(which=1, L=2, B=2) == ("attn_merge_float16_d128", (128, 1, 1), 32)
    assert plan(which=2, L=9, bits=4) == ("attn_dq_float16_d128_q4", (3, 32, 1), 128)
    assert plan(which=3, S=9) == ("attn_dkv_float16_d128", (3, 8, 1), 128)
    assert plan(D=8)[0] == "attn_decode_float16_d64"  # the next instantiated head dim
    assert plan(D=72, L=9)[0] == "attn_prefill_float16_d80"
    assert plan(D=200, bits=4, which=2)[0] == "attn_dq_float16_d256_q4"


# ---- the same instantiations on a real Apple GPU (macOS with Metal only) -------------


def _gpu_available() -> bool:
    return mx.metal.is_available()


GPU = mx.gpu  # the stream of the tests below


@pytest.mark.skipif(not _gpu_available(), reason="no Metal GPU here (the emulator runs these kernels instead)")
@pytest.mark.parametrize("kernel,dtype,D,bits,gs", list(_forward_cases()))
def test_every_forward_instantiation_on_the_gpu(kernel, dtype, D, bits, gs):
    """mlx_ext.scaled_dot_product_attention on the GPU stream with the coverage
    problems (metal.cpp picks `kernel` for each); its gradient with respect to
    q (attn_dq) and, for float K/V, to k and v (attn_dkv)."""
    import mlx_ext

    for run in range(3):
        p = _forward_problem(kernel, dtype, D, bits, gs, run)
        mx_type = MX_TYPES[dtype]

        def on_device(a):  # exact: the values are the dtype's
            return mx.array(from_device(a, dtype)).astype(mx_type)

        def kv(x):
            if bits:
                return (mx.array(x[0][:, :, : p.S]), on_device(x[1][:, :, : p.S]), on_device(x[2][:, :, : p.S]))
            return on_device(x[0][:, :, : p.S])

        kw = p.reference_kwargs()
        out = mlx_ext.scaled_dot_product_attention(on_device(p.q), kv(p.k), kv(p.v), stream=GPU, **kw)
        expected, tol, _ = p.expected()
        ref.assert_within_tolerance(out, expected, tol, f"{kernel} {p.describe}")
        if not bits:
            grads = mx.grad(lambda q, k, v: mlx_ext.scaled_dot_product_attention(
                q, k, v, stream=GPU, **kw).astype(mx.float32).sum(), argnums=(0, 1, 2))(
                on_device(p.q), kv(p.k), kv(p.v))
            want, tols, _, _ = p.gradients(np.ones((p.B, p.Hq, p.L, p.D)))
            for name, got, w, t in zip("qkv", grads, want, tols):
                ref.assert_within_tolerance(got, w, t, f"d{name} {p.describe}")
