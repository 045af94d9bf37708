"""Dense bfloat16 x @ W.T through PyTorch on the GPU machine, the baseline the
kernel-only sparse bench (bench/cuda/sparse_matmul.cu) is read against when
MLX is not there: (N, K) = 14336 x 4096 and 4096 x 4096, M in {1, 16, 2048},
weight copies rotated over >= 256 MiB, CUDA events over rounds of 24 calls
(4 at M = 2048), median of 7 rounds.

    python3 bench/cuda/dense_torch.py
"""

import statistics

import torch


def time_us(fn, copies, calls):
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        for i in range(calls):
            fn(i % copies)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main():
    print(f"| torch {torch.__version__} dense bf16 | M | N | K | us/call | TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for n, k in [(14336, 4096), (4096, 4096)]:
        copies = max(2, -(-(256 << 20) // (2 * n * k)))
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
        for m in [1, 16, 2048]:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            us = time_us(lambda i: x @ ws[i].T, copies, 4 if m > 256 else 24)
            print(f"| dense | {m} | {n} | {k} | {us:.1f} | {2 * m * n * k / us / 1e6:.1f} |", flush=True)
        del ws


if __name__ == "__main__":
    main()
