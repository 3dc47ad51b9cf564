// CUDA runtime queries for build_info(): the runtime is linked statically, so these work (and report the error)
// on machines without a driver.
#include <cuda_runtime.h>

#include <string>

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

}  // namespace vlmo_fast
