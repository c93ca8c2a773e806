"""CUDA codegen: typed kernels -> CUDA C++ (one module per group, one symbol per ArgSpec).

Every ArgSpec becomes `extern "C" __global__ void <symbol>(const fb_args_N p)` whose single
parameter is a struct of int64 words `{ptr[abi.n_ptrs], meta[abi.n_meta], start, stop, flags}`
(`abi.Abi` gives ptr and meta), so the host launches it from one int64 buffer. The launch is flat:
128-thread blocks, each thread computing V consecutive elements `start + V * thread`. The body is
written once as a template over (index type, V):
  - flags bit 0 (vector path): V = `vector_width(ks)` elements per thread with 16-byte (or
    narrower) vector loads of 'c'-inner inputs and vector stores; 'b'-inner inputs are loaded
    once per thread. The host sets it only when the inner extent is a multiple of V and every
    vector access is aligned. Kernels with an 's'-inner input have V = 1 (no vector path).
    8- and 16-bit elements of a vector are read from its 32-bit words where they are used
    (`fb_get`) and results or-ed into words (`fb_out`), which keeps ptxas from spilling.
  - flags bit 1: 64-bit indexing; clear, offsets are computed in 32 bits (host: every operand's
    offsets and the element count below 2^31).
Reduction kernels (DESIGN §8, `Kernel.reduce`) work on whole rows of the last dim, in the order
of `schedule.schedule`, with the same flags and template, and `__launch_bounds__(ROW_THREADS,
1)` (at most 64 registers; without the 1 block an SM, ptxas of NVRTC 13.5 aims at two such
blocks, 32 registers, and spills in some kernels):
  - flags bit 2 (`ROW_BLOCK`): a block per row, of R = blockDim.x threads (a power of two, 64 to
    ROW_THREADS = 1024); clear, R = 32, a warp per row (four rows a 128-thread block). R is a
    run-time value, which halves the instantiations to compile. The host picks R from N alone
    (`runtime.cuda.row_threads`: a thread takes at most 16 elements of rows up to 16384), so a
    row's bits do not depend on the device or on HELD.
  - each sweep over the row (one per pass of reductions, then one computing and storing the full
    outputs) has thread l take elements [b, b + V) for b = l V, l V + R V, ...: 16-byte vector
    loads of 'c'-inner inputs on the vector path (the host also needs N % V == 0), scalar loads
    otherwise. A thread accumulates its elements (float sums compensated, Neumaier), a butterfly
    of `__shfl_xor_sync` combines the warp's partials in a fixed tree, so every lane holds the
    same bits, and for R > 32 the R / 32 warps' results meet in shared memory after one
    `__syncthreads` and are combined by a second butterfly over them (every warp the same fixed
    pairwise tree): each pass's values are known to all threads of the row before the next pass.
    max/min propagate NaN; empty rows (N = 0) give 0 for sums and NaN (floats) or 0 (integers)
    for max/min, and still store their row outputs.
  - flags bit 3 (`HELD`): the row is read from global memory once. The inputs that several
    sweeps load (`held_inputs`: 'c'- or 's'-inner ones not broadcast over rows, in their
    storage type; a broadcast operand such as a norm's weight is shared by the launch's rows
    and re-read from cache) are stored by the first sweep that loads them into dynamic shared
    memory, each thread its own elements at their row index, and later sweeps read them back
    from there (a thread reads only what it wrote: no barrier). The layout, which the host sizes
    the launch by (`runtime.cuda.shared_bytes`): per held input k, in order, a region of one
    slot per row of the block (4 or 1) of z_k = N * itemsize_k rounded up to 16 bytes. The host
    sets the bit when the device's shared memory takes the block and still keeps 25% of the
    SM's warps resident (`runtime.cuda.holds`); other rows re-read every sweep from global
    memory (L2). The values and their order of accumulation are those of the re-reading path,
    so both give the same bits.
  - row outputs are stored once per row, by thread 0 of the row.
float16/bfloat16 are computed in float32 and rounded once on store (PTX `cvt.rn` on the device,
NaN payloads kept like the CPU backend; integer round-to-nearest-even bit tricks on the host).
Integer semantics, casts, Philox and uniform draws follow the CPU backend bit for bit.
"""
from __future__ import annotations

import math

from .. import __version__
from .. import dtypes as dt
from ..ir import Kernel, Node, int_range
from ..ops import PRIMITIVES
from ..schedule import schedule
from .common import KernelSource, Renderer, check_complete

BLOCK = 128          # threads per block, fixed in the kernels
VECTOR_BYTES = 16    # bytes per thread and operand on the vector path
ROW_BLOCK = 4        # flags bit 2 of a reduction kernel: a block per row (else a warp per row)
HELD = 8             # flags bit 3 of a reduction kernel: held inputs in dynamic shared memory
ROW_THREADS = 1024   # the most threads of a reduction kernel's block (a block per row)

_COMPUTE = {"float32": "float", "float16": "float", "bfloat16": "float", "float64": "double",
            "int8": "signed char", "int16": "short", "int32": "int", "int64": "long long",
            "uint8": "unsigned char", "bool": "bool"}
_STORAGE = {**_COMPUTE, "float16": "unsigned short", "bfloat16": "unsigned short",
            "bool": "unsigned char"}

_TRIG = ("sin", "cos", "tan")     # float32: TRIG, no libdevice
_MATH1 = ("exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "sin", "cos", "tan",
          "asin", "acos", "atan", "sinh", "cosh", "tanh", "erf", "erfc", "lgamma")
CUDA_OPS: dict[str, dict[str, str]] = {
    **{n: {"f": f"fb_{n}({{a}})"} for n in _MATH1},
    "rsqrt": {"f": "fb_rsqrt({a})"},
    "sigmoid": {"f": "fb_sigmoid({a})"}, "gelu": {"f": "fb_gelu({a})"},
    "ceil": {"f": "fb_ceil({a})"}, "floor": {"f": "fb_floor({a})"},
    "round": {"f": "fb_rint({a})"}, "trunc": {"f": "fb_trunc({a})"},
    "abs": {"f": "fb_fabs({a})", "i": "fb_iabs({a})"},
    "neg": {"f": "(-{a})", "i": "fb_wneg({a})"},
    "sign": {"f": "fb_fsign({a})", "i": "fb_isign({a})"},
    "isnan": {"f": "({a} != {a})"},
    "isinf": {"f": "(fb_fabs({a}) == fb_inf<{T}>())"},
    "isfinite": {"f": "(fb_fabs({a}) < fb_inf<{T}>())"},
    "add": {"f": "({a} + {b})", "i": "fb_wadd({a}, {b})"},
    "sub": {"f": "({a} - {b})", "i": "fb_wsub({a}, {b})"},
    "mul": {"f": "({a} * {b})", "i": "fb_wmul({a}, {b})"},
    "div": {"f": "({a} / {b})"},
    "floor_divide": {"f": "fb_floordiv({a}, {b})", "i": "fb_floordiv_i({a}, {b})"},
    "remainder": {"f": "fb_remainder({a}, {b})", "i": "fb_remainder_i({a}, {b})"},
    "fmod": {"f": "fb_fmod({a}, {b})", "i": "fb_fmod_i({a}, {b})"},
    "pow": {"f": "fb_pow({a}, {b})", "i": "fb_pow_i({a}, {b})"},
    "atan2": {"f": "fb_atan2({a}, {b})"},
    # NaN-propagating like torch.minimum/numpy.minimum
    "min": {"f": "(({a} < {b} || {a} != {a}) ? {a} : {b})", "*": "(({a} < {b}) ? {a} : {b})"},
    "max": {"f": "(({a} > {b} || {a} != {a}) ? {a} : {b})", "*": "(({a} > {b}) ? {a} : {b})"},
    "eq": {"*": "({a} == {b})"}, "ne": {"*": "({a} != {b})"}, "lt": {"*": "({a} < {b})"},
    "le": {"*": "({a} <= {b})"}, "gt": {"*": "({a} > {b})"}, "ge": {"*": "({a} >= {b})"},
    "logical_and": {"b": "({a} && {b})"}, "logical_or": {"b": "({a} || {b})"},
    "logical_xor": {"b": "({a} != {b})"}, "logical_not": {"b": "(!{a})"},
    "bitwise_and": {"i": "(({T})({a} & {b}))", "b": "({a} && {b})"},
    "bitwise_or": {"i": "(({T})({a} | {b}))", "b": "({a} || {b})"},
    "bitwise_xor": {"i": "(({T})({a} ^ {b}))", "b": "({a} != {b})"},
    "bitwise_not": {"i": "(({T})~{a})", "b": "(!{a})"},
    "lshift": {"i": "fb_shl({a}, {b})"}, "rshift": {"i": "fb_shr({a}, {b})"},
    "where": {"*": "({a} ? {b} : {c})"},
}

