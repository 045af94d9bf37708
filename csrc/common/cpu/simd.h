// A small fixed-width float vector over the instruction set the including
// translation unit is compiled for. cpu_kernels.cpp is compiled once per ISA
// (CMakeLists.txt: mlx_ext_add_isa) with exactly one MLX_EXT_ISA_<name>
// defined; everything here lives in that ISA's namespace so that no inline
// function compiled with AVX-512 can be linked into the scalar build.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(MLX_EXT_ISA_avx512)
#include <immintrin.h>
#define MLX_EXT_ISA_NS avx512
#elif defined(MLX_EXT_ISA_avx2)
#include <immintrin.h>
#define MLX_EXT_ISA_NS avx2
#elif defined(MLX_EXT_ISA_neon)
#include <arm_neon.h>
#define MLX_EXT_ISA_NS neon
#elif defined(MLX_EXT_ISA_scalar)
#define MLX_EXT_ISA_NS scalar
#else
#error "compile simd.h users with exactly one MLX_EXT_ISA_<name> defined"
#endif

#define MLX_EXT_INLINE inline __attribute__((always_inline))

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {

#if defined(MLX_EXT_ISA_avx512)

struct VecF {
  static constexpr int width = 16;
  __m512 v;
};
MLX_EXT_INLINE VecF zero() { return {_mm512_setzero_ps()}; }
MLX_EXT_INLINE VecF broadcast(float a) { return {_mm512_set1_ps(a)}; }
MLX_EXT_INLINE VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
MLX_EXT_INLINE void store(float* p, VecF a) { _mm512_storeu_ps(p, a.v); }
MLX_EXT_INLINE VecF fma(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
MLX_EXT_INLINE VecF add(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
MLX_EXT_INLINE VecF load_half(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
MLX_EXT_INLINE VecF load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
MLX_EXT_INLINE float reduce_add(VecF a) { return _mm512_reduce_add_ps(a.v); }
// out[i] = the sum of v[i]'s lanes, i < 4: one transposing add tree, not four.
MLX_EXT_INLINE void reduce_add4(const VecF* v, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(v[0].v, v[1].v), _mm512_unpackhi_ps(v[0].v, v[1].v));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(v[2].v, v[3].v), _mm512_unpackhi_ps(v[2].v, v[3].v));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
      _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2))); // each 128-bit lane: partial a b c d
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(r), _mm512_extractf32x8_ps(r, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
// 16 bytes holding values 0..255 -> 16 floats.
MLX_EXT_INLINE VecF u8_to_float(__m128i b) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))};
}
// float((p[i] >> shift) & mask) for the kWidth bytes p[0 .. 15]: 8-bit codes
// (shift 0, mask 255) or one nibble of each byte (shift 0 or 4, mask 15).
MLX_EXT_INLINE VecF load_u8_field(const uint8_t* p, int shift, int mask) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return u8_to_float(_mm_and_si128(_mm_srli_epi16(b, shift), _mm_set1_epi8(char(mask))));
}
struct VecU {
  __m512i v;
};
MLX_EXT_INLINE VecU load_u32(const uint32_t* p) { return {_mm512_loadu_si512(p)}; }
// float(w & mask) and float(w >> shift), lane-wise; the integers must fit int32.
MLX_EXT_INLINE VecF masked_to_float(VecU w, uint32_t mask) {
  return {_mm512_cvtepi32_ps(_mm512_and_si512(w.v, _mm512_set1_epi32(int(mask))))};
}
MLX_EXT_INLINE VecF shifted_to_float(VecU w, int shift) {
  return {_mm512_cvtepi32_ps(_mm512_srli_epi32(w.v, shift))};
}
// Lane l of spread(p, s) is p[l / lanes], for s = spread_index(lanes): each
// of the first few values of p repeated over `lanes` consecutive lanes.
struct SpreadIndex {
  __m512i v;
};
MLX_EXT_INLINE SpreadIndex spread_index(int lanes) {
  alignas(64) int32_t idx[16];
  for (int l = 0; l < 16; ++l) idx[l] = l / lanes;
  return {_mm512_load_si512(idx)};
}
MLX_EXT_INLINE VecF spread(const float* p, SpreadIndex s) {
  return {_mm512_permutexvar_ps(s.v, _mm512_loadu_ps(p))};
}

#elif defined(MLX_EXT_ISA_avx2)

