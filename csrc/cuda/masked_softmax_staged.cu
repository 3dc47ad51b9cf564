// The staged softmax kernels: the math of masked_softmax.cu (see its header) for rows of up to 256 keys, with the
// memory traffic organised for bandwidth.
//
// Why: the row kernels load and store each element with its own 2-byte (fp16/bf16) access per lane and keep one
// batch row in flight per warp. On an H100 (benchmarks/results/20261205T194632_*) that reached 34% of the copy
// bandwidth at B·H = 1536, N = 237; ptxas gives the forward 68 and the backward 110 registers, so 28 and 16 warps
// per SM hold about one 474-byte row each: far fewer bytes in flight than the memory system needs.
//
// Occupancy: ptxas (nvcc 13.0, sm_90) needs about 80 registers for the fp16/bf16 forward and 95-128 for the
// backward; the launch bounds ask for 3 and 2 resident blocks per SM (without them ptxas caps the forward at 64 and
// spills; fp32 forwards get 2), i.e. 6 and 4 batch-row slices in flight per SM (about 23 and 30 KB at B·H = 1536,
// N = 237, bf16), against about 13 and 15 KB for the row kernels.
//
// Mapping: a block of eight warps owns eight consecutive query rows (h, i0..i0+7) for a chunk of the batch. At each
// batch row b those rows are one contiguous slice of the (B, H, Nq, Nk) tensor, which the block moves between global
// and shared memory in 16-byte vectors (the slice's unaligned head and tail, at most 15 bytes each, element by
// element); the shared buffer is offset by the slice's address mod 16, so the shared side is aligned too. Every
// warp then does its row's math from shared memory, lane l taking elements l, l+32, ... as the row kernels do, with
// its bias row in registers for the whole chunk. The loads of batch row b + 2 are issued (into registers: one or two
// vectors per thread, plus one head/tail element, key flag and lse) before row b's math, so each block keeps two
// slices in flight. Nothing outside a slice is read or written.
#include <cstdint>
#include <string>

#include "launchers.h"
#include "softmax_common.cuh"