PRELUDE = r"""// fusebuild {version}: CUDA source of group '{group}'. Generated; do not edit.
// Kernels take one struct of int64 words {{ptr[], meta[], start, stop, flags}} (fusebuild/abi.py);
// flags bit 0: vector path, bit 1: 64-bit indexing, bit 2 (reductions): a block per row,
// bit 3 (reductions): the row's held inputs in dynamic shared memory.

template <typename T, int V> struct alignas(sizeof(T) * V) fb_vec {{ T v[V]; }};
template <typename T, int V>
__device__ __forceinline__ fb_vec<T, V> fb_load(const T* p) {{
  return *reinterpret_cast<const fb_vec<T, V>*>(p);
}}
// 16- and 8-byte vectors are stored by one st.global.v4/v2 on the device: NVVM splits the struct
// copy into 4-byte stores on some paths (NVRTC 13.5, sm_80/sm_90: the 64-bit-index vector path)
template <typename T, int V>
__device__ __forceinline__ void fb_store(T* p, const fb_vec<T, V>& x) {{
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(x) == 16 || sizeof(x) == 8) {{
    unsigned w[4];
    memcpy(w, &x, sizeof(x));
    if constexpr (sizeof(x) == 16)
      asm volatile("st.global.v4.b32 [%0], {{%1, %2, %3, %4}};"
                   :: "l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
    else
      asm volatile("st.global.v2.b32 [%0], {{%1, %2}};" :: "l"(p), "r"(w[0]), "r"(w[1]) : "memory");
    return;
  }}
#endif
  *reinterpret_cast<fb_vec<T, V>*>(p) = x;
}}
// 8- and 16-bit lanes of vectors go through 32-bit words: element j is extracted where it is
// used, as a 32-bit value (PTX bfe; else NVVM unpacks every lane of a vector after its load and
// keeps them all live), and results are or-ed into words; so ptxas of NVRTC 13.5 neither spills
// (8-bit selects on sm_100/sm_120) nor needs over 64 registers (16-bit RNN gradients)
template <typename T> struct fb_bits {{ typedef unsigned short type; }};
template <> struct fb_bits<signed char> {{ typedef unsigned char type; }};
template <> struct fb_bits<unsigned char> {{ typedef unsigned char type; }};
template <> struct fb_bits<bool> {{ typedef unsigned char type; }};
template <typename T, int V> constexpr bool fb_lanes = sizeof(T) <= 2 && V * sizeof(T) % 4 == 0;
template <typename T, int V>
__device__ __forceinline__ auto fb_get(const fb_vec<T, V>& x, int j) {{
  if constexpr (fb_lanes<T, V>) {{
    constexpr int L = 4 / sizeof(T), B = 8 * sizeof(T);    // lanes per word, bits per lane
    unsigned w[V / L], b;
    memcpy(w, &x, sizeof(x));
#ifdef __CUDA_ARCH__
    asm("bfe.u32 %0, %1, %2, %3;" : "=r"(b) : "r"(w[j / L]), "r"(B * (j % L)), "n"(B));
#else
    b = (w[j / L] >> (B * (j % L))) & ((1u << B) - 1u);
#endif
    return b;
  }} else {{
    return x.v[j];
  }}
}}
template <typename T, int V, bool W = fb_lanes<T, V>> struct fb_out {{
  fb_vec<T, V> x;
  __device__ __forceinline__ void set(int j, T v) {{ x.v[j] = v; }}
  __device__ __forceinline__ const fb_vec<T, V>& vec() const {{ return x; }}
}};
template <typename T, int V> struct fb_out<T, V, true> {{
  static constexpr int L = 4 / sizeof(T);
  unsigned w[V / L] = {{}};
  __device__ __forceinline__ void set(int j, T v) {{
    w[j / L] |= (unsigned)(typename fb_bits<T>::type)v << (8 * sizeof(T) * (j % L));
  }}
  __device__ __forceinline__ fb_vec<T, V> vec() const {{
    fb_vec<T, V> x;
    memcpy(&x, w, sizeof(x));
    return x;
  }}
}};
template <typename I> struct fb_unsigned;
template <> struct fb_unsigned<int> {{ typedef unsigned int type; }};
template <> struct fb_unsigned<long long> {{ typedef unsigned long long type; }};

// ---- float math: one name for float and double
#define FB_MATH1(name) \
  __device__ __forceinline__ float fb_##name(float x) {{ return name##f(x); }} \
  __device__ __forceinline__ double fb_##name(double x) {{ return name(x); }}
#define FB_MATH2(name) \
  __device__ __forceinline__ float fb_##name(float x, float y) {{ return name##f(x, y); }} \
  __device__ __forceinline__ double fb_##name(double x, double y) {{ return name(x, y); }}
{math1}
FB_MATH1(rsqrt) FB_MATH1(ceil) FB_MATH1(floor) FB_MATH1(rint) FB_MATH1(trunc) FB_MATH1(fabs)
FB_MATH2(fmod) FB_MATH2(atan2) FB_MATH2(copysign)
template <typename F> __device__ __forceinline__ F fb_inf();
template <> __device__ __forceinline__ float fb_inf<float>() {{
  return __int_as_float(0x7f800000);
}}
template <> __device__ __forceinline__ double fb_inf<double>() {{
  return __longlong_as_double(0x7ff0000000000000LL);
}}
template <typename F> __device__ __forceinline__ F fb_nan();
template <> __device__ __forceinline__ float fb_nan<float>() {{
  return __int_as_float(0x7fc00000);
}}
template <> __device__ __forceinline__ double fb_nan<double>() {{
  return __longlong_as_double(0x7ff8000000000000LL);
}}
template <typename F> __device__ __forceinline__ F fb_fsign(F x) {{
  return x > (F)0 ? (F)1 : (x < (F)0 ? (F)-1 : x);
}}
// sigmoid(-|x|) = e / (1 + e), e = exp(-|x|); for x >= 0 one minus it, rounded once, so the
// saturation towards 1 is correctly rounded (1 / (1 + e) rounds 1 + e first)
template <typename F> __device__ __forceinline__ F fb_sigmoid(F x) {{
  const F e = fb_exp(-fb_fabs(x));
  const F s = e / ((F)1 + e);
  return x >= (F)0 ? (F)1 - s : s;
}}
// gelu: 0.5 x erfc(u), u = -x / sqrt 2 = h + l with l the rounding error of h (exact by fma) and
// erfc(h + l) = erfc(h) - 2 / sqrt(pi) exp(-h h) l to first order: erfc's condition 2u^2 would
// amplify h's rounding error ~100-fold in the tail
__device__ __forceinline__ float fb_gelu(float x) {{
  const float h = x * -0.70710677f;
  const float l = fabsf(x) < 1e30f ? fmaf(x, -0.70710677f, -h) + x * -1.21016175e-08f : 0.0f;
  return 0.5f * x * (erfcf(h) - 1.1283792f * expf(-h * h) * l);
}}
__device__ __forceinline__ double fb_gelu(double x) {{
  const double h = x * -0.7071067811865476;
  const double l = fabs(x) < 1e300 ? fma(x, -0.7071067811865476, -h) + x * 4.833646656726457e-17
                                   : 0.0;
  return 0.5 * x * (erfc(h) - 1.1283791670955126 * exp(-h * h) * l);
}}
// float32 pow without FP64 (FP64 runs at 1/64 rate on most GPUs): log2 x in float-float (atanh
// series, relative error ~2^-35), times y in float-float, exp2 of that (Taylor on [-ln2/2, ln2/2]
// with the float-float correction) scaled by two powers of two. Error: at most 1 ulp of the
// correctly rounded result for normal results (2e7 random and random-bit inputs against float64
// pow), one ulp of the subnormal spacing below; the special cases of C99 pow.
__device__ __forceinline__ void fb_two_sum(float a, float b, float& s, float& e) {{
  s = a + b;
  const float v = s - a;
  e = (a - (s - v)) + (b - v);
}}
__device__ __forceinline__ float fb_pow2i(int n) {{   // 2^n, -126 <= n <= 127
  return __uint_as_float((unsigned)(n + 127) << 23);
}}
__device__ __forceinline__ float fb_powf_finite(float x, float y) {{   // x > 0 and y finite
  int e = 0;
  if (x < 1.17549435e-38f) {{ x *= 16777216.0f; e = -24; }}
  const unsigned bits = __float_as_uint(x);
  e += (int)((bits >> 23) & 0xffu) - 127;
  float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);    // [1, 2)
  if (m > 1.41421356f) {{ m *= 0.5f; e += 1; }}                       // [sqrt(1/2), sqrt(2)]
  const float u = m - 1.0f;                                         // exact (Sterbenz)
  float vh, vl;
  fb_two_sum(m, 1.0f, vh, vl);
  const float fh = u / vh, fl = (fmaf(-fh, vh, u) - fh * vl) / vh;  // f = (m - 1) / (m + 1)
  // ln m = 2 f (1 + A), A = s/3 + s^2/5 + ..., s = f^2 <= 0.0295
  const float sh = fh * fh, sl = fmaf(fh, fh, -sh) + 2.0f * fh * fl;
  const float tail = sh * sh * (0.2f + sh * (0.142857143f + sh * (0.111111111f + sh * (
      0.0909090909f + sh * (0.0769230769f + sh * (0.0666666667f + sh * 0.0588235294f))))));
  const float th3 = 0.333333343f, tl3 = -9.93410746e-09f;           // 1/3 = th3 + tl3
  const float ah = sh * th3, al = fmaf(sh, th3, -ah) + sh * tl3 + sl * th3;
  float Ah, Al;
  fb_two_sum(ah, tail, Ah, Al);
  Al += al;
  const float bh = fh * Ah, bl = fmaf(fh, Ah, -bh) + fh * Al + fl * Ah;
  float Lh, Ll;
  fb_two_sum(fh, bh, Lh, Ll);
  Ll += fl + bl;                                                    // ln m / 2 = Lh + Ll
  const float ih = 2.88539004f, il = 3.85192606e-08f;               // 2 / ln 2 = ih + il
  const float Mh = Lh * ih, Ml = fmaf(Lh, ih, -Mh) + Lh * il + Ll * ih;
  float Gh, Gl;
  fb_two_sum((float)e, Mh, Gh, Gl);                                 // log2 x = Gh + Gl
  Gl += Ml;
  const float th = y * Gh, tl = fmaf(y, Gh, -th) + y * Gl;          // t = y log2 x
  if (th > 129.0f) return fb_inf<float>();
  if (th < -160.0f) return 0.0f;
  const float n = rintf(th);
  float rh, rl;
  fb_two_sum(th - n, tl, rh, rl);                                   // th - n is exact
  const float lh = 0.693147182f, ll = -1.90465421e-09f;             // ln 2 = lh + ll
  const float zh = rh * lh, zl = fmaf(rh, lh, -zh) + rh * ll + rl * lh;
  const float q = zh * (1.0f + zh * (0.5f + zh * (0.166666672f + zh * (0.0416666679f + zh * (
      0.00833333377f + zh * (0.00138888892f + zh * (0.000198412701f + zh * 2.48015876e-05f)))))));
  const float p = 1.0f + (q + (1.0f + q) * zl);                     // exp(zh + zl)
  const int k = (int)n, k1 = k / 2;
  return p * fb_pow2i(k1) * fb_pow2i(k - k1);
}}
__device__ __forceinline__ float fb_pow(float a, float b) {{
  if (b == 0.0f || a == 1.0f) return 1.0f;
  if (a != a || b != b) return a + b;
  const float ax = fabsf(a), ab = fabsf(b);
  const bool integer = truncf(b) == b;
  const bool odd = integer && ab < 16777216.0f && fmodf(ab, 2.0f) == 1.0f;
  if (ab == fb_inf<float>()) {{
    if (ax == 1.0f) return 1.0f;
    return (ax > 1.0f) == (b > 0.0f) ? fb_inf<float>() : 0.0f;
  }}
  float r;
  if (ax == fb_inf<float>()) r = b < 0.0f ? 0.0f : fb_inf<float>();
  else if (a < 0.0f && !integer) return fb_nan<float>();
  else if (ax == 0.0f) r = b < 0.0f ? fb_inf<float>() : 0.0f;
  else r = fb_powf_finite(ax, b);
  return (__float_as_uint(a) >> 31) && odd ? -r : r;
}}
__device__ __forceinline__ double fb_pow(double a, double b) {{ return pow(a, b); }}
// numpy's npy_divmod: floor(a / b) without double rounding
template <typename F> __device__ __forceinline__ F fb_floordiv(F a, F b) {{
  const F mod = fb_fmod(a, b);
  F div = (a - mod) / b;
  if (mod != (F)0 && ((b < (F)0) != (mod < (F)0))) div = div - (F)1;
  F fl = fb_floor(div);
  if (div - fl > (F)0.5) fl = fl + (F)1;
  if (div == (F)0) fl = fb_copysign((F)0, a / b);
  return b == (F)0 ? a / b : fl;
}}
template <typename F> __device__ __forceinline__ F fb_remainder(F a, F b) {{
  F mod = fb_fmod(a, b);
  if (b != (F)0) {{
    if (mod != (F)0) {{
      if ((b < (F)0) != (mod < (F)0)) mod = mod + b;
    }} else {{
      mod = fb_copysign((F)0, b);
    }}
  }}
  return mod;
}}

// ---- integers: two's-complement wrap-around, x // 0 == x % 0 == 0, MIN // -1 == MIN
template <typename T> struct fb_wide {{ typedef unsigned int type; }};
template <> struct fb_wide<long long> {{ typedef unsigned long long type; }};
template <typename T> __device__ __forceinline__ T fb_wadd(T a, T b) {{
  typedef typename fb_wide<T>::type W; return (T)((W)a + (W)b);
}}
template <typename T> __device__ __forceinline__ T fb_wsub(T a, T b) {{
  typedef typename fb_wide<T>::type W; return (T)((W)a - (W)b);
}}
template <typename T> __device__ __forceinline__ T fb_wmul(T a, T b) {{
  typedef typename fb_wide<T>::type W; return (T)((W)a * (W)b);
}}
template <typename T> __device__ __forceinline__ T fb_wneg(T a) {{
  typedef typename fb_wide<T>::type W; return (T)((W)0 - (W)a);
}}
template <typename T> __device__ __forceinline__ T fb_iabs(T a) {{ return a < 0 ? fb_wneg(a) : a; }}
template <typename T> __device__ __forceinline__ T fb_isign(T a) {{
  return (T)((a > 0) - (a < 0));
}}
template <typename T> __device__ __forceinline__ T fb_floordiv_i(T a, T b) {{
  if (b == 0) return (T)0;
  if (b == -1) return fb_wneg(a);
  T q = (T)(a / b);
  if ((T)(a % b) != 0 && ((a < 0) != (b < 0))) q = (T)(q - 1);
  return q;
}}
template <typename T> __device__ __forceinline__ T fb_remainder_i(T a, T b) {{
  if (b == 0 || b == -1) return (T)0;
  T r = (T)(a % b);
  if (r != 0 && ((r < 0) != (b < 0))) r = (T)(r + b);
  return r;
}}
template <typename T> __device__ __forceinline__ T fb_fmod_i(T a, T b) {{
  return (b == 0 || b == -1) ? (T)0 : (T)(a % b);
}}
template <typename T> __device__ __forceinline__ T fb_pow_i(T a, T b) {{
  if (b < 0) return (T)(a == 1 ? 1 : (a == -1 ? ((b & 1) ? -1 : 1) : 0));
  unsigned long long r = 1, base = (unsigned long long)(long long)a;
  for (long long e = b; e > 0; e >>= 1) {{
    if (e & 1) r *= base;
    base *= base;
  }}
  return (T)r;
}}
template <typename T> __device__ __forceinline__ T fb_shl(T a, T b) {{
  return (b >= 0 && b < (int)(8 * sizeof(T)))
      ? (T)((unsigned long long)(long long)a << (long long)b) : (T)0;
}}
template <typename T> __device__ __forceinline__ T fb_shr(T a, T b) {{
  return (b >= 0 && b < (int)(8 * sizeof(T))) ? (T)((long long)a >> (long long)b)
                                              : (a < 0 ? (T)-1 : (T)0);
}}
// saturating float -> int, NaN -> 0 (bounds lo and hi + 1 are powers of two, exact in F)
template <typename T, typename F>
__device__ __forceinline__ T fb_f2i(F x, F lo, F hi1, T tlo, T thi) {{
  return x != x ? (T)0 : (x >= hi1 ? thi : (x < lo ? tlo : (T)x));
}}

// ---- float16 / bfloat16 <-> float32, round to nearest even, NaN payload kept (quiet)
__device__ __forceinline__ float fb_f16_to_f32(unsigned short h) {{
  const unsigned sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 31u) return __uint_as_float(sign | 0x7f800000u | (m << 13));
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  if (e == 0u) {{
    const float s = (float)m * 5.9604644775390625e-08f;
    return sign ? -s : s;
  }}
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
#endif
}}
__device__ __forceinline__ unsigned short fb_f32_to_f16(float f) {{
  const unsigned x = __float_as_uint(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
#ifdef __CUDA_ARCH__
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);
  if (a >= 0x38800000u)
    return (unsigned short)(sign | (((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (112u << 10)));
  return (unsigned short)(sign | (unsigned)rintf(fabsf(f) * 16777216.0f));
#endif
}}
__device__ __forceinline__ float fb_bf16_to_f32(unsigned short h) {{
  return __uint_as_float((unsigned)h << 16);
}}
__device__ __forceinline__ unsigned short fb_f32_to_bf16(float f) {{
  const unsigned x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
#endif
}}
__device__ __forceinline__ float fb_round_f16(float f) {{ return fb_f16_to_f32(fb_f32_to_f16(f)); }}
__device__ __forceinline__ float fb_round_bf16(float f) {{
  return fb_bf16_to_f32(fb_f32_to_bf16(f));
}}

// ---- warp shuffles of every compute type (8- and 16-bit integers through int)
template <typename T> __device__ __forceinline__ T fb_shfl_xor(T v, int o) {{
  return __shfl_xor_sync(0xffffffffu, v, o);
}}
#define FB_SHFL_INT(T) __device__ __forceinline__ T fb_shfl_xor(T v, int o) {{ \
  return (T)__shfl_xor_sync(0xffffffffu, (int)v, o); }}
FB_SHFL_INT(signed char) FB_SHFL_INT(unsigned char) FB_SHFL_INT(short)
#ifndef FB_SHARED
#define FB_SHARED(T, name, n) __shared__ T name[n]
#endif
#ifndef FB_DYNAMIC_SHARED
#define FB_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ---- Philox4x32-10: counter (index lo, index hi, offset lo, offset hi), key (seed lo, seed hi)
__device__ __forceinline__ void fb_philox(unsigned w[4], unsigned long long index,
                                          unsigned long long seed, unsigned long long offset) {{
  unsigned c0 = (unsigned)index, c1 = (unsigned)(index >> 32);
  unsigned c2 = (unsigned)offset, c3 = (unsigned)(offset >> 32);
  unsigned k0 = (unsigned)seed, k1 = (unsigned)(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {{
    const unsigned hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const unsigned hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }}
  w[0] = c0; w[1] = c1; w[2] = c2; w[3] = c3;
}}
"""

