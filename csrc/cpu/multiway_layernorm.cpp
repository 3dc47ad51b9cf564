// Modality-split LayerNorm on the CPU (spec §3.2): rows of a fused (text, image) sequence with position < split use
// expert 0's weight and bias (norm2_text), the others expert 1's (norm2_imag); one expert for unimodal calls.
//
//   forward:  x̂ = (x - mean)·rstd,  rstd = 1/sqrt(var + eps) (biased variance),  y = x̂ ⊙ w_e + b_e
//   backward: dx = rstd·(w_e⊙dy - mean_D(w_e⊙dy) - x̂·mean_D(w_e⊙dy⊙x̂)),  dw_e = Σ_rows(e) dy⊙x̂,  db_e = Σ_rows(e) dy
//
// Rows are split into one contiguous block per thread. The weight gradient is two-stage: each thread accumulates
// dw/db for both experts over its rows in private (E, D) buffers, in chunks of rows (stage 1), then the thread
// totals are summed column-wise in a fixed order (stage 2), so the result is deterministic and needs no atomics.
#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_common.h"
#include "kernels.h"

namespace vlmo_fast {
namespace cpu {
namespace {

VLMO_INLINE int expert_of(int64_t row, int64_t seq_len, int64_t split) {
  return (split >= 0 && row % seq_len >= split) ? 1 : 0;
}

// One row: mean, then the centered sums (two-pass variance, robust to a large mean), then the output. The first
// pass brings the row into L1; the others read it from there. The rounded first mean is corrected by the centred
// residual sum (the corrected two-pass algorithm), so a constant row gets x - mean = 0 exactly (y = b, as eager)
// instead of a rounding residue that rstd ~ 1/sqrt(eps) would blow up. A third pass measures what the fp32 rounding
// of that mean left, δ2 = mean_D(x - μ) (each x - μ is exact near the mean), and x̂ = ((x - μ) - δ2)·rstd: at a large
// mean offset the rounding (half an ulp of μ) would otherwise shift every x̂ of the row alike. A constant row has
// x - μ = 0 and δ2 = 0, so y = b still.
template <int DT>
VLMO_INLINE void forward_row(const typename Elem<DT>::T* __restrict xr, typename Elem<DT>::T* __restrict yr,
                             const float* __restrict w, const float* __restrict b, float eps, float inv_d,
                             float* mean, float* rstd, int64_t d) {
  const int64_t d16 = d / 16 * 16;
  Vec16 acc = {};
  for (int64_t j = 0; j < d16; j += 16) acc += vload_as_float<DT>(xr + j);
  float sum = hsum(acc);
  for (int64_t j = d16; j < d; ++j) sum += Elem<DT>::load(xr[j]);
  const float mu0 = sum * inv_d;
  acc = Vec16{};
  Vec16 res = {};
  for (int64_t j = 0; j < d16; j += 16) {
    const Vec16 c = vload_as_float<DT>(xr + j) - mu0;
    acc += c * c;
    res += c;
  }
  float sq = hsum(acc), sc = hsum(res);
  for (int64_t j = d16; j < d; ++j) {
    const float c = Elem<DT>::load(xr[j]) - mu0;
    sq += c * c;
    sc += c;
  }
  const float dm = sc * inv_d;
  const float mu = mu0 + dm;
  const float rs = 1.0f / std::sqrt(std::max(sq * inv_d - dm * dm, 0.0f) + eps);
  // the fp32 rounding of μ0 + δ, measured as the backward will: δ2 = mean_D(x - μ), each x - μ exact near μ
  acc = Vec16{};
  for (int64_t j = 0; j < d16; j += 16) acc += vload_as_float<DT>(xr + j) - mu;
  float s2 = hsum(acc);
  for (int64_t j = d16; j < d; ++j) s2 += Elem<DT>::load(xr[j]) - mu;
  const float d2 = s2 * inv_d;
  for (int64_t j = 0; j < d16; j += 16)
    vstore_from_float<DT>(yr + j, ((vload_as_float<DT>(xr + j) - mu) - d2) * rs * vload(w + j) + vload(b + j));
  for (int64_t j = d16; j < d; ++j)
    yr[j] = Elem<DT>::store(((Elem<DT>::load(xr[j]) - mu) - d2) * rs * w[j] + b[j]);
  *mean = mu;
  *rstd = rs;
}

template <int DT>
VLMO_CPU_CLONES void forward_rows(const typename Elem<DT>::T* x, typename Elem<DT>::T* y, float* mean, float* rstd,
                                  int64_t r0, int64_t r1, int64_t seq_len, int64_t d, int64_t split,
                                  const float* weight, const float* bias, float eps) {
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t r = r0; r < r1; ++r) {
    const int e = expert_of(r, seq_len, split);
    forward_row<DT>(x + r * d, y + r * d, weight + e * d, bias + e * d, eps, inv_d, mean + r, rstd + r, d);
  }
}

// One row of the backward in two passes over x and dy (the second read hits L1): the first sums w⊙dy, w⊙dy⊙(x-μ)
// and x-μ, the second writes dx and accumulates dw/db. The saved mean μ is fp32-rounded; at a large mean offset its
// rounding (half an ulp of μ) would shift every x̂ of the row alike, so the first pass also measures the residual
// mean δ = mean_D(x - μ) (x - μ is exact there) and x̂ = ((x - μ) - δ)·rstd, as the forward's corrected two-pass.
// Restrict-qualified so no run-time alias checks are needed.
template <int DT>
VLMO_INLINE void backward_row(const typename Elem<DT>::T* __restrict xr, const typename Elem<DT>::T* __restrict gr,
                              typename Elem<DT>::T* __restrict dxr, const float* __restrict w, float mu, float rs,
                              float inv_d, float* __restrict dw, float* __restrict db, int64_t d) {
  Vec16 sa = {}, sc = {}, sd = {};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const Vec16 wg = vload(w + j) * vload_as_float<DT>(gr + j);
    const Vec16 xc = vload_as_float<DT>(xr + j) - mu;
    sa += wg;
    sc += wg * xc;
    sd += xc;
  }
  float a = hsum(sa), c = hsum(sc), dm = hsum(sd);
  for (int64_t k = j; k < d; ++k) {
    const float wg = w[k] * Elem<DT>::load(gr[k]);
    const float xc = Elem<DT>::load(xr[k]) - mu;
    a += wg;
    c += wg * xc;
    dm += xc;
  }
  dm *= inv_d;
  c = (c - dm * a) * rs * inv_d;  // mean_D(w⊙dy⊙x̂)
  a *= inv_d;
  for (j = 0; j + 16 <= d; j += 16) {
    const Vec16 gv = vload_as_float<DT>(gr + j);
    const Vec16 xv = ((vload_as_float<DT>(xr + j) - mu) - dm) * rs;
    vstore_from_float<DT>(dxr + j, rs * (vload(w + j) * gv - a - xv * c));
    vstore(dw + j, vload(dw + j) + gv * xv);
    vstore(db + j, vload(db + j) + gv);
  }
  for (; j < d; ++j) {
    const float g = Elem<DT>::load(gr[j]);
    const float xh = ((Elem<DT>::load(xr[j]) - mu) - dm) * rs;
    dxr[j] = Elem<DT>::store(rs * (w[j] * g - a - xh * c));
    dw[j] += g * xh;
    db[j] += g;
  }
}

// Rows per chunk of the weight-gradient sum: a chunk's dw/db accumulate in fp32 in one buffer, which is added to
// the thread's total and cleared after every chunk (a cascade sum, as torch's reductions: the rounding error grows
// with chunk + rows/chunk, not with the thread's row count; a flush costs one pass over 2·E·D floats per chunk).
constexpr int64_t kGradChunkRows = 16;

template <int DT>
VLMO_CPU_CLONES void backward_rows(const typename Elem<DT>::T* dy, const typename Elem<DT>::T* x, const float* mean,
                                   const float* rstd, typename Elem<DT>::T* dx, int64_t r0, int64_t r1,
                                   int64_t seq_len, int64_t d, int64_t split, const float* weight, float* chunk,
                                   float* total, int64_t acc_size) {
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t c0 = r0; c0 < r1; c0 += kGradChunkRows) {
    const int64_t c1 = std::min(r1, c0 + kGradChunkRows);
    for (int64_t r = c0; r < c1; ++r) {
      const int e = expert_of(r, seq_len, split);
      backward_row<DT>(x + r * d, dy + r * d, dx + r * d, weight + e * d, mean[r], rstd[r], inv_d, chunk + e * d,
                       chunk + acc_size + e * d, d);
    }
    for (int64_t k = 0; k < 2 * acc_size; ++k) {
      total[k] += chunk[k];
      chunk[k] = 0.0f;
    }
  }
}