namespace vlmo_fast {
namespace cuda {
namespace {

using namespace softmax;

constexpr int kRows = 8;  // query rows per block, one per warp
constexpr int kThreads = kRows * 32;

// A slice of `count` contiguous elements of T at `ptr`, cut into its 16-byte-aligned vectors and the elements before
// (head) and after (tail) them.
struct Slice {
  int shift;    // the slice's address mod 16, in bytes: where element 0 sits in the shared buffer
  int head;     // elements before the first aligned vector
  int vectors;  // aligned 16-byte vectors
  int tail;     // elements after the last vector
};

template <class T>
__device__ __forceinline__ Slice slice_of(const T* ptr, int count) {
  constexpr int kPer = 16 / sizeof(T);
  Slice s;
  s.shift = static_cast<int>(reinterpret_cast<uintptr_t>(ptr) & 15u);  // a multiple of sizeof(T)
  s.head = min(count, s.shift ? (16 - s.shift) / static_cast<int>(sizeof(T)) : 0);
  s.vectors = (count - s.head) / kPer;
  s.tail = count - s.head - s.vectors * kPer;
  return s;
}

// One thread's share of a slice in flight: V vectors and at most one head/tail element.
template <class T, int V>
struct Part {
  uint4 vec[V];
  T edge;
};

// Vectors per thread for a slice of up to kRows·E·32 elements of T.
template <class T, int E>
constexpr int kVectors = (kRows * E * 32 * static_cast<int>(sizeof(T)) / 16 + kThreads - 1) / kThreads;

template <class T, int V>
__device__ __forceinline__ void load_part(const T* ptr, const Slice& s, Part<T, V>& part) {
  const int t = threadIdx.x;
  const uint4* vec = reinterpret_cast<const uint4*>(ptr + s.head);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int idx = v * kThreads + t;
    if (idx < s.vectors) part.vec[v] = __ldg(vec + idx);
  }
  if (t < s.head) part.edge = __ldg(ptr + t);
  else if (t < s.head + s.tail) part.edge = __ldg(ptr + (t + s.vectors * (16 / static_cast<int>(sizeof(T)))));
}

// Writes a thread's part into the shared buffer `buf` (16-byte aligned): element e of the slice at byte
// s.shift + e·sizeof(T).
template <class T, int V>
__device__ __forceinline__ void commit_part(const Slice& s, const Part<T, V>& part, unsigned char* buf) {
  const int t = threadIdx.x;
  uint4* vec = reinterpret_cast<uint4*>(buf + s.shift + s.head * static_cast<int>(sizeof(T)));  // 16-byte aligned
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int idx = v * kThreads + t;
    if (idx < s.vectors) vec[idx] = part.vec[v];
  }
  T* elem = reinterpret_cast<T*>(buf + s.shift);
  if (t < s.head) elem[t] = part.edge;
  else if (t < s.head + s.tail) elem[t + s.vectors * (16 / static_cast<int>(sizeof(T)))] = part.edge;
}

// The block stores the slice at `ptr` from its shared buffer (laid out as commit_part's).
template <class T>
__device__ __forceinline__ void store_slice(T* ptr, const Slice& s, const unsigned char* buf) {
  const int t = threadIdx.x;
  const uint4* vec = reinterpret_cast<const uint4*>(buf + s.shift + s.head * static_cast<int>(sizeof(T)));
  uint4* dst = reinterpret_cast<uint4*>(ptr + s.head);
  for (int idx = t; idx < s.vectors; idx += kThreads) store_global(dst + idx, vec[idx]);
  const T* elem = reinterpret_cast<const T*>(buf + s.shift);
  if (t < s.head) store_global(ptr + t, elem[t]);
  else if (t < s.head + s.tail) {
    const int e = t + s.vectors * (16 / static_cast<int>(sizeof(T)));
    store_global(ptr + e, elem[e]);
  }
}

// A block's place in the grid: head h, query rows [i0, i0 + rows), batch rows [b0, b1); this warp's row i.
struct Place {
  int64_t h, i0, i, b0, b1;
  int rows, warp, lane;
  bool active;  // this warp has a row (the last block of a head may have fewer than kRows)
};

__device__ __forceinline__ Place place_of(const Params& p) {
  Place pl;
  const int64_t groups = (p.n_q + kRows - 1) / kRows;
  const int64_t unit = blockIdx.x % p.units, chunk = blockIdx.x / p.units;
  pl.h = unit / groups;
  pl.i0 = (unit % groups) * kRows;
  pl.rows = static_cast<int>(min(static_cast<int64_t>(kRows), p.n_q - pl.i0));
  pl.warp = threadIdx.x / 32;
  pl.lane = threadIdx.x & 31;
  pl.i = pl.i0 + pl.warp;
  pl.active = pl.warp < pl.rows;
  pl.b0 = chunk * p.batch_per_chunk;
  pl.b1 = min(p.batch, pl.b0 + p.batch_per_chunk);
  return pl;
}

// First element of the block's slice at batch row b.
__device__ __forceinline__ int64_t slice_start(const Params& p, const Place& pl, int64_t b) {
  return ((b * p.heads + pl.h) * p.n_q + pl.i0) * p.n_k;
}

// Key flag of key t at batch row b (1 without a mask), for threads t < n_k.
__device__ __forceinline__ uint8_t load_keep(const Params& p, int64_t b) {
  const int t = threadIdx.x;
  if (t >= p.n_k) return 0;
  return p.keep ? __ldg(p.keep + b * p.n_k + t) : 1;
}

// Batch row b's slice of scores in flight, with the key flags of row b.
template <class TI, int V>
struct ForwardStage {
  Part<TI, V> s;
  uint8_t keep;
};

// fp32 slices are twice the bytes (and registers) of fp16/bf16 ones: 2 blocks per SM keep as many bytes in flight
template <int IN, int OUT, int E>
__global__ void __launch_bounds__(kThreads, IN == kF32 ? 2 : 3) softmax_forward_staged(Params p) {
  using TI = typename Elem<IN>::T;
  using TO = typename Elem<OUT>::T;
  constexpr int V = kVectors<TI, E>;
  __shared__ uint4 in_buf[kRows * E * 32 * sizeof(TI) / 16 + 1];
  __shared__ uint4 out_buf[kRows * E * 32 * sizeof(TO) / 16 + 1];
  __shared__ uint8_t keep_buf[E * 32];
  const Place pl = place_of(p);
  const int count = pl.rows * static_cast<int>(p.n_k);
  const TI* scores = static_cast<const TI*>(p.scores);
  TO* out = static_cast<TO*>(p.out);
  float bias[E];
  if (pl.active) load_bias<E>(p, pl.h, pl.i, bias);

  auto fetch = [&](int64_t b, ForwardStage<TI, V>& st) {
    const TI* src = scores + slice_start(p, pl, b);
    load_part<TI, V>(src, slice_of(src, count), st.s);
    st.keep = load_keep(p, b);
  };
  // Batch row b from `st` (then refilled with row b + 2): stage into shared memory, each warp's softmax, store.
  auto step = [&](int64_t b, ForwardStage<TI, V>& st) {
    const int64_t start = slice_start(p, pl, b);
    const Slice si = slice_of(scores + start, count), so = slice_of(out + start, count);
    unsigned char* in_bytes = reinterpret_cast<unsigned char*>(in_buf);
    unsigned char* out_bytes = reinterpret_cast<unsigned char*>(out_buf);
    commit_part<TI, V>(si, st.s, in_bytes);
    if (threadIdx.x < p.n_k) keep_buf[threadIdx.x] = st.keep;
    if (b + 2 < pl.b1) fetch(b + 2, st);
    __syncthreads();
    if (pl.active) {  // warp-uniform
      const TI* row = reinterpret_cast<const TI*>(in_bytes + si.shift) + pl.warp * p.n_k;
      TO* orow = reinterpret_cast<TO*>(out_bytes + so.shift) + pl.warp * p.n_k;
      float x[E];
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const int j = k * 32 + pl.lane;
        x[k] = j < p.n_k && keep_buf[j] ? p.scale * to_float<IN>(row[j]) + bias[k] : -kInf;
      }
      float inv;
      const float lse = row_softmax<E>(x, inv);
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const int j = k * 32 + pl.lane;
        if (j < p.n_k) orow[j] = from_float<OUT>(x[k] * inv);
      }
      if (pl.lane == 0) store_global(p.lse + (b * p.heads + pl.h) * p.n_q + pl.i, lse);
    }
    __syncthreads();
    store_slice<TO>(out + start, so, out_bytes);
  };

  // Two stages in registers, used alternately: the loop is unrolled by two so that each is a fixed set of registers.
  ForwardStage<TI, V> st0, st1;
  fetch(pl.b0, st0);
  if (pl.b0 + 1 < pl.b1) fetch(pl.b0 + 1, st1);
  for (int64_t b = pl.b0; b < pl.b1; b += 2) {
    step(b, st0);
    if (b + 1 < pl.b1) step(b + 1, st1);
  }
}

