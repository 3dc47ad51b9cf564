// Relative-position bias gather and its backward on the CPU (spec §2 "Gather").
//
//   forward:  out[c, i, j] = table[index[i, j], c]                       (C, N, N) from an (R, C) strided table
//   backward: dtable[r, c] = Σ_{(i, j): index[i, j] == r} grad[c, i, j]  a scatter-add with extreme contention
//
// The backward never shares an accumulator between threads: with at least as many columns as threads, each thread
// owns whole columns and sums each into an L1-resident R-float buffer; otherwise each thread sums its block of
// query rows into a private (R, C) table and the tables are added in a fixed order. No atomics; deterministic.
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_common.h"
#include "kernels.h"

namespace vlmo_fast {
namespace cpu {
namespace {

// Forward copies elements unchanged (no conversion), so only the element size matters.
template <typename T>
VLMO_CPU_CLONES void gather_rows(const T* table, int64_t s0, int64_t s1, const int32_t* index, int64_t n, T* out,
                                 int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {  // u = c·N + i
    const int64_t c = u / n, i = u % n;
    const T* col = table + c * s1;
    const int32_t* idx = index + i * n;
    T* o = out + u * n;
    for (int64_t j = 0; j < n; ++j) o[j] = col[static_cast<int64_t>(idx[j]) * s0];
  }
}

template <int DT>
VLMO_CPU_CLONES void scatter_column(const typename Elem<DT>::T* grad, const int32_t* index, int64_t n, int64_t i0,
                                    int64_t i1, float* acc) {
  for (int64_t i = i0; i < i1; ++i) {
    const typename Elem<DT>::T* g = grad + i * n;
    const int32_t* idx = index + i * n;
    for (int64_t j = 0; j < n; ++j) acc[idx[j]] += Elem<DT>::load(g[j]);
  }
}

int pick_threads(int requested, int64_t work) {
  int t = std::max(1, requested);
  if (work < (int64_t{1} << 15)) t = 1;
  return t;
}

template <int DT>
void backward_typed(const void* grad, const int32_t* index, int64_t n, int64_t rows, int64_t cols, float* dtable,
                    int num_threads) {
  const auto* g = static_cast<const typename Elem<DT>::T*>(grad);
  const int64_t nn = n * n;
  const int threads = pick_threads(num_threads, cols * nn);
  if (cols >= threads) {
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> acc(static_cast<size_t>(rows));
#pragma omp for schedule(static)
      for (int64_t c = 0; c < cols; ++c) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        scatter_column<DT>(g + c * nn, index, n, 0, n, acc.data());
        for (int64_t r = 0; r < rows; ++r) dtable[r * cols + c] = acc[r];
      }
    }
    return;
  }
  // few columns (e.g. one head): split the query rows, one private table per thread
  std::vector<float> priv(static_cast<size_t>(rows * cols * threads), 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const ThreadShare share = thread_share(n);
    const int tid = share.tid;
    const int64_t i0 = share.begin, i1 = share.end;
    float* mine = priv.data() + rows * cols * tid;
    for (int64_t c = 0; c < cols; ++c) scatter_column<DT>(g + c * nn, index, n, i0, i1, mine + c * rows);
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      float s = 0.0f;
      for (int t = 0; t < threads; ++t) s += priv[rows * cols * t + c * rows + r];
      dtable[r * cols + c] = s;
    }
}

}  // namespace

std::string rel_pos_gather_forward(const void* table, int dtype, int64_t s0, int64_t s1, int64_t rows, int64_t cols,
                                   const int32_t* index, int64_t n, void* out, int num_threads) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) return "unsupported dtype code";
  (void)rows;
  const int64_t units = cols * n;
  if (units * n == 0) return "";
  const int threads = pick_threads(num_threads, units * n);
#pragma omp parallel num_threads(threads)
  {
    const ThreadShare share = thread_share(units);
    const int64_t u0 = share.begin, u1 = share.end;
    if (dtype == kF32)
      gather_rows<float>(static_cast<const float*>(table), s0, s1, index, n, static_cast<float*>(out), u0, u1);
    else
      gather_rows<uint16_t>(static_cast<const uint16_t*>(table), s0, s1, index, n, static_cast<uint16_t*>(out), u0,
                            u1);
  }
  return "";
}

std::string rel_pos_gather_backward(const void* grad, int dtype, const int32_t* index, int64_t n, int64_t rows,
                                    int64_t cols, float* dtable, int num_threads) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) return "unsupported dtype code";
  if (n == 0 || cols == 0) {
    std::fill(dtable, dtable + rows * cols, 0.0f);
    return "";
  }
  switch (dtype) {
    case kF32: backward_typed<kF32>(grad, index, n, rows, cols, dtable, num_threads); break;
    case kF16: backward_typed<kF16>(grad, index, n, rows, cols, dtable, num_threads); break;
    default: backward_typed<kBF16>(grad, index, n, rows, cols, dtable, num_threads);
  }
  return "";
}

}  // namespace cpu
}  // namespace vlmo_fast
