// Fused scale + relative-position bias + key-padding mask + softmax on the CPU, forward and backward (spec §4).
//
//   x[b,h,i,j] = scale·s[b,h,i,j] + bias[h,i,j] + (0 if keep[b,j] else -inf)
//   p = softmax_j(x),  lse = log Σ_j exp(x)   (a row with no finite logit gives p = 0, lse = +inf)
//   backward: g = p ⊙ (dp - Σ_j p·dp);  ds = scale·g;  dbias = Σ_b g;  dtable[index[i,j], h] += Σ_b g[.., i, j]
//   with p recomputed as p'/Σ_j p', p' = exp(x - lse) (the division cancels lse's rounding error, a per-row factor)
//
// Work unit = a block of kBlock consecutive (h, i) query rows across the whole batch: the block's bias rows are read
// or gathered once and reused for all B batch rows, and in the backward the batch sum of g stays in a block-private
// buffer, so the dense bias gradient needs no atomics and the table gradient is scattered once per block row into a
// thread-private table (summed at the end). Rows go through L1-resident fp32 scratch rows: one read of scores, one
// write of p (no temporaries).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_common.h"
#include "kernels.h"

namespace vlmo_fast {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query rows per work block. A block's rows are contiguous in memory for every batch index (row = b·H·Nq + u with
// u = h·Nq + i), so each batch step streams ~kBlock·Nk·4 bytes the prefetcher can follow, while the block's bias
// rows (kBlock·Nk floats) stay in L1/L2 across the batch loop.
constexpr int64_t kBlock = 16;

// The bias rows of units [u0, u1): dense rows are used in place; table rows are gathered into scratch.
VLMO_INLINE const float* bias_block(const SoftmaxBias& bias, const SoftmaxShape& sh, int64_t u0, int64_t u1,
                                    float* scratch) {
  const int64_t nk = sh.n_k;
  if (bias.dense) return bias.dense + u0 * nk;
  if (!bias.table) return nullptr;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t h = u / sh.n_q, i = u % sh.n_q;
    const int32_t* idx = bias.index + i * nk;
    const float* col = bias.table + h * bias.table_s1;
    float* dst = scratch + (u - u0) * nk;
    for (int64_t j = 0; j < nk; ++j) dst[j] = col[static_cast<int64_t>(idx[j]) * bias.table_s0];
  }
  return scratch;
}

// x = scale·s + bias + mask into xs (fp32 scratch row), then -inf up to nk16 (the vector loops' padding: p = 0).
template <int IN>
VLMO_INLINE void logits(const typename Elem<IN>::T* __restrict s, const float* __restrict brow,
                        const float* __restrict mrow, float scale, float* __restrict xs, int64_t nk, int64_t nk16) {
  if (brow && mrow) {
    for (int64_t j = 0; j < nk; ++j) xs[j] = scale * Elem<IN>::load(s[j]) + brow[j] + mrow[j];
  } else if (brow) {
    for (int64_t j = 0; j < nk; ++j) xs[j] = scale * Elem<IN>::load(s[j]) + brow[j];
  } else if (mrow) {
    for (int64_t j = 0; j < nk; ++j) xs[j] = scale * Elem<IN>::load(s[j]) + mrow[j];
  } else {
    for (int64_t j = 0; j < nk; ++j) xs[j] = scale * Elem<IN>::load(s[j]);
  }
  for (int64_t j = nk; j < nk16; ++j) xs[j] = kNegInf;
}

