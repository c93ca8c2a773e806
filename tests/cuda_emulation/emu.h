// Host-side emulation of the CUDA subset fusebuild's generated kernels use, so their source can
// be compiled with g++ and run on the CPU. __CUDA_ARCH__ stays undefined, so the kernels take
// their portable (non-PTX) code paths.
//
// Every thread of a block is a fiber with its own stack (a hand-rolled stack switch on x86-64,
// ucontext elsewhere or with -DFB_EMU_UCONTEXT), all on the calling OS thread; blocks run one
// after another. The scheduler runs each runnable fiber until it waits at a barrier or exits,
// then releases the barriers whose threads have all arrived:
//   __syncthreads()              every thread of the block;
//   __syncwarp, __shfl*_sync     every thread of the warp (full masks only), the shuffles over a
//                                per-warp exchange buffer between two warp barriers.
// A round that releases nothing while threads still wait is a deadlock (a barrier some thread
// never reaches, threads that exited while others wait): the launch stops and fb_emulate returns
// nonzero with the reason in fb_emu_error(). Shared memory is block-local static storage:
// FB_SHARED(T, name, n) (what generated kernels use) is filled with 0xff bytes (NaN, -1) at the
// start of every block, so reads of never-written shared memory show up; plain `__shared__`
// variables are not poisoned.
//
// Global-memory traffic (compiled with -DFB_EMU_TRAFFIC and g++ -fsanitize=thread, whose
// instrumentation calls __tsan_readN / __tsan_writeN before every memory access of the compiled
// code; harness.compile_source(traffic=True) links no sanitizer runtime, the hooks are here):
// the bytes each access moves are added to the registered range (an array of the launch) that
// holds its address (the first such range), loads also marking the bytes they touched. Stacks,
// parameters and shared memory lie outside every range, so only global memory is counted,
// however the code reaches it.
#pragma once
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <utility>
#if !defined(__x86_64__) || defined(FB_EMU_UCONTEXT)
#include <ucontext.h>
#define FB_EMU_USE_UCONTEXT 1
#endif

#define __global__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__

struct dim3 { unsigned x, y, z; };
static thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
static const int warpSize = 32;

inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return (unsigned)(((unsigned long long)a * b) >> 32);
}
inline long long __double_as_longlong(double d) { long long x; memcpy(&x, &d, 8); return x; }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }

namespace fb_emu {

enum State : unsigned char { RUN, AT_WARP, AT_BLOCK, EXITED, FAILED };
const unsigned MAX_THREADS = 1024;
const size_t STACK_BYTES = 256 << 10;    // per fiber, below a guard page

#ifdef FB_EMU_USE_UCONTEXT
typedef ucontext_t Context;
#else
typedef void* Context;                   // the saved stack pointer
extern "C" void fb_emu_switch(void** save, void* load);
extern "C" void fb_emu_start(void);
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer to *save, loads `load` and restores the same from there. A new fiber's
// stack holds a frame whose return address is fb_emu_start, which calls the entry in r12.
asm(R"(
  .text
  .p2align 4
  .weak fb_emu_switch
  .hidden fb_emu_switch
  .type fb_emu_switch, @function
fb_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fb_emu_switch, .-fb_emu_switch
  .weak fb_emu_start
  .hidden fb_emu_start
  .type fb_emu_start, @function
fb_emu_start:
  callq *%r12
  ud2
  .size fb_emu_start, .-fb_emu_start
)");
#endif

struct Fiber {
  Context ctx;
  State state;
};

// One OS thread's emulator: the fibers of the running block and their stacks.
struct Scheduler {
  Context main;
  Fiber fibers[MAX_THREADS];
  long long exchange[MAX_THREADS];       // shuffle values, one slot per thread
  unsigned n, cur;
  unsigned long long block_generation;
  void (*body)(const void*);
  const void* params;
  char* stacks;                          // mmap'ed: [guard page, stack] per fiber
  unsigned capacity;
  char error[1024];

