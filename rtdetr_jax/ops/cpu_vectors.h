// Shared by rtdetr_jax's C++ CPU kernels that work on channels 16 floats at a time (cpu_channel_moments.cc,
// cpu_deformable_sampling.cc, cpu_winograd_transforms.cc): `V16`, a vector of 16 floats whatever the CPU's vector
// width (GCC splits it into the registers it has: one with AVX-512, two with AVX2), and unaligned `load` and
// `store` of one. (cpu_kernel_gradient.cc sizes its vectors to the CPU's width instead: its register tile depends
// on it.)
//
// rtdetr_jax/ops/native.py compiles each source with this folder on the include path and hashes this header
// into the cache key of every kernel, so a change here rebuilds them all.

#ifndef RTDETR_JAX_OPS_CPU_VECTORS_H_
#define RTDETR_JAX_OPS_CPU_VECTORS_H_

#include <cstring>

namespace rtdetr_jax {

constexpr int kWidth = 16;  // floats per V16
typedef float V16 __attribute__((vector_size(kWidth * sizeof(float))));

inline V16 load(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof(V16));
  return v;
}

inline void store(float* p, V16 v) { std::memcpy(p, &v, sizeof(V16)); }

}  // namespace rtdetr_jax

#endif  // RTDETR_JAX_OPS_CPU_VECTORS_H_
