// Fused scale + relative-position bias + key-padding mask + softmax, forward and backward (spec §4).
//
//   x[b,h,i,j] = scale·s[b,h,i,j] + bias[h,i,j] + (0 if keep[b,j] else -inf)
//   p = softmax_j(x) (fp32 math), lse = log Σ_j exp(x)   (a row with no finite logit: p = 0, lse = +inf)
//   backward (recomputes p from s and lse, so fp16/bf16 callers get fp32-exact probabilities without storing them;
//   p = p'/Σ_j p' with p' = exp(x - lse), which cancels lse's rounding error, a per-row factor):
//   g = p ⊙ (dp - Σ_j p·dp),  ds = scale·g,  dbias[h,i,j] = Σ_b g,  dtable[index[i,j], h] += Σ_b g
//
// Layout: scores/p/dp/ds are contiguous (B, H, Nq, Nk); any Nk (no multiple-of-4 requirement).
// Mapping: one warp owns one query row (h, i) for a chunk of the batch. Each lane keeps E = ceil(Nk/32) (rounded up
// to a power of two, Nk <= 1024) elements in registers, element j = k·32 + lane (coalesced loads, one read of s and
// one write of p per element). The bias row is loaded or gathered once per warp and reused for every batch row of
// the chunk; in the backward the warp sums g over its batch rows in registers, so the dense bias gradient gets one
// atomic per element per chunk and the table gradient one warp-aggregated atomic per distinct table row per chunk
// (warp_scatter_add). Longer rows (Nk > 1024) take a loop kernel, one warp per (b, h, i) row.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>

#include "launchers.h"
#include "softmax_common.cuh"

namespace vlmo_fast {
namespace cuda {
namespace {

using namespace softmax;

std::atomic<int> g_kernel{kSoftmaxRows};  // which kernels take rows of up to kStagedMaxKeys keys

constexpr int kWarps = 4;  // warps per block

// Rows up to 512 keep the next batch row's raw loads in flight during this row's math; at 1024 the extra registers
// would spill.
template <int E>
constexpr bool kPrefetch = E <= 16;

// Raw row of a (B,H,Nq,Nk) tensor into registers (issued early, converted at use: the next row's loads overlap this
// row's math).
template <int DT, int E>
__device__ __forceinline__ void load_raw(const void* base, int64_t row, int64_t n_k, typename Elem<DT>::T (&v)[E]) {
  using T = typename Elem<DT>::T;
  const T* src = static_cast<const T*>(base) + row * n_k;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int k = 0; k < E; ++k) {
    const int64_t j = k * 32 + lane;
    if (j < n_k) v[k] = __ldg(src + j);
  }
}

template <int IN, int E>
__device__ __forceinline__ void logits(const Params& p, int64_t b, const typename Elem<IN>::T (&raw)[E],
                                       const float (&bias)[E], float (&x)[E]) {
  const int lane = threadIdx.x & 31;
  const uint8_t* keep = p.keep ? p.keep + b * p.n_k : nullptr;
#pragma unroll
  for (int k = 0; k < E; ++k) {
    const int64_t j = k * 32 + lane;
    float v = -kInf;
    if (j < p.n_k) {
      v = p.scale * to_float<IN>(raw[k]) + bias[k];
      if (keep && !__ldg(keep + j)) v = -kInf;
    }
    x[k] = v;
  }
}

template <int IN, int OUT, int E>
__global__ void __launch_bounds__(kWarps * 32) softmax_forward_rows(Params p) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (warp >= p.units * p.chunks) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const int64_t unit = warp % p.units, chunk = warp / p.units;
  const int64_t h = unit / p.n_q, i = unit % p.n_q;
  const int64_t b0 = chunk * p.batch_per_chunk;
  const int64_t b1 = min(p.batch, b0 + p.batch_per_chunk);
  float bias[E];
  load_bias<E>(p, h, i, bias);
  using TI = typename Elem<IN>::T;
  using TO = typename Elem<OUT>::T;
  TI cur[E], nxt[E];
  load_raw<IN, E>(p.scores, (b0 * p.heads + h) * p.n_q + i, p.n_k, cur);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = (b * p.heads + h) * p.n_q + i;
    if (kPrefetch<E>) {
      if (b + 1 < b1) load_raw<IN, E>(p.scores, row + p.heads * p.n_q, p.n_k, nxt);
    } else if (b > b0) {
      load_raw<IN, E>(p.scores, row, p.n_k, cur);
    }
    float x[E];
    logits<IN, E>(p, b, cur, bias, x);
    float inv;
    const float lse = row_softmax<E>(x, inv);
    TO* o = static_cast<TO*>(p.out) + row * p.n_k;
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int64_t j = k * 32 + lane;
      if (j < p.n_k) Elem<OUT>::store(o + j, x[k] * inv);
    }
    if (lane == 0) store_global(p.lse + row, lse);
    if (kPrefetch<E>) {
#pragma unroll
      for (int k = 0; k < E; ++k) cur[k] = nxt[k];
    }
  }
}