  static size_t slot_bytes() { return STACK_BYTES + (size_t)sysconf(_SC_PAGESIZE); }
  bool reserve(unsigned threads) {
    if (threads <= capacity) return true;
    if (stacks) munmap(stacks, capacity * slot_bytes());
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), slot = slot_bytes();
    void* p = mmap(nullptr, threads * slot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    stacks = p == MAP_FAILED ? nullptr : (char*)p;
    capacity = stacks ? threads : 0;
    for (unsigned t = 0; t < capacity; ++t) mprotect(stacks + t * slot, page, PROT_NONE);
    return stacks != nullptr;
  }
};
static thread_local Scheduler S;       // trivially destructible: no TLS wrapper calls
struct StackRelease {                   // unmaps this thread's stacks when it ends
  ~StackRelease() {
    if (S.stacks) munmap(S.stacks, S.capacity * Scheduler::slot_bytes());
  }
};
static thread_local StackRelease release_stacks;

inline void memory_barrier() { asm volatile("" ::: "memory"); }

inline void switch_to(Context* save, Context* load) {
  memory_barrier();
#ifdef FB_EMU_USE_UCONTEXT
  swapcontext(save, load);
#else
  fb_emu_switch(save, *load);
#endif
  memory_barrier();
}

// The first frame of every fiber: run the kernel for this thread, then exit.
inline void fiber_main() {
  S.body(S.params);
  S.fibers[S.cur].state = EXITED;
  switch_to(&S.fibers[S.cur].ctx, &S.main);    // never resumed
}

inline void start_fiber(unsigned t) {
  char* stack = S.stacks + t * Scheduler::slot_bytes() + (size_t)sysconf(_SC_PAGESIZE);
  Fiber& f = S.fibers[t];
  f.state = RUN;
#ifdef FB_EMU_USE_UCONTEXT
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = STACK_BYTES;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main, 0);
#else
  unsigned long long* top = (unsigned long long*)(stack + STACK_BYTES);
  unsigned long long* frame = top - 8;         // popped by fb_emu_switch, then `ret`
  unsigned mxcsr = __builtin_ia32_stmxcsr();
  unsigned short fpcw;
  asm volatile("fnstcw %0" : "=m"(fpcw));
  frame[0] = mxcsr | ((unsigned long long)fpcw << 32);
  frame[1] = frame[2] = frame[3] = frame[5] = frame[6] = 0;     // r15 r14 r13 rbx rbp
  frame[4] = (unsigned long long)(void (*)())fiber_main;        // r12: the entry
  frame[7] = (unsigned long long)fb_emu_start;
  f.ctx = frame;
#endif
}

// Stop the running fiber and the launch with a message (printf-style).
template <typename... A>
inline void fail(const char* format, A... args) {
  int used = snprintf(S.error, sizeof S.error, "block %u thread %u: ", blockIdx.x, threadIdx.x);
  snprintf(S.error + used, sizeof S.error - used, format, args...);
  S.fibers[S.cur].state = FAILED;
  switch_to(&S.fibers[S.cur].ctx, &S.main);    // never resumed
}

inline void wait(State at) {
  S.fibers[S.cur].state = at;
  switch_to(&S.fibers[S.cur].ctx, &S.main);
}

inline unsigned warp_lanes(unsigned warp) {
  const unsigned left = S.n - 32 * warp;
  return left >= 32 ? 32 : left;
}

inline void warp_barrier(unsigned mask, const char* what) {
  const unsigned lanes = warp_lanes(threadIdx.x / 32);
  const unsigned full = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  if (mask != full) fail("%s with mask 0x%08x: only the mask of every lane of the warp (0x%08x)"
                         " is emulated", what, mask, full);
  wait(AT_WARP);
}

// "threads 0-31, 64-127" for the fibers in state `s`.
inline void describe(State s, const char* what, char*& out, char* end) {
  bool any = false;
  for (unsigned t = 0; t < S.n; ++t) {
    if (S.fibers[t].state != s || (t && S.fibers[t - 1].state == s)) continue;
    unsigned last = t;
    while (last + 1 < S.n && S.fibers[last + 1].state == s) ++last;
    out += snprintf(out, end - out, "%s%u", any ? ", " : "; threads ", t);
    if (last > t) out += snprintf(out, end - out, "-%u", last);
    any = true;
  }
  if (any) out += snprintf(out, end - out, " %s", what);
}

// Run the block's fibers to completion; false (and S.error) on a deadlock or a failure.
inline bool run_block() {
  for (;;) {
    for (unsigned t = 0; t < S.n; ++t) {
      if (S.fibers[t].state != RUN) continue;
      S.cur = t;
      threadIdx = {t, 0, 0};
      switch_to(&S.main, &S.fibers[t].ctx);
      if (S.fibers[t].state == FAILED) return false;
    }
    unsigned exited = 0, at_block = 0;
    for (unsigned t = 0; t < S.n; ++t) {
      exited += S.fibers[t].state == EXITED;
      at_block += S.fibers[t].state == AT_BLOCK;
    }
    if (exited == S.n) return true;
    bool released = false;
    if (at_block == S.n) {
      for (unsigned t = 0; t < S.n; ++t) S.fibers[t].state = RUN;
      released = true;
    }
    for (unsigned w = 0; 32 * w < S.n; ++w) {
      bool all = true;
      for (unsigned l = 0; l < warp_lanes(w); ++l) all &= S.fibers[32 * w + l].state == AT_WARP;
      if (!all) continue;
      for (unsigned l = 0; l < warp_lanes(w); ++l) S.fibers[32 * w + l].state = RUN;
      released = true;
    }
    if (!released) {
      char* out = S.error;
      char* end = S.error + sizeof S.error;
      out += snprintf(out, end - out, "deadlock in block %u", blockIdx.x);
      describe(AT_BLOCK, "wait at __syncthreads", out, end);
      describe(AT_WARP, "wait at a warp barrier (__syncwarp or a shuffle)", out, end);
      describe(EXITED, "exited", out, end);
      return false;
    }
  }
}

