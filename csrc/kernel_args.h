// Argument bundles shared by the CPU (csrc/cpu/kernels.h) and CUDA (csrc/cuda/launchers.h) entry points.
// Plain data, no PyTorch: pointers are addresses handed over from Python after validation.
#pragma once

#include <cstdint>

namespace vlmo_fast {

// Additive attention bias of the softmax: dense (H, Nq, Nk) fp32 contiguous, or gathered from an fp32 table with
// any strides, bias[h, i, j] = table[index[i, j]·table_s0 + h·table_s1] (index int32 (Nq, Nk) contiguous, values
// checked to lie in [0, table_rows)), or absent (all null).
struct SoftmaxBias {
  const float* dense = nullptr;
  const float* table = nullptr;
  int64_t table_s0 = 0, table_s1 = 0, table_rows = 0;
  const int32_t* index = nullptr;
};

struct SoftmaxShape {
  int64_t batch = 0, heads = 0, n_q = 0, n_k = 0;
};

}  // namespace vlmo_fast
