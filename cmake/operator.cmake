# mlx_ext_add_operator(<op> ...): the sources of one operator, all under
# csrc/<op>/ (its Metal kernels in metal/<op>.metal):
#
#   SOURCES        always compiled: the op function and Primitive, eval_cpu,
#                  the CPU driver
#   ISA_SOURCES    CPU kernels compiled once per instruction set
#   METAL_SOURCES  eval_gpu for Metal (Metal builds); metal/<op>.metal joins
#                  the metallib when it exists
#   CUDA_SOURCES   eval_gpu for CUDA (MLX_EXT_CUDA=ON builds)
#   CUDA_KERNELS, CUDA_KERNELS_SM90A
#                  <name> of each csrc/<op>/<name>.cu, compiled by nvcc into
#                  an embedded image (cmake/cuda.cmake); the SM90A ones only
#                  for sm_90a
#
# An operator without kernels for the build's GPU backend is listed in
# csrc/common/no_gpu.cpp instead.
function(mlx_ext_add_operator op)
  cmake_parse_arguments(PARSE_ARGV 1 ARG ""  ""
    "SOURCES;ISA_SOURCES;METAL_SOURCES;CUDA_SOURCES;CUDA_KERNELS;CUDA_KERNELS_SM90A")
  set(dir csrc/${op})
  list(TRANSFORM ARG_SOURCES PREPEND ${dir}/)
  list(TRANSFORM ARG_ISA_SOURCES PREPEND ${dir}/)
  set(sources ${MLX_EXT_SOURCES} ${ARG_SOURCES})
  set(isa_sources ${MLX_EXT_ISA_SOURCES} ${ARG_ISA_SOURCES})
  if(MLX_EXT_GPU_BACKEND STREQUAL "METAL")
    list(TRANSFORM ARG_METAL_SOURCES PREPEND ${dir}/)
    list(APPEND sources ${ARG_METAL_SOURCES})
    set(kernels "${CMAKE_CURRENT_SOURCE_DIR}/metal/${op}.metal")
    if(EXISTS "${kernels}")
      set(MLX_EXT_METAL_KERNELS ${MLX_EXT_METAL_KERNELS} "${kernels}" PARENT_SCOPE)
    endif()
  elseif(MLX_EXT_GPU_BACKEND STREQUAL "CUDA")
    list(TRANSFORM ARG_CUDA_SOURCES PREPEND ${dir}/)
    list(APPEND sources ${ARG_CUDA_SOURCES})
    mlx_ext_add_cuda_kernels(${op} KERNELS ${ARG_CUDA_KERNELS} SM90A ${ARG_CUDA_KERNELS_SM90A})
  endif()
  set(MLX_EXT_SOURCES ${sources} PARENT_SCOPE)
  set(MLX_EXT_ISA_SOURCES ${isa_sources} PARENT_SCOPE)
endfunction()
