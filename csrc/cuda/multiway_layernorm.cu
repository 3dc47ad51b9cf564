// Modality-split LayerNorm, forward and backward (spec §3.2): one launch normalizes a fused (text, image) sequence,
// rows at position < split with expert 0's weight/bias (norm2_text), the others with expert 1's (norm2_imag); one
// expert (split < 0) for unimodal calls and the VL-FFN layers.
//
//   forward:  x̂ = (x - mean)·rstd, rstd = rsqrt(var + eps) (biased variance), y = x̂ ⊙ w_e + b_e
//   backward: dx = rstd·(w_e⊙dy - mean_D(w_e⊙dy) - x̂·mean_D(w_e⊙dy⊙x̂)),  dw_e = Σ_rows(e) dy⊙x̂,  db_e = Σ_rows(e) dy
//
// Layout: x, y, dy, dx contiguous (rows = B·N, D); weights (E, D) fp32; mean/rstd (rows,) fp32.
// One warp per row, E = ceil(D/32) values per lane in registers (D <= 1024). When D is a multiple of V, the widest
// of 8, 4, 2 elements (16, 8, 4 bytes at fp16/bf16) that divides E, and the row pointers are aligned to it, a lane's
// registers hold vectors of V consecutive columns, loaded and stored as whole words: register k of lane l is column
// ((k / V)·32 + l)·V + k % V (V = 1, the fallback: k·32 + l, 2-byte accesses at fp16/bf16).
// Weight gradient, two stages (no atomics, deterministic): stage 1 gives each block a contiguous range of ONE
// expert's rows; each warp accumulates dw/db over its rows in its own shared-memory slice, then the block sums its
// warps and writes one (2, D) partial. Stage 2 sums, per expert and column, that expert's block partials.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "cuda_common.cuh"
#include "launchers.h"