int pick_threads(int requested, int64_t rows, int64_t work) {
  int t = std::max(1, requested);
  if (work < (int64_t{1} << 15)) t = 1;
  return static_cast<int>(std::min<int64_t>(t, std::max<int64_t>(rows, 1)));
}

template <int DT>
void forward_typed(const void* x, void* y, float* mean, float* rstd, int64_t rows, int64_t seq_len, int64_t d,
                   int64_t split, const float* weight, const float* bias, float eps, int num_threads) {
  const int threads = pick_threads(num_threads, rows, rows * d);
  const auto* xp = static_cast<const typename Elem<DT>::T*>(x);
  auto* yp = static_cast<typename Elem<DT>::T*>(y);
#pragma omp parallel num_threads(threads)
  {
    const ThreadShare share = thread_share(rows);
    const int64_t r0 = share.begin, r1 = share.end;
    forward_rows<DT>(xp, yp, mean, rstd, r0, r1, seq_len, d, split, weight, bias, eps);
  }
}

template <int DT>
void backward_typed(const void* dy, const void* x, const float* mean, const float* rstd, void* dx, int64_t rows,
                    int64_t seq_len, int64_t d, int64_t split, const float* weight, float* dweight, float* dbias,
                    int num_experts, int num_threads) {
  const int threads = pick_threads(num_threads, rows, rows * d);
  const int64_t acc_size = num_experts * d;
  // stage 1 buffers: per thread, a chunk buffer and the thread's total, each dw then db for every expert
  std::vector<float> partial(static_cast<size_t>(4 * acc_size * threads), 0.0f);
  const auto* gp = static_cast<const typename Elem<DT>::T*>(dy);
  const auto* xp = static_cast<const typename Elem<DT>::T*>(x);
  auto* dxp = static_cast<typename Elem<DT>::T*>(dx);
#pragma omp parallel num_threads(threads)
  {
    const ThreadShare share = thread_share(rows);
    const int tid = share.tid;
    const int64_t r0 = share.begin, r1 = share.end;
    float* mine = partial.data() + 4 * acc_size * tid;
    backward_rows<DT>(gp, xp, mean, rstd, dxp, r0, r1, seq_len, d, split, weight, mine + 2 * acc_size, mine,
                      acc_size);
  }
  // stage 2: fixed-order sum of the thread partials
  for (int64_t k = 0; k < acc_size; ++k) {
    float sw = 0.0f, sb = 0.0f;
    for (int t = 0; t < threads; ++t) {
      sw += partial[4 * acc_size * t + k];
      sb += partial[4 * acc_size * t + acc_size + k];
    }
    if (dweight) dweight[k] = sw;
    if (dbias) dbias[k] = sb;
  }
}

