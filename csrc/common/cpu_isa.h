// Which CPU instruction set the kernels use: the best one compiled in and
// supported by this processor, unless MLX_EXT_CPU_ISA or set_cpu_isa() asks
// for another (tests force "scalar" to cover the fallback).
#pragma once

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

} // namespace mlx_ext::cpu