namespace vlmo_fast {
namespace cuda {
namespace {

constexpr int kFwdWarps = 4;
constexpr int kBwdWarps = 4;

struct Params {
  const void* x;
  void* y;
  const void* dy;
  void* dx;
  float* mean;
  float* rstd;
  const float* weight;
  const float* bias;
  float* workspace;
  int64_t rows, seq_len, dim, split;
  float eps;
  // backward plan: blocks [0, blocks0) take expert 0's rows, [blocks0, blocks0 + blocks1) expert 1's
  int64_t blocks0, blocks1, rows_per_block0, rows_per_block1;
};

// Elements per vector for a row tier: the widest of 16, 8 and 4 bytes whose element count divides E (1: none).
template <int DT, int E>
constexpr int vector_width() {
  constexpr int size = static_cast<int>(sizeof(typename Elem<DT>::T));
  for (int bytes = 16; bytes >= 4; bytes /= 2)
    if (bytes / size >= 1 && E % (bytes / size) == 0 && bytes / size > 1) return bytes / size;
  return 1;
}

// The column of register k of this lane (see the header).
template <int V>
__device__ __forceinline__ int column(int k, int lane) {
  return ((k / V) * 32 + lane) * V + k % V;
}

// The register slot (k·32 + lane) that holds column j: the inverse of column().
template <int V>
__device__ __forceinline__ int slot(int j) {
  return ((j / (32 * V)) * V + j % V) * 32 + (j / V) % 32;
}

// Columns j..j+V of a row of T.
template <int DT, int V>
__device__ __forceinline__ void load_cols(const typename Elem<DT>::T* row, int j, float (&v)[V]) {
  if constexpr (V == 1) v[0] = Elem<DT>::load(row + j);
  else load_vec<DT, V>(row + j, v);
}

// A row of D values into this lane's registers (zeros past D).
template <int DT, int E, int V>
__device__ __forceinline__ void load_row(const typename Elem<DT>::T* row, int64_t dim, float (&x)[E]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int k = 0; k < E; k += V) {
    const int j = column<V>(k, lane);
    float v[V];
    if (j < dim) load_cols<DT, V>(row, j, v);  // a whole vector: D is a multiple of V
#pragma unroll
    for (int i = 0; i < V; ++i) x[k + i] = j < dim ? v[i] : 0.0f;
  }
}

// Columns j..j+V of an fp32 (E, D) weight row.
template <int V>
__device__ __forceinline__ void load_weights(const float* w, int j, float (&v)[V]) {
  if constexpr (V == 1) v[0] = __ldg(w + j);
  else load_vec<kF32, V>(w + j, v);
}

template <int DT, int V>
__device__ __forceinline__ void store_cols(typename Elem<DT>::T* row, int j, const float (&v)[V]) {
  if constexpr (V == 1) Elem<DT>::store(row + j, v[0]);
  else store_vec<DT, V>(row + j, v);
}

template <int DT, int E, int V>
__global__ void __launch_bounds__(kFwdWarps * 32) layernorm_forward(Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFwdWarps + threadIdx.x / 32;
  if (row >= p.rows) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  using T = typename Elem<DT>::T;
  const T* xr = static_cast<const T*>(p.x) + row * p.dim;
  float x[E];
  load_row<DT, E, V>(xr, p.dim, x);
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < E; ++k) sum += x[k];
  const float inv_d = 1.0f / static_cast<float>(p.dim);
  const float mu0 = warp_sum(sum) * inv_d;
  float sc = 0.0f;
#pragma unroll
  for (int k = 0; k < E; ++k) sc += column<V>(k, lane) < p.dim ? x[k] - mu0 : 0.0f;
  // corrected two-pass: the centred residual sum repairs the rounded first mean (a constant row gets x - mean = 0
  // exactly, y = b as eager, instead of a residue that rstd ~ 1/sqrt(eps) blows up)
  const float mu = mu0 + warp_sum(sc) * inv_d;
  // the variance from the final mean, over the registers once more: a constant row's is exactly 0, as eager's. (The
  // shortcut mean(c²) - dm², c centred on the first mean, left an FMA-dependent residue on the GPU that the
  // H100 run showed: rstd off by up to 0.3% for constant rows at eps = 1e-12, and dx with it.)
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < E; ++k) {
    const float c = column<V>(k, lane) < p.dim ? x[k] - mu : 0.0f;
    sq += c * c;
  }
  const float rs = rsqrtf(warp_sum(sq) * inv_d + p.eps);
  const int e = (p.split >= 0 && row % p.seq_len >= p.split) ? 1 : 0;
  const float* w = p.weight + e * p.dim;
  const float* b = p.bias + e * p.dim;
  T* yr = static_cast<T*>(p.y) + row * p.dim;
#pragma unroll
  for (int k = 0; k < E; k += V) {
    const int j = column<V>(k, lane);
    if (j < p.dim) {
      float wv[V], bv[V], yv[V];
      load_weights<V>(w, j, wv);
      load_weights<V>(b, j, bv);
#pragma unroll
      for (int i = 0; i < V; ++i) yv[i] = (x[k + i] - mu) * rs * wv[i] + bv[i];
      store_cols<DT, V>(yr, j, yv);
    }
  }
  if (lane == 0) {
    store_global(p.mean + row, mu);
    store_global(p.rstd + row, rs);
  }
}

// Row of the t-th row of expert e.
__device__ __forceinline__ int64_t expert_row(const Params& p, int e, int64_t t) {
  if (p.split < 0) return t;
  const int64_t len = e == 0 ? p.split : p.seq_len - p.split;
  const int64_t start = e == 0 ? 0 : p.split;
  return (t / len) * p.seq_len + start + t % len;
}

