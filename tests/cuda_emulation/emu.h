// Host-side emulation of the CUDA subset fusebuild's generated kernels use, so their source can
// be compiled with g++ and run on the CPU: thread indices as thread-locals, the function-space
// qualifiers as no-ops, and the intrinsics (bit casts, __umulhi, rsqrt). __CUDA_ARCH__ stays
// undefined, so the kernels take their portable (non-PTX) code paths.
#pragma once
#include <math.h>
#include <string.h>

#define __global__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(n)

struct dim3 { unsigned x, y, z; };
static thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return (unsigned)(((unsigned long long)a * b) >> 32);
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }

// Run `kernel` over a 1-D grid of `block`-thread blocks, its parameter struct read from `words`.
template <typename P>
void fb_emulate(void (*kernel)(P), const long long* words, unsigned grid, unsigned block) {
  P p;
  memcpy(&p, words, sizeof(P));
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    for (unsigned t = 0; t < block; ++t) {
      blockIdx = {b, 0, 0};
      threadIdx = {t, 0, 0};
      kernel(p);
    }
  }
}

template <typename P>
unsigned long long fb_param_bytes(void (*)(P)) { return sizeof(P); }
