"""mlx_ext.quantized_matmul against tests/reference.py (float64).

Weights are random uint32 words (every bit pattern is a valid packed matrix)
with random scales and biases, so all values of every bit width occur.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx.core as mx
import mlx_ext

from . import reference as ref

BITS = [2, 3, 4, 5, 6, 8]
GROUP_SIZES = [32, 64, 128]
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
ISAS = mlx_ext.available_cpu_isas()


def cuda_rounds_w(dtype):
    """On MLX's CUDA backend the kernels for float16 / bfloat16 activations
    round each dequantized weight s * q + b to that type before the tensor
    cores multiply (as MLX's own quantized kernels do); the CPU and Metal
    kernels keep it in float32."""
    on_cuda = mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available()
    return on_cuda and dtype != mx.float32


def assert_matches_reference(out, x, w_q, scales, biases, *, transpose, group_size, bits, bias,
                             w_rounded=None):
    """w_rounded: whether the kernel rounded each weight to out's dtype (one
    more rounding per term); by default, cuda_rounds_w(out.dtype)."""
    expected, tol = ref.quantized_matmul_with_tolerance(
        x, w_q, scales, biases, out_dtype=out.dtype, transpose=transpose, group_size=group_size, bits=bits,
        bias=bias, w_rounded=cuda_rounds_w(out.dtype) if w_rounded is None else w_rounded,
    )
    ref.assert_within_tolerance(out, expected, tol)


@st.composite
def problems(draw):
    bits = draw(st.sampled_from(BITS))
    group_size = draw(st.sampled_from(GROUP_SIZES))
    transpose = draw(st.booleans())
    if transpose:  # groups run along K
        k = group_size * draw(st.integers(1, 4))
        n = draw(st.integers(1, 70))
    else:  # groups run along N
        k = draw(st.integers(1, 70))
        n = group_size * draw(st.integers(1, 3))
    return dict(
        bits=bits,
        group_size=group_size,
        transpose=transpose,
        k=k,
        n=n,
        m=draw(st.sampled_from([1, 2, 3, 4, 5, 8, 11, 12, 13, 25])),
        batch=tuple(draw(st.lists(st.integers(1, 3), max_size=2))),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        with_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_x(rng, shape, dtype, layout):
    """x of `shape`, contiguous or a non-contiguous view."""
    if layout == "strided":
        full = rng.standard_normal(shape[:-1] + (2 * shape[-1],))
        return mx.array(full, dtype=dtype)[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        flipped = shape[:-2] + (shape[-1], shape[-2])
        return mx.swapaxes(mx.array(rng.standard_normal(flipped), dtype=dtype), -1, -2)
    return mx.array(rng.standard_normal(shape), dtype=dtype)


# The isa fixture sets process-wide state that holds for every example.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(p=problems())
def test_matches_reference(isa, p):
    rng = np.random.default_rng(p["seed"])
    rows, cols = (p["n"], p["k"]) if p["transpose"] else (p["k"], p["n"])
    w_q, scales, biases = ref.random_quantized(rng, rows, cols, p["bits"], p["group_size"], p["dtype"])
    x = make_x(rng, p["batch"] + (p["m"], p["k"]), p["dtype"], p["layout"])
    bias = mx.array(rng.standard_normal(p["n"]), dtype=p["dtype"]) if p["with_bias"] else None
    out = mlx_ext.quantized_matmul(
        x, w_q, scales, biases, transpose=p["transpose"], group_size=p["group_size"],
        bits=p["bits"], bias=bias,
    )
    assert out.dtype == p["dtype"]
    assert_matches_reference(
        out, x, w_q, scales, biases, transpose=p["transpose"], group_size=p["group_size"],
        bits=p["bits"], bias=bias,
    )


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_every_bit_width_on_a_layer_sized_problem(isa, bits, transpose, m):
    """Shapes large enough for every kernel path: the vectorised chunks of the
    GEMV, a K tail after them, several GEMM K and N blocks with ragged edges."""
    rng = np.random.default_rng(bits * 100 + m)
    k, n = (640, 300) if transpose else (300, 640)
    rows, cols = (n, k) if transpose else (k, n)
    w_q, scales, biases = ref.random_quantized(rng, rows, cols, bits, 64, mx.float32)
    x = mx.array(rng.standard_normal((m, k)), dtype=mx.float32)
    bias = mx.array(rng.standard_normal(n), dtype=mx.float32)
    out = mlx_ext.quantized_matmul(x, w_q, scales, biases, transpose=transpose, bits=bits, bias=bias)
    assert_matches_reference(
        out, x, w_q, scales, biases, transpose=transpose, group_size=64, bits=bits, bias=bias
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 32])
def test_agrees_with_mlx_on_mx_quantize_weights(dtype, m):
    """Weights packed by mx.quantize give what mx.quantized_matmul gives, and
    never a less accurate result (MLX's CPU kernel accumulates float16 and
    bfloat16 in that type; mlx_ext accumulates in float32)."""
    k = 256
    w = mx.random.normal((96, k), key=mx.random.key(1)).astype(dtype)
    w_q, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((2, m, k), key=mx.random.key(2)).astype(dtype)
    ours = mlx_ext.quantized_matmul(x, w_q, scales, biases)
    theirs = mx.quantized_matmul(x, w_q, scales, biases)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = float(mx.abs(theirs.astype(mx.float32)).max())
    diff = float(mx.abs((ours - theirs).astype(mx.float32)).max())
    accumulation_eps = ref.EPS[mx.float32] if dtype == mx.float32 else ref.EPS[dtype]
    assert diff <= (4 * np.sqrt(k) * accumulation_eps + 2 * ref.EPS[dtype]) * scale

    exact = ref.quantized_matmul(x, w_q, scales, biases)
    our_err = np.abs(ref.to_f64(ours) - exact).max()
    their_err = np.abs(ref.to_f64(theirs) - exact).max()
    assert our_err <= their_err * 1.01 + 4 * np.sqrt(k) * ref.EPS[mx.float32] * scale


def test_mixed_dtypes_promote_like_mlx():
    rng = np.random.default_rng(0)
    w_q, scales, biases = ref.random_quantized(rng, 16, 64, 4, 64, mx.float16)
    x = mx.array(rng.standard_normal((3, 64)), dtype=mx.bfloat16)
    bias = mx.array(rng.standard_normal(16), dtype=mx.float32)
    out = mlx_ext.quantized_matmul(x, w_q, scales, biases, bias=bias)
    assert out.dtype == mx.float32
    assert_matches_reference(out, x, w_q, scales, biases, transpose=True, group_size=64, bits=4, bias=bias)


def test_vector_x_and_empty_batch():
    rng = np.random.default_rng(1)
    w_q, scales, biases = ref.random_quantized(rng, 24, 128, 4, 64, mx.float32)
    x = mx.array(rng.standard_normal(128), dtype=mx.float32)
    out = mlx_ext.quantized_matmul(x, w_q, scales, biases)
    assert out.shape == (24,)
    assert_matches_reference(out, x, w_q, scales, biases, transpose=True, group_size=64, bits=4, bias=None)
    empty = mlx_ext.quantized_matmul(mx.zeros((0, 128)), w_q, scales, biases)
    assert empty.shape == (0, 24)


@pytest.mark.parametrize("m", [1, 20])
def test_empty_reduction_gives_the_bias(isa, m):
    """K = 0: every output is the bias (or zero), for the GEMV and GEMM paths."""
    w_q = mx.zeros((5, 0), dtype=mx.uint32)
    scales = mx.zeros((5, 0))
    bias = mx.arange(5, dtype=mx.float32)
    out = mlx_ext.quantized_matmul(mx.zeros((m, 0)), w_q, scales, scales, bias=bias)
    np.testing.assert_array_equal(np.array(out), np.broadcast_to(np.arange(5.0), (m, 5)))
    out = mlx_ext.quantized_matmul(mx.zeros((m, 0)), w_q, scales, scales)
    np.testing.assert_array_equal(np.array(out), np.zeros((m, 5)))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_results(threads):
    rng = np.random.default_rng(2)
    w_q, scales, biases = ref.random_quantized(rng, 200, 256, 4, 32, mx.float32)
    x = mx.array(rng.standard_normal((20, 256)), dtype=mx.float32)
    before = mlx_ext.get_num_threads()
    try:
        mlx_ext.set_num_threads(threads)
        assert mlx_ext.get_num_threads() == threads
        out = mlx_ext.quantized_matmul(x, w_q, scales, biases, group_size=32)
        mx.eval(out)
    finally:
        mlx_ext.set_num_threads(before)
    reference_out = mlx_ext.quantized_matmul(x, w_q, scales, biases, group_size=32)
    assert np.array_equal(np.array(out), np.array(reference_out))


def test_cpu_isa_control():
    assert "scalar" in ISAS and ISAS[-1] == "scalar"
    assert mlx_ext.get_cpu_isa() == ISAS[0]
    with pytest.raises(ValueError, match=r"^\[mlx_ext.set_cpu_isa\] isa='sse9'"):
        mlx_ext.set_cpu_isa("sse9")
    mlx_ext.set_cpu_isa("scalar")
    assert mlx_ext.get_cpu_isa() == "scalar"
    mlx_ext.set_cpu_isa("auto")
    assert mlx_ext.get_cpu_isa() == ISAS[0]
