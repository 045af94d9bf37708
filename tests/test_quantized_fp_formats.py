"""tests/reference.py's float64 decoding of the fp modes against MLX 0.32.4's
own mx.dequantize, bit for bit: on every code and every scale byte, and on
mx.quantize outputs of random matrices."""

import numpy as np
import pytest

import mlx.core as mx

from tests import reference

FP_MODES = list(reference.FP_MODES)


def _words(codes, bits):
    """Codes (rows, cols) packed as MLX packs them: little-endian within uint32."""
    codes = np.asarray(codes, dtype=np.uint64)
    per = 32 // bits
    codes = codes.reshape(codes.shape[0], -1, per)
    return (codes << (np.arange(per, dtype=np.uint64) * bits)).sum(-1).astype(np.uint32)


def _mlx_f64(w_q, scales, mode):
    out = mx.dequantize(mx.array(w_q), mx.array(scales), mode=mode, dtype=mx.float32)
    return np.array(out).astype(np.float64)


@pytest.mark.parametrize("mode", FP_MODES)
def test_every_code_with_every_scale(mode):
    """Row r holds every code, scaled by scale byte r: the whole decoding table."""
    group_size, bits = reference.FP_MODES[mode]
    codes = np.arange(2**bits)
    cols = max(len(codes), group_size)
    row = np.resize(codes, cols)
    w_q = _words(np.tile(row, (256, 1)), bits)
    scales = np.repeat(np.arange(256, dtype=np.uint8)[:, None], cols // group_size, axis=1)
    got = _mlx_f64(w_q, scales, mode)
    want = reference.dequantize_fp(w_q, scales, mode)
    # float32 output: where the exact value is out of float32's range MLX
    # overflows or flushes, as float32 must; elsewhere the two are identical.
    with np.errstate(over="ignore"):
        want32 = want.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(got, want32)
    if mode == "nvfp4":  # its scales stay in range: exact in float32 too
        finite = np.isfinite(want)
        np.testing.assert_array_equal(got[finite], want[finite])


@pytest.mark.parametrize("mode", FP_MODES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_quantize_outputs(mode, dtype):
    w = mx.random.normal((24, 256), key=mx.random.key(3)).astype(dtype) * 3
    w_q, scales = mx.quantize(w, mode=mode)
    got = reference.to_f64(mx.dequantize(w_q, scales, mode=mode, dtype=dtype))
    np.testing.assert_array_equal(got, reference.dequantize_fp(w_q, scales, mode))


def test_batched_unpack():
    w = mx.random.normal((2, 3, 8, 64), key=mx.random.key(1))
    w_q, scales = mx.quantize(w, mode="mxfp4")
    want = reference.dequantize_fp(w_q, scales, "mxfp4")
    assert want.shape == (2, 3, 8, 64)
    np.testing.assert_array_equal(reference.to_f64(mx.dequantize(w_q, scales, mode="mxfp4", dtype=mx.float32)),
                                  want)


@pytest.mark.parametrize("mode", FP_MODES)
def test_random_fp_quantized_decodes_finite(mode):
    w_q, scales = reference.random_fp_quantized(np.random.default_rng(0), (2, 16, 64), mode)
    want = reference.dequantize_fp(w_q, scales, mode)
    assert np.isfinite(want).all() and np.abs(want).max() < 65504
    np.testing.assert_array_equal(reference.to_f64(mx.dequantize(w_q, scales, mode=mode, dtype=mx.float32)), want)
