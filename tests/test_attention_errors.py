"""Every bad input to mlx_ext.scaled_dot_product_attention raises a ValueError
or TypeError that starts with "[mlx_ext.scaled_dot_product_attention]" and
names the argument, before any kernel runs."""

import pytest

import mlx.core as mx
import mlx_ext

PREFIX = r"^\[mlx_ext\.scaled_dot_product_attention\] "
B, HQ, HKV, L, S, D = 2, 4, 2, 3, 10, 64


def quantized(bits=4, group_size=64, s=S, d=D, dtype=mx.float32):
    return (mx.zeros((B, HKV, s, d * bits // 32), dtype=mx.uint32),
            mx.zeros((B, HKV, s, d // group_size), dtype=dtype),
            mx.zeros((B, HKV, s, d // group_size), dtype=dtype))


def call(q=None, k=None, v=None, **kwargs):
    q = mx.zeros((B, HQ, L, D)) if q is None else q
    k = mx.zeros((B, HKV, S, D)) if k is None else k
    v = mx.zeros((B, HKV, S, D)) if v is None else v
    kwargs.setdefault("scale", 0.125)
    mx.eval(mlx_ext.scaled_dot_product_attention(q, k, v, **kwargs))


CASES = [
    # (arguments, error, message after the prefix)
    (dict(q=mx.zeros((HQ, L, D))), ValueError, r"q must have shape \(B, Hq, L, D\)"),
    (dict(k=mx.zeros((B, HKV, D))), ValueError, r"k must have shape \(B, Hkv, S, D\)"),
    (dict(v=mx.zeros((1, B, HKV, S, D))), ValueError, r"v must have shape \(B, Hkv, S, D\)"),
    (dict(q=mx.zeros((B, HQ, L, D), dtype=mx.int32)), TypeError, "q must be float32, float16 or bfloat16"),
    (dict(k=mx.zeros((B, HKV, S, D), dtype=mx.int8)), TypeError, "k must be float32"),
    (dict(q=mx.zeros((B, HQ, L, 12)), k=mx.zeros((B, HKV, S, 12)), v=mx.zeros((B, HKV, S, 12))),
     ValueError, "q has head dim D=12"),
    (dict(q=mx.zeros((B, HQ, L, 264)), k=mx.zeros((B, HKV, S, 264)), v=mx.zeros((B, HKV, S, 264))),
     ValueError, "q has head dim D=264"),
    (dict(k=mx.zeros((B, 3, S, D)), v=mx.zeros((B, 3, S, D))), ValueError, r"q's 4 heads are not a multiple of k's 3"),
    (dict(k=mx.zeros((B, HKV, S, 32))), ValueError, "k has head dim 32"),
    (dict(v=mx.zeros((B, HKV, S, 32))), ValueError, "v has head dim 32"),
    (dict(v=mx.zeros((B, HKV, S + 1, D))), ValueError, "v has 2 heads and S=11 keys"),
    (dict(v=mx.zeros((B, 1, S, D))), ValueError, "v has 1 heads and S=10 keys"),
    (dict(k=mx.zeros((1, HKV, S, D))), ValueError, "k has batch size 1"),
    (dict(mask="sliding"), ValueError, "mask='sliding' is not supported"),
    (dict(mask=mx.zeros((L, S), dtype=mx.int32)), TypeError, "mask must be bool"),
    (dict(mask=mx.zeros((L, S + 1), dtype=mx.bool_)), ValueError, r"mask with shape \(3,11\) does not broadcast"),
    (dict(mask=mx.zeros((3, HQ, L, S))), ValueError, r"mask with shape \(3,4,3,10\) does not broadcast"),
    (dict(mask=mx.zeros((1, 1, 1, L, S))), ValueError, "mask must have at most 4 dimensions"),
    (dict(q=mx.zeros((B, HQ, S + 1, D)), mask="causal"), ValueError, r"mask='causal' needs L <= S"),
    (dict(q=mx.zeros((B, HQ, S + 1, D)), window=4), ValueError, "window needs L <= S"),
    (dict(sinks=mx.zeros((HQ + 1,))), ValueError, r"sinks must have shape \(Hq,\)"),
    (dict(sinks=mx.zeros((HQ,), dtype=mx.int32)), TypeError, "sinks must be float32"),
    (dict(window=0), ValueError, "window=0 must be >= 1"),
    (dict(window=-3), ValueError, "window=-3 must be >= 1"),
    (dict(kv_lengths=mx.zeros((B,), dtype=mx.int64)), TypeError, "kv_lengths must be int32"),
    (dict(kv_lengths=mx.zeros((B, 1), dtype=mx.int32)), ValueError, r"kv_lengths must have shape \(B,\)"),
    (dict(kv_lengths=mx.zeros((B + 1,), dtype=mx.int32)), ValueError, r"kv_lengths must have shape \(B,\)"),
    (dict(bits=4), ValueError, "bits=4 is only for quantized k and v"),
    (dict(k=quantized()), ValueError, "k and v must both be arrays or both be"),
    (dict(v=quantized()), ValueError, "k and v must both be arrays or both be"),
    (dict(k=quantized(), v=quantized(), bits=6), ValueError, "bits=6 is not supported"),
    (dict(k=quantized(), v=quantized(), group_size=48), ValueError, "group_size=48 is not supported"),
    (dict(k=quantized()[:2], v=quantized()), ValueError, "k must be an array or a .* tuple of 2"),
    (dict(k=quantized(bits=8), v=quantized(), bits=4), ValueError, r"k\[0\] \(w_q\) must have shape"),
    (dict(k=quantized(), v=quantized(s=S + 1)), ValueError, r"v has 2 heads and S=11"),
    (dict(k=quantized(), v=quantized(group_size=32)), ValueError, r"v\[1\] \(scales\) must have shape"),
    (dict(k=quantized(), v=quantized(dtype=mx.int32)), TypeError, r"v\[1\] \(scales\) must be float32"),
    (dict(k=(quantized()[0], quantized()[1], mx.zeros((B, HKV, S, 1), dtype=mx.float16)), v=quantized()),
     TypeError, r"k\[2\] \(biases\) must have the dtype of k\[1\]"),
    (dict(k=(quantized()[0].astype(mx.int32),) + quantized()[1:], v=quantized()), TypeError,
     r"k\[0\] \(w_q\) must be uint32"),
    (dict(k=(mx.zeros((B, HKV, S, 4), dtype=mx.uint32),) + quantized()[1:], v=quantized()), ValueError,
     r"k\[0\] \(w_q\) has .* neither 4 nor 8"),
    (dict(k=quantized(group_size=128, d=D), v=quantized(group_size=128, d=D), group_size=128),
     ValueError, "q's head dim D=64 is not a multiple of group_size=128"),
]


@pytest.mark.parametrize("kwargs, error, message", CASES)
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=PREFIX + message):
        call(**kwargs)

