// Kernels that check the CUDA emulator itself (tests/test_cuda_emulator.py): that it gives the hardware's results for
// the warp primitives and block barriers the kernels of csrc/cuda use, and that it refuses what the hardware leaves
// undefined. Compiled like the real kernels (rewritten launches, emu.h force-included); C entry points for ctypes.
#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace {

// out[t] = sum over the warp of t (xor butterfly), then lane 0's value read by all lanes via __shfl_sync.
__global__ void warp_sums(float* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  float v = static_cast<float>(t);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const float first = __shfl_sync(0xffffffffu, static_cast<float>(t), 0);
  out[t] = v + 1000.0f * first;
}

// groups[lane] = __match_any_sync of key lane / 4 (lanes 28..31 share key -1); any = __any_sync(lane == 5).
__global__ void match_and_any(unsigned* groups, int* any) {
  const int lane = threadIdx.x & 31;
  const long long key = lane < 28 ? lane / 4 : -1;
  groups[threadIdx.x] = __match_any_sync(0xffffffffu, static_cast<unsigned long long>(key));
  any[threadIdx.x] = __any_sync(0xffffffffu, lane == 5);
}

// Block reduction through shared memory across a __syncthreads; out[block] = Σ t over the block's threads.
__global__ void block_sum(float* out) {
  __shared__ float part[8];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  float v = static_cast<float>(blockIdx.x * blockDim.x + threadIdx.x);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += part[w];
    out[blockIdx.x] = s;
  }
}

// Reads shared memory no thread wrote: the emulator's poison makes that a NaN.
__global__ void read_unwritten_shared(float* out) {
  __shared__ float scratch[32];
  if (threadIdx.x == 0) scratch[0] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = scratch[threadIdx.x];
}

// Half the warp returns before a full-mask shuffle: undefined on the hardware, an error in the emulator.
__global__ void divergent_shuffle(float* out) {
  if ((threadIdx.x & 31) >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// One warp at __syncthreads while another runs a warp operation that never completes for it: a deadlock on the
// hardware (lanes of warp 1 split between the two), an error in the emulator.
__global__ void split_warp_barrier(float* out) {
  if (threadIdx.x >= 32 && (threadIdx.x & 1)) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

// A 16-byte vector read at `in` + offset bytes: on the hardware a "misaligned address" fault unless 16-aligned.
__global__ void vector_read(const char* in, int offset, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + offset));
  out[threadIdx.x] = static_cast<float>(v.x);
}

template <class F>
int guarded(F f, char* error, int error_len) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, error_len, "%s", e.what());
    return 1;
  }
}

}  // namespace

extern "C" {

int emu_warp_sums(float* out, int blocks, char* error, int error_len) {
  return guarded([&] { warp_sums<<<blocks, 64>>>(out); }, error, error_len);
}

int emu_match_and_any(unsigned* groups, int* any, char* error, int error_len) {
  return guarded([&] { match_and_any<<<1, 32>>>(groups, any); }, error, error_len);
}

int emu_block_sum(float* out, int blocks, int threads, char* error, int error_len) {
  return guarded([&] { block_sum<<<blocks, threads>>>(out); }, error, error_len);
}

int emu_read_unwritten_shared(float* out, char* error, int error_len) {
  return guarded([&] { read_unwritten_shared<<<2, 32>>>(out); }, error, error_len);
}

int emu_divergent_shuffle(float* out, char* error, int error_len) {
  return guarded([&] { divergent_shuffle<<<1, 32>>>(out); }, error, error_len);
}

int emu_split_warp_barrier(float* out, char* error, int error_len) {
  return guarded([&] { split_warp_barrier<<<1, 64>>>(out); }, error, error_len);
}

int emu_vector_read(const char* in, int offset, float* out, char* error, int error_len) {
  return guarded([&] { vector_read<<<1, 32>>>(in, offset, out); }, error, error_len);
}

unsigned emu_fns(unsigned mask, unsigned base, int offset) { return __fns(mask, base, offset); }

// The launch-configuration error CUDA reports for a block of 2048 threads.
int emu_bad_config() {
  float x = 0.0f;
  warp_sums<<<1, 2048>>>(&x);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
