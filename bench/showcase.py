"""A short showcase of mlx_ext.quantized_matmul on a realistic layer: the
MLP up-projection of a Llama-3-8B-sized model (4096 -> 14336), 4-bit, group
size 64, as mx.quantize packs it. Shows that the values agree with
mx.quantized_matmul and how long each takes, on the CPU."""

import mlx.core as mx
import mlx_ext

from . import harness

N, K, BITS, GROUP_SIZE = 14336, 4096, 4, 64


def median_ms(fn, repeats):
    return 1e3 * harness.time_calls(lambda i: fn(), warmup=1, repeats=repeats)["median_s"]


def main():
    mx.set_default_device(mx.cpu)
    print(f"mlx {mx.__version__}, mlx_ext CPU kernels: {mlx_ext.get_cpu_isa()}, "
          f"{mlx_ext.get_num_threads()} threads")
    print(f"layer: {K} -> {N}, {BITS}-bit affine, group size {GROUP_SIZE}\n")
    rows = []
    for dtype in (mx.float16, mx.float32):
        w = (mx.random.normal((N, K), key=mx.random.key(0)) * 0.02).astype(dtype)
        w_q, scales, biases = mx.quantize(w, group_size=GROUP_SIZE, bits=BITS)
        mx.eval(w_q, scales, biases)
        for m in (1, 8):
            x = mx.random.normal((m, K), key=mx.random.key(m)).astype(dtype)
            ours = lambda: mx.eval(mlx_ext.quantized_matmul(x, w_q, scales, biases))
            theirs = lambda: mx.eval(mx.quantized_matmul(x, w_q, scales, biases))
            a = mlx_ext.quantized_matmul(x, w_q, scales, biases).astype(mx.float32)
            b = mx.quantized_matmul(x, w_q, scales, biases).astype(mx.float32)
            rel = float(mx.abs(a - b).max() / mx.abs(b).max())
            slow = dtype == mx.float16 and m > 1  # MLX's float16 CPU kernel takes seconds
            t_ours = median_ms(ours, 20)
            t_theirs = median_ms(theirs, 1 if dtype == mx.float16 else 5) if not slow else None
            rows.append((str(dtype).split(".")[-1], m, t_ours, t_theirs, rel))
    print(f"{'activations':>11} {'M':>3} {'mlx_ext ms':>11} {'mx.quantized_matmul ms':>23} "
          f"{'speed-up':>9} {'max rel diff':>13}")
    for name, m, t_ours, t_theirs, rel in rows:
        theirs = f"{t_theirs:23.2f}" if t_theirs else f"{'(skipped: seconds)':>23}"
        speedup = f"{t_theirs / t_ours:8.0f}x" if t_theirs else f"{'':>9}"
        print(f"{name:>11} {m:>3} {t_ours:11.2f} {theirs} {speedup} {rel:13.1e}")
    print("\nmax rel diff: |mlx_ext - mx| / max|mx|. For float16, MLX's CPU kernel accumulates in "
          "float16 and mlx_ext in float32,\nso part of the difference is MLX's rounding "
          "(tests/test_quantized_matmul.py checks both against a float64 reference).")


if __name__ == "__main__":
    main()
