// The scheduler of the CUDA emulator (see emu.h) and the few CUDA runtime calls the launchers make.
// The emulated machine: 8 devices; device d has 2·(d + 1) SMs, and every kernel fits 4 blocks per SM, so a test picks
// the device to steer the launchers' occupancy-driven grid planning.
#include <ucontext.h>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "emu.h"

namespace cuda_emu {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kPoisonBytes = 8 * 1024;  // top of each fiber's stack, where its frames live

enum class State { kReady, kWarpOp, kSync, kDone };

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  State state = State::kReady;
  Op op = Op::kShflXor;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0;
};

struct Run {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  uint3 block{0, 0, 0};
  dim3 block_dim, grid_dim;
  uint64_t block_serial = 0;
};

Run* g_run = nullptr;
uint64_t g_block_serial = 0;
uint3 g_host_idx{0, 0, 0};
dim3 g_host_dim{1, 1, 1};
cudaError_t g_last_error = cudaSuccess;
bool g_reverse = false;  // run blocks, and the fibers of each scheduling round, in reverse order
std::vector<std::pair<uintptr_t, uintptr_t>> g_readable;  // [start, end) of the storages a launch may read
std::string g_bad_read;  // the first access outside them, reported when the launch ends

const char* op_name(Op op) {
  switch (op) {
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kShfl: return "__shfl_sync";
    case Op::kMatchAny: return "__match_any_sync";
    case Op::kAny: return "__any_sync";
  }
  return "?";
}

[[noreturn]] void fail(const Run& r, const std::string& what) {
  char where[96];
  std::snprintf(where, sizeof(where), "block (%u,%u,%u) of grid (%u,%u,%u): ", r.block.x, r.block.y, r.block.z,
                r.grid_dim.x, r.grid_dim.y, r.grid_dim.z);
  throw std::runtime_error(std::string("cuda emulator: ") + where + what);
}

Fiber& self() {
  if (g_run == nullptr || g_run->current == nullptr) throw std::runtime_error("cuda emulator: device call on the host");
  return *g_run->current;
}

void yield(Fiber& f) { swapcontext(&f.ctx, &g_run->scheduler); }

void fiber_main() {
  Fiber* f = g_run->current;
  (*g_run->body)();
  f->state = State::kDone;  // uc_link returns to the scheduler
}

// Completes the warp operation that all 32 lanes of `lanes` wait at.
void complete_warp_op(Run& r, Fiber* lanes, int warp) {
  const Op op = lanes[0].op;
  for (int l = 0; l < 32; ++l) {
    if (lanes[l].op != op)
      fail(r, "warp " + std::to_string(warp) + ": lanes wait at different warp operations (" + op_name(op) +
                  " and " + op_name(lanes[l].op) + ")");
    if (lanes[l].mask != kFullMask)
      fail(r, "warp " + std::to_string(warp) + ": " + op_name(op) + " with a mask other than all 32 lanes");
  }
  for (int l = 0; l < 32; ++l) {
    Fiber& f = lanes[l];
    switch (op) {
      case Op::kShflXor: f.result = lanes[(l ^ f.arg) & 31].value; break;
      case Op::kShfl: f.result = lanes[f.arg & 31].value; break;
      case Op::kMatchAny: {
        unsigned m = 0;
        for (int o = 0; o < 32; ++o)
          if (lanes[o].value == f.value) m |= 1u << o;
        f.result = m;
        break;
      }
      case Op::kAny: {
        uint64_t any = 0;
        for (int o = 0; o < 32; ++o) any |= lanes[o].value;
        f.result = any;
        break;
      }
    }
  }
  for (int l = 0; l < 32; ++l) lanes[l].state = State::kReady;
}

void run_block(Run& r) {
  r.block_serial = ++g_block_serial;
  const int n = static_cast<int>(r.fibers.size());
  for (int t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    const unsigned bx = r.block_dim.x, by = r.block_dim.y;
    f.tid = uint3{static_cast<unsigned>(t) % bx, (static_cast<unsigned>(t) / bx) % by, static_cast<unsigned>(t) / (bx * by)};
    f.state = State::kReady;
    std::vector<char>& stack = r.stacks[t];
    std::memset(stack.data() + stack.size() - kPoisonBytes, 0xff, kPoisonBytes);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack.data();
    f.ctx.uc_stack.ss_size = stack.size();
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (;;) {
    for (int k = 0; k < n; ++k) {
      Fiber& f = r.fibers[g_reverse ? n - 1 - k : k];
      if (f.state != State::kReady) continue;
      r.current = &f;
      swapcontext(&r.scheduler, &f.ctx);
      r.current = nullptr;
    }
    bool progress = false;
    for (int w = 0; w * 32 < n; ++w) {
      Fiber* lanes = &r.fibers[w * 32];
      int at_op = 0, done = 0;
      for (int l = 0; l < 32; ++l) {
        at_op += lanes[l].state == State::kWarpOp;
        done += lanes[l].state == State::kDone;
      }
      if (at_op == 0) continue;
      if (at_op != 32)
        fail(r, "warp " + std::to_string(w) + ": " + std::to_string(at_op) + " lanes wait at " +
                    op_name(lanes[0].state == State::kWarpOp ? lanes[0].op : lanes[31].op) + " while " +
                    std::to_string(done) + " have exited and " + std::to_string(32 - at_op - done) +
                    " wait at __syncthreads");
      complete_warp_op(r, lanes, w);
      progress = true;
    }
    if (progress) continue;
    int active = 0, at_sync = 0;
    for (Fiber& f : r.fibers) {
      active += f.state != State::kDone;
      at_sync += f.state == State::kSync;
    }
    if (active == 0) return;
    if (at_sync != active) fail(r, "deadlock");
    for (Fiber& f : r.fibers)
      if (f.state == State::kSync) f.state = State::kReady;
  }
}

}  // namespace