template <int DT, int E, int V>
__global__ void __launch_bounds__(kBwdWarps * 32, 3) layernorm_backward_stage1(Params p) {
  // Per-warp dw/db accumulators live in shared memory, not registers: each lane only touches its own words (no bank
  // conflicts), and the registers go to occupancy instead (x̂ and dy alone take 2·24 per lane at D = 768).
  __shared__ float acc[2][kBwdWarps][E * 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const bool second = blockIdx.x >= p.blocks0;
  const int e = second ? 1 : 0;
  const int64_t blk = second ? blockIdx.x - p.blocks0 : blockIdx.x;
  const int64_t rpb = second ? p.rows_per_block1 : p.rows_per_block0;
  int64_t count = p.rows;
  if (p.split >= 0) count = (p.rows / p.seq_len) * (second ? p.seq_len - p.split : p.split);
  const int64_t t0 = blk * rpb, t1 = min(count, t0 + rpb);
  using T = typename Elem<DT>::T;
  const float inv_d = 1.0f / static_cast<float>(p.dim);
  const float* w = p.weight + e * p.dim;
  float* acc_w = acc[0][warp];
  float* acc_b = acc[1][warp];
#pragma unroll
  for (int k = 0; k < E; ++k) {
    acc_w[k * 32 + lane] = 0.0f;
    acc_b[k * 32 + lane] = 0.0f;
  }
  for (int64_t t = t0 + warp; t < t1; t += kBwdWarps) {
    const int64_t row = expert_row(p, e, t);
    const T* xr = static_cast<const T*>(p.x) + row * p.dim;
    const T* gr = static_cast<const T*>(p.dy) + row * p.dim;
    const float mu = __ldg(p.mean + row), rs = __ldg(p.rstd + row);
    float xh[E], g[E];
    float a = 0.0f, c = 0.0f;
#pragma unroll
    for (int k = 0; k < E; k += V) {
      const int j = column<V>(k, lane);
      const bool in = j < p.dim;  // a whole vector (D is a multiple of V)
      float xv[V], gv[V], wv[V];
      if (in) {
        load_cols<DT, V>(xr, j, xv);
        load_cols<DT, V>(gr, j, gv);
        load_weights<V>(w, j, wv);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) {
        xh[k + i] = in ? (xv[i] - mu) * rs : 0.0f;
        g[k + i] = in ? gv[i] : 0.0f;
        const float wg = in ? __fmul_rn(wv[i], g[k + i]) : 0.0f;  // rounded, as below (no FMA contraction)
        a += wg;
        c += wg * xh[k + i];
      }
    }
    a = warp_sum(a) * inv_d;
    c = warp_sum(c) * inv_d;
    T* dxr = static_cast<T*>(p.dx) + row * p.dim;
#pragma unroll
    for (int k = 0; k < E; k += V) {
      const int j = column<V>(k, lane);
      if (j < p.dim) {
        float wv[V], dv[V];
        load_weights<V>(w, j, wv);
#pragma unroll
        for (int i = 0; i < V; ++i)  // the rounded product, as summed into a: an FMA would leave (exact - rounded)
          dv[i] = rs * (__fmul_rn(wv[i], g[k + i]) - a - xh[k + i] * c);  // where w·dy - a is exactly 0
        store_cols<DT, V>(dxr, j, dv);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) {  // zeros past D: the slots of no column stay 0
        acc_w[(k + i) * 32 + lane] += g[k + i] * xh[k + i];
        acc_b[(k + i) * 32 + lane] += g[k + i];
      }
    }
  }
  __syncthreads();
  // block partial: the warps summed in a fixed order
  float* out = p.workspace + static_cast<int64_t>(blockIdx.x) * 2 * p.dim;
  for (int j = threadIdx.x; j < p.dim; j += kBwdWarps * 32) {
    float sw = 0.0f, sb = 0.0f;
#pragma unroll
    for (int q = 0; q < kBwdWarps; ++q) {
      sw += acc[0][q][slot<V>(j)];
      sb += acc[1][q][slot<V>(j)];
    }
    store_global(out + j, sw);
    store_global(out + p.dim + j, sb);
  }
}

// dweight[e, j] / dbias[e, j] = Σ over expert e's stage-1 blocks, in block order.
__global__ void layernorm_backward_stage2(Params p, float* dweight, float* dbias) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= p.dim) return;
  const int e = blockIdx.y;
  const int64_t k0 = e == 0 ? 0 : p.blocks0;
  const int64_t k1 = e == 0 ? p.blocks0 : p.blocks0 + p.blocks1;
  float sw = 0.0f, sb = 0.0f;
  for (int64_t k = k0; k < k1; ++k) {
    sw += __ldg(p.workspace + (2 * k) * p.dim + j);  // written by stage 1 (an earlier launch): read-only here
    sb += __ldg(p.workspace + (2 * k + 1) * p.dim + j);
  }
  if (dweight) store_global(dweight + e * p.dim + j, sw);
  if (dbias) store_global(dbias + e * p.dim + j, sb);
}

int lanes_tier(int64_t dim) {
  const int64_t per_lane = ceil_div(dim, 32);
  for (int e : {1, 2, 4, 8, 12, 16, 24, 32})
    if (per_lane <= e) return e;
  return 0;
}

using Kernel = void (*)(Params);

