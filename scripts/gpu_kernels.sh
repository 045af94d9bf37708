#!/usr/bin/env bash
# Builds and runs bench/cuda/kernels.cu on the GPU machine: the CUDA kernels
# of the quantized matmul checked against a float64 reference and timed on
# their own, without MLX. Needs nvcc (CUDA 12.x or 13) and a Hopper GPU (the
# Hopper GEMM is built for sm_90a). Output under $OUT (default /tmp).
set -euo pipefail
OUT=${OUT:-/tmp}
nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc bench/cuda/kernels.cu -o "$OUT/qmm_kernels"
"$OUT/qmm_kernels" "$@" | tee "$OUT/kernels.log"
