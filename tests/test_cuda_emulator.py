"""The CPU emulator that runs the CUDA kernels of csrc/cuda in CI (tests/cuda_emulator.py, tests/cuda_emu/): its source
rewriting, the hardware results of the warp primitives and barriers, the errors for what the hardware leaves
undefined, and schedule independence. (The kernels' numerics on emulated GPUs of two sizes are in tests/test_native_*.)"""

import ctypes

import pytest
import torch

import cuda_emulator
from native_helpers import padding
from vlmo_fast import ops

pytestmark = pytest.mark.skipif(cuda_emulator.unavailable() is not None,
                                reason=f"the CUDA emulator cannot be built: {cuda_emulator.unavailable()}")


@pytest.fixture(scope="module")
def lib():
    return cuda_emulator.selftest_library()


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _call(fn, *args):
    err = ctypes.create_string_buffer(512)
    rc = fn(*args, err, len(err))
    return rc, err.value.decode()


def test_launches_and_shared_arrays_are_rewritten():
    src = ("  foo<T, 2><<<dim3(g), 128, 0, st>>>(p, q);\n"
           "  if (x) bar<<<grid, kThreads>>>(p); else baz<float><<<1, 32, 0, s>>>(a);\n"
           "  __shared__ float acc[2][kWarps][E * 32];\n")
    out = cuda_emulator.rewrite(src)
    assert "::cuda_emu::make_launch(foo<T, 2>, dim3(g), 128, 0, st)(p, q);" in out
    assert "if (x) ::cuda_emu::make_launch(bar, grid, kThreads)(p);" in out
    assert "else ::cuda_emu::make_launch(baz<float>, 1, 32, 0, s)(a);" in out
    assert "__shared__ float acc[2][kWarps][E * 32]; ::cuda_emu::poison_shared(acc, sizeof(acc));" in out
    assert "<<<" not in out


def test_warp_shuffles_give_the_hardware_results(lib):
    out = torch.zeros(3 * 64)
    assert _call(lib.emu_warp_sums, _ptr(out), 3) == (0, "")
    t = torch.arange(3 * 64, dtype=torch.float32)
    warp = t.div(32, rounding_mode="floor")
    want = (32 * warp * 32 + 496) + 1000 * warp * 32  # Σ of a warp's 32 ids + 1000·(its first id)
    assert torch.equal(out, want)


