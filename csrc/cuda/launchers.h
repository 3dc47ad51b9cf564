// Host-side entry points of the CUDA kernels. Each launcher takes raw device pointers (as uintptr_t from Python),
// sizes, and the CUDA stream handle, so the build needs neither a CUDA build of PyTorch nor its headers.
// Launchers return an empty string on success, else the CUDA error text.
#pragma once

#include <cstdint>
#include <string>

namespace vlmo_fast {

int cuda_runtime_version();
std::string cuda_device_status(int* count);

}  // namespace vlmo_fast
