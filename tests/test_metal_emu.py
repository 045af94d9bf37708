"""The Metal emulator itself: each MSL feature against NumPy, each diagnostic
triggered by a kernel (fixtures in tests/metal_emu/fixtures/)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.metal_emu import (
    BarrierMismatchError,
    DeadlockError,
    DivergentCollectiveError,
    FunctionConstantError,
    KernelFault,
    Library,
    OutOfBoundsError,
    StackOverflowError,
    StrictError,
    ThreadgroupMemoryError,
    ToolchainMissing,
    UnboundBufferError,
    find_clang,
)
from tests.metal_harness import from_bfloat16_bits, load_library, to_bfloat16_bits

FIXTURES = Path(__file__).parent / "metal_emu" / "fixtures"
SCHEDULES = ("forward", "reverse", "random")


@pytest.fixture(scope="module")
def features() -> Library:
    return load_library(FIXTURES / "features.metal")


@pytest.fixture(scope="module")
def diagnostics() -> Library:
    return load_library(FIXTURES / "diagnostics.metal")


@pytest.fixture(scope="module")
def mlx_kernels() -> Library:
    return load_library(FIXTURES / "mlx_kernels.metal")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_names(err, kernel: str, thread: int | None, lane: int | None, group=(0, 0, 0)) -> None:
    """A diagnostic names the kernel, threadgroup, thread and lane, in its
    attributes and in its message."""
    msg = str(err)
    assert err.kernel == kernel and f"kernel '{kernel}'" in msg, msg
    assert err.thread == thread and err.lane == lane, msg
    if thread is not None:
        assert err.threadgroup == group and f"threadgroup {group}" in msg, msg
        assert f"thread {thread} (simdgroup {thread // 32}, lane {lane})" in msg, msg


# ---- features ------------------------------------------------------------------


PARAMS = np.dtype(
    {
        "names": ["scale", "n", "bias"],
        "formats": [(np.float32, 4), np.int32, np.float32],
        "offsets": [0, 16, 20],
        "itemsize": 32,
    }
)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_address_spaces_constant_struct_and_threadgroup_argument(features, schedule):
    size, groups, n = 32, 2, 60
    x = _rng().standard_normal((groups * size, 4)).astype(np.float32)
    params = np.zeros((), PARAMS)
    params["scale"], params["n"], params["bias"] = [1, 2, 3, 4], n, 0.5
    y = np.full_like(x, np.nan)
    features.run(
        "address_spaces",
        {0: x, 1: y, 2: params},
        grid=groups * size,
        threadgroup=size,
        threadgroup_memory={0: size * 16},
        schedule=schedule,
    )
    v = (x * params["scale"] + 0.5).reshape(groups, size, 4)
    expected = (v[:, ::-1] + np.array([1, 2, 3, 4], np.float32)[np.arange(size) % 4, None]).reshape(
        -1, 4
    )
    np.testing.assert_allclose(y[:n], expected[:n], rtol=1e-6)
    assert np.isnan(y[n:]).all()


def test_builtins_on_a_grid_with_partial_threadgroups(features):
    grid, tg = (10, 6, 2), (4, 4, 1)
    out = np.full((2, 6, 10, 27), 0xDEAD, np.uint32)
    features.run("builtins", {0: out}, grid=grid, threadgroup=tg)
    z, y, x = np.meshgrid(np.arange(2), np.arange(6), np.arange(10), indexing="ij")
    size_x, size_y = np.minimum(4, 10 - x // 4 * 4), np.minimum(4, 6 - y // 4 * 4)
    index = x % 4 + y % 4 * size_x
    threads = size_x * size_y
    full = np.ones_like(x)
    expected = [
        x,
        y,
        z,
        x % 4,
        y % 4,
        0 * x,
        x // 4,
        y // 4,
        z,
        size_x,
        size_y,
        full,
        3 * full,
        2 * full,
        2 * full,
        10 * full,
        6 * full,
        4 * full,
        index,
        index // 32,
        index % 32,
        32 * full,
        (threads + 31) // 32,
        32 * full,
        index % 4,
        index // 4,
        4 * full,
    ]
    np.testing.assert_array_equal(out, np.stack(expected, -1))


def test_half_and_bfloat(features):
    a = _rng().uniform(-4, 4, 64).astype(np.float16)
    b_bits = to_bfloat16_bits(_rng(1).uniform(-4, 4, 64))
    out_half, out_bits = np.zeros(64, np.float16), np.zeros(64, np.uint16)
    out_float = np.zeros(64, np.float32)
    features.run("half_bfloat", [a, b_bits, out_half, out_bits, out_float], grid=64, threadgroup=32)
    half_ref = (a.astype(np.float32) * 1.5 + 0.25).astype(np.float16)
    np.testing.assert_allclose(
        out_half, half_ref, rtol=1e-3, atol=1e-3
    )  # <= 1 ulp (rounding steps)
    bits_ref = to_bfloat16_bits(from_bfloat16_bits(b_bits) * 2 + 1)
    np.testing.assert_array_equal(out_bits, bits_ref)
    np.testing.assert_allclose(
        out_float, out_half.astype(np.float32) + from_bfloat16_bits(out_bits)
    )


def test_vectors_swizzles_and_conversions(features):
    x = _rng().standard_normal((32, 4)).astype(np.float32)
    out, iout = np.zeros((32, 3, 4), np.float32), np.zeros((32, 4), np.int32)
    features.run("vectors", [x, out, iout], grid=32, threadgroup=32)
    r = x[:, ::-1].copy()
    r[:, :2] = x[:, 2:] * 2
    r[:, 3] += x[:, 0]
    c = np.concatenate([x[:, :2], np.ones((32, 1), np.float32)], 1)
    rg = x[:, :2] + x[:, 2:]
    selected = np.where(x > 0, x, -1) + np.concatenate([rg, rg[:, ::-1]], 1)
    np.testing.assert_allclose(out[:, 0], r, rtol=1e-6)
    np.testing.assert_allclose(
        out[:, 1], np.concatenate([c, (c * c).sum(1, keepdims=True)], 1), rtol=1e-6
    )
    np.testing.assert_allclose(out[:, 2], selected, rtol=1e-6)
    flags = np.stack([(x > 0).all(1), (x > 0).any(1), np.full(32, 16), np.full(32, 8)], 1)
    np.testing.assert_array_equal(iout, np.trunc(x * 10).astype(np.int32) + flags)


def test_float_math_including_fast_and_precise(features):
    n = 64
    a = _rng().uniform(-3, 3, n).astype(np.float32)
    b = _rng(1).uniform(0.1, 4, n).astype(np.float32)
    out = np.zeros((24, n), np.float32)
    features.run("float_math", [a, b, out], grid=n, threadgroup=32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    expected = (
        [np.exp(a64)] * 3
        + [np.log(b64)] * 2
        + [
            np.sqrt(b64),
            1 / np.sqrt(b64),
            np.sin(a64),
            np.cos(a64),
            np.tanh(a64),
            b64**1.5,
            a64 * b64 + 1,
            np.minimum(a64, b64),
            np.maximum(a64, b64),
            np.floor(a64),
            np.ceil(a64),
            np.sign(a64) * np.floor(np.abs(a64) + 0.5),
            np.abs(a64),
            np.clip(a64, -0.5, 0.5),
            a64 + (b64 - a64) * 0.25,
            np.arctan2(a64, b64),
            np.exp2(a64),
        ]
    )
    np.testing.assert_allclose(out[:22], np.array(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[22], np.exp(a.astype(np.float16).astype(np.float64)), rtol=2e-3)
    np.testing.assert_allclose(out[23], np.sqrt(a64**2 + b64**2 + 5), rtol=1e-6)


def test_integer_math(features):
    a = np.concatenate([[0, 1, 0x80000000, 0xFFFFFFFF], _rng().integers(0, 2**32, 28)]).astype(
        np.uint32
    )
    b = _rng(1).integers(-10, 10, 32).astype(np.int32)
    out = np.zeros((9, 32), np.int32)
    features.run("int_math", [a, b, out], grid=32, threadgroup=32)
    bits = [f"{int(v):032b}" for v in a]
    expected = [
        [s.count("1") for s in bits],
        [len(s) - len(s.lstrip("0")) for s in bits],
        [len(s) - len(s.rstrip("0")) for s in bits],
        (a >> 4) & 0xFF,
        [int(s[::-1], 2) for s in bits],
        np.abs(b),
        np.maximum(b, 3),
        np.minimum(b, -3),
        (a.astype(np.uint64) * 0x9E3779B9) >> 32,
    ]
    np.testing.assert_array_equal(
        out, np.array(expected, np.int64).astype(np.uint32).view(np.int32)
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_threadgroup_barrier_reduction(features, workers):
    x = _rng().standard_normal(16 * 256).astype(np.float32)
    for schedule, check_bounds in zip(SCHEDULES, (1, 2, 0), strict=True):
        out = np.full(16, np.nan, np.float32)
        features.run(
            "block_sum",
            [x, out],
            grid=x.size,
            threadgroup=256,
            schedule=schedule,
            workers=workers,
            check_bounds=check_bounds,
        )
        np.testing.assert_allclose(out, x.reshape(16, 256).sum(1), rtol=1e-5, atol=1e-5)


def _collective_reference(x: np.ndarray, s: np.ndarray, W: int) -> np.ndarray:
    """The 28 rows of the *_collectives kernels for full W-lane segments."""
    idx = np.arange(x.size)
    lane, base = idx % W, idx - idx % W
    X, S = x.reshape(-1, W), s.reshape(-1, W)
    each = lambda v: np.repeat(v, W)  # noqa: E731  (segment value to every lane)
    d, k, h = W // 4 + 1, W // 2 + 1, W // 2
    i, g = idx % h, idx - idx % h
    incl_prod = np.cumprod(S, 1).ravel()
    ballot = ((X > 0).astype(np.uint64) << np.arange(W, dtype=np.uint64)).sum(1)
    rows = [
        each(X.sum(1)),
        each(S.prod(1)),
        each(X.min(1)),
        each(X.max(1)),
        each(np.bitwise_and.reduce(X, 1)),
        each(np.bitwise_or.reduce(X, 1)),
        each(np.bitwise_xor.reduce(X, 1)),
        np.cumsum(X, 1).ravel(),
        np.cumsum(X, 1).ravel() - x,
        incl_prod,
        incl_prod // s,
        x[base + (lane + 3) % W],
        np.where(lane >= d, x[idx - d], x),
        np.where(lane + d < W, x[np.minimum(idx + d, x.size - 1)], x),
        x[base + (lane ^ k)],
        x[base + (lane - k) % W],
        x[base + (lane + k) % W],
        np.where(lane >= d, x[idx - d], -x[base + (lane - d) % W]),
        np.where(lane + d < W, x[np.minimum(idx + d, x.size - 1)], -x[base + (lane + d) % W]),
        np.where(i >= 1, x[idx - 1], -x[g + (i - 1) % h]),
        np.where(i + 1 < h, x[np.minimum(idx + 1, x.size - 1)], -x[g + (i + 1) % h]),
        x[base + W - 1],
        x[base],
        each((X > -90).all(1)),
        each((X == 7).any(1)),
        each(ballot),
        each(np.full(X.shape[0], 2**W - 1)),
        (lane == 0).astype(np.int64),
    ]
    return np.array(rows, np.int64).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("family, width", [("simd", 32), ("quad", 4)])
def test_every_collective(features, family, width):
    n = 64
    x = _rng().integers(-100, 100, n).astype(np.int32)
    x[::9] = 7
    small = (1 + (np.arange(n) % 7 == 0)).astype(np.int32)
    f = _rng(1).standard_normal((n, 4)).astype(np.float32)
    for schedule in SCHEDULES:
        out, fout = np.zeros((28, n), np.int32), np.zeros((n, 2, 4), np.float32)
        features.run(
            f"{family}_collectives",
            [x, small, f, out, fout],
            grid=n,
            threadgroup=n,
            schedule=schedule,
            strict=True,
        )
        np.testing.assert_array_equal(out, _collective_reference(x, small, width))
        F = f.reshape(-1, width, 4)
        np.testing.assert_allclose(fout[:, 0], np.repeat(F.sum(1), width, 0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(fout[:, 1], np.repeat(F.max(1), width, 0))


@pytest.mark.parametrize("poison", [True, False])
def test_collectives_in_a_partial_simdgroup(features, poison):
    n = 40  # simdgroup 1 has 8 lanes; lanes 8-31 are inactive
    x = _rng().standard_normal(n).astype(np.float32)
    out = np.zeros((5, n), np.float32)
    features.run("partial_simdgroup", [x, out], grid=n, threadgroup=n, poison=poison)
    groups = [x[:32], x[32:]]
    np.testing.assert_allclose(
        out[0], np.concatenate([np.full(len(v), v.sum()) for v in groups]), rtol=1e-5
    )
    np.testing.assert_allclose(
        out[1], np.concatenate([np.cumsum(v) - v for v in groups]), rtol=1e-5, atol=1e-6
    )
    ballots = [sum(1 << i for i, e in enumerate(v) if e > 0) for v in groups]
    np.testing.assert_array_equal(
        out[2],
        np.concatenate(
            [np.full(len(v), b, np.float32) for v, b in zip(groups, ballots, strict=True)]
        ),
    )
    np.testing.assert_array_equal(out[3, :16], x[16:32])
    np.testing.assert_array_equal(out[3, 16:32], x[16:32])
    undefined = out[3, 32:]
    assert np.isnan(undefined).all() if poison else (undefined == 0).all()
    np.testing.assert_array_equal(out[4], 3)  # all() of a vote and simd_all: over active lanes


@pytest.mark.parametrize("dtype", ["float", "half"])
def test_simdgroup_matrix_multiply(features, dtype):
    T = np.float32 if dtype == "float" else np.float16
    a = _rng().standard_normal((8, 16)).astype(T)
    b = _rng(1).standard_normal((8, 8)).astype(T)
    c = _rng(2).standard_normal((8, 8)).astype(np.float32)
    d, e = np.full((8, 8), np.nan, np.float32), np.full((8, 16), np.nan, np.float32)
    for schedule in SCHEDULES:
        features.run(
            f"matrix_multiply_{dtype}",
            [a, b, c, d, e],
            grid=32,
            threadgroup=32,
            schedule=schedule,
            strict=True,
        )
        product = a[:, 8:].astype(np.float64) @ b.astype(np.float64).T
        np.testing.assert_allclose(d, product + c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(e[:, :8], product.T, rtol=1e-5, atol=1e-5)
        assert np.isnan(e[:, 8:]).all()


def test_simdgroup_matrix_lane_layout_and_thread_elements(features):
    iota = np.arange(64, dtype=np.float32)
    held = np.zeros((32, 2), np.float32)
    written, special = np.zeros((8, 8), np.float32), np.zeros((2, 8, 8), np.float32)
    features.run("matrix_layout", [iota, held, written, special], grid=32, threadgroup=32)
    lane = np.arange(32)
    q = lane // 4
    row, col = (q & 4) + (lane // 2) % 4, (q & 2) * 2 + (lane % 2) * 2
    np.testing.assert_array_equal(held, np.stack([row * 8 + col, row * 8 + col + 1], 1))
    expected = np.zeros((8, 8), np.float32)
    expected[row, col], expected[row, col + 1] = lane, lane + 0.5
    np.testing.assert_array_equal(written, expected)
    np.testing.assert_array_equal(special[0], 2 * np.eye(8))
    np.testing.assert_array_equal(special[1], np.full((8, 8), 3))


def test_atomics_across_workers(features):
    n = 512
    x = _rng().standard_normal(n).astype(np.float32)
    counts, total = np.zeros(3, np.int32), np.zeros(1, np.float32)
    extremes = np.array([0, 0xFFFFFFFF], np.uint32)
    features.run("atomics", [counts, total, extremes, x], grid=n, threadgroup=64, workers=2)
    keys = np.arange(n) * 7919 % 1000
    assert counts[0] == n and 1 <= counts[1] <= n and counts[2] == 1
    np.testing.assert_allclose(total[0], x.sum(dtype=np.float64), rtol=1e-4)
    assert extremes[0] == keys.max() and extremes[1] == keys.min() + 5


def test_function_constants(features):
    x = _rng().standard_normal(32).astype(np.float32)
    y = np.zeros_like(x)
    features.run(
        "function_constants",
        [x, y, np.float32(3)],
        grid=32,
        threadgroup=32,
        function_constants={"use_scale": True, "repeat": 2},
    )
    np.testing.assert_allclose(y, (x + 2) * 3, rtol=1e-6)
    # use_scale false: `negate` (derived) holds, and buffer 2 may stay unbound.
    features.run(
        "function_constants",
        {0: x, 1: y},
        grid=32,
        threadgroup=32,
        function_constants={0: False, 1: 0, "offset": 0.5},
    )
    np.testing.assert_allclose(y, -x + 0.5, rtol=1e-6)
    with pytest.raises(FunctionConstantError, match="'repeat' \\(index 1\\)") as err:
        features.run(
            "function_constants",
            [x, y, np.float32(3)],
            grid=32,
            threadgroup=32,
            function_constants={"use_scale": True},
        )
    assert_names(err.value, "function_constants", thread=0, lane=0)
    with pytest.raises(UnboundBufferError, match="buffer\\(2\\)"):
        features.run(
            "function_constants",
            {0: x, 1: y},
            grid=32,
            threadgroup=32,
            function_constants={"use_scale": True, "repeat": 0},
        )


def test_templated_kernels_and_host_names(features):
    assert {"axpy_float_1", "axpy_half_2", "axpy_bfloat_1"} <= set(features.host_names)
    x = _rng().standard_normal(32).astype(np.float32)
    y = _rng(1).standard_normal(32).astype(np.float32)
    out = y.copy()
    features.run("axpy_float_1", [x, out, np.float32(0.5)], grid=32, threadgroup=32)
    np.testing.assert_allclose(out, 0.5 * x + y, rtol=1e-6)
    xh, out_h = x.astype(np.float16), y.astype(np.float16)
    features.run("axpy_half_2", [xh, out_h, np.float32(0.5)], grid=32, threadgroup=32)
    np.testing.assert_allclose(out_h, x + y, rtol=1e-2, atol=1e-2)  # applied twice, in half
    xb, out_b = to_bfloat16_bits(x), to_bfloat16_bits(y)
    expected = to_bfloat16_bits(0.5 * from_bfloat16_bits(xb) + from_bfloat16_bits(out_b))
    features.run("axpy_bfloat_1", [xb, out_b, np.float32(0.5)], grid=32, threadgroup=32)
    np.testing.assert_array_equal(out_b, expected)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_fiber_context_switch_on_each_architecture(arch, tmp_path):
    """Both context switches keep callee-saved registers; the foreign one runs
    under qemu-user when that (and ld.lld) is installed."""
    try:
        clang = find_clang()[0]
    except ToolchainMissing as e:
        pytest.skip(str(e))
    lld = shutil.which("ld.lld") or next(
        (p for v in range(25, 16, -1) if (p := shutil.which(f"ld.lld-{v}"))), None
    )
    runner = (
        []
        if platform.machine() == arch
        else [q for q in (shutil.which(f"qemu-{arch}-static"), shutil.which(f"qemu-{arch}")) if q][
            :1
        ]
    )
    if platform.machine() != arch and not (runner and lld):
        pytest.skip(f"running the {arch} context switch here needs qemu-user and ld.lld")
    runtime = FIXTURES.parent / "runtime"
    exe = tmp_path / f"fiber_switch_{arch}"
    linker = ["-fuse-ld=lld", f"--ld-path={lld}"] if lld else []
    subprocess.run(
        [
            clang,
            f"--target={arch}-linux-gnu",
            "-O2",
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-fno-stack-protector",
            *linker,
            str(FIXTURES / "fiber_switch_check.cpp"),
            str(runtime / "fiber_switch.S"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    assert subprocess.run([*runner, str(exe)]).returncode == 0


# ---- MLX's installed kernel headers ------------------------------------------


def _quantize(w: np.ndarray, group: int = 64):
    """MLX's 4-bit affine format: w ~ scale * q + bias per group of a row; each
    row's q values packed little-endian, 8 per uint32, low bits first."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.min(-1), g.max(-1)
    scale = (hi - lo) / 15
    q = (
        np.clip(np.round((g - lo[..., None]) / scale[..., None]), 0, 15)
        .astype(np.uint32)
        .reshape(n, -1, 8)
    )
    packed = (q << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32)
    return packed, scale, lo, q.reshape(n, k // group, group)


def _dequantize(q, scale, bias) -> np.ndarray:
    return (scale[..., None].astype(np.float64) * q + bias[..., None]).reshape(q.shape[0], -1)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mlx_affine_qmv_fast(mlx_kernels, schedule):
    M, N, K = 2, 64, 512
    w = _rng().standard_normal((N, K)).astype(np.float32)
    packed, scale, bias, q = _quantize(w)
    scale, bias = scale.astype(np.float16), bias.astype(np.float16)
    x = _rng(1).standard_normal((M, K)).astype(np.float16)
    y = np.full((M, N), np.nan, np.float16)
    # Batch-only pointers (8, 9, 11-14) stay unbound: batched=false never reads them.
    buffers = {
        0: packed,
        1: scale,
        2: bias,
        3: x,
        4: y,
        5: np.int32(K),
        6: np.int32(N),
        7: np.int32(0),
        10: np.int32(0),
    }
    mlx_kernels.run(
        "affine_qmv_fast_float16_t_gs_64_b_4_batch_0",
        buffers,
        grid=(M * 32, N // 8 * 2),
        threadgroup=(32, 2),
        schedule=schedule,
        strict=True,
    )
    expected = x.astype(np.float64) @ _dequantize(q, scale, bias).T
    np.testing.assert_allclose(y, expected, rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mlx_affine_qmm_t_with_steel_block_mma(mlx_kernels, schedule):
    M, N, K = 40, 64, 256  # M = 32 + 8: a full and a partial tile of rows
    w = _rng().standard_normal((N, K)).astype(np.float32)
    packed, scale, bias, q = _quantize(w)
    scale, bias = scale.astype(np.float32), bias.astype(np.float32)
    x = _rng(1).standard_normal((M, K)).astype(np.float32)
    y = np.full((M, N), np.nan, np.float32)
    buffers = {
        0: packed,
        1: scale,
        2: bias,
        3: x,
        4: y,
        5: np.int32(K),
        6: np.int32(N),
        7: np.int32(M),
        8: np.int32(0),
        11: np.int32(0),
    }
    mlx_kernels.run(
        "affine_qmm_t_float_gs_64_b_4_alN_true_batch_0",
        buffers,
        grid=(N // 32 * 128, (M + 31) // 32),
        threadgroup=128,
        schedule=schedule,
        strict=True,
    )
    expected = x.astype(np.float64) @ _dequantize(q, scale, bias).T
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mlx_sdpa_vector(mlx_kernels, schedule):
    H, N, D = 2, 100, 64
    r = _rng()
    q, k, v = (
        r.standard_normal(shape).astype(np.float16) for shape in [(H, 1, D), (H, N, D), (H, N, D)]
    )
    out = np.full((H, 1, D), np.nan, np.float16)
    scale = 1 / np.sqrt(D)
    constants = dict(
        has_mask=False,
        query_transposed=False,
        do_causal=False,
        bool_mask=False,
        float_mask=False,
        has_sinks=False,
    )
    buffers = {
        0: q,
        1: k,
        2: v,
        3: out,
        4: np.int32(1),
        5: np.int32(N),
        6: np.uint64(N * D),
        7: np.uint64(D),
        8: np.uint64(N * D),
        9: np.uint64(D),
        10: np.float32(scale),
    }
    mlx_kernels.run(
        "sdpa_vector_float16_t_64_64",
        buffers,
        grid=H * 1024,
        threadgroup=1024,
        function_constants=constants,
        schedule=schedule,
        strict=True,
    )
    s = np.einsum("hqd,hkd->hqk", q.astype(np.float64), k.astype(np.float64)) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-2, atol=2e-3)


# ---- diagnostics --------------------------------------------------------------


def test_missing_barrier_is_caught_by_schedule_variation(diagnostics):
    x = _rng().standard_normal(64).astype(np.float32)
    expected = np.concatenate([x[:1], x[:-1]])
    results = {}
    for kernel in ("read_neighbour", "read_neighbour_no_barrier"):
        for schedule in SCHEDULES:
            y = np.zeros_like(x)
            diagnostics.run(kernel, [x, y], grid=64, threadgroup=64, schedule=schedule)
            results[kernel, schedule] = np.array_equal(y, expected)
    assert all(results["read_neighbour", s] for s in SCHEDULES)
    # In forward order each neighbour happens to have stored already ...
    assert results["read_neighbour_no_barrier", "forward"]
    # ... in reverse or random order the poisoned threadgroup memory shows.
    assert not results["read_neighbour_no_barrier", "reverse"]
    assert not results["read_neighbour_no_barrier", "random"]


@pytest.mark.parametrize(
    "kernel, offset, check_bounds, buffer, thread, byte_offset",
    [
        ("read_at", 1, 1, 0, 63, 256),
        ("read_at", -1, 2, 0, 0, -4),
        ("write_at", 1, 1, 1, 63, 256),
        ("write_at", -1, 2, 1, 0, -4),
    ],
)
def test_out_of_bounds_on_both_sides(
    diagnostics, kernel, offset, check_bounds, buffer, thread, byte_offset
):
    x, y = np.ones(64, np.float32), np.zeros(64, np.float32)
    with pytest.raises(OutOfBoundsError) as err:
        diagnostics.run(
            kernel, [x, y, np.int32(offset)], grid=64, threadgroup=64, check_bounds=check_bounds
        )
    access = "read" if kernel == "read_at" else "write"
    assert f"out-of-bounds {access} of [[buffer({buffer})]] at byte offset {byte_offset}" in str(
        err.value
    )
    assert_names(err.value, kernel, thread=thread, lane=thread % 32)


def test_an_underrun_needs_the_guard_before(diagnostics):
    x, y = np.ones(64, np.float32), np.zeros(64, np.float32)
    diagnostics.run("read_at", [x, y, np.int32(-1)], grid=64, threadgroup=64, check_bounds=1)
    assert np.isnan(y[0]) and (y[1:] == 1).all()  # read the poisoned slack, undetected


def test_deadlock(diagnostics):
    with pytest.raises(
        DeadlockError, match="simd_sum.*threadgroup_barrier|threadgroup_barrier.*simd_sum"
    ) as err:
        diagnostics.run(
            "collective_then_barrier", [np.ones(64, np.float32)], grid=64, threadgroup=64
        )
    assert_names(err.value, "collective_then_barrier", thread=0, lane=0)


def test_threads_at_different_barriers(diagnostics):
    with pytest.raises(
        BarrierMismatchError, match=r"threads 0-31 at threadgroup_barrier .*:\d+\); threads 32-63"
    ) as err:
        diagnostics.run("different_barriers", [np.zeros(64, np.float32)], grid=64, threadgroup=64)
    assert_names(err.value, "different_barriers", thread=0, lane=0)


def test_divergent_collectives(diagnostics):
    with pytest.raises(
        DivergentCollectiveError, match="threads 0-15 at simd_sum .*threads 16-31 at simd_max"
    ) as err:
        diagnostics.run("divergent_collectives", [np.ones(32, np.float32)], grid=32, threadgroup=32)
    assert_names(err.value, "divergent_collectives", thread=0, lane=0)


def test_unbound_buffers(diagnostics):
    y = np.zeros(32, np.float32)
    with pytest.raises(UnboundBufferError, match=r"read of unbound \[\[buffer\(0\)\]\]") as err:
        diagnostics.run("optional_input", {1: y, 2: np.int32(4)}, grid=32, threadgroup=32)
    assert_names(err.value, "optional_input", thread=0, lane=0)
    # A reference cannot be left unbound at all: reported at launch.
    with pytest.raises(UnboundBufferError, match=r"\[\[buffer\(2\)\]\] 'n' is a reference") as err:
        diagnostics.run(
            "optional_input", {0: np.ones(32, np.float32), 1: y}, grid=32, threadgroup=32
        )
    assert_names(err.value, "optional_input", thread=None, lane=None)


def test_threadgroup_memory_over_32_kib(diagnostics):
    with pytest.raises(ThreadgroupMemoryError, match="32772 bytes") as err:
        diagnostics.run(
            "large_threadgroup_array", [np.ones(32, np.float32)], grid=32, threadgroup=32
        )
    assert_names(err.value, "large_threadgroup_array", thread=0, lane=0)
    x = np.arange(32, dtype=np.float32)
    diagnostics.run(
        "threadgroup_argument", [x], grid=32, threadgroup=32, threadgroup_memory={0: 128}
    )
    assert (x == 0).all()
    with pytest.raises(ThreadgroupMemoryError, match="40000 bytes") as err:
        diagnostics.run(
            "threadgroup_argument", [x], grid=32, threadgroup=32, threadgroup_memory={0: 40000}
        )
    assert_names(err.value, "threadgroup_argument", thread=None, lane=None)


def test_stack_overflow(diagnostics):
    with pytest.raises(StackOverflowError, match="fiber stack overflow") as err:
        diagnostics.run("large_local_array", [np.ones(4, np.float32)], grid=4, threadgroup=4)
    assert_names(err.value, "large_local_array", thread=0, lane=0)


def test_strict_mode(diagnostics, features):
    x = np.ones(32, np.float32)
    diagnostics.run("early_return", [x, np.uint32(16)], grid=32, threadgroup=32)
    assert (x[:16] == 2).all() and (x[16:] == 1).all()
    with pytest.raises(StrictError, match=r"reached after threads 16-31 returned") as err:
        diagnostics.run("early_return", [x, np.uint32(16)], grid=32, threadgroup=32, strict=True)
    assert_names(err.value, "early_return", thread=0, lane=0)
    with pytest.raises(
        StrictError, match="simd_shuffle_down reads lane 16, which is inactive"
    ) as err:
        features.run(
            "partial_simdgroup",
            [np.ones(40, np.float32), np.zeros((5, 40), np.float32)],
            grid=40,
            threadgroup=40,
            strict=True,
        )
    assert_names(err.value, "partial_simdgroup", thread=32, lane=0)


def test_wild_pointer(diagnostics):
    with pytest.raises(KernelFault, match="read at address 0x8") as err:
        diagnostics.run(
            "wild_pointer", [np.zeros(1, np.float32), np.uint64(8)], grid=1, threadgroup=1
        )
    assert_names(err.value, "wild_pointer", thread=0, lane=0)