// Stage-1 blocks per expert, in proportion to its rows, and in all as many as fit on the GPU at once (one full wave:
// each block loops over its rows, so a second, partial wave would only add a tail).
void plan_backward(Params& p, int resident_blocks) {
  const int64_t batch = p.seq_len > 0 ? p.rows / p.seq_len : 0;
  const int64_t rows0 = p.split < 0 ? p.rows : batch * p.split;
  const int64_t rows1 = p.split < 0 ? 0 : batch * (p.seq_len - p.split);
  const int64_t total = std::max<int64_t>(1, std::min<int64_t>(resident_blocks, ceil_div(p.rows, kBwdWarps)));
  auto blocks_for = [&](int64_t n, int64_t* rpb) -> int64_t {
    if (n == 0) {
      *rpb = 1;
      return 0;
    }
    int64_t nb = std::max<int64_t>(1, (total * n + p.rows / 2) / std::max<int64_t>(p.rows, 1));
    *rpb = ceil_div(n, nb);
    return ceil_div(n, *rpb);
  };
  p.blocks0 = blocks_for(rows0, &p.rows_per_block0);
  p.blocks1 = blocks_for(rows1, &p.rows_per_block1);
}

template <int DT>
int tier_width(int tier) {
  switch (tier) {
    case 1: return vector_width<DT, 1>();
    case 2: return vector_width<DT, 2>();
    case 4: return vector_width<DT, 4>();
    case 8: return vector_width<DT, 8>();
    case 12: return vector_width<DT, 12>();
    case 16: return vector_width<DT, 16>();
    case 24: return vector_width<DT, 24>();
    default: return vector_width<DT, 32>();
  }
}

// Whether rows of this dtype and D take the tier's vectorized kernels: the tier has a vector width v > 1, D is a
// multiple of v, and every row pointer (data of `elem` bytes, fp32 weights) is aligned to v elements; rows then
// start aligned too (row·D elements).
bool vectorizable(int dtype, int tier, int64_t dim, std::initializer_list<const void*> data,
                  std::initializer_list<const void*> weights) {
  const int v = dtype == kF32 ? tier_width<kF32>(tier) : dtype == kF16 ? tier_width<kF16>(tier)
                                                                        : tier_width<kBF16>(tier);
  if (v == 1 || dim % v != 0) return false;
  const uintptr_t elem = dtype == kF32 ? 4 : 2;
  for (const void* q : data)
    if (reinterpret_cast<uintptr_t>(q) % (v * elem) != 0) return false;
  for (const void* q : weights)
    if (reinterpret_cast<uintptr_t>(q) % (v * 4) != 0) return false;
  return true;
}

template <int DT, int E>
Kernel forward_tier(bool vector) {
  constexpr int v = vector_width<DT, E>();
  return vector ? layernorm_forward<DT, E, v> : layernorm_forward<DT, E, 1>;
}

template <int DT, int E>
Kernel backward_tier(bool vector) {
  constexpr int v = vector_width<DT, E>();
  return vector ? layernorm_backward_stage1<DT, E, v> : layernorm_backward_stage1<DT, E, 1>;
}

// The forward (stage-1 backward) kernel of a dtype, tier and vectorization.
template <bool BACKWARD, int DT>
Kernel pick_dt(int tier, bool vector) {
#define VLMO_LN_TIER(E) \
  case E:               \
    return BACKWARD ? backward_tier<DT, E>(vector) : forward_tier<DT, E>(vector);
  switch (tier) {
    VLMO_LN_TIER(1)
    VLMO_LN_TIER(2)
    VLMO_LN_TIER(4)
    VLMO_LN_TIER(8)
    VLMO_LN_TIER(12)
    VLMO_LN_TIER(16)
    VLMO_LN_TIER(24)
    default:
      return BACKWARD ? backward_tier<DT, 32>(vector) : forward_tier<DT, 32>(vector);
  }
#undef VLMO_LN_TIER
}

template <bool BACKWARD>
Kernel pick(int dtype, int tier, bool vector) {
  return dtype == kF32   ? pick_dt<BACKWARD, kF32>(tier, vector)
         : dtype == kF16 ? pick_dt<BACKWARD, kF16>(tier, vector)
                         : pick_dt<BACKWARD, kBF16>(tier, vector);
}

// How many stage-1 blocks fit on the GPU at once for this dtype and D, for the kernel rows of this D take when their
// pointers are aligned: the plan (and so the workspace size, asked for before the pointers are known) depends on D
// alone; misaligned rows run the scalar kernel on the same plan.
int stage1_resident_blocks(int dtype, int64_t dim, int sms) {
  const int tier = lanes_tier(dim);
  int per_sm = 0;
  Kernel k = pick<true>(dtype, tier, vectorizable(dtype, tier, dim, {}, {}));
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, kBwdWarps * 32, 0) != cudaSuccess || per_sm <= 0) {
    cudaGetLastError();
    per_sm = 2;
  }
  return sms * per_sm;
}

