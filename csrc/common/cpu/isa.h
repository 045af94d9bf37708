// Which CPU instruction set the kernels use: the best one compiled in and
// supported by this processor, unless MLX_EXT_CPU_ISA or set_cpu_isa() asks
// for another (tests force "scalar" to cover the fallback).
//
// An operator's per-ISA kernels are compiled once per ISA into the namespaces
// mlx_ext::cpu::{scalar,avx2,avx512,neon} (simd.h), each defining a table of
// function pointers under a name of the operator's own. MLX_EXT_PER_ISA
// declares that table in every ISA namespace and defines `<name>_for(Isa)`,
// which returns the table of an ISA compiled into this build (else scalar's).
#pragma once

#include <array>
#include <string>
#include <vector>

namespace mlx_ext::cpu {

enum class Isa { scalar, avx2, avx512, neon };

Isa current_isa();
std::string isa_name(Isa isa);
// ISAs both compiled into this build and supported by this processor.
std::vector<std::string> available_isas();
// "auto" restores the default; an ISA not in available_isas() is a ValueError.
void set_cpu_isa(const std::string& name);

// tables[isa]: the table of each ISA, nullptr where the ISA is not compiled in.
template <typename Table>
const Table& select_for_isa(Isa isa, const std::array<const Table*, 4>& tables) {
  const Table* t = tables[static_cast<int>(isa)];
  return t ? *t : *tables[static_cast<int>(Isa::scalar)];
}

} // namespace mlx_ext::cpu

// In a per-ISA kernel file (compiled with MLX_EXT_ISA_NS=<ns>): the ISA's name
// as a string literal, "avx512", for its table's `isa` field.
#define MLX_EXT_STRINGIFY_(x) #x
#define MLX_EXT_STRINGIFY(x) MLX_EXT_STRINGIFY_(x)
#define MLX_EXT_ISA_NAME MLX_EXT_STRINGIFY(MLX_EXT_ISA_NS)

// &ns::name when the ISA `ns` is compiled into this build (CMakeLists.txt
// defines MLX_EXT_HAVE_ISA_<ns>), else nullptr: no reference to a symbol
// that does not exist.
#if defined(MLX_EXT_HAVE_ISA_avx2)
#define MLX_EXT_IF_ISA_avx2(name) &avx2::name
#else
#define MLX_EXT_IF_ISA_avx2(name) nullptr
#endif
#if defined(MLX_EXT_HAVE_ISA_avx512)
#define MLX_EXT_IF_ISA_avx512(name) &avx512::name
#else
#define MLX_EXT_IF_ISA_avx512(name) nullptr
#endif
#if defined(MLX_EXT_HAVE_ISA_neon)
#define MLX_EXT_IF_ISA_neon(name) &neon::name
#else
#define MLX_EXT_IF_ISA_neon(name) nullptr
#endif

// Inside namespace mlx_ext::cpu: declares `extern const Type name` in each
// ISA namespace and defines `const Type& name_for(Isa)`. The kernels file of
// each ISA defines `name`.
#define MLX_EXT_PER_ISA(Type, name)                                                       \
  namespace scalar { extern const Type name; }                                            \
  namespace avx2 { extern const Type name; }                                              \
  namespace avx512 { extern const Type name; }                                            \
  namespace neon { extern const Type name; }                                              \
  inline const Type& name##_for(Isa isa) {                                                \
    return select_for_isa<Type>(isa, {&scalar::name, MLX_EXT_IF_ISA_avx2(name),           \
                                          MLX_EXT_IF_ISA_avx512(name), MLX_EXT_IF_ISA_neon(name)}); \
  }
