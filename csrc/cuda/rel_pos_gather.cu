// Relative-position bias gather and its backward (spec §2 "Gather").
//
//   forward:  out[c, i, j] = table[index[i, j], c]                       (C, N, N) from an (R, C) strided table
//   backward: dtable[r, c] = Σ_{(i, j): index[i, j] == r} grad[c, i, j]
//
// Forward: one thread per output element; index reads and output writes are coalesced, the table (a few hundred KB)
// is served from L1/L2. Backward: one thread per position (i, j), looping over the columns c (each c reads a
// coalesced row of grad). The scatter is contention-heavy (every text→image pair of a head lands on one table row),
// so a warp first groups its lanes by table row (__match_any_sync, once per position, reused for every c) and sums
// each group with shuffles; only the group leader issues an atomic.
#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda_common.cuh"
#include "launchers.h"

namespace vlmo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_forward(const T* __restrict__ table, int64_t s0, int64_t s1,
                                                           const int32_t* __restrict__ index, int64_t n, int64_t cols,
                                                           T* __restrict__ out) {
  const int64_t nn = n * n;
  const int64_t total = cols * nn;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = t / nn, ij = t % nn;
    store_global(out + t, __ldg(table + static_cast<int64_t>(__ldg(index + ij)) * s0 + c * s1));
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads) gather_backward(const typename Elem<DT>::T* __restrict__ grad,
                                                            const int32_t* __restrict__ index, int64_t n,
                                                            int64_t cols, float* __restrict__ dtable) {
  const int64_t nn = n * n;
  // every lane of a warp runs the same number of iterations (the shuffles need the whole warp)
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + (threadIdx.x & ~31); base < nn; base += stride) {
    const int64_t ij = base + (threadIdx.x & 31);
    const bool in = ij < nn;
    const int64_t key = in ? static_cast<int64_t>(__ldg(index + ij)) : -1;
    const unsigned group = __match_any_sync(kFullMask, static_cast<unsigned long long>(key));
    const bool any_shared = __any_sync(kFullMask, __popc(group) > 1);
    for (int64_t c = 0; c < cols; ++c) {
      float v = in ? Elem<DT>::load(grad + c * nn + ij) : 0.0f;
      bool leader = true;
      if (any_shared) leader = group_sum(group, v);
      if (leader && key >= 0) atomicAdd(dtable + key * cols + c, v);
    }
  }
}

int grid_for(int64_t work, int sms) {
  const int64_t blocks = ceil_div(work, kThreads);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(sms) * 16)));
}

}  // namespace

std::string rel_pos_gather_forward(const void* table, int dtype, int64_t s0, int64_t s1, int64_t rows, int64_t cols,
                                   const int32_t* index, int64_t n, void* out, int device, uintptr_t stream) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) return "unsupported dtype code";
  (void)rows;
  if (cols * n * n == 0) return "";
  std::string err;
  const int sms = prepare_device(device, &err);
  if (sms < 0) return err;
  const int grid = grid_for(cols * n * n, sms);
  cudaStream_t st = as_stream(stream);
  if (dtype == kF32)
    gather_forward<float><<<grid, kThreads, 0, st>>>(static_cast<const float*>(table), s0, s1, index, n, cols,
                                                     static_cast<float*>(out));
  else  // fp16 and bf16 are copied bit for bit
    gather_forward<uint16_t><<<grid, kThreads, 0, st>>>(static_cast<const uint16_t*>(table), s0, s1, index, n, cols,
                                                        static_cast<uint16_t*>(out));
  return launch_status("rel_pos_gather forward");
}

std::string rel_pos_gather_backward(const void* grad, int dtype, const int32_t* index, int64_t n, int64_t rows,
                                    int64_t cols, float* dtable, int device, uintptr_t stream) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) return "unsupported dtype code";
  (void)rows;
  if (cols * n * n == 0) return "";
  std::string err;
  const int sms = prepare_device(device, &err);
  if (sms < 0) return err;
  const int grid = grid_for(n * n, sms);
  cudaStream_t st = as_stream(stream);
  if (dtype == kF32)
    gather_backward<kF32><<<grid, kThreads, 0, st>>>(static_cast<const float*>(grad), index, n, cols, dtable);
  else if (dtype == kF16)
    gather_backward<kF16><<<grid, kThreads, 0, st>>>(static_cast<const __half*>(grad), index, n, cols, dtable);
  else
    gather_backward<kBF16><<<grid, kThreads, 0, st>>>(static_cast<const __nv_bfloat16*>(grad), index, n, cols,
                                                      dtable);
  return launch_status("rel_pos_gather backward");
}

}  // namespace cuda
}  // namespace vlmo_fast