TRIG = r"""// ---- float32 sin, cos and tan without FP64 or local memory (libdevice's sinf/cosf/tanf
// reduce |x| >= 105615 in float64 through a local array). x = q pi/2 + rh + rl, |rh| <= 0.8, rl a
// float-float tail: for |x| < 105615 by Cody-Waite (pi/2 = c1 + c2 + c3 to 2^-76; x - j c1 is
// exact, j c2 exact by fma, then one two-sum), beyond by Payne-Hanek in 32-bit integers (the
// 24-bit mantissa times a 96-bit window of 2/pi read from fb_2_over_pi in constant memory, kept
// mod 4 to 2^-70, the fraction rounded to 64 bits); then minimax polynomials in r^2 on [-0.8, 0.8]
// (relative errors about 2^-28 sin, 2^-32 cos, 2^-29 tan, coefficients in float32) with the
// first-order term of rl, and a corrected reciprocal for tan's odd quadrants.
// Error bound: below 1 ulp of the exact result over the whole float32 range (measured: 0.72 ulp
// sin, 0.72 cos, 0.75 tan against float64 libm on dense random, random-bit and near-multiple-of-
// pi/2 inputs: tests/test_cuda_emulation.py); sin(+-0) = +-0, tan(+-0) = +-0, inf and NaN give NaN.
__constant__ unsigned fb_2_over_pi[8] = {0x00000000u, 0xa2f9836eu, 0x4e441529u, 0xfc2757d1u,
                                         0xf534ddc0u, 0xdb629599u, 0x3c439041u, 0xfe5163abu};
__device__ __forceinline__ unsigned fb_shl_join(unsigned a, unsigned b, unsigned s) {
  return s ? (a << s) | (b >> (32u - s)) : a;   // bits s.. of the 64-bit a:b
}
// x = q pi/2 + rh + rl for finite x (q mod 4)
__device__ __forceinline__ void fb_reduce_pio2(float x, float& rh, float& rl, int& q) {
  const float ax = fabsf(x);
  if (ax < 105615.0f) {
    const float j = rintf(x * 0.636619747f);
    const float r1 = fmaf(-j, 1.57079637f, x);                       // exact
    const float ph = j * 4.37113883e-08f, pl = fmaf(j, 4.37113883e-08f, -ph);
    float s, e;
    fb_two_sum(r1, ph, s, e);
    const float t = e + fmaf(j, 1.71512451e-15f, pl);
    rh = j == 0.0f ? x : s + t;                                      // keeps -0
    rl = t - (rh - s);
    q = (int)j;
    return;
  }
  const unsigned bits = __float_as_uint(ax), m = (bits & 0x7fffffu) | 0x800000u;
  const unsigned g = (bits >> 23) - 120u, w = g >> 5, s = g & 31u;   // window of bits g..g+95
  const unsigned t0 = fb_2_over_pi[w], t1 = fb_2_over_pi[w + 1], t2 = fb_2_over_pi[w + 2],
                 t3 = fb_2_over_pi[w + 3];
  const unsigned w0 = fb_shl_join(t0, t1, s), w1 = fb_shl_join(t1, t2, s),
                 w2 = fb_shl_join(t2, t3, s);
  // m (w0:w1:w2) mod 2^96 = r0:r1:r2 = (|x| 2/pi mod 4) 2^94
  const unsigned r2 = m * w2, p1 = m * w1, r1 = __umulhi(m, w2) + p1;
  const unsigned r0 = __umulhi(m, w1) + m * w0 + (r1 < p1 ? 1u : 0u);
  // the fraction as a signed 64-bit fixed-point number in [-1/2, 1/2), the quadrant rounded
  const unsigned fh = (r0 << 2) | (r1 >> 30), fl = (r1 << 2) | (r2 >> 30);
  const long long f = (long long)(((unsigned long long)fh << 32) | fl);
  const int k = (int)(r0 >> 30) + (int)(fh >> 31);
  const bool neg = f < 0;
  unsigned long long a = neg ? 0ull - (unsigned long long)f : (unsigned long long)f;
  const int lz = __clzll((long long)a);
  a <<= lz;
  const unsigned hi = (unsigned)(a >> 32), lo = (unsigned)a;
  const float vh = (float)(hi >> 8) * fb_pow2i(-24 - lz);
  const float vl = (float)(((hi & 0xffu) << 24) | (lo >> 8)) * fb_pow2i(-56 - lz);
  // times pi/2 = 1.57079637 - 4.37113883e-08
  const float uh = vh * 1.57079637f;
  const float ul = fmaf(vh, 1.57079637f, -uh) + fmaf(vh, -4.37113883e-08f, vl * 1.57079637f);
  const float sh = uh + ul, sl = ul - (sh - uh);
  rh = neg != (x < 0.0f) ? -sh : sh;
  rl = neg != (x < 0.0f) ? -sl : sl;
  q = x < 0.0f ? -k : k;
}
// sin of x = q pi/2 + rh + rl (cos: q + 1): the quadrant picks sin r or cos r and the sign
__device__ __forceinline__ float fb_sincos_reduced(float rh, float rl, int q) {
  const float z = rh * rh, zl = fmaf(rh, rh, -z);
  const float ps = fmaf(fmaf(z, -0.000195030691f, 0.00833207089f), z, -0.166666538f);
  const float sn = rh + fmaf(rh * z, ps, fmaf(-0.5f * z, rl, rl));
  const float pc = fmaf(fmaf(z, 2.44191961e-05f, -0.00138871942f), z, 0.0416666418f);
  const float hz = 0.5f * z, w = 1.0f - hz;
  const float cs = w + (((1.0f - w) - hz) + fmaf(z * z, pc, fmaf(-0.5f, zl, -rh * rl)));
  const float y = (q & 1) ? cs : sn;
  return (q & 2) ? -y : y;
}
__device__ __forceinline__ float fb_sin(float x) {
  if (fabsf(x) < 2.44140625e-04f) return x;                       // sin x rounds to x
  if (!(fabsf(x) < fb_inf<float>())) return x - x;
  float rh, rl;
  int q;
  fb_reduce_pio2(x, rh, rl, q);
  return fb_sincos_reduced(rh, rl, q);
}
__device__ __forceinline__ float fb_cos(float x) {
  if (!(fabsf(x) < fb_inf<float>())) return x - x;
  float rh, rl;
  int q;
  fb_reduce_pio2(x, rh, rl, q);
  return fb_sincos_reduced(rh, rl, q + 1);
}
__device__ __forceinline__ float fb_tan(float x) {
  if (fabsf(x) < 2.44140625e-04f) return x;                       // tan x rounds to x
  if (!(fabsf(x) < fb_inf<float>())) return x - x;
  float rh, rl;
  int q;
  fb_reduce_pio2(x, rh, rl, q);
  // tan r = r + r^3 (c0 + z q(z)), r^3 c0 with its rounding errors, + rl (1 + tan^2 r)
  const float z = rh * rh, t3 = rh * z, t3l = fmaf(rh, z, -t3) + rh * fmaf(rh, rh, -z);
  const float p = fmaf(fmaf(fmaf(fmaf(fmaf(z, 0.00458001159f, -0.000318546518f), z,
      0.0111530554f), z, 0.0211619716f), z, 0.0540826805f), z, 0.133324683f);
  const float hi = t3 * 0.333333552f, lo = fmaf(t3, 0.333333552f, -hi);
  const float s = rh + hi;
  const float u = ((rh - s) + hi) +
                  fmaf(t3 * z, p, fmaf(t3l, 0.333333552f, lo + fmaf(s * s, rl, rl)));
  const float th = s + u, tl = u - (th - s);                      // tan r = th + tl
  if (!(q & 1)) return th;
  const float y = -1.0f / th;                                      // -1 / (th + tl)
  return fmaf(y, fmaf(y, tl, fmaf(y, th, 1.0f)), y);
}
// ---- float64 sin, cos and tan without local memory (libdevice's sin/cos/tan keep the
// Payne-Hanek product with 2/pi in a local array). x = q pi/2 + rh + rl, |rh| <= pi/4 (1 + 2^-22),
// rl a double-double tail: for |x| < 2^30 by Cody-Waite (pi/2 = C1 + C2 + C3 to 2^-163; x - j C1
// is exact with fma, j C2 exact by fma, then one two-sum), beyond by Payne-Hanek in 64-bit
// integers (the 53-bit mantissa times a 192-bit window of 2/pi read from fb_2_over_pi64 in
// constant memory, kept mod 4 to 2^-137, the fraction normalized to 106 bits; the reduced
// argument of a double is at least 2^-61 away from 0: Muller, Elementary Functions, worst case
// 6381956970095103 2^797); then polynomials in r^2 on [0, 0.617] fitted by relative least
// squares at Chebyshev nodes in mpmath (relative errors 2^-63 sin, 2^-54 cos's r^4 part, whose
// weight is at most 1/40), sin and cos carried as double-doubles with the terms of rl, and tan =
// sin / cos (odd quadrants -cos / sin) by a reciprocal and one corrected product.
// Error bound: below 1 ulp of the exact result over the whole float64 range (measured: 0.55 ulp
// sin, 0.56 cos, 0.57 tan against mpmath on dense random, random-bit and near-multiple-of-pi/2
// inputs: tests/test_cuda_emulation.py); sin(+-0) = +-0, tan(+-0) = +-0, inf and NaN give NaN.
__constant__ unsigned long long fb_2_over_pi64[20] = {
    0x0000000000000000ull, 0xa2f9836e4e441529ull, 0xfc2757d1f534ddc0ull, 0xdb6295993c439041ull,
    0xfe5163abdebbc561ull, 0xb7246e3a424dd2e0ull, 0x06492eea09d1921cull, 0xfe1deb1cb129a73eull,
    0xe88235f52ebb4484ull, 0xe99c7026b45f7e41ull, 0x3991d639835339f4ull, 0x9c845f8bbdf9283bull,
    0x1ff897ffde05980full, 0xef2f118b5a0a6d1full, 0x6d367ecf27cb09b7ull, 0x4f463f669e5fea2dull,
    0x7527bac7ebe5f17bull, 0x3d0739f78a5292eaull, 0x6bfb5fb11f8d5d08ull, 0x56033046fc7b6babull};
__device__ __forceinline__ unsigned long long fb_shl_join64(unsigned long long a,
                                                            unsigned long long b, unsigned s) {
  return s ? (a << s) | (b >> (64u - s)) : a;   // bits s.. of the 128-bit a:b
}
__device__ __forceinline__ double fb_pow2d(int n) {   // 2^n, -1022 <= n <= 1023
  return __longlong_as_double((long long)(n + 1023) << 52);
}
__device__ __forceinline__ void fb_two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  const double v = s - a;
  e = (a - (s - v)) + (b - v);
}
// x = q pi/2 + rh + rl for finite x (q mod 4)
__device__ __forceinline__ void fb_reduce_pio2(double x, double& rh, double& rl, int& q) {
  const double ax = fabs(x);
  if (ax < 1073741824.0) {
    const double j = rint(x * 0.6366197723675814);
    const double r1 = fma(-j, 1.5707963267948966, x);                      // exact
    const double p = j * 6.123233995736766e-17, pl = fma(j, 6.123233995736766e-17, -p);
    double s, e;
    fb_two_sum(r1, -p, s, e);
    const double t = e - fma(j, -1.4973849048591698e-33, pl);
    rh = j == 0.0 ? x : s + t;                                              // keeps -0
    rl = t - (rh - s);
    q = (int)j;
    return;
  }
  const unsigned long long bits = (unsigned long long)__double_as_longlong(ax);
  const unsigned long long m = (bits & 0xfffffffffffffull) | 0x10000000000000ull;
  const unsigned g = (unsigned)(bits >> 52) - 1023u - 52u + 62u, w = g >> 6, s = g & 63u;
  const unsigned long long t0 = fb_2_over_pi64[w], t1 = fb_2_over_pi64[w + 1],
                           t2 = fb_2_over_pi64[w + 2], t3 = fb_2_over_pi64[w + 3];
  const unsigned long long w0 = fb_shl_join64(t0, t1, s), w1 = fb_shl_join64(t1, t2, s),
                           w2 = fb_shl_join64(t2, t3, s);
  // m (w0:w1:w2) mod 2^192 = r0:r1:r2 = (|x| 2/pi mod 4) 2^190
  const unsigned long long r2 = m * w2, p1 = m * w1, r1 = __umul64hi(m, w2) + p1;
  const unsigned long long r0 = __umul64hi(m, w1) + m * w0 + (r1 < p1 ? 1ull : 0ull);
  // the fraction as a signed 192-bit fixed-point number in [-1/2, 1/2), the quadrant rounded
  unsigned long long a0 = (r0 << 2) | (r1 >> 62), a1 = (r1 << 2) | (r2 >> 62), a2 = r2 << 2;
  const int k = (int)(r0 >> 62) + (int)(a0 >> 63);
  const bool neg = (long long)a0 < 0;
  if (neg) { a0 = ~a0; a1 = ~a1; a2 = ~a2; }                  // minus it, less 2^-192
  const unsigned lz = (unsigned)__clzll((long long)a0);        // < 62: the fraction >= 2^-62
  const unsigned long long h = fb_shl_join64(a0, a1, lz), l = fb_shl_join64(a1, a2, lz);
  const double vh = (double)(h >> 11) * fb_pow2d(-53 - (int)lz);
  const double vl = (double)(((h & 0x7ffull) << 42) | (l >> 22)) * fb_pow2d(-106 - (int)lz);
  // times pi/2 = 1.5707963267948966 + 6.123233995736766e-17
  const double uh = vh * 1.5707963267948966;
  const double ul = fma(vh, 1.5707963267948966, -uh) +
                    fma(vh, 6.123233995736766e-17, vl * 1.5707963267948966);
  const double sh = uh + ul, sl = ul - (sh - uh);
  rh = neg != (x < 0.0) ? -sh : sh;
  rl = neg != (x < 0.0) ? -sl : sl;
  q = x < 0.0 ? -k : k;
}
// sin(rh + rl) = sh + sl: rh + r^3 (S(z) with its first coefficient a double-double) + rl cos
__device__ __forceinline__ void fb_sin_dd(double rh, double rl, double& sh, double& sl) {
  const double z = rh * rh, zl = fma(rh, rh, -z);
  const double t3 = rh * z, t3l = fma(rh, z, -t3) + rh * zl;               // r^3
  const double P = fma(fma(fma(fma(fma(z, -7.586617980157103e-13, 1.6058530175950522e-10), z,
      -2.5052106222581196e-08), z, 2.7557319219308077e-06), z, -0.00019841269841265022), z,
      0.008333333333333331) * z;
  const double ph = -0.16666666666666666 + P;
  const double pl = ((-0.16666666666666666 - ph) + P) + -9.240074368660403e-18;
  const double th = t3 * ph, tl = fma(t3, ph, -th) + fma(t3, pl, t3l * ph);
  sh = rh + th;
  sl = ((rh - sh) + th) + (tl + fma(-0.5 * z, rl, rl));
}
// cos(rh + rl) = ch + cl: 1 - r^2 / 2 (exact in parts) + r^4 C(z) - rh rl
__device__ __forceinline__ void fb_cos_dd(double rh, double rl, double& ch, double& cl) {
  const double z = rh * rh, zl = fma(rh, rh, -z);
  const double C = fma(fma(fma(fma(fma(fma(z, 4.7458401489011036e-14, -1.1470460312208007e-11),
      z, 2.08767557871718e-09), z, -2.755731922139059e-07), z, 2.480158730158463e-05), z,
      -0.0013888888888888887), z, 0.041666666666666664);
  const double hz = 0.5 * z, w = 1.0 - hz;
  const double u = ((1.0 - w) - hz) + fma(z * z, C, fma(-0.5, zl, -rh * rl));
  ch = w + u;
  cl = u - (ch - w);
}
__device__ __forceinline__ double fb_sin(double x) {
  if (fabs(x) < 1.4901161193847656e-08) return x;                 // sin x rounds to x
  if (!(fabs(x) < fb_inf<double>())) return x - x;
  double rh, rl, h, l;
  int q;
  fb_reduce_pio2(x, rh, rl, q);
  if (q & 1) fb_cos_dd(rh, rl, h, l); else fb_sin_dd(rh, rl, h, l);
  const double y = h + l;
  return (q & 2) ? -y : y;
}
__device__ __forceinline__ double fb_cos(double x) {
  if (!(fabs(x) < fb_inf<double>())) return x - x;
  double rh, rl, h, l;
  int q;
  fb_reduce_pio2(x, rh, rl, q);
  if (q & 1) fb_sin_dd(rh, rl, h, l); else fb_cos_dd(rh, rl, h, l);
  const double y = h + l;
  return ((q + 1) & 2) ? -y : y;
}
__device__ __forceinline__ double fb_tan(double x) {
  if (fabs(x) < 7.450580596923828e-09) return x;                  // tan x rounds to x
  if (!(fabs(x) < fb_inf<double>())) return x - x;
  double rh, rl, sh, sl, ch, cl;
  int q;
  fb_reduce_pio2(x, rh, rl, q);
  fb_sin_dd(rh, rl, sh, sl);
  fb_cos_dd(rh, rl, ch, cl);
  const bool odd = q & 1;                                          // -cos / sin
  const double nh = odd ? -ch : sh, nl = odd ? -cl : sl, dh = odd ? sh : ch, dl = odd ? sl : cl;
  const double y = 1.0 / dh, t = nh * y;
  return fma(fma(-t, dh, nh) + fma(-t, dl, nl), y, t);            // (n - t d) / d + t
}
"""


