// pybind11 module vlmo_fast._C: build facts and the kernel launchers (CPU always, CUDA when compiled).
// Python (vlmo_fast/ops/native.py) validates every argument (devices, dtypes, shapes, strides, index ranges) before
// a pointer reaches a launcher; pointers arrive as integers (tensor.data_ptr()), 0 meaning "absent".
// CPU launchers take the thread count (torch.get_num_threads()); CUDA launchers the device index and the stream
// handle (torch.cuda.current_stream().cuda_stream). Kernels run with the GIL released; a kernel that refuses its
// arguments raises RuntimeError with its reason.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#include "kernel_args.h"

#ifdef VLMO_FAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace py = pybind11;
using vlmo_fast::SoftmaxBias;
using vlmo_fast::SoftmaxShape;

namespace {

using uptr = uintptr_t;

template <typename T>
T* ptr(uptr p) {
  return reinterpret_cast<T*>(p);
}

void check(const std::string& err) {
  if (!err.empty()) throw std::runtime_error("vlmo_fast._C: " + err);
}

SoftmaxShape softmax_shape(int64_t batch, int64_t heads, int64_t n_q, int64_t n_k) {
  SoftmaxShape s;
  s.batch = batch;
  s.heads = heads;
  s.n_q = n_q;
  s.n_k = n_k;
  return s;
}

SoftmaxBias softmax_bias(uptr dense, uptr table, int64_t table_s0, int64_t table_s1, int64_t table_rows,
                         uptr index) {
  SoftmaxBias b;
  b.dense = ptr<const float>(dense);
  b.table = ptr<const float>(table);
  b.table_s0 = table_s0;
  b.table_s1 = table_s1;
  b.table_rows = table_rows;
  b.index = ptr<const int32_t>(index);
  return b;
}

py::dict build_info() {
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
  py::list ops;
  for (const char* op : {"masked_softmax", "multiway_layernorm", "rel_pos_bias_gather"}) ops.append(op);
  d["ops"] = ops;
  return d;
}

// The argument lists of the launchers, shared by the CPU and CUDA variants (the last one or two differ).
#define VLMO_SOFTMAX_FWD_ARGS                                                                                      \
  py::arg("scores"), py::arg("scores_dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("lse"),              \
      py::arg("batch"), py::arg("heads"), py::arg("n_q"), py::arg("n_k"), py::arg("scale"), py::arg("bias"),     \
      py::arg("table"), py::arg("table_s0"), py::arg("table_s1"), py::arg("table_rows"), py::arg("index"),       \
      py::arg("keep")
#define VLMO_SOFTMAX_BWD_ARGS                                                                                      \
  py::arg("dp"), py::arg("dp_dtype"), py::arg("scores"), py::arg("scores_dtype"), py::arg("lse"),                \
      py::arg("dscores"), py::arg("batch"), py::arg("heads"), py::arg("n_q"), py::arg("n_k"), py::arg("scale"),  \
      py::arg("bias"), py::arg("table"), py::arg("table_s0"), py::arg("table_s1"), py::arg("table_rows"),        \
      py::arg("index"), py::arg("keep"), py::arg("dbias"), py::arg("dtable")
#define VLMO_LN_FWD_ARGS                                                                                           \
  py::arg("x"), py::arg("dtype"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("rows"),               \
      py::arg("seq_len"), py::arg("dim"), py::arg("split"), py::arg("weight"), py::arg("bias"), py::arg("eps")
#define VLMO_LN_BWD_ARGS                                                                                           \
  py::arg("dy"), py::arg("x"), py::arg("dtype"), py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("rows"), \
      py::arg("seq_len"), py::arg("dim"), py::arg("split"), py::arg("weight"), py::arg("dweight"),               \
      py::arg("dbias"), py::arg("num_experts")
#define VLMO_GATHER_FWD_ARGS                                                                                       \
  py::arg("table"), py::arg("dtype"), py::arg("s0"), py::arg("s1"), py::arg("rows"), py::arg("cols"),            \
      py::arg("index"), py::arg("n"), py::arg("out")
#define VLMO_GATHER_BWD_ARGS                                                                                       \
  py::arg("grad"), py::arg("dtype"), py::arg("index"), py::arg("n"), py::arg("rows"), py::arg("cols"),           \
      py::arg("dtable")

void bind_cpu(py::module_& m) {
  namespace k = vlmo_fast::cpu;
  m.def(
      "masked_softmax_forward_cpu",
      [](uptr scores, int sdt, uptr out, int odt, uptr lse, int64_t b, int64_t h, int64_t nq, int64_t nk, float scale,
         uptr bias, uptr table, int64_t s0, int64_t s1, int64_t rows, uptr index, uptr keep, int threads) {
        check(k::masked_softmax_forward(ptr<const void>(scores), sdt, ptr<void>(out), odt, ptr<float>(lse),
                                        softmax_shape(b, h, nq, nk), scale,
                                        softmax_bias(bias, table, s0, s1, rows, index),
                                        ptr<const uint8_t>(keep), threads));
      },
      VLMO_SOFTMAX_FWD_ARGS, py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "masked_softmax_backward_cpu",
      [](uptr dp, int gdt, uptr scores, int sdt, uptr lse, uptr dscores, int64_t b, int64_t h, int64_t nq, int64_t nk,
         float scale, uptr bias, uptr table, int64_t s0, int64_t s1, int64_t rows, uptr index, uptr keep, uptr dbias,
         uptr dtable, int threads) {
        check(k::masked_softmax_backward(ptr<const void>(dp), gdt, ptr<const void>(scores), sdt, ptr<const float>(lse),
                                         ptr<void>(dscores), softmax_shape(b, h, nq, nk), scale,
                                         softmax_bias(bias, table, s0, s1, rows, index), ptr<const uint8_t>(keep),
                                         ptr<float>(dbias), ptr<float>(dtable), threads));
      },
      VLMO_SOFTMAX_BWD_ARGS, py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "multiway_layernorm_forward_cpu",
      [](uptr x, int dt, uptr y, uptr mean, uptr rstd, int64_t rows, int64_t seq_len, int64_t dim, int64_t split,
         uptr weight, uptr bias, float eps, int threads) {
        check(k::multiway_layernorm_forward(ptr<const void>(x), dt, ptr<void>(y), ptr<float>(mean), ptr<float>(rstd),
                                            rows, seq_len, dim, split, ptr<const float>(weight),
                                            ptr<const float>(bias), eps, threads));
      },
      VLMO_LN_FWD_ARGS, py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "multiway_layernorm_backward_cpu",
      [](uptr dy, uptr x, int dt, uptr mean, uptr rstd, uptr dx, int64_t rows, int64_t seq_len, int64_t dim,
         int64_t split, uptr weight, uptr dweight, uptr dbias, int experts, int threads) {
        check(k::multiway_layernorm_backward(ptr<const void>(dy), ptr<const void>(x), dt, ptr<const float>(mean),
                                             ptr<const float>(rstd), ptr<void>(dx), rows, seq_len, dim, split,
                                             ptr<const float>(weight), ptr<float>(dweight), ptr<float>(dbias), experts,
                                             threads));
      },
      VLMO_LN_BWD_ARGS, py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "rel_pos_gather_forward_cpu",
      [](uptr table, int dt, int64_t s0, int64_t s1, int64_t rows, int64_t cols, uptr index, int64_t n, uptr out,
         int threads) {
        check(k::rel_pos_gather_forward(ptr<const void>(table), dt, s0, s1, rows, cols, ptr<const int32_t>(index), n,
                                        ptr<void>(out), threads));
      },
      VLMO_GATHER_FWD_ARGS, py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "rel_pos_gather_backward_cpu",
      [](uptr grad, int dt, uptr index, int64_t n, int64_t rows, int64_t cols, uptr dtable, int threads) {
        check(k::rel_pos_gather_backward(ptr<const void>(grad), dt, ptr<const int32_t>(index), n, rows, cols,
                                         ptr<float>(dtable), threads));
      },
      VLMO_GATHER_BWD_ARGS, py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
}

#ifdef VLMO_FAST_WITH_CUDA
void bind_cuda(py::module_& m) {
  namespace k = vlmo_fast::cuda;
  m.def(
      "masked_softmax_forward_cuda",
      [](uptr scores, int sdt, uptr out, int odt, uptr lse, int64_t b, int64_t h, int64_t nq, int64_t nk, float scale,
         uptr bias, uptr table, int64_t s0, int64_t s1, int64_t rows, uptr index, uptr keep, int device, uptr stream) {
        check(k::masked_softmax_forward(ptr<const void>(scores), sdt, ptr<void>(out), odt, ptr<float>(lse),
                                        softmax_shape(b, h, nq, nk), scale,
                                        softmax_bias(bias, table, s0, s1, rows, index),
                                        ptr<const uint8_t>(keep), device, stream));
      },
      VLMO_SOFTMAX_FWD_ARGS, py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "masked_softmax_backward_cuda",
      [](uptr dp, int gdt, uptr scores, int sdt, uptr lse, uptr dscores, int64_t b, int64_t h, int64_t nq, int64_t nk,
         float scale, uptr bias, uptr table, int64_t s0, int64_t s1, int64_t rows, uptr index, uptr keep, uptr dbias,
         uptr dtable, int device, uptr stream) {
        check(k::masked_softmax_backward(ptr<const void>(dp), gdt, ptr<const void>(scores), sdt, ptr<const float>(lse),
                                         ptr<void>(dscores), softmax_shape(b, h, nq, nk), scale,
                                         softmax_bias(bias, table, s0, s1, rows, index), ptr<const uint8_t>(keep),
                                         ptr<float>(dbias), ptr<float>(dtable), device, stream));
      },
      VLMO_SOFTMAX_BWD_ARGS, py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "multiway_layernorm_forward_cuda",
      [](uptr x, int dt, uptr y, uptr mean, uptr rstd, int64_t rows, int64_t seq_len, int64_t dim, int64_t split,
         uptr weight, uptr bias, float eps, int device, uptr stream) {
        check(k::multiway_layernorm_forward(ptr<const void>(x), dt, ptr<void>(y), ptr<float>(mean), ptr<float>(rstd),
                                            rows, seq_len, dim, split, ptr<const float>(weight),
                                            ptr<const float>(bias), eps, device, stream));
      },
      VLMO_LN_FWD_ARGS, py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "multiway_layernorm_backward_workspace_cuda",
      [](int64_t rows, int64_t seq_len, int64_t dim, int64_t split, int dtype, int device) {
        const int64_t n = k::multiway_layernorm_backward_workspace(rows, seq_len, dim, split, dtype, device);
        if (n < 0) throw std::runtime_error("vlmo_fast._C: cannot plan the LayerNorm backward on this device");
        return n;
      },
      py::arg("rows"), py::arg("seq_len"), py::arg("dim"), py::arg("split"), py::arg("dtype"), py::arg("device"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "multiway_layernorm_backward_cuda",
      [](uptr dy, uptr x, int dt, uptr mean, uptr rstd, uptr dx, int64_t rows, int64_t seq_len, int64_t dim,
         int64_t split, uptr weight, uptr dweight, uptr dbias, int experts, uptr workspace, int device, uptr stream) {
        check(k::multiway_layernorm_backward(ptr<const void>(dy), ptr<const void>(x), dt, ptr<const float>(mean),
                                             ptr<const float>(rstd), ptr<void>(dx), rows, seq_len, dim, split,
                                             ptr<const float>(weight), ptr<float>(dweight), ptr<float>(dbias), experts,
                                             ptr<float>(workspace), device, stream));
      },
      VLMO_LN_BWD_ARGS, py::arg("workspace"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "rel_pos_gather_forward_cuda",
      [](uptr table, int dt, int64_t s0, int64_t s1, int64_t rows, int64_t cols, uptr index, int64_t n, uptr out,
         int device, uptr stream) {
        check(k::rel_pos_gather_forward(ptr<const void>(table), dt, s0, s1, rows, cols, ptr<const int32_t>(index), n,
                                        ptr<void>(out), device, stream));
      },
      VLMO_GATHER_FWD_ARGS, py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "rel_pos_gather_backward_cuda",
      [](uptr grad, int dt, uptr index, int64_t n, int64_t rows, int64_t cols, uptr dtable, int device, uptr stream) {
        check(k::rel_pos_gather_backward(ptr<const void>(grad), dt, ptr<const int32_t>(index), n, rows, cols,
                                         ptr<float>(dtable), device, stream));
      },
      VLMO_GATHER_BWD_ARGS, py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.attr("LAYERNORM_CUDA_MAX_DIM") = k::kLayerNormMaxDim;
  m.def(
      "set_masked_softmax_kernel_cuda", [](int kind) { check(k::set_masked_softmax_kernel(kind)); }, py::arg("kind"),
      "Which CUDA kernels take softmax rows of up to 256 keys: SOFTMAX_KERNEL_ROWS or SOFTMAX_KERNEL_STAGED.");
  m.def("masked_softmax_kernel_cuda", &k::masked_softmax_kernel);
  m.attr("SOFTMAX_KERNEL_ROWS") = k::kSoftmaxRows;
  m.attr("SOFTMAX_KERNEL_STAGED") = k::kSoftmaxStaged;
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlmo_fast native kernels";
  m.def("build_info", &build_info, "What this build of the extension contains");
  bind_cpu(m);
#ifdef VLMO_FAST_WITH_CUDA
  bind_cuda(m);
#endif
}
