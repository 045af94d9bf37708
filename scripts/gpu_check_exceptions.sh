#!/usr/bin/env bash
# Does a C++ exception thrown inside an extension reach Python as an
# exception? Checks MLX alone, then mlx_ext; on a crash, prints the native
# backtrace (cuda-gdb also debugs host-only code). Run from the repo root.
mlx_only='
import mlx.core as mx
try:
    mx.reshape(mx.zeros((3,)), (2,))
except ValueError as e:
    print("mlx: C++ exception reached Python:", str(e)[:50])
'
with_ext='
import mlx.core as mx, mlx_ext
try:
    mlx_ext.quantized_matmul(mx.zeros((1, 64)), mx.zeros((8, 8), dtype=mx.uint32),
                             mx.zeros((8, 1)), mx.zeros((8, 1)), bits=0)
except ValueError as e:
    print("mlx_ext: C++ exception reached Python:", str(e)[:50])
'
status=0
for name in mlx_only with_ext; do
  if ! python3 -c "${!name}"; then
    status=1
    echo "$name: crashed; native backtrace:"
    timeout 120 cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 -c "${!name}" 2>&1 \
      | grep -E "^#|signal|SIG|libstdc|libgcc|_ext|core\.cpython|libmlx" | head -40
  fi
done
exit $status