def storage_type(d: dt.DType) -> str:
    return _STORAGE[d.name]


def _inner(layout: str) -> str:
    """The inner letter of an input layout ('b' for rank 0: one element for every thread)."""
    return layout[-1] if layout else "b"


def vector_width(ks: KernelSource) -> int:
    """Elements per thread on the vector path: 16 bytes of the widest vector-accessed operand
    ('c'-inner inputs and outputs but row outputs); 1 (no vector path) for rank 0, an 's'-inner
    input or no vector-accessed operand."""
    inners = [_inner(lay) for lay in ks.layouts]
    if ks.rank == 0 or "s" in inners:
        return 1
    sizes = [d.itemsize for d, letter in zip(ks.kernel.in_dtypes, inners) if letter == "c"]
    sizes += [o.dtype.itemsize for o in ks.kernel.outputs if not o.row]
    return VECTOR_BYTES // max(sizes) if sizes else 1


class CudaRenderer(Renderer):
    ops = CUDA_OPS

    def __init__(self):
        self.inner: tuple[str, ...] = ()    # inner letter per tensor input of the kernel

    def type_name(self, d: dt.DType) -> str:
        return _COMPUTE[d.compute.name]

    def assign(self, var: str, d: dt.DType, expr: str) -> str:
        return f"const {self.type_name(d)} {var} = {expr};"

    def const(self, value, d: dt.DType) -> str:
        if d.is_bool:
            return "true" if value else "false"
        T = self.type_name(d)
        if d.is_float:
            if math.isnan(value):
                return f"fb_nan<{T}>()"
            if math.isinf(value):
                return f"{'-' if value < 0 else ''}fb_inf<{T}>()"
            return repr(float(value)) + ("f" if T == "float" else "")
        return _int_literal(int(value), T)

    def cast(self, x: str, src: dt.DType, dst: dt.DType) -> str:
        if dst.is_bool:
            return f"({x} != 0)"
        T = self.type_name(dst)
        if dst.is_float:
            if dst.name in ("float16", "bfloat16"):   # through float32, held in float32
                return f"fb_round_{dst.short}((float){x})"
            return f"({T}){x}"
        if src.is_float:
            F = self.type_name(src)
            lo, hi = int_range(dst)
            suffix = "f" if F == "float" else ""
            return (f"fb_f2i<{T}, {F}>({x}, {float(lo)!r}{suffix}, {float(hi + 1)!r}{suffix}, "
                    f"{_int_literal(lo, T)}, {_int_literal(hi, T)})")
        return f"({T}){x}"

    def load(self, node: Node) -> str:
        pos, k = node.attr
        j = "j" if self.inner[pos] == "c" else "0"
        value = f"fb_get(l{pos}_{k}, {j})"
        if node.dtype.name in ("float16", "bfloat16"):
            return f"fb_{node.dtype.short}_to_f32({value})"
        if node.dtype.is_bool:
            return f"({value} != 0)"
        return value

    def store(self, value: str, d: dt.DType) -> str:
        if d.name in ("float16", "bfloat16"):
            return f"fb_f32_to_{d.short}({value})"
        if d.is_bool:
            return f"(unsigned char){value}"
        return value

    def rowlen(self, d: dt.DType) -> str:
        return f"({self.type_name(d)})N"

    def rand(self, node: Node) -> str:
        w = node.attr
        if node.dtype == dt.float64:
            return (f"(double)((((unsigned long long)rw[{w}] << 32) | rw[{w + 1}]) >> 11)"
                    " * 1.1102230246251565e-16")
        mant = {"float32": 24, "float16": 11, "bfloat16": 8}[node.dtype.name]
        return f"(float)(rw[{w}] >> {32 - mant}) * {2.0 ** -mant!r}f"