bool valid_dtype(int dt) { return dt == kF32 || dt == kF16 || dt == kBF16; }

}  // namespace

std::string multiway_layernorm_forward(const void* x, int dtype, void* y, float* mean, float* rstd, int64_t rows,
                                       int64_t seq_len, int64_t dim, int64_t split, const float* weight,
                                       const float* bias, float eps, int num_threads) {
  if (!valid_dtype(dtype)) return "unsupported dtype code";
  if (dim <= 0 || seq_len <= 0) return rows == 0 ? "" : "dim and seq_len must be positive";
  if (rows == 0) return "";
  switch (dtype) {
    case kF32: forward_typed<kF32>(x, y, mean, rstd, rows, seq_len, dim, split, weight, bias, eps, num_threads); break;
    case kF16: forward_typed<kF16>(x, y, mean, rstd, rows, seq_len, dim, split, weight, bias, eps, num_threads); break;
    default: forward_typed<kBF16>(x, y, mean, rstd, rows, seq_len, dim, split, weight, bias, eps, num_threads);
  }
  return "";
}

std::string multiway_layernorm_backward(const void* dy, const void* x, int dtype, const float* mean, const float* rstd,
                                        void* dx, int64_t rows, int64_t seq_len, int64_t dim, int64_t split,
                                        const float* weight, float* dweight, float* dbias, int num_experts,
                                        int num_threads) {
  if (!valid_dtype(dtype)) return "unsupported dtype code";
  if (num_experts != 1 && num_experts != 2) return "num_experts must be 1 or 2";
  if ((split >= 0) != (num_experts == 2)) return "split must be given exactly with two experts";
  if (dim <= 0 || seq_len <= 0) return rows == 0 ? "" : "dim and seq_len must be positive";
  switch (dtype) {
    case kF32:
      backward_typed<kF32>(dy, x, mean, rstd, dx, rows, seq_len, dim, split, weight, dweight, dbias, num_experts,
                           num_threads);
      break;
    case kF16:
      backward_typed<kF16>(dy, x, mean, rstd, dx, rows, seq_len, dim, split, weight, dweight, dbias, num_experts,
                           num_threads);
      break;
    default:
      backward_typed<kBF16>(dy, x, mean, rstd, dx, rows, seq_len, dim, split, weight, dweight, dbias, num_experts,
                            num_threads);
  }
  return "";
}

}  // namespace cpu
}  // namespace vlmo_fast