template <int IN, int GD, int E>
__global__ void __launch_bounds__(kWarps * 32) softmax_backward_rows(Params p) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (warp >= p.units * p.chunks) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const int64_t unit = warp % p.units, chunk = warp / p.units;
  const int64_t h = unit / p.n_q, i = unit % p.n_q;
  const int64_t b0 = chunk * p.batch_per_chunk;
  const int64_t b1 = min(p.batch, b0 + p.batch_per_chunk);
  float bias[E], gsum[E];
  load_bias<E>(p, h, i, bias);
#pragma unroll
  for (int k = 0; k < E; ++k) gsum[k] = 0.0f;
  using TI = typename Elem<IN>::T;
  using TG = typename Elem<GD>::T;
  TI s_cur[E], s_nxt[E];
  TG g_cur[E], g_nxt[E];
  const int64_t first = (b0 * p.heads + h) * p.n_q + i;
  load_raw<IN, E>(p.scores, first, p.n_k, s_cur);
  load_raw<GD, E>(p.dp, first, p.n_k, g_cur);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = (b * p.heads + h) * p.n_q + i;
    if (kPrefetch<E>) {
      if (b + 1 < b1) {
        load_raw<IN, E>(p.scores, row + p.heads * p.n_q, p.n_k, s_nxt);
        load_raw<GD, E>(p.dp, row + p.heads * p.n_q, p.n_k, g_nxt);
      }
    } else if (b > b0) {
      load_raw<IN, E>(p.scores, row, p.n_k, s_cur);
      load_raw<GD, E>(p.dp, row, p.n_k, g_cur);
    }
    float x[E], dp[E];
    logits<IN, E>(p, b, s_cur, bias, x);
#pragma unroll
    for (int k = 0; k < E; ++k) dp[k] = k * 32 + lane < p.n_k ? to_float<GD>(g_cur[k]) : 0.0f;
    row_softmax_grad<E>(x, dp, __ldg(p.lse + row));
    TI* ds = static_cast<TI*>(p.dscores) + row * p.n_k;
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int64_t j = k * 32 + lane;
      gsum[k] += x[k];
      if (j < p.n_k) Elem<IN>::store(ds + j, p.scale * x[k]);
    }
    if (kPrefetch<E>) {
#pragma unroll
      for (int k = 0; k < E; ++k) {
        s_cur[k] = s_nxt[k];
        g_cur[k] = g_nxt[k];
      }
    }
  }
  flush_bias_grad<E>(p, h, i, gsum);
}

// ---- rows longer than 1024: one warp per (b, h, i), two passes over global memory -------------------------------

template <int IN>
__device__ __forceinline__ float logit_at(const Params& p, int64_t row, int64_t b, int64_t h, int64_t i, int64_t j) {
  using TI = typename Elem<IN>::T;
  float v = p.scale * Elem<IN>::load(static_cast<const TI*>(p.scores) + row * p.n_k + j) + bias_at(p, h, i, j);
  if (p.keep && !__ldg(p.keep + b * p.n_k + j)) v = -kInf;
  return v;
}