check_complete(CudaRenderer(), PRIMITIVES)


def _int_literal(v: int, T: str) -> str:
    if v == -(1 << 63):
        return f"({T})(-9223372036854775807LL - 1)"
    return f"({T}){v}LL"


def _scalar(d: dt.DType, word: str) -> str:
    """A scalar input from its meta word (bits of its value; float32 bits for float16/bfloat16)."""
    if d == dt.float64:
        return f"__longlong_as_double({word})"
    if d.is_float:
        value = f"__uint_as_float((unsigned){word})"
        return value if d == dt.float32 else f"fb_round_{d.short}({value})"
    if d.is_bool:
        return f"({word} != 0)"
    return f"({_COMPUTE[d.name]}){word}"


def _render_kernel(r: CudaRenderer, ks: KernelSource, n: int) -> list[str]:
    k, abi, rank, layouts = ks.kernel, ks.abi, ks.rank, ks.layouts
    n_in = len(k.in_dtypes)
    V = vector_width(ks)
    r.inner = tuple(_inner(lay) for lay in layouts)
    lines = [_args_struct(abi, n), "",
             f"// {ks.key}",
             "template <typename I, int V>",
             f"__device__ __forceinline__ void fb_body_{n}(const fb_args_{n}& p) {{",
             "  typedef typename fb_unsigned<I>::type U;",
             f"  const U t = (U)blockIdx.x * {BLOCK}u + (U)threadIdx.x;",
             "  if (t >= (U)((p.stop - p.start) / V)) return;",
             "  const long long e = p.start + (long long)t * V;   // first element of this thread"]

    def size(d: int) -> str:
        return f"(U)p.meta[{abi.size(d)}]"

    def stride(op: int, d: int) -> str:
        return f"(I)p.meta[{abi.stride(op, d)}]"

    if rank == 1:
        lines.append("  const I x0 = (I)e;")
    elif rank > 1:
        lines.append("  U r = (U)e;")
        for d in range(rank - 1, 0, -1):
            lines.append(f"  const I x{d} = (I)(r % {size(d)}); r /= {size(d)};")
        lines.append("  const I x0 = (I)r;")

    def offset(op: int, letters: str) -> str:
        terms = [f"x{d} * {stride(op, d)}" for d in range(rank - 1) if letters[d] != "b"]
        inner = letters[-1] if letters else "b"
        terms += {"c": [f"x{rank - 1}"], "s": [f"x{rank - 1} * {stride(op, rank - 1)}"],
                  "b": []}[inner]
        return " + ".join(terms) or "(I)0"

    loaded = sorted({n_.attr for n_ in k.nodes if n_.op == "load"})
    for pos in sorted({p for p, _ in loaded}):
        lines.append(f"  const I o{pos} = {offset(pos, layouts[pos])};")
    for pos, c in loaded:
        S, W = storage_type(k.in_dtypes[pos]), "V" if r.inner[pos] == "c" else "1"
        lines.append(f"  const fb_vec<{S}, {W}> l{pos}_{c} = "
                     f"fb_load<{S}, {W}>((const {S}*)p.ptr[{abi.in_ptr(pos, c)}] + o{pos});")
    for o, out in enumerate(k.outputs):
        op = n_in + o
        where = offset(op, "s" * rank) if out.cat else "(I)e"
        lines.append(f"  const I q{o} = {where};")
    lines += _uniform_inputs(r, k, abi)
    pre = ["unsigned rw[4];", "fb_philox(rw, (unsigned long long)(e + j), seed, offset);"] \
        if abi.random else []
    post, stores = [], []
    for o, out in enumerate(k.outputs):
        S = storage_type(out.dtype)
        for c, part in enumerate(out.parts):
            lines.append(f"  fb_out<{S}, V> s{o}_{c};")
            post.append(f"s{o}_{c}.set(j, {r.store(f'v{part}', out.dtype)});")
            stores.append(f"  fb_store<{S}, V>(({S}*)p.ptr[{abi.out_ptr(o, c)}] + q{o}, "
                          f"s{o}_{c}.vec());")
    lines += ["#pragma unroll", "  for (int j = 0; j < V; ++j) {"]
    lines += [f"    {b}" for b in pre + r.render_nodes(k) + post]
    lines += ["  }"] + stores + ["}", ""]
    lines += [f'extern "C" __global__ void __launch_bounds__({BLOCK}) '
              f"{ks.symbol}(const fb_args_{n} p) {{", *_dispatch(n, V), "}"]
    return lines