std::string check_common(int dtype, int64_t rows, int64_t seq_len, int64_t dim, int64_t split) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) return "unsupported dtype code";
  if (dim <= 0 || dim > kLayerNormMaxDim) return "dim must be in [1, 1024] for the CUDA LayerNorm";
  if (seq_len <= 0 || rows % seq_len != 0) return "rows must be a multiple of seq_len";
  if (split > seq_len) return "split must be <= seq_len";
  return "";
}

}  // namespace

std::string multiway_layernorm_forward(const void* x, int dtype, void* y, float* mean, float* rstd, int64_t rows,
                                       int64_t seq_len, int64_t dim, int64_t split, const float* weight,
                                       const float* bias, float eps, int device, uintptr_t stream) {
  if (rows == 0) return "";
  std::string err = check_common(dtype, rows, seq_len, dim, split);
  if (!err.empty()) return err;
  if (prepare_device(device, &err) < 0) return err;
  Params p{};
  p.x = x;
  p.y = y;
  p.mean = mean;
  p.rstd = rstd;
  p.weight = weight;
  p.bias = bias;
  p.rows = rows;
  p.seq_len = seq_len;
  p.dim = dim;
  p.split = split;
  p.eps = eps;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kFwdWarps)));
  const int tier = lanes_tier(dim);
  Kernel kernel = pick<false>(dtype, tier, vectorizable(dtype, tier, dim, {x, y}, {weight, bias}));
  kernel<<<grid, kFwdWarps * 32, 0, as_stream(stream)>>>(p);
  return launch_status("multiway_layernorm forward");
}

int64_t multiway_layernorm_backward_workspace(int64_t rows, int64_t seq_len, int64_t dim, int64_t split, int dtype,
                                              int device) {
  if (!check_common(dtype, rows, seq_len, dim, split).empty()) return -1;
  std::string err;
  const int sms = prepare_device(device, &err);
  if (sms < 0) return -1;
  const int resident = stage1_resident_blocks(dtype, dim, sms);
  Params p{};
  p.rows = rows;
  p.seq_len = seq_len;
  p.dim = dim;
  p.split = split;
  plan_backward(p, resident);
  return std::max<int64_t>(1, (p.blocks0 + p.blocks1) * 2 * dim);
}

std::string multiway_layernorm_backward(const void* dy, const void* x, int dtype, const float* mean, const float* rstd,
                                        void* dx, int64_t rows, int64_t seq_len, int64_t dim, int64_t split,
                                        const float* weight, float* dweight, float* dbias, int num_experts,
                                        float* workspace, int device, uintptr_t stream) {
  if (num_experts != 1 && num_experts != 2) return "num_experts must be 1 or 2";
  if ((split >= 0) != (num_experts == 2)) return "split must be given exactly with two experts";
  std::string err = check_common(dtype, rows, seq_len, dim, split);
  if (!err.empty()) return err;
  const int sms = prepare_device(device, &err);
  if (sms < 0) return err;
  Params p{};
  p.x = x;
  p.dy = dy;
  p.dx = dx;
  p.mean = const_cast<float*>(mean);
  p.rstd = const_cast<float*>(rstd);
  p.weight = weight;
  p.workspace = workspace;
  p.rows = rows;
  p.seq_len = seq_len;
  p.dim = dim;
  p.split = split;
  const int tier = lanes_tier(dim);
  Kernel stage1 = pick<true>(dtype, tier, vectorizable(dtype, tier, dim, {x, dy, dx}, {weight}));
  plan_backward(p, stage1_resident_blocks(dtype, dim, sms));
  cudaStream_t st = as_stream(stream);
  const int64_t blocks = p.blocks0 + p.blocks1;
  if (blocks > 0) stage1<<<dim3(static_cast<unsigned>(blocks)), kBwdWarps * 32, 0, st>>>(p);
  const dim3 grid2(static_cast<unsigned>(ceil_div(dim, 256)), static_cast<unsigned>(num_experts));
  layernorm_backward_stage2<<<grid2, 256, 0, st>>>(p, dweight, dbias);
  return launch_status("multiway_layernorm backward");
}

}  // namespace cuda
}  // namespace vlmo_fast