struct VecF {
  static constexpr int width = 8;
  __m256 v;
};
MLX_EXT_INLINE VecF zero() { return {_mm256_setzero_ps()}; }
MLX_EXT_INLINE VecF broadcast(float a) { return {_mm256_set1_ps(a)}; }
MLX_EXT_INLINE VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
MLX_EXT_INLINE void store(float* p, VecF a) { _mm256_storeu_ps(p, a.v); }
MLX_EXT_INLINE VecF fma(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
MLX_EXT_INLINE VecF add(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
MLX_EXT_INLINE VecF load_half(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
MLX_EXT_INLINE VecF load_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
MLX_EXT_INLINE float reduce_add(VecF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// out[i] = the sum of v[i]'s lanes, i < 4: one transposing add tree, not four.
MLX_EXT_INLINE void reduce_add4(const VecF* v, float* out) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(v[0].v, v[1].v), _mm256_unpackhi_ps(v[0].v, v[1].v));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(v[2].v, v[3].v), _mm256_unpackhi_ps(v[2].v, v[3].v));
  const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
      _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1)));
}
// The low 8 bytes of b, holding values 0..255 -> 8 floats.
MLX_EXT_INLINE VecF u8_to_float(__m128i b) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))};
}
// float((p[i] >> shift) & mask) for the kWidth bytes p[0 .. 7].
MLX_EXT_INLINE VecF load_u8_field(const uint8_t* p, int shift, int mask) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return u8_to_float(_mm_and_si128(_mm_srli_epi16(b, shift), _mm_set1_epi8(char(mask))));
}
struct VecU {
  __m256i v;
};
MLX_EXT_INLINE VecU load_u32(const uint32_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))};
}
MLX_EXT_INLINE VecF masked_to_float(VecU w, uint32_t mask) {
  return {_mm256_cvtepi32_ps(_mm256_and_si256(w.v, _mm256_set1_epi32(int(mask))))};
}
MLX_EXT_INLINE VecF shifted_to_float(VecU w, int shift) {
  return {_mm256_cvtepi32_ps(_mm256_srli_epi32(w.v, shift))};
}
struct SpreadIndex {
  __m256i v;
};
MLX_EXT_INLINE SpreadIndex spread_index(int lanes) {
  alignas(32) int32_t idx[8];
  for (int l = 0; l < 8; ++l) idx[l] = l / lanes;
  return {_mm256_load_si256(reinterpret_cast<const __m256i*>(idx))};
}
MLX_EXT_INLINE VecF spread(const float* p, SpreadIndex s) {
  return {_mm256_permutevar8x32_ps(_mm256_loadu_ps(p), s.v)};
}

#elif defined(MLX_EXT_ISA_neon)

struct VecF {
  static constexpr int width = 4;
  float32x4_t v;
};
MLX_EXT_INLINE VecF zero() { return {vdupq_n_f32(0.0f)}; }
MLX_EXT_INLINE VecF broadcast(float a) { return {vdupq_n_f32(a)}; }
MLX_EXT_INLINE VecF load(const float* p) { return {vld1q_f32(p)}; }
MLX_EXT_INLINE void store(float* p, VecF a) { vst1q_f32(p, a.v); }
MLX_EXT_INLINE VecF fma(VecF a, VecF b, VecF c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
MLX_EXT_INLINE VecF add(VecF a, VecF b) { return {vaddq_f32(a.v, b.v)}; }
MLX_EXT_INLINE VecF load_half(const uint16_t* p) {
  return {vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)))};
}
MLX_EXT_INLINE VecF load_bf16(const uint16_t* p) {
  return {vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16))};
}
MLX_EXT_INLINE float reduce_add(VecF a) { return vaddvq_f32(a.v); }
// out[i] = the sum of v[i]'s lanes, i < 4.
MLX_EXT_INLINE void reduce_add4(const VecF* v, float* out) {
  vst1q_f32(out, vpaddq_f32(vpaddq_f32(v[0].v, v[1].v), vpaddq_f32(v[2].v, v[3].v)));
}
// float((p[i] >> shift) & mask) for the kWidth bytes p[0 .. 3].
MLX_EXT_INLINE VecF load_u8_field(const uint8_t* p, int shift, int mask) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  uint8x8_t b = vcreate_u8(w);
  b = vand_u8(vshl_u8(b, vdup_n_s8(int8_t(-shift))), vdup_n_u8(uint8_t(mask)));
  return {vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(b))))};
}
struct VecU {
  uint32x4_t v;
};
MLX_EXT_INLINE VecU load_u32(const uint32_t* p) { return {vld1q_u32(p)}; }
MLX_EXT_INLINE VecF masked_to_float(VecU w, uint32_t mask) {
  return {vcvtq_f32_u32(vandq_u32(w.v, vdupq_n_u32(mask)))};
}
MLX_EXT_INLINE VecF shifted_to_float(VecU w, int shift) {
  return {vcvtq_f32_u32(vshlq_u32(w.v, vdupq_n_s32(-shift)))};
}
struct SpreadIndex {
  int lanes;
};
MLX_EXT_INLINE SpreadIndex spread_index(int lanes) { return {lanes}; }
MLX_EXT_INLINE VecF spread(const float* p, SpreadIndex s) {
  float r[4];
  for (int l = 0; l < 4; ++l) r[l] = p[l / s.lanes];
  return {vld1q_f32(r)};
}

