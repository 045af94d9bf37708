// Float -> bfloat conversions that clang emits as libcalls: the libgcc of
// Debian 12 (GCC 12) predates them. Round to nearest even, NaN stays NaN.
#include <stdint.h>

#include "abi.h"

namespace {

__bf16 bits_to_bf16(uint16_t bits) { return __builtin_bit_cast(__bf16, bits); }

__bf16 round_to_bf16(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bits_to_bf16(uint16_t((u >> 16) | 0x40));
  u += 0x7fffu + ((u >> 16) & 1u);
  return bits_to_bf16(uint16_t(u >> 16));
}

}  // namespace

EMU_EXPORT __bf16 __truncsfbf2(float f) { return round_to_bf16(f); }

// Through float, so rounded twice: this differs from one rounding only for a
// double within half a float ulp of a bfloat tie (MSL has no double anyway).
EMU_EXPORT __bf16 __truncdfbf2(double d) { return round_to_bf16(float(d)); }
