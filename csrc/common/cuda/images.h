// The CUDA kernel images embedded in this library: one fatbin per
// csrc/<op>/<name>.cu of every operator, in the table cmake/cuda.cmake
// generates (images.cpp in the build folder).
#pragma once

namespace mlx_ext::cuda {

struct EmbeddedImage {
  const void* fatbin;
  const char* name; // "<op>/<name>", for messages
  // Built for sm_90a only (an operator's CUDA_KERNELS_SM90A): no code for
  // other GPUs, where it is skipped. Every other image carries PTX of the
  // newest architecture built, so it loads on any GPU the build supports.
  bool arch_specific;
};

extern const EmbeddedImage embedded_images[];
extern const int embedded_image_count;

} // namespace mlx_ext::cuda