def _args_struct(abi, n: int) -> str:
    meta = f" long long meta[{abi.n_meta}];" if abi.n_meta else ""
    return (f"struct fb_args_{n} {{ long long ptr[{abi.n_ptrs}];{meta} "
            "long long start, stop, flags; };")


def _uniform_inputs(r: CudaRenderer, k, abi) -> list[str]:
    """Seed and offset (random groups) and the scalar inputs, from their meta words."""
    lines = []
    if abi.random:
        lines += [f"  const unsigned long long {name} = (unsigned long long)p.meta[{slot}];"
                  for name, slot in (("seed", abi.seed), ("offset", abi.offset))]
    scalars = {n_.attr: n_.dtype for n_ in k.nodes if n_.op == "scalar"}
    for s, d in sorted(scalars.items()):
        lines.append(f"  const {r.type_name(d)} a{s} = {_scalar(d, f'p.meta[{abi.scalar(s)}]')};")
    return lines


def _dispatch(n: int, V: int) -> list[str]:
    """Pick the instantiation of kernel n's body for the flags (bit 0 vector, bit 1 64-bit)."""
    def pick(I: str) -> str:
        scalar = f"fb_body_{n}<{I}, 1>(p);"
        return scalar if V == 1 else f"if (p.flags & 1) fb_body_{n}<{I}, {V}>(p); else {scalar}"
    return [f"  if (p.flags & 2) {{ {pick('long long')} }}", f"  else {{ {pick('int')} }}"]


