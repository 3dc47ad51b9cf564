// Shared device helpers of the CUDA kernels: element types (fp32 math on fp32/fp16/bf16 storage), warp reductions,
// the contention-aware scatter-add, and host-side launch plumbing (device selection, SM count, error text).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace vlmo_fast {
namespace cuda {

// Element type codes shared with Python and the CPU kernels (csrc/cpu/cpu_common.h).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Every global-memory store of the kernels goes through store_global (and every input read through __ldg), so the
// CPU emulator of the tests (tests/cuda_emu) can check each address against the tensors handed to the launch: it
// defines VLMO_FAST_STORE_CHECK; on the device the hook is empty and store_global is a plain store.
#ifndef VLMO_FAST_STORE_CHECK
#define VLMO_FAST_STORE_CHECK(p, bytes)
#endif
template <class T>
__device__ __forceinline__ void store_global(T* p, T v) {
  VLMO_FAST_STORE_CHECK(p, sizeof(T))
  *p = v;
}

// The storage types and their conversions to and from fp32 math (round to nearest even)...
template <int DT>
struct Storage;
template <>
struct Storage<kF32> {
  using T = float;
  static __device__ __forceinline__ float to_float(T v) { return v; }
  static __device__ __forceinline__ T from_float(float v) { return v; }
};
template <>
struct Storage<kF16> {
  using T = __half;
  static __device__ __forceinline__ float to_float(T v) { return __half2float(v); }
  static __device__ __forceinline__ T from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Storage<kBF16> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float to_float(T v) { return __bfloat162float(v); }
  static __device__ __forceinline__ T from_float(float v) { return __float2bfloat16_rn(v); }
};

// ...and one element's read (through __ldg) and write (through store_global) as fp32.
template <int DT>
struct Elem : Storage<DT> {
  using T = typename Storage<DT>::T;
  static __device__ __forceinline__ float load(const T* p) { return Storage<DT>::to_float(__ldg(p)); }
  static __device__ __forceinline__ void store(T* p, float v) { store_global(p, Storage<DT>::from_float(v)); }
};

// The conversions for values already in registers.
template <int DT>
__device__ __forceinline__ float to_float(typename Storage<DT>::T v) {
  return Storage<DT>::to_float(v);
}
template <int DT>
__device__ __forceinline__ typename Storage<DT>::T from_float(float v) {
  return Storage<DT>::from_float(v);
}

// The widest word (16, 8 or 4 bytes) that a vector of kBytes is made of.
template <int kBytes>
using VecWord = typename std::conditional<kBytes % 16 == 0, uint4,
                                          typename std::conditional<kBytes % 8 == 0, uint2, unsigned>::type>::type;

// V consecutive elements of T at p (aligned to V·sizeof(T) bytes) as floats, read through __ldg as 16-, 8- or 4-byte
// words (so the CPU emulator checks them like every other read).

template <int DT, int V>
__device__ __forceinline__ void load_vec(const typename Elem<DT>::T* p, float (&out)[V]) {
  using T = typename Elem<DT>::T;
  constexpr int kBytes = V * static_cast<int>(sizeof(T));
  using W = VecWord<kBytes>;
  static_assert(kBytes % sizeof(W) == 0, "a vector is whole words");
  W words[kBytes / sizeof(W)];
#pragma unroll
  for (int i = 0; i < kBytes / static_cast<int>(sizeof(W)); ++i) words[i] = __ldg(reinterpret_cast<const W*>(p) + i);
  T vals[V];
  memcpy(vals, words, kBytes);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_float<DT>(vals[i]);
}

// The inverse: V floats rounded to T and stored at p (aligned as above) as whole words, through store_global.
template <int DT, int V>
__device__ __forceinline__ void store_vec(typename Elem<DT>::T* p, const float (&in)[V]) {
  using T = typename Elem<DT>::T;
  constexpr int kBytes = V * static_cast<int>(sizeof(T));
  using W = VecWord<kBytes>;
  T vals[V];
#pragma unroll
  for (int i = 0; i < V; ++i) vals[i] = from_float<DT>(in[i]);
  W words[kBytes / sizeof(W)];
  memcpy(words, vals, kBytes);
#pragma unroll
  for (int i = 0; i < kBytes / static_cast<int>(sizeof(W)); ++i) store_global(reinterpret_cast<W*>(p) + i, words[i]);
}

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Lanes that share `key` (from __match_any_sync) sum their values: a tree over each group's members in lane order,
// five rounds of shuffles whatever the grouping. Returns true on the group's lowest lane, which then holds the group
// sum. All 32 lanes must call it together.
__device__ __forceinline__ bool group_sum(unsigned group, float& v) {
  const int lane = threadIdx.x & 31;
  const int count = __popc(group);
  const int rank = __popc(group & ((1u << lane) - 1u));
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int partner_rank = rank + off;
    // __fns(mask, 0, k) is the lane of the k-th (1-based) set bit of mask
    const int partner = partner_rank < count ? static_cast<int>(__fns(group, 0, partner_rank + 1)) : lane;
    const float w = __shfl_sync(kFullMask, v, partner);
    if ((rank & (2 * off - 1)) == 0 && partner_rank < count) v += w;
  }
  return rank == 0;
}

// dst[key·stride + offset] += v over a warp, with one atomic per distinct key instead of one per lane: the
// relative-position index sends long runs of (i, j) to the same table row (all text→image pairs of a head share
// one), so per-element atomics would serialize on a handful of addresses. Lanes with key < 0 contribute nothing.
// All 32 lanes must call it (the shuffles are warp-wide; the branch on any_shared is warp-uniform).
__device__ __forceinline__ void warp_scatter_add(float* dst, int64_t key, int64_t stride, int64_t offset, float v) {
  const unsigned group = __match_any_sync(kFullMask, static_cast<unsigned long long>(key));
  const bool any_shared = __any_sync(kFullMask, __popc(group) > 1);
  bool leader = true;
  if (any_shared) leader = group_sum(group, v);
  if (leader && key >= 0) atomicAdd(dst + key * stride + offset, v);
}

// ---- host side -----------------------------------------------------------------------------------------------------

// Makes `device` current for this (statically linked) runtime and returns its SM count (cached), or -1 on error.
int prepare_device(int device, std::string* error);

// "" if the last launch succeeded, else the CUDA error text prefixed by `what`.
std::string launch_status(const char* what);

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace vlmo_fast
