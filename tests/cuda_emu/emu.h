// A CUDA execution emulator for the kernels of csrc/cuda, so their logic runs (and is tested) on a machine with no
// GPU. Test infrastructure only: tests/cuda_emu.py rewrites each kernel launch `k<<<grid, block, smem, stream>>>(args)`
// into `::cuda_emu::make_launch(k, grid, block, smem, stream)(args)`, force-includes this header, and compiles the
// CUDA sources unchanged otherwise with the host C++ compiler.
//
// Model: every CUDA thread of a block is a fiber (ucontext) on one OS thread; the blocks of a grid run one after the
// other. A fiber runs until it reaches a warp-synchronous operation (__shfl*_sync, __match_any_sync, __any_sync) or
// __syncthreads, then yields. A warp operation completes when all 32 lanes of the warp have reached one (each lane
// gets the hardware result), __syncthreads when every thread of the block that has not exited reached it. It is an
// error, reported as an exception, when
//   - some lanes of a warp wait at a warp operation while others have exited or wait at __syncthreads,
//   - the lanes of one warp operation disagree on the operation or pass a mask other than all 32 lanes,
//   - the launch configuration is one CUDA would reject.
// Blocks run in index order, and the threads of a block are resumed in index order, unless the tests ask for the
// reverse (cuda_emu_set_reverse_order): a kernel whose bits depend on that order has a race or an unordered reduction.
// Reads through __ldg and stores through store_global/atomicAdd (every input and output access of the kernels) can be
// checked against the tensors handed to the launch; a 2-16 byte one not aligned to its size is always an error (the
// GPU's "misaligned address"), e.g. a vector access a kernel takes for rows that are not aligned.
// Shared memory is filled with NaN bytes at each block's start and each fiber's stack top likewise, so a read of
// memory nobody wrote shows up in the results instead of reading as zero.
// Not modelled: timing, memory coalescing, real concurrency between blocks (atomics are plain read-modify-writes on
// one OS thread), and the approximations of fast-math intrinsics (rsqrtf here is exact).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

namespace cuda_emu {

enum class Op : int { kShflXor = 0, kShfl = 1, kMatchAny = 2, kAny = 3 };

uint3& thread_idx();
uint3& block_idx();
dim3& block_dim();
dim3& grid_dim();

// Blocks the calling fiber until its whole warp reached a warp operation; returns this lane's result.
uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg);
void sync_threads();
// With read checking on (tests/cuda_emulator.py turns it on for each launcher call and lists the storages of the
// tensors handed to it), a __ldg outside all of them is recorded and reported when the launch ends; false for such a
// read, which then returns zero instead of touching the address.
bool check_read(const void* p, size_t bytes);
// The same for stores (csrc/cuda's store_global and atomicAdd); a store outside them is skipped.
bool check_write(const void* p, size_t bytes);
// Fills a block's static shared array with NaN bytes, once per block (whichever thread gets there first).
void poison_shared(void* p, size_t bytes);
// Runs `body` for every thread of every block of the grid (see the model above).
void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

template <class K>
struct Launch {
  K kernel;
  dim3 grid, block;
  size_t shared_bytes;
  template <class... A>
  void operator()(A... args) const {
    launch(grid, block, shared_bytes, [&] { kernel(args...); });
  }
};

template <class K>
Launch<K> make_launch(K kernel, dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return Launch<K>{kernel, grid, block, shared_bytes};
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp operations move at most 64 bits");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace cuda_emu

// ---- the device-side vocabulary the kernels use ---------------------------------------------------------------------

#define VLMO_FAST_STORE_CHECK(p, bytes) \
  if (!::cuda_emu::check_write(p, bytes)) return;

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

template <class T>
inline T __ldg(const T* p) {
  if (!cuda_emu::check_read(p, sizeof(T))) return T{};
  return *p;
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return cuda_emu::from_bits<T>(cuda_emu::warp_op(cuda_emu::Op::kShflXor, mask, cuda_emu::to_bits(v), lane_mask));
}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
  return cuda_emu::from_bits<T>(cuda_emu::warp_op(cuda_emu::Op::kShfl, mask, cuda_emu::to_bits(v), src_lane));
}

inline unsigned __match_any_sync(unsigned mask, unsigned long long v) {
  return static_cast<unsigned>(cuda_emu::warp_op(cuda_emu::Op::kMatchAny, mask, v, 0));
}

inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(cuda_emu::warp_op(cuda_emu::Op::kAny, mask, predicate != 0 ? 1 : 0, 0));
}

inline void __syncthreads() { cuda_emu::sync_threads(); }

inline int __popc(unsigned v) { return __builtin_popcount(v); }

// PTX fns.b32: the bit position of the offset-th set bit of mask counting from base (upward for offset > 0,
// downward for offset < 0; offset 0: base itself if set), 0xffffffff if there is none.
inline unsigned __fns(unsigned mask, unsigned base, int offset) {
  if (offset == 0) return ((mask >> base) & 1u) ? base : 0xffffffffu;
  int count = (offset > 0 ? offset : -offset) - 1;
  const int inc = offset > 0 ? 1 : -1;
  for (int pos = static_cast<int>(base); pos >= 0 && pos < 32; pos += inc) {
    if ((mask >> pos) & 1u) {
      if (count == 0) return static_cast<unsigned>(pos);
      --count;
    }
  }
  return 0xffffffffu;
}

inline float atomicAdd(float* address, float v) {  // one OS thread runs every fiber: a plain read-modify-write
  if (!cuda_emu::check_write(address, sizeof(float))) return 0.0f;
  const float old = *address;
  *address = old + v;
  return old;
}

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float __fmul_rn(float a, float b) { return a * b; }  // the emulator builds as ISO C++: no FMA contraction

template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