# ---------------------------------------------------------------- row reductions ---------------

def _row_offset(abi, op: int, letters: str, rank: int) -> str:
    """Offset of operand `op`'s row from the outer coordinates x0..x{rank-2}."""
    terms = [f"x{d} * (I)p.meta[{abi.stride(op, d)}]" for d in range(rank - 1)
             if letters[d] != "b"]
    return " + ".join(terms) or "(I)0"


def _identity(r: CudaRenderer, op: str, d: dt.DType) -> str:
    """The start value of a row accumulator."""
    if op == "rsum":
        return r.const(0, d)
    if d.is_float:
        return r.const(-math.inf if op == "rmax" else math.inf, d)
    lo, hi = int_range(d)
    return r.const(lo if op == "rmax" else hi, d)


def _combine(r: CudaRenderer, op: str, a: str, b: str, d: dt.DType) -> str:
    """a (+|max|min) b in the row's order (NaN-propagating max and min; a first on ties)."""
    return r.op({"rsum": "add", "rmax": "max", "rmin": "min"}[op], [a, b], d)


def _accumulate(r: CudaRenderer, op: str, acc: str, x: str, d: dt.DType) -> str:
    """Add element x to the thread's accumulator; float sums are compensated (Neumaier: the
    rounding error of every addition is kept in c{acc}), so a thread's partial sum is accurate
    to a few ulps whatever its length and the error of the row is that of the tree."""
    if op == "rsum" and d.is_float:
        T = r.type_name(d)
        return (f"{{ const {T} t_ = s{acc} + {x}; c{acc} += fb_fabs(s{acc}) >= fb_fabs({x}) ? "
                f"(s{acc} - t_) + {x} : ({x} - t_) + s{acc}; s{acc} = t_; }}")
    return f"s{acc} = {_combine(r, op, f's{acc}', x, d)};"


def _butterfly(r: CudaRenderer, op: str, i: int, d: dt.DType, width: str) -> list[str]:
    """Combine t{i} over groups of `width` lanes (a power of two <= 32) in a fixed pairwise
    tree, the lower lane's value first: every lane of a group ends with the same bits."""
    T = r.type_name(d)
    return [f"  for (int o = 1; o < {width}; o <<= 1) {{",
            f"    const {T} y_ = fb_shfl_xor(t{i}, o), lo_ = (threadIdx.x & o) ? y_ : "
            f"t{i}, hi_ = (threadIdx.x & o) ? t{i} : y_;",
            f"    t{i} = {_combine(r, op, 'lo_', 'hi_', d)};", "  }"]


def _sweep_nodes(k: Kernel) -> list[tuple[int, ...]]:
    """The FULL nodes of each sweep over the row: one per pass of `schedule`, then the sweep
    that stores the full outputs (if any)."""
    sched = schedule(k)
    final = [sched.final] if any(not o.row for o in k.outputs) else []
    return [ps.elem for ps in sched.passes] + final


def held_inputs(ks: KernelSource) -> tuple[tuple[int, int], ...]:
    """The (input, chunk) loads a reduction kernel holds on the HELD path: those of more than
    one sweep, but broadcast ones (a 'b' in the layout: one element per row, or a row shared by
    several rows, which later sweeps find in cache)."""
    k = ks.kernel
    if not k.reduce:
        return ()
    loads = [{k.nodes[i].attr for i in ids if k.nodes[i].op == "load"} for ids in _sweep_nodes(k)]
    return tuple(sorted(x for x in set().union(*loads) if sum(x in s for s in loads) > 1
                        and "b" not in ks.layouts[x[0]]))


def held_itemsizes(ks: KernelSource) -> list[int]:
    """Bytes per element of each held input, in order (the manifest's `held`: the host sizes
    the dynamic shared memory of HELD launches by it)."""
    return [ks.kernel.in_dtypes[pos].itemsize for pos, _ in held_inputs(ks)]


def _held_slots(ks: KernelSource) -> list[str]:
    """The HELD flag and, per held input, the pointer to this row's slot of shared memory."""
    lines = [f"  const bool held = p.flags & {HELD};   // held inputs in shared memory",
             "  FB_DYNAMIC_SHARED(fb_held);",
             f"  const U slot = block ? 0u : (U)(threadIdx.x / 32), slots = block ? 1u : "
             f"{BLOCK // 32}u;"]
    regions: list[str] = []      # the bytes of the regions before this one
    for pos, c in held_inputs(ks):
        d = ks.kernel.in_dtypes[pos]
        S, z = storage_type(d), f"((n * {d.itemsize}u + 15u) & ~(U)15)"
        at = " + ".join(regions + [f"slot * {z}"])
        lines.append(f"  {S}* const h{pos}_{c} = ({S}*)(fb_held + {at});")
        regions.append(f"slots * {z}")
    return lines