// Batch row b's slices of scores and incoming gradient in flight, with the key flags and the rows' lse.
template <class TI, class TG, int V, int VG>
struct BackwardStage {
  Part<TI, V> s;
  Part<TG, VG> g;
  uint8_t keep;
  float lse;
};

template <int IN, int GD, int E>
__global__ void __launch_bounds__(kThreads, 2) softmax_backward_staged(Params p) {
  using TI = typename Elem<IN>::T;
  using TG = typename Elem<GD>::T;
  constexpr int V = kVectors<TI, E>;
  constexpr int VG = kVectors<TG, E>;
  __shared__ uint4 s_buf[kRows * E * 32 * sizeof(TI) / 16 + 1];
  __shared__ uint4 g_buf[kRows * E * 32 * sizeof(TG) / 16 + 1];
  __shared__ uint4 ds_buf[kRows * E * 32 * sizeof(TI) / 16 + 1];
  __shared__ uint8_t keep_buf[E * 32];
  __shared__ float lse_buf[kRows];
  const Place pl = place_of(p);
  const int count = pl.rows * static_cast<int>(p.n_k);
  const TI* scores = static_cast<const TI*>(p.scores);
  const TG* dp = static_cast<const TG*>(p.dp);
  TI* dscores = static_cast<TI*>(p.dscores);
  float bias[E], gsum[E];
  if (pl.active) load_bias<E>(p, pl.h, pl.i, bias);
#pragma unroll
  for (int k = 0; k < E; ++k) gsum[k] = 0.0f;

  using Stage = BackwardStage<TI, TG, V, VG>;
  auto fetch = [&](int64_t b, Stage& st) {
    const int64_t start = slice_start(p, pl, b);
    load_part<TI, V>(scores + start, slice_of(scores + start, count), st.s);
    load_part<TG, VG>(dp + start, slice_of(dp + start, count), st.g);
    st.keep = load_keep(p, b);
    if (threadIdx.x < pl.rows) st.lse = __ldg(p.lse + (b * p.heads + pl.h) * p.n_q + pl.i0 + threadIdx.x);
  };
  auto step = [&](int64_t b, Stage& st) {
    const int64_t start = slice_start(p, pl, b);
    const Slice ss = slice_of(scores + start, count), sg = slice_of(dp + start, count),
                sd = slice_of(dscores + start, count);
    unsigned char* s_bytes = reinterpret_cast<unsigned char*>(s_buf);
    unsigned char* g_bytes = reinterpret_cast<unsigned char*>(g_buf);
    unsigned char* ds_bytes = reinterpret_cast<unsigned char*>(ds_buf);
    commit_part<TI, V>(ss, st.s, s_bytes);
    commit_part<TG, VG>(sg, st.g, g_bytes);
    if (threadIdx.x < p.n_k) keep_buf[threadIdx.x] = st.keep;
    if (threadIdx.x < pl.rows) lse_buf[threadIdx.x] = st.lse;
    if (b + 2 < pl.b1) fetch(b + 2, st);
    __syncthreads();
    if (pl.active) {  // warp-uniform
      const TI* srow = reinterpret_cast<const TI*>(s_bytes + ss.shift) + pl.warp * p.n_k;
      const TG* grow = reinterpret_cast<const TG*>(g_bytes + sg.shift) + pl.warp * p.n_k;
      TI* drow = reinterpret_cast<TI*>(ds_bytes + sd.shift) + pl.warp * p.n_k;
      float x[E], g[E];
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const int j = k * 32 + pl.lane;
        const bool in = j < p.n_k;
        x[k] = in && keep_buf[j] ? p.scale * to_float<IN>(srow[j]) + bias[k] : -kInf;
        g[k] = in ? to_float<GD>(grow[j]) : 0.0f;
      }
      row_softmax_grad<E>(x, g, lse_buf[pl.warp]);  // +inf lse for an all-masked row: g = 0
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const int j = k * 32 + pl.lane;
        gsum[k] += x[k];
        if (j < p.n_k) drow[j] = from_float<IN>(p.scale * x[k]);
      }
    }
    __syncthreads();
    store_slice<TI>(dscores + start, sd, ds_bytes);
  };

  Stage st0, st1;
  fetch(pl.b0, st0);
  if (pl.b0 + 1 < pl.b1) fetch(pl.b0 + 1, st1);
  for (int64_t b = pl.b0; b < pl.b1; b += 2) {
    step(b, st0);
    if (b + 1 < pl.b1) step(b + 1, st1);
  }
  if (pl.active) flush_bias_grad<E>(p, pl.h, pl.i, gsum);
}

