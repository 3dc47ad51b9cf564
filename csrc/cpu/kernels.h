// Entry points of the C++ CPU kernels (csrc/cpu/*.cpp). Pointers are host addresses handed over from Python after
// vlmo_fast/ops/native.py has checked every shape, dtype, stride and index range; the kernels trust them.
// Element types are the codes of cpu_common.h (0 fp32, 1 fp16, 2 bf16); math is fp32 throughout.
// Each entry point returns an empty string on success, else a description of what it refused.
#pragma once

#include <cstdint>
#include <string>

#include "../kernel_args.h"

namespace vlmo_fast {
namespace cpu {

// ---- fused scale + bias + key mask + softmax (masked_softmax.cpp) ------------------------------------------------
// Logits x[b,h,i,j] = scale·scores[b,h,i,j] + bias[h,i,j] (+ -inf where keep[b,j] == 0); see kernel_args.h.
// out = softmax_j(x) in out_dtype; lse (B,H,Nq) fp32 = log Σ_j exp(x) (+inf for a row without any finite logit,
// whose probabilities are all zero). scores and out are contiguous (B,H,Nq,Nk); keep is (B,Nk) bytes or null.
std::string masked_softmax_forward(const void* scores, int scores_dtype, void* out, int out_dtype, float* lse,
                                   SoftmaxShape shape, float scale, SoftmaxBias bias, const uint8_t* keep,
                                   int num_threads);

// Given dp = dL/dout (contiguous, dp_dtype), recomputes p = exp(x - lse) and writes
//   dscores = scale · p ⊙ (dp - Σ_j p·dp)            (scores_dtype, contiguous)
//   dbias_dense[h,i,j] = Σ_b p ⊙ (dp - Σ p·dp)          (fp32 (H,Nq,Nk), if not null; overwritten)
//   dtable[r, h] = Σ over (b,i,j) with index[i,j] == r  (fp32 (table_rows, H) contiguous, if not null; overwritten)
std::string masked_softmax_backward(const void* dp, int dp_dtype, const void* scores, int scores_dtype,
                                    const float* lse, void* dscores, SoftmaxShape shape, float scale, SoftmaxBias bias,
                                    const uint8_t* keep, float* dbias_dense, float* dtable, int num_threads);

// ---- modality-split LayerNorm (multiway_layernorm.cpp) -----------------------------------------------------------
// x: (rows, D) contiguous, rows = B·N; row r belongs to expert 1 when split >= 0 and r mod N >= split, else expert 0.
// weight, bias: (E, D) fp32 contiguous (E = 1 or 2). y has x's dtype; mean and rstd (rows,) fp32.
std::string multiway_layernorm_forward(const void* x, int dtype, void* y, float* mean, float* rstd, int64_t rows,
                                       int64_t seq_len, int64_t dim, int64_t split, const float* weight,
                                       const float* bias, float eps, int num_threads);

// dy, x, dx: (rows, D) contiguous in dtype. dweight, dbias: (E, D) fp32, overwritten (either may be null).
std::string multiway_layernorm_backward(const void* dy, const void* x, int dtype, const float* mean, const float* rstd,
                                        void* dx, int64_t rows, int64_t seq_len, int64_t dim, int64_t split,
                                        const float* weight, float* dweight, float* dbias, int num_experts,
                                        int num_threads);

// ---- relative-position bias gather (rel_pos_gather.cpp) ----------------------------------------------------------
// out[c, i, j] = table[index[i,j]·s0 + c·s1]; table (R, C) any strides in dtype, index (N,N) int32, out (C,N,N).
std::string rel_pos_gather_forward(const void* table, int dtype, int64_t s0, int64_t s1, int64_t rows, int64_t cols,
                                   const int32_t* index, int64_t n, void* out, int num_threads);

// dtable[r, c] = Σ_{(i,j): index[i,j] == r} grad[c, i, j]; grad (C,N,N) contiguous in dtype, dtable (R, C) fp32
// contiguous, overwritten.
std::string rel_pos_gather_backward(const void* grad, int dtype, const int32_t* index, int64_t n, int64_t rows,
                                    int64_t cols, float* dtable, int num_threads);

}  // namespace cpu
}  // namespace vlmo_fast
