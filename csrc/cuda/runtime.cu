// CUDA runtime queries for build_info() and the launch plumbing shared by the kernels. The runtime is linked
// statically, so these work (and report the error) on machines without a driver.
#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "launchers.h"

namespace vlmo_fast {

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

std::string cuda_device_status(int* count) {
  *count = 0;
  cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state
    *count = 0;
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  return "ok";
}

namespace cuda {

int prepare_device(int device, std::string* error) {
  // This module has its own (static) runtime, whose current device is independent of PyTorch's: select the tensors'
  // device explicitly before every launch.
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    *error = std::string("cudaSetDevice(") + std::to_string(device) + "): " + cudaGetErrorString(err);
    return -1;
  }
  static std::mutex mu;
  static std::vector<int> sm_count;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(sm_count.size())) sm_count.resize(device + 1, 0);
  if (sm_count[device] == 0) {
    int n = 0;
    err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess || n <= 0) {
      cudaGetLastError();
      *error = std::string("cudaDeviceGetAttribute(SM count): ") + cudaGetErrorString(err);
      return -1;
    }
    sm_count[device] = n;
  }
  return sm_count[device];
}

std::string launch_status(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return "";
  return std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace vlmo_fast