def test_match_any_and_any(lib):
    g32 = torch.zeros(32, dtype=torch.int32)  # the unsigned lane masks, bit for bit
    any_ = torch.zeros(32, dtype=torch.int32)
    assert _call(lib.emu_match_and_any, _ptr(g32), _ptr(any_)) == (0, "")
    got = [int(v) & 0xFFFFFFFF for v in g32.tolist()]
    for lane in range(32):
        members = range(28, 32) if lane >= 28 else range(4 * (lane // 4), 4 * (lane // 4) + 4)
        assert got[lane] == sum(1 << m for m in members), lane
    assert torch.all(any_ == 1)


@pytest.mark.parametrize("mask,base,offset,want", [
    (0xAAAAAAAA, 3, 1, 3), (0xAAAAAAAA, 3, -1, 3), (0xAAAAAAAA, 2, 1, 3), (0xAAAAAAAA, 2, -1, 1),  # PTX ISA examples
    (0b1011_0000, 0, 1, 4), (0b1011_0000, 0, 2, 5), (0b1011_0000, 0, 3, 7), (0b1011_0000, 0, 4, 0xFFFFFFFF),
    (0b1000, 3, 0, 3), (0b1000, 2, 0, 0xFFFFFFFF),
])
def test_fns_follows_the_ptx_definition(lib, mask, base, offset, want):
    """__fns(mask, 0, k) is what the kernels use to find the k-th member of a lane group."""
    lib.emu_fns.restype = ctypes.c_uint
    assert lib.emu_fns(ctypes.c_uint(mask), ctypes.c_uint(base), ctypes.c_int(offset)) == want


@pytest.mark.parametrize("threads", [32, 96, 256])
def test_block_barrier_and_shared_memory(lib, threads):
    blocks = 5
    out = torch.zeros(blocks)
    assert _call(lib.emu_block_sum, _ptr(out), blocks, threads) == (0, "")
    ids = torch.arange(blocks * threads, dtype=torch.float64).view(blocks, threads)
    assert torch.equal(out.double(), ids.sum(1))


def test_unwritten_shared_memory_reads_as_nan(lib):
    out = torch.zeros(32)
    assert _call(lib.emu_read_unwritten_shared, _ptr(out)) == (0, "")
    assert out[0] == 1 and out[1:].isnan().all()


def test_a_partial_warp_at_a_full_mask_shuffle_is_an_error(lib):
    rc, err = _call(lib.emu_divergent_shuffle, _ptr(torch.zeros(32)))
    assert rc == 1 and "16 lanes wait at __shfl_xor_sync while 16 have exited" in err


def test_a_warp_split_between_a_shuffle_and_a_barrier_is_an_error(lib):
    rc, err = _call(lib.emu_split_warp_barrier, _ptr(torch.zeros(64)))
    assert rc == 1 and "warp 1" in err and "16 wait at __syncthreads" in err


def test_a_misaligned_vector_access_is_an_error(lib):
    """The GPU faults on a 16-byte access that is not 16-byte aligned (x86 does not): so does the emulator."""
    buf, out = torch.zeros(64, dtype=torch.uint8), torch.zeros(32)
    assert _call(lib.emu_vector_read, _ptr(buf), 16, _ptr(out)) == (0, "")
    rc, err = _call(lib.emu_vector_read, _ptr(buf), 8, _ptr(out))
    assert rc == 1 and "read 16 bytes" in err and "misaligned address" in err


def test_an_invalid_launch_configuration_is_reported_like_cuda(lib):
    assert lib.emu_bad_config() == 9  # cudaErrorInvalidConfiguration; the kernel did not run


def test_the_module_reports_an_emulated_cuda_build():
    info = cuda_emulator.load().build_info()
    assert info["cuda"] is True and info["cuda_archs"] == "emulated" and info["cuda_device_count"] == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softmax_kernel", ["rows", "staged"])
def test_layernorm_and_softmax_bits_do_not_depend_on_the_schedule(monkeypatch, dtype, softmax_kernel):
    """The LayerNorm (forward, dx and both stages of the weight gradient), the softmax forward and its dscores (both
    CUDA kernel kinds: the staged ones share shared-memory buffers between a block's warps) have no atomics and no
    cross-thread races, so running blocks and threads in reverse order gives the same bits. (The bias gradients of
    the softmax and the gather use atomics: their order, like on the hardware, is not fixed.)"""
    from vlmo_fast.ops import native

    cuda_emulator.route_native_to_emulator(monkeypatch, 1)
    before = native.cuda_softmax_kernel(softmax_kernel)  # the emulated module's choice, restored below
    b, n, d, h = 3, 29, 96, 2
    x, gy = torch.randn(b, n, d).to(dtype), torch.randn(b, n, d).to(dtype)
    w, bias = torch.randn(2, d), torch.randn(2, d)
    s, gp = (torch.randn(b, h, n, n) * 3).to(dtype), torch.randn(b, h, n, n).to(dtype)
    keep = padding(b, n)
    table, index = torch.randn(40, h), torch.randint(0, 40, (n, n))

    def run():
        xs, ws, bs = x.clone().requires_grad_(), [t.clone().requires_grad_() for t in w], [t.clone() for t in bias]
        y = ops.multiway_layernorm(xs, ws, bs, split=11, backend="cuda")
        y.backward(gy)
        ss = s.clone().requires_grad_()
        p = ops.masked_softmax(ss, scale=0.2, bias_table=table, bias_index=index, key_padding_mask=keep,
                               backend="cuda")
        p.backward(gp)
        return [y, xs.grad, ws[0].grad, ws[1].grad, p, ss.grad]

    try:
        first = run()
        with cuda_emulator.reverse_order():
            second = run()
    finally:
        native.cuda_softmax_kernel(before)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_a_read_past_the_operands_is_an_error(monkeypatch):
    """Every __ldg of a launcher call must fall inside a tensor the op handed over: here an index value far past the
    table (which the Python validation would have refused) makes the kernel read outside it."""
    from vlmo_fast.ops import native

    cuda_emulator.route_native_to_emulator(monkeypatch)
    b, h, n = 2, 2, 8
    scores, table = torch.randn(b, h, n, n), torch.randn(4, h)
    out, lse = torch.empty_like(scores), torch.empty(b, h, n)
    index = torch.randint(0, 4, (n, n), dtype=torch.int32)

    def launch():
        native._launcher("masked_softmax_forward", scores.device)(
            scores=native._addr(scores), scores_dtype=0, out=native._addr(out), out_dtype=0, lse=native._addr(lse),
            batch=b, heads=h, n_q=n, n_k=n, scale=1.0, bias=0, table=native._addr(table), table_s0=h, table_s1=1,
            table_rows=4, index=native._addr(index), keep=0, device=0, stream=0)

    launch()  # in range: fine
    index[3, 5] = 1 << 20
    with pytest.raises(RuntimeError, match="outside every tensor handed to the launch"):
        launch()
    index[3, 5] = 0
    launch()  # the checker holds no stale state


def test_a_gather_past_the_table_is_an_error(monkeypatch):
    """The relative-position gather reads the table through __ldg too: an index past the table is caught."""
    from vlmo_fast.ops import native

    cuda_emulator.route_native_to_emulator(monkeypatch)
    n, rows, cols = 9, 6, 3
    table, out = torch.randn(rows, cols), torch.empty(cols, n, n)
    index = torch.randint(0, rows, (n, n), dtype=torch.int32)

    def launch():
        native._launcher("rel_pos_gather_forward", table.device)(
            table=native._addr(table), dtype=0, s0=cols, s1=1, rows=rows, cols=cols, index=native._addr(index), n=n,
            out=native._addr(out), device=0, stream=0)

    launch()
    assert torch.equal(out, table.t()[:, index.long()])
    index[4, 4] = 1 << 20
    with pytest.raises(RuntimeError, match="outside every tensor handed to the launch"):
        launch()


def test_a_write_past_the_output_is_an_error(monkeypatch):
    """Stores go through store_global (and atomicAdd), checked like the reads: an output buffer too small for the
    launch's sizes (which the Python wrappers never allocate) is caught, and the stray stores are not made."""
    from vlmo_fast.ops import native

    cuda_emulator.route_native_to_emulator(monkeypatch)
    n, rows, cols = 9, 6, 3
    table, index = torch.randn(rows, cols), torch.randint(0, rows, (n, n), dtype=torch.int32)
    short = torch.zeros(cols * n * n // 2)
    with pytest.raises(RuntimeError, match="wrote 4 bytes at .* outside every tensor handed to the launch"):
        native._launcher("rel_pos_gather_forward", table.device)(
            table=native._addr(table), dtype=0, s0=cols, s1=1, rows=rows, cols=cols, index=native._addr(index), n=n,
            out=native._addr(short), device=0, stream=0)
    assert torch.equal(short, table.t()[:, index.long()].flatten()[: short.numel()])