VLMO_INLINE int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// scratch: a padded row (round16(Nk) floats) + kBlock·Nk of gathered bias.
template <int IN, int OUT>
VLMO_CPU_CLONES void forward_block(const typename Elem<IN>::T* scores, typename Elem<OUT>::T* out, float* lse,
                                   const SoftmaxShape& sh, float scale, const SoftmaxBias& bias,
                                   const float* mask_add, int64_t u0, int64_t u1, float* scratch) {
  const int64_t nk = sh.n_k, nk16 = round16(nk), units = sh.heads * sh.n_q;
  float* xs = scratch;  // padded with -inf past nk, so the vector loops need no tail
  const float* bblock = bias_block(bias, sh, u0, u1, scratch + nk16);
  for (int64_t b = 0; b < sh.batch; ++b) {
    const float* mrow = mask_add ? mask_add + b * nk : nullptr;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t row = b * units + u;
      typename Elem<OUT>::T* o = out + row * nk;
      logits<IN>(scores + row * nk, bblock ? bblock + (u - u0) * nk : nullptr, mrow, scale, xs, nk, nk16);
      const float mx = row_max(xs, nk16);
      if (!(mx > kNegInf)) {  // every key masked (zeros, lse = +inf), or NaN logits the max skipped (NaN out, as
        bool nan = false;      // the PyTorch path and the CUDA kernel give: a diverging model must show)
        for (int64_t j = 0; j < nk; ++j) nan |= xs[j] != xs[j];
        const float fill = nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
        for (int64_t j = 0; j < nk; ++j) o[j] = Elem<OUT>::store(fill);
        lse[row] = nan ? fill : std::numeric_limits<float>::infinity();
        continue;
      }
      Vec16 acc = {};
      for (int64_t j = 0; j < nk16; j += 16) {
        const Vec16 e = exp_approx(vload(xs + j) - mx);
        vstore(xs + j, e);
        acc += e;
      }
      const float sum = hsum(acc);
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < nk; ++j) o[j] = Elem<OUT>::store(xs[j] * inv);
      lse[row] = mx + std::log(sum);
    }
  }
}

// scratch: 2 padded rows (round16(Nk) floats each) + kBlock·Nk of batch-summed g + kBlock·Nk of gathered bias.
template <int IN, int GD>
VLMO_CPU_CLONES void backward_block(const typename Elem<GD>::T* dp, const typename Elem<IN>::T* scores,
                                    const float* lse, typename Elem<IN>::T* dscores, const SoftmaxShape& sh,
                                    float scale, const SoftmaxBias& bias, const float* mask_add, float* dbias_dense,
                                    float* dtable_private, int64_t u0, int64_t u1, float* scratch) {
  const int64_t nk = sh.n_k, nk16 = round16(nk), units = sh.heads * sh.n_q;
  float* ps = scratch;  // logits, then p, then g; padded with -inf (p = 0) past nk
  float* dps = scratch + nk16;  // padded with 0
  float* gsum = scratch + 2 * nk16;
  for (int64_t j = nk; j < nk16; ++j) dps[j] = 0.0f;
  const float* bblock = bias_block(bias, sh, u0, u1, gsum + kBlock * nk);
  const bool want_bias_grad = dbias_dense != nullptr || dtable_private != nullptr;
  if (want_bias_grad)
    for (int64_t t = 0; t < (u1 - u0) * nk; ++t) gsum[t] = 0.0f;
  for (int64_t b = 0; b < sh.batch; ++b) {
    const float* mrow = mask_add ? mask_add + b * nk : nullptr;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t row = b * units + u;
      typename Elem<IN>::T* ds = dscores + row * nk;
      logits<IN>(scores + row * nk, bblock ? bblock + (u - u0) * nk : nullptr, mrow, scale, ps, nk, nk16);
      const float l = lse[row];  // +inf for an all-masked row: p = 0 below
      const typename Elem<GD>::T* g = dp + row * nk;
      for (int64_t j = 0; j < nk; ++j) dps[j] = Elem<GD>::load(g[j]);
      // p' = exp(x - lse) is off by one factor per row, exp(±|lse|·2^-24) from lse's fp32 rounding: dividing by
      // Σ p' (free in this pass) removes it, so a large-logit row keeps eager precision, and Σ p·dp does not pick
      // up the factor's error where it cancels against dp
      Vec16 acc = {}, mass = {};
      for (int64_t j = 0; j < nk16; j += 16) {
        const Vec16 p = exp_approx(vload(ps + j) - l);
        vstore(ps + j, p);
        acc += p * vload(dps + j);
        mass += p;
      }
      const float total = hsum(mass);
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;  // 0 for an all-masked row (p = 0)
      const float dot = hsum(acc) * inv;
      for (int64_t j = 0; j < nk; ++j) ps[j] = ps[j] * inv * (dps[j] - dot);
      for (int64_t j = 0; j < nk; ++j) ds[j] = Elem<IN>::store(scale * ps[j]);
      if (want_bias_grad) {
        float* gs = gsum + (u - u0) * nk;
        for (int64_t j = 0; j < nk; ++j) gs[j] += ps[j];
      }
    }
  }
  if (dbias_dense) {
    float* d = dbias_dense + u0 * nk;
    for (int64_t t = 0; t < (u1 - u0) * nk; ++t) d[t] = gsum[t];
  }
  if (dtable_private) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t h = u / sh.n_q, i = u % sh.n_q;
      const int32_t* idx = bias.index + i * nk;
      const float* gs = gsum + (u - u0) * nk;
      for (int64_t j = 0; j < nk; ++j) dtable_private[static_cast<int64_t>(idx[j]) * sh.heads + h] += gs[j];
    }
  }
}

