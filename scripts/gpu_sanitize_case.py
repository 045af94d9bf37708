"""A small run of every CUDA kernel family of mlx_ext.quantized_matmul (affine
and the fp modes), of mlx_ext.scaled_dot_product_attention (split-K, merge,
mma.sync, backward), of mlx_ext.sparse_matmul (decode, prefill, transposed and
sampled products of every format) and of mlx_ext.gather_qmm (decode, grouping
pass + tiles, generic, fused SwiGLU), for compute-sanitizer (scripts/gpu_run.sh):

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
    attention(rng)
    sparse_cases(rng)
    gather_cases(rng)
    mx.synchronize()
    print("sanitize case: all kernel families ran and matched the reference")


def attention(rng):
    """Ragged shapes (S, L and the capacity of a sliced cache off every tile)
    through each attention kernel: decode over float and 8-/4-bit K/V, the
    tensor-core prefill with every option, and the backward."""
    def check(q, k, v, **kw):
        out = mlx_ext.scaled_dot_product_attention(q, k, v, stream=mx.gpu, **kw)
        expected = ref.scaled_dot_product_attention(q, k, v, **kw)
        err = np.abs(ref.to_f64(out) - expected).max() / max(np.abs(expected).max(), 1e-30)
        assert err < 2e-2, (kw.get("bits"), q.shape, err)

    b, hq, hkv, s, d = 2, 6, 2, 301, 128
    q1 = mx.array(rng.standard_normal((b, hq, 1, d)), dtype=mx.bfloat16)
    k, v = (mx.array(rng.standard_normal((b, hkv, s + 33, d)), dtype=mx.bfloat16)[:, :, :s] for _ in range(2))
    check(q1, k, v, scale=d**-0.5, sinks=mx.array(rng.standard_normal(hq), dtype=mx.float32))
    for bits in [8, 4]:
        kq, vq = (mx.quantize(x, group_size=64, bits=bits) for x in (k, v))
        check(q1, kq, vq, scale=d**-0.5, bits=bits, kv_lengths=mx.array([200, 400], dtype=mx.int32))
    q = mx.array(rng.standard_normal((b, hq, 70, d)), dtype=mx.bfloat16)
    check(q, k, v, scale=d**-0.5, mask="causal", window=50, kv_lengths=mx.array([150, 301], dtype=mx.int32))
    check(q, k, v, scale=d**-0.5, mask=mx.array(rng.random((70, s)) < 0.5))
    qf = q.astype(mx.float32)
    check(qf, k.astype(mx.float32), v.astype(mx.float32), scale=d**-0.5, mask="causal")
    cot = mx.array(rng.standard_normal(q.shape), dtype=mx.bfloat16)
    grads = mx.grad(lambda q, k, v: (mlx_ext.scaled_dot_product_attention(
        q, k, v, scale=d**-0.5, mask="causal", stream=mx.gpu) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
    mx.eval(grads)
def sparse_cases(rng):
    """Each sparse format through the decode (M <= 32), prefill (M > 32,
    16-bit) and gradient kernels (x: the transposed product; values: the
    sampled product), on a ragged N."""
    from mlx_ext import sparse

    n, k = 200, 256
    for dtype in [mx.bfloat16, mx.float32]:
        w = mx.array(rng.standard_normal((n, k)) * 0.1, dtype=dtype)
        containers = {
            "csr": sparse.CSR.from_dense(w, mask=rng.random((n, k)) < 0.3),
            "bitmask": sparse.Bitmask.from_dense(w, mask=rng.random((n, k)) < 0.5),
            "bsr": sparse.BSR.from_dense(w[:192], block=32, mask=rng.random((6, 8)) < 0.4),
            "2:4": sparse.NM.from_dense(w, 2, 4),
            "4:8 q4": sparse.NM.from_dense(w, 4, 8, bits=4, group_size=64),
        }
        for name, ws in containers.items():
            dense = ref.sparse_to_dense(ws)
            for m in [1, 3, 19, 40]:
                x = mx.array(rng.standard_normal((m, k)), dtype=dtype)
                out = mlx_ext.sparse_matmul(x, ws, stream=mx.gpu)
                expected = ref.to_f64(x) @ dense.T
                err = np.abs(ref.to_f64(out) - expected).max() / max(np.abs(expected).max(), 1e-30)
                assert err < 2e-2, (name, dtype, m, err)
            if name == "4:8 q4":
                continue
            x = mx.array(rng.standard_normal((5, k)), dtype=mx.float32)
            values_key = "data"
            g = mx.grad(lambda x, v: mx.sum(mlx_ext.sparse_matmul(x, _with(ws, values_key, v), stream=mx.gpu) ** 2),
                        argnums=(0, 1))(x, ws[values_key])
            mx.eval(g)


def gather_cases(rng):
    """gather_qmm's decode, grouping + tiles and generic kernels, and the fused
    SwiGLU, on a ragged N and a K with a partial last span, with repeated
    experts, an expert with every row and lazy out-of-range indices (NaN rows)."""
    e, n, k = 6, 37, 320
    words = rng.integers(0, 2**32, size=(e, n, k * 4 // 32), dtype=np.uint64).astype(np.uint32)
    w_q = mx.array(words)
    for dtype in [mx.bfloat16, mx.float32]:
        scales = mx.array(rng.uniform(-0.1, 0.1, (e, n, k // 64)), dtype=dtype)
        biases = mx.array(rng.uniform(-0.5, 0.5, (e, n, k // 64)), dtype=dtype)
        for tokens in [1, 9, 40]:
            x = mx.array(rng.standard_normal((tokens, 1, 1, k)), dtype=dtype)
            rhs = rng.integers(0, e, (tokens, 4))
            rhs[0] = e - 1
            for idx in [rhs, np.where(rng.random(rhs.shape) < 0.2, e + 3, rhs)]:
                lazy = mx.array(idx.astype(np.uint32)) + mx.array(0, dtype=mx.uint32)
                out = mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=lazy, stream=mx.gpu)
                expected, _ = ref.gather_qmm_with_tolerance(x, w_q, scales, biases, None, idx, out_dtype=dtype)
                got = ref.to_f64(out)
                nan = np.isnan(expected)
                assert np.array_equal(np.isnan(got), nan), (dtype, tokens)
                err = np.abs(got[~nan] - expected[~nan]).max() / max(np.abs(expected[~nan]).max(), 1e-30)
                assert err < 2e-2, (dtype, tokens, err)
            sw = mlx_ext.gather_quantized_swiglu(0.02 * x, w_q, scales, biases, w_q, scales, biases,
                                                 rhs_indices=mx.array(rhs.astype(np.uint32)), stream=mx.gpu)
            mx.eval(sw)
        xt = mx.array(rng.standard_normal((3, 1, 1, k)), dtype=dtype)  # the vjp: transpose=False
        g = mx.grad(lambda x: mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=mx.array([[0, 5], [1, 1], [2, 3]]),
                                                 stream=mx.gpu).sum())(xt)
        mx.eval(g)


def _with(ws, key, values):
    """ws with its values replaced (the pattern unchanged)."""
    import copy

    out = copy.copy(ws)
    out[key] = values
    return out


if __name__ == "__main__":
    main()