template <int IN, int SECOND, bool BACKWARD>
Kernel pick_tier(int64_t n_k) {
#define VLMO_STAGED_TIER(E)                                                   \
  if (n_k <= E * 32) {                                                        \
    if constexpr (BACKWARD) return softmax_backward_staged<IN, SECOND, E>;    \
    else return softmax_forward_staged<IN, SECOND, E>;                        \
  }
  VLMO_STAGED_TIER(1)
  VLMO_STAGED_TIER(2)
  VLMO_STAGED_TIER(4)
  VLMO_STAGED_TIER(8)
#undef VLMO_STAGED_TIER
  return nullptr;
}

// The same dtype pairs as the row kernels: (x, x) and (x, fp32).
template <bool BACKWARD>
Kernel pick(int in_dtype, int second, int64_t n_k) {
  if (second != kF32 && second != in_dtype) return nullptr;
  if (in_dtype == kF32) return pick_tier<kF32, kF32, BACKWARD>(n_k);
  if (in_dtype == kF16)
    return second == kF32 ? pick_tier<kF16, kF32, BACKWARD>(n_k) : pick_tier<kF16, kF16, BACKWARD>(n_k);
  if (in_dtype == kBF16)
    return second == kF32 ? pick_tier<kBF16, kF32, BACKWARD>(n_k) : pick_tier<kBF16, kBF16, BACKWARD>(n_k);
  return nullptr;
}

}  // namespace

std::string launch_staged_softmax(bool backward, int in_dtype, int second, Params p, int sms, uintptr_t stream) {
  Kernel kernel = backward ? pick<true>(in_dtype, second, p.n_k) : pick<false>(in_dtype, second, p.n_k);
  if (kernel == nullptr) return "masked_softmax: no staged kernel for these dtypes and row length";
  p.units = p.heads * ceil_div(p.n_q, kRows);
  p.chunks = choose_chunks(kernel, kThreads, 1, sms, p.units, p.batch);
  p.batch_per_chunk = ceil_div(p.batch, p.chunks);
  p.chunks = ceil_div(p.batch, p.batch_per_chunk);
  const int64_t blocks = p.units * p.chunks;
  if (blocks > 0x7fffffffLL) return "masked_softmax: problem too large for one launch";
  kernel<<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, as_stream(stream)>>>(p);
  return launch_status(backward ? "masked_softmax backward (staged)" : "masked_softmax forward (staged)");
}

}  // namespace cuda
}  // namespace vlmo_fast