// Batch-row additive key mask: 0 (keep) or -inf, (B, Nk). Null when there is no mask.
std::vector<float> make_mask_add(const uint8_t* keep, const SoftmaxShape& sh) {
  std::vector<float> m;
  if (keep) {
    m.resize(static_cast<size_t>(sh.batch * sh.n_k));
    for (int64_t t = 0; t < sh.batch * sh.n_k; ++t) m[t] = keep[t] ? 0.0f : kNegInf;
  }
  return m;
}

int pick_threads(int requested, int64_t units, int64_t work) {
  int t = std::max(1, requested);
  // below ~64k elements the fork/join costs more than it saves
  if (work < (int64_t{1} << 16)) t = 1;
  return static_cast<int>(std::min<int64_t>(t, std::max<int64_t>(units, 1)));
}

bool valid_dtype(int dt) { return dt == kF32 || dt == kF16 || dt == kBF16; }

template <int IN, int OUT>
void forward_typed(const void* scores, void* out, float* lse, const SoftmaxShape& sh, float scale,
                   const SoftmaxBias& bias, const uint8_t* keep, int num_threads) {
  const std::vector<float> mask = make_mask_add(keep, sh);
  const float* mask_add = keep ? mask.data() : nullptr;
  const int64_t units = sh.heads * sh.n_q, blocks = (units + kBlock - 1) / kBlock;
  const int threads = pick_threads(num_threads, blocks, units * sh.batch * sh.n_k);
  const auto* s = static_cast<const typename Elem<IN>::T*>(scores);
  auto* o = static_cast<typename Elem<OUT>::T*>(out);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(static_cast<size_t>(round16(sh.n_k) + kBlock * sh.n_k));
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk)
      forward_block<IN, OUT>(s, o, lse, sh, scale, bias, mask_add, blk * kBlock,
                             std::min(units, (blk + 1) * kBlock), scratch.data());
  }
}

template <int IN, int GD>
void backward_typed(const void* dp, const void* scores, const float* lse, void* dscores, const SoftmaxShape& sh,
                    float scale, const SoftmaxBias& bias, const uint8_t* keep, float* dbias_dense, float* dtable,
                    int num_threads) {
  const std::vector<float> mask = make_mask_add(keep, sh);
  const float* mask_add = keep ? mask.data() : nullptr;
  const int64_t units = sh.heads * sh.n_q, blocks = (units + kBlock - 1) / kBlock;
  const int threads = pick_threads(num_threads, blocks, units * sh.batch * sh.n_k);
  const int64_t table_size = dtable ? bias.table_rows * sh.heads : 0;
  // One private table per thread: the VLMo index sends thousands of (i, j) to the same row, so shared atomics would
  // serialize; private copies are tiny (R·H floats) and summed once.
  std::vector<float> priv(static_cast<size_t>(table_size * threads), 0.0f);
  const auto* g = static_cast<const typename Elem<GD>::T*>(dp);
  const auto* s = static_cast<const typename Elem<IN>::T*>(scores);
  auto* ds = static_cast<typename Elem<IN>::T*>(dscores);
#pragma omp parallel num_threads(threads)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    float* mine = dtable ? priv.data() + tid * table_size : nullptr;
    std::vector<float> scratch(static_cast<size_t>(2 * round16(sh.n_k) + 2 * kBlock * sh.n_k));
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk)
      backward_block<IN, GD>(g, s, lse, ds, sh, scale, bias, mask_add, dbias_dense, mine, blk * kBlock,
                             std::min(units, (blk + 1) * kBlock), scratch.data());
  }
  if (dtable) {
    for (int64_t e = 0; e < table_size; ++e) {
      float acc = 0.0f;
      for (int t = 0; t < threads; ++t) acc += priv[t * table_size + e];
      dtable[e] = acc;
    }
  }
}