#else // scalar: plain arrays the compiler may auto-vectorise with the baseline ISA

struct VecF {
  static constexpr int width = 8;
  float v[8];
};
MLX_EXT_INLINE VecF zero() { return VecF{}; }
MLX_EXT_INLINE VecF broadcast(float a) {
  VecF r;
  for (int i = 0; i < 8; ++i) r.v[i] = a;
  return r;
}
MLX_EXT_INLINE VecF load(const float* p) {
  VecF r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
MLX_EXT_INLINE void store(float* p, VecF a) { std::memcpy(p, a.v, sizeof(a.v)); }
MLX_EXT_INLINE VecF fma(VecF a, VecF b, VecF c) {
  for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
MLX_EXT_INLINE VecF add(VecF a, VecF b) {
  for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
  return a;
}
MLX_EXT_INLINE float reduce_add(VecF a) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}
// out[i] = the sum of v[i]'s lanes, i < 4.
MLX_EXT_INLINE void reduce_add4(const VecF* v, float* out) {
  for (int i = 0; i < 4; ++i) out[i] = reduce_add(v[i]);
}
// float((p[i] >> shift) & mask) for the kWidth bytes p[0 .. 7].
MLX_EXT_INLINE VecF load_u8_field(const uint8_t* p, int shift, int mask) {
  VecF r;
  for (int i = 0; i < 8; ++i) r.v[i] = float((p[i] >> shift) & mask);
  return r;
}
struct VecU {
  uint32_t v[8];
};
MLX_EXT_INLINE VecU load_u32(const uint32_t* p) {
  VecU r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
MLX_EXT_INLINE VecF masked_to_float(VecU w, uint32_t mask) {
  VecF r;
  for (int i = 0; i < 8; ++i) r.v[i] = float(int32_t(w.v[i] & mask));
  return r;
}
MLX_EXT_INLINE VecF shifted_to_float(VecU w, int shift) {
  VecF r;
  for (int i = 0; i < 8; ++i) r.v[i] = float(int32_t(w.v[i] >> shift));
  return r;
}
struct SpreadIndex {
  int lanes;
};
MLX_EXT_INLINE SpreadIndex spread_index(int lanes) { return {lanes}; }
MLX_EXT_INLINE VecF spread(const float* p, SpreadIndex s) {
  VecF r;
  for (int l = 0; l < 8; ++l) r.v[l] = p[l / s.lanes];
  return r;
}

#endif

constexpr int kWidth = VecF::width;

// Scalar conversions of the 16-bit float formats MLX stores (bit patterns in
// uint16_t so that kernels need no MLX types). Hardware F16C where the ISA
// has it, exact software conversion otherwise.
MLX_EXT_INLINE float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

MLX_EXT_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40); // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u); // round to nearest even
  return uint16_t(u >> 16);
}

#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
MLX_EXT_INLINE float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
MLX_EXT_INLINE uint16_t float_to_half(float f) {
  return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
#elif defined(MLX_EXT_ISA_neon)
MLX_EXT_INLINE float half_to_float(uint16_t h) {
  __fp16 x;
  std::memcpy(&x, &h, 2);
  return float(x);
}
MLX_EXT_INLINE uint16_t float_to_half(float f) {
  __fp16 x = __fp16(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}
#else
MLX_EXT_INLINE float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13); // inf / NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else { // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    u = sign | uint32_t(112 - e) << 23 | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
MLX_EXT_INLINE uint16_t float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u; // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u; // rounds to inf
  if (a < 0x38800000u) { // subnormal or zero half: add the magic to round
    float fa, magic = 0.5f;
    std::memcpy(&fa, &a, 4);
    fa += magic;
    uint32_t r;
    std::memcpy(&r, &fa, 4);
    return sign | uint16_t(r - 0x3f000000u);
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd; // rebias exponent (-112 << 23) and round to even
  return sign | uint16_t(a >> 13);
}
#endif

#if defined(MLX_EXT_ISA_scalar)
MLX_EXT_INLINE VecF load_half(const uint16_t* p) {
  VecF r;
  for (int i = 0; i < 8; ++i) r.v[i] = half_to_float(p[i]);
  return r;
}
MLX_EXT_INLINE VecF load_bf16(const uint16_t* p) {
  VecF r;
  for (int i = 0; i < 8; ++i) r.v[i] = bf16_to_float(p[i]);
  return r;
}
#endif

} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
