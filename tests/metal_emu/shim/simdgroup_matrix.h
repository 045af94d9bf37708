// simdgroup_matrix<T, 8, 8> with the hardware's distribution of elements:
// each of the 32 lanes holds 2 elements, row r and columns c, c+1 of
//   q = lane / 4,  r = (q & 4) + (lane / 2) % 4,  c = (q & 2) * 2 + (lane % 2) * 2
// (the mapping MLX's BaseMMAFrag::get_coord relies on), so code that writes
// through thread_elements() sees what it would on a GPU. Loads and stores
// touch only the lane's own elements; a multiply is one collective whose
// 8x8 product is computed once, in float, for the whole simdgroup.
#pragma once

#include "simd.h"

namespace metal {

namespace emu_matrix {
struct Coord {
  uint row, col;
};
inline Coord lane_coord(uint lane) {
  uint q = lane / 4;
  return {(q & 4) + (lane / 2) % 4, (q & 2) * 2 + (lane % 2) * 2};
}
}  // namespace emu_matrix

template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "the emulator implements 8x8 simdgroup matrices");
};

template <class T>
struct simdgroup_matrix<T, 8, 8> {
  vec<T, 2> elements;

  simdgroup_matrix() = default;
  // The diagonal matrix diag(d, ..., d).
  explicit simdgroup_matrix(T d) {
    emu_matrix::Coord c = emu_matrix::lane_coord(emu_self()->lane);
    elements = vec<T, 2>(c.row == c.col ? d : T(0), c.row == c.col + 1 ? d : T(0));
  }
  vec<T, 2>& thread_elements() { return elements; }
  const vec<T, 2>& thread_elements() const { return elements; }
};

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  m.elements = vec<T, 2>(value);
  return m;
}

// Element (r, c) of the matrix at `origin` (x = column, y = row) of a
// row-major source with `stride` elements per row; transposed: (c, r).
inline ulong emu_matrix_offset(uint r, uint c, ulong stride, ulong2 origin, bool transpose) {
  return transpose ? (origin.y + c) * stride + origin.x + r : (origin.y + r) * stride + origin.x + c;
}

template <class T, class U>
void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const U* src, ulong elements_per_row = 8,
                    ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  emu_matrix::Coord c = emu_matrix::lane_coord(emu_self()->lane);
  for (uint j = 0; j < 2; ++j) {
    d.elements[j] =
        T(src[emu_matrix_offset(c.row, c.col + j, elements_per_row, matrix_origin, transpose_matrix)]);
  }
}

template <class T, class U>
void simdgroup_store(const simdgroup_matrix<T, 8, 8>& a, U* dst, ulong elements_per_row = 8,
                     ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  emu_matrix::Coord c = emu_matrix::lane_coord(emu_self()->lane);
  for (uint j = 0; j < 2; ++j) {
    dst[emu_matrix_offset(c.row, c.col + j, elements_per_row, matrix_origin, transpose_matrix)] =
        U(a.elements[j]);
  }
}

// D = A * B + C.
template <class TD, class TA, class TB, class TC>
void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d,
                                   const simdgroup_matrix<TA, 8, 8>& a,
                                   const simdgroup_matrix<TB, 8, 8>& b,
                                   const simdgroup_matrix<TC, 8, 8>& c, EmuSite site = EMU_HERE) {
  struct Lane {
    float a[2], b[2], c[2];
  };
  const char* what = "simdgroup_multiply_accumulate";
  Lane mine = {{float(a.elements[0]), float(a.elements[1])},
               {float(b.elements[0]), float(b.elements[1])},
               {float(c.elements[0]), float(c.elements[1])}};
  EmuSimdView* v = emu_simd::publish(mine, what, site);
  float* product = reinterpret_cast<float*>(v->shared);
  if (!v->shared_ready) {
    v->shared_ready = 1;
    float A[8][8], B[8][8];
    for (uint lane = 0; lane < EMU_SIMD_WIDTH; ++lane) {
      Lane in = emu_simd::read_lane<Lane>(v, lane, what);
      emu_matrix::Coord p = emu_matrix::lane_coord(lane);
      for (uint j = 0; j < 2; ++j) {
        A[p.row][p.col + j] = in.a[j];
        B[p.row][p.col + j] = in.b[j];
        product[p.row * 8 + p.col + j] = in.c[j];
      }
    }
    for (uint i = 0; i < 8; ++i)
      for (uint k = 0; k < 8; ++k)
        for (uint j = 0; j < 8; ++j) product[i * 8 + j] += A[i][k] * B[k][j];
  }
  emu_matrix::Coord p = emu_matrix::lane_coord(emu_self()->lane);
  d.elements = vec<TD, 2>(TD(product[p.row * 8 + p.col]), TD(product[p.row * 8 + p.col + 1]));
}

template <class TD, class TA, class TB>
void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                        const simdgroup_matrix<TB, 8, 8>& b, EmuSite site = EMU_HERE) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, 8, 8>(TD(0)), site);
}

// a * b is the matrix product (a collective); + and - act element-wise.
template <class T>
simdgroup_matrix<T, 8, 8> operator*(const simdgroup_matrix<T, 8, 8>& a,
                                    const simdgroup_matrix<T, 8, 8>& b) {
  simdgroup_matrix<T, 8, 8> d;
  simdgroup_multiply(d, a, b);
  return d;
}
template <class T>
simdgroup_matrix<T, 8, 8> operator+(simdgroup_matrix<T, 8, 8> a, const simdgroup_matrix<T, 8, 8>& b) {
  a.elements += b.elements;
  return a;
}
template <class T>
simdgroup_matrix<T, 8, 8> operator-(simdgroup_matrix<T, 8, 8> a, const simdgroup_matrix<T, 8, 8>& b) {
  a.elements -= b.elements;
  return a;
}

}  // namespace metal