template <typename P>
void call_kernel(const void* params) {
  const auto* k = (const std::pair<void (*)(P), P>*)params;
  k->first(k->second);
}

}  // namespace fb_emu

inline void __syncthreads() { fb_emu::wait(fb_emu::AT_BLOCK); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { fb_emu::warp_barrier(mask, "__syncwarp"); }

namespace fb_emu {
// Lane `src` (absolute, within the warp) of value v, or v itself for src < 0.
template <typename T>
inline T shuffle(unsigned mask, T v, int src, int width, const char* what) {
  static_assert(sizeof(T) <= sizeof(long long), "shuffles move at most 8 bytes");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("%s with width %d: not a power of two in [1, 32]", what, width);
  const unsigned tid = threadIdx.x, base = tid & ~31u;
  memcpy(&S.exchange[tid], &v, sizeof(T));
  warp_barrier(mask, what);
  T r = v;
  if (src >= 0) memcpy(&r, &S.exchange[base + src], sizeof(T));
  warp_barrier(mask, what);
  return r;
}
}  // namespace fb_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = threadIdx.x & 31, group = lane & -width;
  return fb_emu::shuffle(mask, v, group + (src_lane & (width - 1)), width, "__shfl_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = threadIdx.x & 31, src = lane ^ lane_mask;
  return fb_emu::shuffle(mask, v, (src & -width) > (lane & -width) ? -1 : src, width,
                         "__shfl_xor_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = threadIdx.x & 31;
  const bool inside = (lane & (width - 1)) + (int)delta < width;
  return fb_emu::shuffle(mask, v, inside ? lane + (int)delta : -1, width, "__shfl_down_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = threadIdx.x & 31;
  const bool inside = (lane & (width - 1)) >= (int)delta;
  return fb_emu::shuffle(mask, v, inside ? lane - (int)delta : -1, width, "__shfl_up_sync");
}

// Block-local shared storage, poisoned (0xff bytes) at the start of every block.
template <typename T, unsigned long long N>
struct fb_shared_storage {
  unsigned long long generation;
  alignas(16) T data[N];
  T* get() {
    if (generation != fb_emu::S.block_generation) {
      memset((void*)data, 0xff, sizeof data);
      generation = fb_emu::S.block_generation;
    }
    return data;
  }
};
#define FB_SHARED(T, name, n) \
  static thread_local fb_shared_storage<T, (n)> name##_fb_storage; \
  T* const name = name##_fb_storage.get()

// Run `kernel` over a 1-D grid of `block`-thread blocks, its parameter struct read from `words`.
// Returns 0, or 1 after a deadlock or an emulation error (message: fb_emu_error()).
template <typename P>
int fb_emulate(void (*kernel)(P), const long long* words, unsigned grid, unsigned block) {
  using namespace fb_emu;
  std::pair<void (*)(P), P> call;
  call.first = kernel;
  memcpy(&call.second, words, sizeof(P));
  S.error[0] = 0;
  (void)&release_stacks;
  if (block == 0 || block > MAX_THREADS || !S.reserve(block)) {
    snprintf(S.error, sizeof S.error, "cannot emulate blocks of %u threads", block);
    return 1;
  }
  S.n = block;
  S.body = call_kernel<P>;
  S.params = &call;
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {b, 0, 0};
    ++S.block_generation;
    for (unsigned t = 0; t < block; ++t) start_fiber(t);
    if (!run_block()) return 1;
  }
  return 0;
}

template <typename P>
unsigned long long fb_param_bytes(void (*)(P)) { return sizeof(P); }

extern "C" __attribute__((weak)) const char* fb_emu_error(void) { return fb_emu::S.error; }

#ifdef FB_EMU_TRAFFIC
namespace fb_emu {
const unsigned MAX_RANGES = 64;
// The registered ranges [lo, hi) with their byte counts and a byte map of loaded bytes.
struct Traffic {
  unsigned n;
  unsigned long long lo[MAX_RANGES], hi[MAX_RANGES], loaded[MAX_RANGES], stored[MAX_RANGES];
  unsigned char* touched[MAX_RANGES];
};
static thread_local Traffic traffic;

__attribute__((no_sanitize_thread)) inline void count(const void* p, unsigned long bytes,
                                                      bool store) {
  const unsigned long long a = (unsigned long long)p;
  Traffic& t = traffic;
  for (unsigned i = 0; i < t.n; ++i) {
    if (a < t.lo[i] || a >= t.hi[i]) continue;
    if (store) {
      t.stored[i] += bytes;
    } else {
      t.loaded[i] += bytes;
      const unsigned long long left = t.hi[i] - a;
      memset(t.touched[i] + (a - t.lo[i]), 1, bytes < left ? bytes : left);
    }
    return;
  }
}
}  // namespace fb_emu

// Count from now on into `n` ranges, given as {lo, hi, byte map address} triples (a byte map
// holds hi - lo zeroed bytes); counts start at 0. n = 0 stops counting.
extern "C" __attribute__((no_sanitize_thread)) void fb_emu_traffic_start(
    unsigned n, const unsigned long long* ranges) {
  fb_emu::Traffic& t = fb_emu::traffic;
  t.n = n < fb_emu::MAX_RANGES ? n : fb_emu::MAX_RANGES;
  for (unsigned i = 0; i < t.n; ++i) {
    t.lo[i] = ranges[3 * i];
    t.hi[i] = ranges[3 * i + 1];
    t.touched[i] = (unsigned char*)ranges[3 * i + 2];
    t.loaded[i] = t.stored[i] = 0;
  }
}
// Bytes loaded and stored per range: out[2 i], out[2 i + 1].
extern "C" __attribute__((no_sanitize_thread)) void fb_emu_traffic_counts(
    unsigned long long* out) {
  const fb_emu::Traffic& t = fb_emu::traffic;
  for (unsigned i = 0; i < t.n; ++i) {
    out[2 * i] = t.loaded[i];
    out[2 * i + 1] = t.stored[i];
  }
}

#define FB_TSAN_ACCESS(size) \
  extern "C" __attribute__((no_sanitize_thread)) void __tsan_read##size(void* p) { \
    fb_emu::count(p, size, false); } \
  extern "C" __attribute__((no_sanitize_thread)) void __tsan_unaligned_read##size(void* p) { \
    fb_emu::count(p, size, false); } \
  extern "C" __attribute__((no_sanitize_thread)) void __tsan_write##size(void* p) { \
    fb_emu::count(p, size, true); } \
  extern "C" __attribute__((no_sanitize_thread)) void __tsan_unaligned_write##size(void* p) { \
    fb_emu::count(p, size, true); }
