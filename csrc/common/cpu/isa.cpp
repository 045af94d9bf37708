#include "common/cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

namespace mlx_ext::cpu {
namespace {

bool supported(Isa isa) {
  switch (isa) {
    case Isa::scalar:
      return true;
#if defined(MLX_EXT_HAVE_ISA_avx2)
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
          __builtin_cpu_supports("f16c");
#endif
#if defined(MLX_EXT_HAVE_ISA_avx512)
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#if defined(MLX_EXT_HAVE_ISA_neon)
    case Isa::neon:
      return true; // NEON is part of the arm64 baseline
#endif
    default:
      return false;
  }
}

constexpr Isa kAll[] = {Isa::avx512, Isa::avx2, Isa::neon, Isa::scalar}; // best first

Isa best_isa() {
  for (Isa isa : kAll)
    if (supported(isa)) return isa;
  return Isa::scalar;
}

Isa parse(const std::string& name) {
  for (Isa isa : kAll)
    if (isa_name(isa) == name) {
      if (!supported(isa)) break;
      return isa;
    }
  std::ostringstream msg;
  msg << "[mlx_ext.set_cpu_isa] isa='" << name << "' is not available here; choose 'auto' or one of:";
  for (const auto& n : available_isas()) msg << " '" << n << "'";
  throw std::invalid_argument(msg.str());
}

Isa initial_isa() {
  const char* env = std::getenv("MLX_EXT_CPU_ISA");
  if (env && *env && std::string(env) != "auto") return parse(env);
  return best_isa();
}

std::atomic<Isa>& selected() {
  static std::atomic<Isa> isa{initial_isa()};
  return isa;
}

} // namespace

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::neon: return "neon";
  }
  return "unknown";
}

Isa current_isa() {
  return selected().load(std::memory_order_relaxed);
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (Isa isa : kAll)
    if (supported(isa)) names.push_back(isa_name(isa));
  return names;
}

void set_cpu_isa(const std::string& name) {
  selected().store(name == "auto" ? best_isa() : parse(name));
}

} // namespace mlx_ext::cpu