def _render_reduction(r: CudaRenderer, ks: KernelSource, n: int) -> list[str]:
    """A reduction kernel: R threads per row (a warp, or the block: flags bit 2), template over
    (index type, V). Each sweep over the row (the passes of `schedule`, then the sweep that
    stores the full outputs) has every thread take V consecutive elements every R * V;
    reductions are accumulated per thread, combined by a butterfly of warp shuffles (so every
    lane holds the result) and, for R = 128, across the warps through shared memory. With
    flags bit 3 the held inputs are read from global memory by their first sweep only."""
    k, abi, rank, layouts = ks.kernel, ks.abi, ks.rank, ks.layouts
    sched = schedule(k)
    r.inner = tuple(_inner(lay) for lay in layouts)
    n_in = len(k.in_dtypes)
    lines = [_args_struct(abi, n), "", f"// {ks.key}",
             "template <typename I, int V>",
             f"__device__ __forceinline__ void fb_body_{n}(const fb_args_{n}& p) {{",
             "  typedef typename fb_unsigned<I>::type U;",
             f"  const bool block = p.flags & {ROW_BLOCK};    // a block per row, else a warp",
             "  const U R = block ? (U)blockDim.x : 32u;        // threads per row",
             f"  const long long N = p.meta[{abi.size(rank - 1)}], W = N > 0 ? N : 1;",
             "  const long long first = p.start ? (p.start + W - 1) / W : 0;   // rows r with "
             "r W in [start, stop)",
             "  const long long row = first + (block ? (long long)blockIdx.x : "
             f"(long long)blockIdx.x * {BLOCK // 32} + threadIdx.x / 32);",
             "  if (row * W >= p.stop) return;",
             "  const U n = (U)N, l = block ? (U)threadIdx.x : (U)(threadIdx.x % 32);"]
    if rank > 1:
        lines.append("  U r = (U)row;")
        for d in range(rank - 2, 0, -1):
            lines.append(f"  const I x{d} = (I)(r % (U)p.meta[{abi.size(d)}]); "
                         f"r /= (U)p.meta[{abi.size(d)}];")
        lines.append("  const I x0 = (I)r;")
    loaded = sorted({n_.attr for n_ in k.nodes if n_.op == "load"})
    for pos in sorted({p for p, _ in loaded}):
        lines.append(f"  const I o{pos} = {_row_offset(abi, pos, layouts[pos], rank)};")
    for o in range(len(k.outputs)):
        lines.append(f"  const I q{o} = {_row_offset(abi, n_in + o, 's' * rank, rank)};")
    lines += _uniform_inputs(r, k, abi)
    lines += [f"  {x}" for x in r.render_nodes(k, sched.hoisted)]
    held = held_inputs(ks)
    if held:
        lines += _held_slots(ks)
    sweeps = _sweep_nodes(k)
    first = {x: min(s for s, ids in enumerate(sweeps) if x in {k.nodes[i].attr for i in ids})
             for x in held}

    def inner(pos: int) -> str:
        letter = r.inner[pos]
        return {"c": " + (I)b", "s": f" + (I)b * (I)p.meta[{abi.stride(pos, rank - 1)}]",
                "b": ""}[letter]

    def sweep(at: int, ids: tuple[int, ...], before: list[str], body: list[str],
              after: list[str]) -> list[str]:
        """Sweep number `at` over the row; held inputs are stored to shared memory by the
        first sweep that loads them and read back from there by later ones."""
        out = ["  for (U b = l * V; b < n; b += R * V) {"]
        for pos, c in sorted({k.nodes[i].attr for i in ids if k.nodes[i].op == "load"}):
            S, W = storage_type(k.in_dtypes[pos]), "V" if r.inner[pos] == "c" else "1"
            vec, h = f"fb_vec<{S}, {W}>", f"h{pos}_{c} + b"
            load = (f"fb_load<{S}, {W}>((const {S}*)p.ptr[{abi.in_ptr(pos, c)}] + "
                    f"o{pos}{inner(pos)})")
            if (pos, c) not in first:
                out.append(f"    const {vec} l{pos}_{c} = {load};")
            elif first[pos, c] == at:
                out += [f"    const {vec} l{pos}_{c} = {load};",
                        f"    if (held) fb_store<{S}, {W}>({h}, l{pos}_{c});"]
            else:
                out += [f"    {vec} l{pos}_{c};",
                        f"    if (held) l{pos}_{c} = fb_load<{S}, {W}>({h});",
                        f"    else l{pos}_{c} = {load};"]
        out += [f"    {x}" for x in before]
        out += ["#pragma unroll", "    for (int j = 0; j < V; ++j) {"]
        if any(k.nodes[i].op == "rand" for i in ids):
            out += ["      unsigned rw[4];",
                    "      fb_philox(rw, (unsigned long long)(row * N + (long long)b + j), seed, "
                    "offset);"]
        out += [f"      {x}" for x in r.render_nodes(k, ids) + body]
        return out + ["    }"] + [f"    {x}" for x in after] + ["  }"]

    for at, ps in enumerate(sched.passes):
        reds = [(i, k.nodes[i].op, k.nodes[i].dtype) for i in ps.reds]
        for i, op, d in reds:
            T = r.type_name(d)
            lines.append(f"  {T} s{i} = {_identity(r, op, d)};")
            if op == "rsum" and d.is_float:
                lines.append(f"  {T} c{i} = {r.const(0, d)};")
        lines += sweep(at, ps.elem, [], [_accumulate(r, op, str(i), f"v{k.nodes[i].args[0]}", d)
                                     for i, op, d in reds], [])
        for i, op, d in reds:
            T = r.type_name(d)
            fold = f"fb_fabs(s{i}) < fb_inf<{T}>() ? s{i} + c{i} : s{i}" \
                if op == "rsum" and d.is_float else f"s{i}"
            lines += [f"  {T} t{i} = {fold};", *_butterfly(r, op, i, d, "32")]
        lines.append("  if (block) {    // the warps' results, through shared memory")
        for i, op, d in reds:
            lines += [f"    FB_SHARED({r.type_name(d)}, w{i}, {ROW_THREADS // 32});",
                      f"    if (threadIdx.x % 32 == 0) w{i}[threadIdx.x / 32] = t{i};"]
        lines += ["    __syncthreads();", "    const int warps = (int)(blockDim.x / 32);"]
        for i, op, d in reds:
            lines += [f"    t{i} = w{i}[threadIdx.x % warps];",
                      *(f"  {x}" for x in _butterfly(r, op, i, d, "warps"))]
        lines.append("  }")
        for i, op, d in reds:
            empty = f"n > 0 ? t{i} : {r.const(math.nan if d.is_float else 0, d)}" \
                if op != "rsum" else f"t{i}"
            lines.append(f"  const {r.type_name(d)} v{i} = {empty};")
        lines += [f"  {x}" for x in r.render_nodes(k, ps.after)]
    stores = []
    for o, out in enumerate(k.outputs):
        if out.row:
            S = storage_type(out.dtype)
            stores.append(f"    (({S}*)p.ptr[{abi.out_ptr(o)}])[q{o}] = "
                          f"{r.store(f'v{out.parts[0]}', out.dtype)};")
    if stores:
        lines += ["  if (l == 0) {", *stores, "  }"]
    full = [(o, out) for o, out in enumerate(k.outputs) if not out.row]
    if full:
        before, body, after = [], [], []
        for o, out in full:
            S = storage_type(out.dtype)
            for c, part in enumerate(out.parts):
                before.append(f"fb_vec<{S}, V> s{o}_{c};")
                body.append(f"s{o}_{c}.v[j] = {r.store(f'v{part}', out.dtype)};")
                after.append(f"fb_store<{S}, V>(({S}*)p.ptr[{abi.out_ptr(o, c)}] + q{o} + (I)b, "
                             f"s{o}_{c});")
        lines += sweep(len(sched.passes), sched.final, before, body, after)
    lines += ["}", "",
              f'extern "C" __global__ void __launch_bounds__({ROW_THREADS}, 1) '
              f"{ks.symbol}(const fb_args_{n} p) {{", *_dispatch(n, vector_width(ks)), "}"]
    return lines


def render_module(kernels: list[KernelSource]) -> str:
    """CUDA C++ of one group: one `extern "C"` kernel per ArgSpec, named `KernelSource.symbol`."""
    group = kernels[0].kernel.group if kernels else ""
    libm = [n for n in _MATH1 if n not in _TRIG]
    math1 = "\n".join(" ".join(f"FB_MATH1({n})" for n in libm[i:i + 7])
                      for i in range(0, len(libm), 7))
    parts = [PRELUDE.format(version=__version__, group=group, math1=math1) + TRIG]
    r = CudaRenderer()
    for n, ks in enumerate(kernels):
        render = _render_reduction if ks.kernel.reduce else _render_kernel
        parts.append("\n".join(render(r, ks, n)))
    return "\n\n".join(parts) + "\n"
