// What the softmax kernels of masked_softmax.cu (one warp per query row) and masked_softmax_staged.cu (a block per
// eight query rows, staged through shared memory) share: the launch parameters, the bias lookups, the bias-gradient
// flush and the batch-chunk planner. Formulas in masked_softmax.cu's header.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "cuda_common.cuh"

namespace vlmo_fast {
namespace cuda {
namespace softmax {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Params {
  const void* scores;
  void* out;
  float* lse;
  const void* dp;
  void* dscores;
  int64_t batch, heads, n_q, n_k;
  float scale;
  const float* dense;
  const float* table;
  int64_t ts0, ts1;
  const int32_t* index;
  const uint8_t* keep;
  float* dbias;
  float* dtable;
  int64_t units;            // work units of a batch row: query rows (heads · n_q), or blocks of them (staged)
  int64_t chunks;           // batch chunks per unit
  int64_t batch_per_chunk;  // batch rows of one chunk, handled in sequence by one warp (block, staged)
};

__device__ __forceinline__ float bias_at(const Params& p, int64_t h, int64_t i, int64_t j) {
  if (p.dense) return __ldg(p.dense + (h * p.n_q + i) * p.n_k + j);
  if (p.table) return __ldg(p.table + static_cast<int64_t>(__ldg(p.index + i * p.n_k + j)) * p.ts0 + h * p.ts1);
  return 0.0f;
}

template <int E>
__device__ __forceinline__ void load_bias(const Params& p, int64_t h, int64_t i, float (&bias)[E]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int k = 0; k < E; ++k) {
    const int64_t j = k * 32 + lane;
    bias[k] = j < p.n_k ? bias_at(p, h, i, j) : 0.0f;
  }
}

// A warp's row softmax: logits x (lane l holds keys l, l + 32, ...; -inf where masked or past the row end) become
// exp(x - max), and p = x · inv; returns lse = log Σ exp(x). A row with no finite logit gets x = 0, inv = 0 (p = 0)
// and lse = +inf. (The caller scales while storing: normalising in place here costs the staged forward a spill.)
template <int E>
__device__ __forceinline__ float row_softmax(float (&x)[E], float& inv) {
  float mx = x[0];
#pragma unroll
  for (int k = 1; k < E; ++k) mx = fmaxf(mx, x[k]);
  mx = warp_max(mx);
  if (mx == -kInf) mx = 0.0f;  // every key masked: every x becomes 0 below (no -inf - -inf)
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < E; ++k) {
    x[k] = expf(x[k] - mx);  // -inf -> 0
    sum += x[k];
  }
  sum = warp_sum(sum);
  inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  return sum > 0.0f ? mx + logf(sum) : kInf;
}

// The backward of a warp's row, in place: logits x become g = p ⊙ (dp - Σ_j p·dp), p recomputed from the saved lse
// (+inf for an all-masked row: g = 0) and dp the incoming gradient (0 past the row end). p' = exp(x - lse) carries one
// factor per row from lse's fp32 rounding (exp(±|lse|·2^-24)); dividing by Σ p' removes it (see the CPU kernel).
template <int E>
__device__ __forceinline__ void row_softmax_grad(float (&x)[E], const float (&dp)[E], float lse) {
  float dot = 0.0f, mass = 0.0f;
#pragma unroll
  for (int k = 0; k < E; ++k) {
    x[k] = expf(x[k] - lse);
    dot += x[k] * dp[k];
    mass += x[k];
  }
  mass = warp_sum(mass);
  const float inv = mass > 0.0f ? 1.0f / mass : 0.0f;  // 0 for an all-masked row (p = 0)
  dot = warp_sum(dot) * inv;
#pragma unroll
  for (int k = 0; k < E; ++k) x[k] = x[k] * inv * (dp[k] - dot);
}

// Writes a warp's batch sums of g for query row (h, i): into the dense bias gradient (a plain
// store when one chunk covers the whole batch, else an atomic), or scattered into the table rows of the index. All
// 32 lanes must call it (warp_scatter_add).
template <int E>
__device__ __forceinline__ void flush_bias_grad(const Params& p, int64_t h, int64_t i, const float (&gsum)[E]) {
  const int lane = threadIdx.x & 31;
  if (p.dbias) {
    float* d = p.dbias + (h * p.n_q + i) * p.n_k;
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int64_t j = k * 32 + lane;
      if (j < p.n_k) {
        if (p.chunks == 1) store_global(d + j, gsum[k]);
        else atomicAdd(d + j, gsum[k]);
      }
    }
  }
  if (p.dtable) {
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int64_t j = k * 32 + lane;
      const int64_t key = j < p.n_k ? static_cast<int64_t>(__ldg(p.index + i * p.n_k + j)) : -1;
      warp_scatter_add(p.dtable, key, p.heads, h, gsum[k]);
    }
  }
}

using Kernel = void (*)(Params);

// Batch chunks per unit. Each warp (block) loops over its chunk's batch rows, so fewer chunks mean more bias reuse
// and fewer gradient atomics, but the warps are long-lived: the grid must also fill the GPU in (close to) whole
// waves, or the last partial wave idles most SMs. Takes the fewest chunks whose last wave is at least 85% full, from
// the kernel's measured occupancy (`units_per_block` units resident per block); else the best-filled count.
inline int64_t choose_chunks(Kernel kernel, int threads, int units_per_block, int sms, int64_t units,
                             int64_t batch) {
  int blocks_per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads, 0) != cudaSuccess ||
      blocks_per_sm <= 0) {
    cudaGetLastError();
    blocks_per_sm = 4;
  }
  const double resident = static_cast<double>(sms) * blocks_per_sm * units_per_block;
  int64_t best = batch;
  double best_fill = -1.0;
  for (int64_t c = 1; c <= batch; ++c) {
    const int64_t chunks = ceil_div(batch, ceil_div(batch, c));  // the count the rounding to whole rows gives
    if (chunks != c) continue;
    const double waves = static_cast<double>(units * chunks) / resident;
    const double fill = waves < 1.0 ? waves : waves / std::ceil(waves);
    if (fill >= 0.85) return chunks;
    if (fill > best_fill) {
      best_fill = fill;
      best = chunks;
    }
  }
  return best;
}

}  // namespace softmax

// ---- the staged kernels (masked_softmax_staged.cu) -------------------------------------------------------------

// Longest rows the staged kernels take.
constexpr int64_t kStagedMaxKeys = 256;

// Launches the staged forward (backward) kernel for the dtype pair (in_dtype, second) on `p`, whose pointers, sizes,
// scale and bias are set (units, chunks and batch_per_chunk are planned here). "" on success, else the error.
std::string launch_staged_softmax(bool backward, int in_dtype, int second, softmax::Params p, int sms,
                                  uintptr_t stream);

}  // namespace cuda
}  // namespace vlmo_fast
