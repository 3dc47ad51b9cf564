// pybind11 module vlmo_fast._C: build facts and the kernel launchers (CPU always, CUDA when compiled).
// Python (vlmo_fast/_native.py) validates every argument before a pointer reaches a launcher.
#include <pybind11/pybind11.h>

#include <string>

#ifdef VLMO_FAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict d;
#ifdef VLMO_FAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(VLMO_FAST_CUDA_ARCHS);
  d["nvcc_version"] = std::string(VLMO_FAST_NVCC_VERSION);
  d["cuda_runtime_version"] = vlmo_fast::cuda_runtime_version();
  int count = 0;
  d["cuda_device_status"] = vlmo_fast::cuda_device_status(&count);
  d["cuda_device_count"] = count;
#else
  d["cuda"] = false;
#endif
#ifdef VLMO_FAST_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlmo_fast native kernels";
  m.def("build_info", &build_info, "What this build of the extension contains");
}