#define VLMO_DISPATCH_PAIR(A, B, FN, ...)                                  \
  do {                                                                     \
    if ((A) == kF32 && (B) == kF32) FN<kF32, kF32>(__VA_ARGS__);           \
    else if ((A) == kF32 && (B) == kF16) FN<kF32, kF16>(__VA_ARGS__);      \
    else if ((A) == kF32 && (B) == kBF16) FN<kF32, kBF16>(__VA_ARGS__);    \
    else if ((A) == kF16 && (B) == kF32) FN<kF16, kF32>(__VA_ARGS__);      \
    else if ((A) == kF16 && (B) == kF16) FN<kF16, kF16>(__VA_ARGS__);      \
    else if ((A) == kF16 && (B) == kBF16) FN<kF16, kBF16>(__VA_ARGS__);    \
    else if ((A) == kBF16 && (B) == kF32) FN<kBF16, kF32>(__VA_ARGS__);    \
    else if ((A) == kBF16 && (B) == kF16) FN<kBF16, kF16>(__VA_ARGS__);    \
    else FN<kBF16, kBF16>(__VA_ARGS__);                                    \
  } while (0)

}  // namespace

std::string masked_softmax_forward(const void* scores, int scores_dtype, void* out, int out_dtype, float* lse,
                                   SoftmaxShape shape, float scale, SoftmaxBias bias, const uint8_t* keep,
                                   int num_threads) {
  if (!valid_dtype(scores_dtype) || !valid_dtype(out_dtype)) return "unsupported dtype code";
  if (bias.table && !bias.index) return "bias table without index";
  if (shape.batch * shape.heads * shape.n_q * shape.n_k == 0) return "";
  VLMO_DISPATCH_PAIR(scores_dtype, out_dtype, forward_typed, scores, out, lse, shape, scale, bias, keep, num_threads);
  return "";
}

std::string masked_softmax_backward(const void* dp, int dp_dtype, const void* scores, int scores_dtype,
                                    const float* lse, void* dscores, SoftmaxShape shape, float scale, SoftmaxBias bias,
                                    const uint8_t* keep, float* dbias_dense, float* dtable, int num_threads) {
  if (!valid_dtype(scores_dtype) || !valid_dtype(dp_dtype)) return "unsupported dtype code";
  if (bias.table && !bias.index) return "bias table without index";
  if (dtable && !bias.table) return "table gradient requested without a table";
  if (dbias_dense && !bias.dense) return "dense bias gradient requested without a dense bias";
  if (shape.batch * shape.heads * shape.n_q * shape.n_k == 0) {
    if (dbias_dense) std::fill(dbias_dense, dbias_dense + shape.heads * shape.n_q * shape.n_k, 0.0f);
    if (dtable) std::fill(dtable, dtable + bias.table_rows * shape.heads, 0.0f);
    return "";
  }
  VLMO_DISPATCH_PAIR(scores_dtype, dp_dtype, backward_typed, dp, scores, lse, dscores, shape, scale, bias, keep,
                     dbias_dense, dtable, num_threads);
  return "";
}

}  // namespace cpu
}  // namespace vlmo_fast