FB_TSAN_ACCESS(1) FB_TSAN_ACCESS(2) FB_TSAN_ACCESS(4) FB_TSAN_ACCESS(8) FB_TSAN_ACCESS(16)
extern "C" __attribute__((no_sanitize_thread)) void __tsan_read_range(void* p, unsigned long n) {
  fb_emu::count(p, n, false);
}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_write_range(void* p, unsigned long n) {
  fb_emu::count(p, n, true);
}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_init(void) {}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_func_entry(void*) {}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_func_exit(void) {}
#endif

// Dynamic shared memory (`extern __shared__`, declared by FB_DYNAMIC_SHARED(name)): the bytes
// a launch of fb_emulate_dynamic gives every block, poisoned like FB_SHARED at its start.
#include <stdlib.h>
namespace fb_emu {
struct DynamicShared {
  unsigned char* data;
  size_t bytes;
  unsigned long long generation;
  unsigned char* get() {
    if (generation != S.block_generation) {
      memset(data, 0xff, bytes);
      generation = S.block_generation;
    }
    return data;
  }
};
static thread_local DynamicShared dynamic_shared;
}  // namespace fb_emu
#define FB_DYNAMIC_SHARED(name) unsigned char* const name = fb_emu::dynamic_shared.get()

// fb_emulate with `bytes` of dynamic shared memory per block (16-byte aligned).
template <typename P>
int fb_emulate_dynamic(void (*kernel)(P), const long long* words, unsigned grid,
                       unsigned block, size_t bytes) {
  unsigned char* data = (unsigned char*)aligned_alloc(16, (bytes + 16) / 16 * 16);
  if (!data) {
    snprintf(fb_emu::S.error, sizeof fb_emu::S.error, "cannot allocate %zu bytes", bytes);
    return 1;
  }
  fb_emu::dynamic_shared = {data, bytes, 0};
  const int failed = fb_emulate(kernel, words, grid, block);
  fb_emu::dynamic_shared = {nullptr, 0, 0};
  free(data);
  return failed;
}