uint3& thread_idx() { return g_run && g_run->current ? g_run->current->tid : g_host_idx; }
uint3& block_idx() { return g_run ? g_run->block : g_host_idx; }
dim3& block_dim() { return g_run ? g_run->block_dim : g_host_dim; }
dim3& grid_dim() { return g_run ? g_run->grid_dim : g_host_dim; }

uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg) {
  Fiber& f = self();
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.state = State::kWarpOp;
  yield(f);
  return f.result;
}

void sync_threads() {
  Fiber& f = self();
  f.state = State::kSync;
  yield(f);
}

bool check_access(const void* p, size_t bytes, const char* verb) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  // the GPU faults ("misaligned address") on a 2-, 4-, 8- or 16-byte access not aligned to its size; x86 does not
  if ((bytes & (bytes - 1)) == 0 && bytes <= 16 && a % bytes != 0) {
    if (g_bad_read.empty()) {
      char what[160];
      const uint3 t = thread_idx(), b = block_idx();
      std::snprintf(what, sizeof(what), "thread (%u,%u,%u) of block (%u,%u,%u) %s %zu bytes at %p: misaligned address",
                    t.x, t.y, t.z, b.x, b.y, b.z, verb, bytes, p);
      g_bad_read = what;
    }
    return false;
  }
  if (g_readable.empty()) return true;
  for (const auto& r : g_readable)
    if (a >= r.first && a + bytes <= r.second) return true;
  if (!g_bad_read.empty()) return false;
  char what[160];
  const uint3 t = thread_idx(), b = block_idx();
  std::snprintf(what, sizeof(what), "thread (%u,%u,%u) of block (%u,%u,%u) %s %zu bytes at %p, outside every tensor "
                "handed to the launch", t.x, t.y, t.z, b.x, b.y, b.z, verb, bytes, p);
  g_bad_read = what;
  return false;
}

bool check_read(const void* p, size_t bytes) { return check_access(p, bytes, "read"); }
bool check_write(const void* p, size_t bytes) { return check_access(p, bytes, "wrote"); }

void poison_shared(void* p, size_t bytes) {
  struct Seen {
    void* p;
    uint64_t serial;
  };
  static std::vector<Seen> seen;
  self();  // device code only
  const uint64_t serial = g_run->block_serial;
  for (Seen& s : seen) {
    if (s.p != p) continue;
    if (s.serial != serial) {
      std::memset(p, 0xff, bytes);
      s.serial = serial;
    }
    return;
  }
  std::memset(p, 0xff, bytes);
  seen.push_back({p, serial});
}

void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  if (g_run != nullptr) throw std::runtime_error("cuda emulator: a kernel launched a kernel");
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const bool bad = threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
                   grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 || shared_bytes > 48 * 1024;
  if (bad) {  // as CUDA: the launch does not happen and the next cudaGetLastError reports it
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (threads % 32 != 0) throw std::runtime_error("cuda emulator: blocks must be whole warps (emulator limit)");
  Run r;
  r.body = &body;
  r.fibers.resize(threads);
  r.stacks.assign(threads, std::vector<char>(kStackBytes));
  r.block_dim = block;
  r.grid_dim = grid;
  g_run = &r;
  try {
    const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
    for (uint64_t k = 0; k < blocks; ++k) {
      const uint64_t b = g_reverse ? blocks - 1 - k : k;
      r.block = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                      static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
      run_block(r);
    }
  } catch (...) {
    g_run = nullptr;
    g_bad_read.clear();  // this launch failed anyway: nothing of it may leak into the next
    throw;
  }
  g_run = nullptr;
  if (!g_bad_read.empty()) {
    const std::string what = g_bad_read;
    g_bad_read.clear();
    throw std::runtime_error("cuda emulator: " + what);
  }
}

int sm_count(int device) { return 2 * (device + 1); }

}  // namespace cuda_emu

// Scheduling order for the tests: 0 runs blocks and threads in index order, 1 in reverse. A kernel whose result
// depends on the order (a race, or an accumulation whose order is not fixed) gives different bits under the two.
extern "C" void cuda_emu_set_reverse_order(int reverse) { cuda_emu::g_reverse = reverse != 0; }

// Read checking: while any range is listed, every __ldg must fall inside one of them.
extern "C" void cuda_emu_add_readable(uint64_t start, uint64_t bytes) {
  cuda_emu::g_readable.emplace_back(static_cast<uintptr_t>(start), static_cast<uintptr_t>(start + bytes));
}
extern "C" void cuda_emu_clear_readable() { cuda_emu::g_readable.clear(); }

// ---- the CUDA runtime API the launchers and build_info() call ---------------------------------------------------

extern "C" {

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::g_last_error;
  cuda_emu::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidValue: return "invalid argument";
    default: return "unknown error";
  }
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 8;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= 8) {
    cuda_emu::g_last_error = cudaErrorInvalidDevice;
    return cudaErrorInvalidDevice;
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device < 0 || device >= 8) {
    cuda_emu::g_last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  *value = cuda_emu::sm_count(device);
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func, int block_size,
                                                          size_t dynamic_shared) {
  if (func == nullptr || block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  (void)dynamic_shared;
  *blocks = 4;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void* func, int block_size,
                                                                   size_t dynamic_shared, unsigned int flags) {
  (void)flags;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, func, block_size, dynamic_shared);
}

}  // extern "C"