template <int IN, int OUT>
__global__ void __launch_bounds__(kWarps * 32) softmax_forward_long(Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.batch * p.units) return;
  const int lane = threadIdx.x & 31;
  const int64_t b = row / p.units, unit = row % p.units, h = unit / p.n_q, i = unit % p.n_q;
  float m = -kInf, s = 0.0f;  // online max and rescaled sum
  for (int64_t j = lane; j < p.n_k; j += 32) {
    const float x = logit_at<IN>(p, row, b, h, i, j);
    if (x == -kInf) continue;
    if (x > m) {
      s = s * expf(m - x) + 1.0f;
      m = x;
    } else {
      s += expf(x - m);
    }
  }
  const float mx = warp_max(m);
  const float sum = warp_sum(m == -kInf ? 0.0f : s * expf(m - mx));
  using TO = typename Elem<OUT>::T;
  TO* o = static_cast<TO*>(p.out) + row * p.n_k;
  if (mx == -kInf) {
    for (int64_t j = lane; j < p.n_k; j += 32) Elem<OUT>::store(o + j, 0.0f);
    if (lane == 0) store_global(p.lse + row, kInf);
    return;
  }
  // exp(x - mx) / sum, as the row kernel: exp(x - lse) would carry lse's rounding error (|lse|·2^-24) into every p
  const float inv = 1.0f / sum;
  for (int64_t j = lane; j < p.n_k; j += 32)
    Elem<OUT>::store(o + j, expf(logit_at<IN>(p, row, b, h, i, j) - mx) * inv);
  if (lane == 0) store_global(p.lse + row, mx + logf(sum));
}

template <int IN, int GD>
__global__ void __launch_bounds__(kWarps * 32) softmax_backward_long(Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.batch * p.units) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const int64_t b = row / p.units, unit = row % p.units, h = unit / p.n_q, i = unit % p.n_q;
  using TG = typename Elem<GD>::T;
  using TI = typename Elem<IN>::T;
  const TG* dp = static_cast<const TG*>(p.dp) + row * p.n_k;
  TI* ds = static_cast<TI*>(p.dscores) + row * p.n_k;
  const float l = __ldg(p.lse + row);
  float dot = 0.0f, mass = 0.0f;  // renormalised by Σ p' as in the row kernel
  for (int64_t j = lane; j < p.n_k; j += 32) {
    const float e = expf(logit_at<IN>(p, row, b, h, i, j) - l);
    dot += e * Elem<GD>::load(dp + j);
    mass += e;
  }
  mass = warp_sum(mass);
  const float inv = mass > 0.0f ? 1.0f / mass : 0.0f;
  dot = warp_sum(dot) * inv;
  for (int64_t j0 = 0; j0 < p.n_k; j0 += 32) {  // warp-uniform trip count: warp_scatter_add needs every lane
    const int64_t j = j0 + lane;
    float g = 0.0f;
    if (j < p.n_k) {
      g = expf(logit_at<IN>(p, row, b, h, i, j) - l) * inv * (Elem<GD>::load(dp + j) - dot);
      Elem<IN>::store(ds + j, p.scale * g);
      if (p.dbias) atomicAdd(p.dbias + unit * p.n_k + j, g);
    }
    if (p.dtable) {
      const int64_t key = j < p.n_k ? static_cast<int64_t>(__ldg(p.index + i * p.n_k + j)) : -1;
      warp_scatter_add(p.dtable, key, p.heads, h, g);
    }
  }
}

// ---- dispatch ------------------------------------------------------------------------------------------------------

int lanes_tier(int64_t n_k) {
  if (n_k <= 32) return 1;
  if (n_k <= 64) return 2;
  if (n_k <= 128) return 4;
  if (n_k <= 256) return 8;
  if (n_k <= 512) return 16;
  if (n_k <= 1024) return 32;
  return 0;  // loop kernel
}

template <int IN, int OUT, bool BACKWARD>
Kernel pick_kernel(int tier) {
#define VLMO_SOFTMAX_TIER(E)                                   \
  case E:                                                      \
    if constexpr (BACKWARD) return softmax_backward_rows<IN, OUT, E>; \
    else return softmax_forward_rows<IN, OUT, E>;
  switch (tier) {
    VLMO_SOFTMAX_TIER(1)
    VLMO_SOFTMAX_TIER(2)
    VLMO_SOFTMAX_TIER(4)
    VLMO_SOFTMAX_TIER(8)
    VLMO_SOFTMAX_TIER(16)
    VLMO_SOFTMAX_TIER(32)
    default:
      if constexpr (BACKWARD) return softmax_backward_long<IN, OUT>;
      else return softmax_forward_long<IN, OUT>;
  }
#undef VLMO_SOFTMAX_TIER
}

// Compiled pairs: (fp32, fp32), (fp16, fp16), (bf16, bf16), (fp16, fp32), (bf16, fp32); Python runs other output
// dtypes through fp32 (each pair costs 14 kernels of compile time). nullptr for a pair that is not compiled.
template <bool BACKWARD, int IN>
Kernel pick_second(int second, int tier) {
  if (second == kF32) return pick_kernel<IN, kF32, BACKWARD>(tier);
  if constexpr (IN != kF32) {
    if (second == IN) return pick_kernel<IN, IN, BACKWARD>(tier);
  }
  return nullptr;
}

