// Host-side entry points of the CUDA kernels. Each launcher takes raw device pointers (as uintptr_t from Python),
// sizes, the device index and the CUDA stream handle (torch.cuda.current_stream().cuda_stream), so the build needs
// neither a CUDA build of PyTorch nor its headers. Python (vlmo_fast/ops/native.py) validates every argument first.
// Launchers return an empty string on success, else the CUDA error text. Semantics match the CPU kernels
// (csrc/cpu/kernels.h); fp32 math on fp32/fp16/bf16 storage.
#pragma once

#include <cstdint>
#include <string>

#include "../kernel_args.h"

namespace vlmo_fast {

int cuda_runtime_version();
std::string cuda_device_status(int* count);

namespace cuda {

// ---- fused scale + bias + key mask + softmax (masked_softmax.cu) -------------------------------------------------
std::string masked_softmax_forward(const void* scores, int scores_dtype, void* out, int out_dtype, float* lse,
                                   SoftmaxShape shape, float scale, SoftmaxBias bias, const uint8_t* keep, int device,
                                   uintptr_t stream);

// dbias_dense (H,Nq,Nk) and dtable (table_rows, H) are fp32 and must be zero on entry (atomics accumulate into them).
std::string masked_softmax_backward(const void* dp, int dp_dtype, const void* scores, int scores_dtype,
                                    const float* lse, void* dscores, SoftmaxShape shape, float scale, SoftmaxBias bias,
                                    const uint8_t* keep, float* dbias_dense, float* dtable, int device,
                                    uintptr_t stream);

// Which kernels take rows of up to 256 keys (longer rows always take the row kernels): kSoftmaxRows, one warp per
// query row loading its own elements (the default, measured on an H100), or kSoftmaxStaged, a block per eight query
// rows whose batch rows stream through shared memory in 16-byte vectors (masked_softmax_staged.cu). Process-wide.
constexpr int kSoftmaxRows = 0;
constexpr int kSoftmaxStaged = 1;
std::string set_masked_softmax_kernel(int kind);  // "" or the error
int masked_softmax_kernel();

// ---- modality-split LayerNorm (multiway_layernorm.cu) ------------------------------------------------------------
// Largest D the register-resident row kernels take.
constexpr int64_t kLayerNormMaxDim = 1024;

std::string multiway_layernorm_forward(const void* x, int dtype, void* y, float* mean, float* rstd, int64_t rows,
                                       int64_t seq_len, int64_t dim, int64_t split, const float* weight,
                                       const float* bias, float eps, int device, uintptr_t stream);

// Floats of fp32 scratch the backward needs (per-block partial weight gradients of stage 1), or -1 on error.
int64_t multiway_layernorm_backward_workspace(int64_t rows, int64_t seq_len, int64_t dim, int64_t split, int dtype,
                                              int device);

// dweight, dbias: (E, D) fp32, overwritten. workspace: as many floats as the function above said.
std::string multiway_layernorm_backward(const void* dy, const void* x, int dtype, const float* mean, const float* rstd,
                                        void* dx, int64_t rows, int64_t seq_len, int64_t dim, int64_t split,
                                        const float* weight, float* dweight, float* dbias, int num_experts,
                                        float* workspace, int device, uintptr_t stream);

// ---- relative-position bias gather (rel_pos_gather.cu) -----------------------------------------------------------
std::string rel_pos_gather_forward(const void* table, int dtype, int64_t s0, int64_t s1, int64_t rows, int64_t cols,
                                   const int32_t* index, int64_t n, void* out, int device, uintptr_t stream);

// dtable (R, C) fp32 contiguous, must be zero on entry.
std::string rel_pos_gather_backward(const void* grad, int dtype, const int32_t* index, int64_t n, int64_t rows,
                                    int64_t cols, float* dtable, int device, uintptr_t stream);

}  // namespace cuda
}  // namespace vlmo_fast
