"""A small run of every CUDA kernel family of mlx_ext.quantized_matmul (affine
and the fp modes), for
compute-sanitizer (scripts/gpu_run.sh):

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize_case.py

Shapes with ragged edges (N not a multiple of any tile, M not a multiple of
the GEMM's rows) so that out-of-bounds reads or writes would show.
"""

import numpy as np

import mlx.core as mx
import mlx_ext

from tests import reference as ref


def check(x, w_q, scales, biases, bias, **kw):
    out = mlx_ext.quantized_matmul(x, w_q, scales, biases, bias=bias, stream=mx.gpu, **kw)
    expected = ref.quantized_matmul(x, w_q, scales, biases, bias=bias, **kw)
    err = np.abs(ref.to_f64(out) - expected).max() / max(np.abs(expected).max(), 1e-30)
    assert err < 1e-2, (kw, x.shape, err)
    return err


def main():
    rng = np.random.default_rng(0)
    for dtype in [mx.bfloat16, mx.float32]:
        for bits in [3, 4, 8]:
            for transpose in [True, False]:
                gs = 64
                k, n = (256, 37) if transpose else (40, 3 * gs)
                rows, cols = (n, k) if transpose else (k, n)
                words = rng.integers(0, 2**32, size=(rows, cols * bits // 32), dtype=np.uint64)
                w_q = mx.array(words.astype(np.uint32))
                scales = mx.array(rng.uniform(-0.1, 0.1, (rows, cols // gs)), dtype=dtype)
                biases = mx.array(rng.uniform(-0.5, 0.5, (rows, cols // gs)), dtype=dtype)
                bias = mx.array(rng.standard_normal(n), dtype=dtype)
                for m in [1, 3, 6, 12, 19, 70]:
                    x = mx.array(rng.standard_normal((m, k)), dtype=dtype)
                    check(x, w_q, scales, biases, bias, transpose=transpose, group_size=gs, bits=bits)
                x = mx.array(rng.standard_normal((1, 3 * k + 1)), dtype=dtype)[:, 1:1 + k]
                check(mx.contiguous(x), w_q, scales, biases, None, transpose=transpose,
                      group_size=gs, bits=bits)
    for mode in ["mxfp4", "nvfp4", "mxfp8"]:  # the fp kernels (qmm_fp.cu), ragged edges too
        for dtype in [mx.bfloat16, mx.float32]:
            for transpose in [True, False]:
                gs, bits = ref.FP_MODES[mode]
                k, n = (8 * gs, 37) if transpose else (40, 3 * gs)
                rows, cols = (n, k) if transpose else (k, n)
                w_q, scales = ref.random_fp_quantized(rng, (rows, cols), mode)
                for m in [1, 3, 19, 70]:
                    x = mx.array(rng.standard_normal((m, k)), dtype=dtype)
                    check(x, w_q, scales, None, None, transpose=transpose, group_size=gs, bits=bits,
                          mode=mode)
    mx.synchronize()
    print("sanitize case: all kernel families ran and matched the reference")


if __name__ == "__main__":
    main()