// `second` is the output dtype (forward) or the incoming gradient's dtype (backward).
template <bool BACKWARD>
std::string run(int in_dtype, int second, SoftmaxShape sh, float scale, SoftmaxBias bias, const uint8_t* keep,
                Params p, int device, uintptr_t stream) {
  auto valid = [](int dt) { return dt == kF32 || dt == kF16 || dt == kBF16; };
  if (!valid(in_dtype) || !valid(second)) return "unsupported dtype code";
  if (bias.table && !bias.index) return "bias table without index";
  const int tier = lanes_tier(sh.n_k);
  Kernel kernel = in_dtype == kF32   ? pick_second<BACKWARD, kF32>(second, tier)
                  : in_dtype == kF16 ? pick_second<BACKWARD, kF16>(second, tier)
                                     : pick_second<BACKWARD, kBF16>(second, tier);
  if (kernel == nullptr) return "dtype pair not compiled (use fp32 or the input dtype)";
  std::string err;
  const int sms = prepare_device(device, &err);
  if (sms < 0) return err;
  if (sh.batch * sh.heads * sh.n_q * sh.n_k == 0) return "";
  p.batch = sh.batch;
  p.heads = sh.heads;
  p.n_q = sh.n_q;
  p.n_k = sh.n_k;
  p.scale = scale;
  p.dense = bias.dense;
  p.table = bias.table;
  p.ts0 = bias.table_s0;
  p.ts1 = bias.table_s1;
  p.index = bias.index;
  p.keep = keep;
  if (tier > 0 && sh.n_k <= kStagedMaxKeys && g_kernel.load(std::memory_order_relaxed) == kSoftmaxStaged)
    return launch_staged_softmax(BACKWARD, in_dtype, second, p, sms, stream);
  p.units = sh.heads * sh.n_q;
  int64_t warps;
  if (tier > 0) {
    p.chunks = choose_chunks(kernel, kWarps * 32, kWarps, sms, p.units, sh.batch);
    p.batch_per_chunk = ceil_div(sh.batch, p.chunks);
    p.chunks = ceil_div(sh.batch, p.batch_per_chunk);
    warps = p.units * p.chunks;
  } else {
    p.chunks = 1;
    p.batch_per_chunk = sh.batch;
    warps = sh.batch * p.units;
  }
  const int64_t blocks = ceil_div(warps, kWarps);
  if (blocks > 0x7fffffffLL) return "masked_softmax: problem too large for one launch";
  kernel<<<dim3(static_cast<unsigned>(blocks)), kWarps * 32, 0, as_stream(stream)>>>(p);
  return launch_status(BACKWARD ? "masked_softmax backward" : "masked_softmax forward");
}

}  // namespace

std::string set_masked_softmax_kernel(int kind) {
  if (kind != kSoftmaxRows && kind != kSoftmaxStaged) return "unknown softmax kernel kind";
  g_kernel.store(kind, std::memory_order_relaxed);
  return "";
}

int masked_softmax_kernel() { return g_kernel.load(std::memory_order_relaxed); }

std::string masked_softmax_forward(const void* scores, int scores_dtype, void* out, int out_dtype, float* lse,
                                   SoftmaxShape shape, float scale, SoftmaxBias bias, const uint8_t* keep, int device,
                                   uintptr_t stream) {
  Params p{};
  p.scores = scores;
  p.out = out;
  p.lse = lse;
  return run<false>(scores_dtype, out_dtype, shape, scale, bias, keep, p, device, stream);
}

std::string masked_softmax_backward(const void* dp, int dp_dtype, const void* scores, int scores_dtype,
                                    const float* lse, void* dscores, SoftmaxShape shape, float scale, SoftmaxBias bias,
                                    const uint8_t* keep, float* dbias_dense, float* dtable, int device,
                                    uintptr_t stream) {
  if (dtable && !bias.table) return "table gradient requested without a table";
  if (dbias_dense && !bias.dense) return "dense bias gradient requested without a dense bias";
  Params p{};
  p.scores = scores;
  p.lse = const_cast<float*>(lse);
  p.dp = dp;
  p.dscores = dscores;
  p.dbias = dbias_dense;
  p.dtable = dtable;
  return run<true>(scores_dtype, dp_dtype, shape, scale, bias, keep, p, device, stream);
}

}  // namespace cuda
}  // namespace vlmo_fast
