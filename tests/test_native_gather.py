"""The native relative-position bias gather and its contention-heavy backward (backend="cuda": C++ on CPU tensors,
CUDA on CUDA tensors) against float64 references, its argument checks, and tracing."""

import pytest
import torch

from native_helpers import devices, max_err
from vlmo_fast import _native, ops
from vlmo_fast.model import relpos
from vlmo_fast.ops import backend as ops_backend
from vlmo_fast.ops import native


def reference_backward(grad, index, rows):
    """float64 dtable[r, c] = Σ_{index[i, j] == r} grad[c, i, j]."""
    c = grad.shape[0]
    out = torch.zeros(rows, c, dtype=torch.float64, device=grad.device)
    out.index_add_(0, index.reshape(-1).long(), grad.double().reshape(c, -1).t())
    return out


@pytest.mark.parametrize("device", devices(), indirect=True)
@pytest.mark.parametrize("n", [1, 40, 237, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_float64(device, n, dtype):
    heads, rows = 3, 300
    full = torch.randn(rows, 4 * heads, device=device).to(dtype).requires_grad_()
    table = full[:, heads : 2 * heads]  # strided column slice
    index = torch.randint(0, rows, (n, n), device=device)
    out = ops.rel_pos_bias_gather(table, index, backend="cuda")
    assert out.shape == (heads, n, n) and out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, table.detach().t()[:, index])  # a gather is exact
    grad = torch.randn(heads, n, n, device=device).to(dtype)
    out.backward(grad)
    want = reference_backward(grad, index, rows)
    assert full.grad.dtype == dtype
    # fp32 accumulation, one rounding to the table dtype
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert max_err(full.grad[:, heads : 2 * heads], want) <= tol * max(1.0, want.abs().max().item())
    assert full.grad[:, :heads].abs().sum() == 0 and full.grad[:, 2 * heads :].abs().sum() == 0


@pytest.mark.parametrize("device", devices(), indirect=True)
@pytest.mark.parametrize("heads", [1, 12])
def test_vlmo_fusion_index_contention(device, heads):
    """The real index: 40·197 text→image pairs per head share one table row (and image→text another)."""
    index = relpos.fusion_relative_position_index(40, 14).to(device)
    table = torch.randn(1126, heads, device=device, requires_grad=True)
    out = ops.rel_pos_bias_gather(table, index, backend="cuda")
    grad = torch.randn_like(out)
    out.backward(grad)
    want = reference_backward(grad, index, 1126)
    assert max_err(table.grad, want) <= 1e-5 * want.abs().max().item()
    counts = torch.bincount(index.flatten().cpu(), minlength=1126)
    assert counts.max() == 40 * 197  # the hot rows really are hot


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_index_dtypes_and_layouts(index_dtype):
    table = torch.randn(5, 200)  # (R, C) with R < C, and a transposed (column-major) view below
    index = torch.randint(0, 5, (17, 17)).to(index_dtype)
    for t in (table, table.t().contiguous().t()):
        for backend in ("cuda", "torch", "auto"):  # the torch path must take every accepted dtype too
            out = ops.rel_pos_bias_gather(t, index.t(), backend=backend)
            assert torch.equal(out, t.t()[:, index.t().long()]), backend


@pytest.mark.parametrize("device", devices(), indirect=True)
def test_every_output_element_is_written(device):
    n, rows, cols = 61, 50, 5
    table = torch.randn(rows, cols, device=device)
    index = torch.randint(0, rows, (n, n), device=device, dtype=torch.int32)
    out = torch.full((cols, n, n), float("nan"), device=device)
    extra = native._launch_args(table.device)
    native._launcher("rel_pos_gather_forward", table.device)(
        table=table.data_ptr(), dtype=0, s0=cols, s1=1, rows=rows, cols=cols, index=index.data_ptr(), n=n,
        out=out.data_ptr(), **extra)
    assert not out.isnan().any()
    if not native._runs_cuda(table.device):  # the CPU backward overwrites its output (CUDA accumulates into zeros)
        dtable = torch.full((rows, cols), float("nan"))
        native._launcher("rel_pos_gather_backward", table.device)(
            grad=out.data_ptr(), dtype=0, index=index.data_ptr(), n=n, rows=rows, cols=cols,
            dtable=dtable.data_ptr(), **extra)
        assert not dtable.isnan().any()


@pytest.mark.parametrize(
    "table,index,err,match",
    [
        (torch.randn(10, 3), torch.full((4, 4), 10), ValueError, r"bias_index values must lie in \[0, 10\)"),
        (torch.randn(10, 3), torch.full((4, 4), -3), ValueError, r"bias_index values must lie in \[0, 10\)"),
        # values past int32 are checked before the kernels' int32 copy is made (narrowed first, 2**32 + 1 passed as 1)
        (torch.randn(10, 3), torch.full((4, 4), 2**32 + 1), ValueError, r"bias_index values must lie in \[0, 10\)"),
        (torch.randn(10, 3), torch.full((4, 4), -(2**32) + 2), ValueError, r"bias_index values must lie in \[0, 10\)"),
        (torch.randn(10, 3), torch.zeros(4, 5, dtype=torch.long), ValueError, "must have shape"),
        (torch.randn(10, 3), torch.zeros(4, 4), TypeError, "must have dtype"),
        (torch.randn(10, 3, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.long), TypeError,
         "table must have dtype"),
        (torch.randn(10), torch.zeros(4, 4, dtype=torch.long), ValueError, "table must be a 2-D"),
        (torch.randn(0, 3), torch.zeros(4, 4, dtype=torch.long), ValueError, "at least one row"),
    ],
)
def test_op_rejects_bad_inputs(table, index, err, match):
    with pytest.raises(err, match=match):
        torch.ops.vlmo_fast.rel_pos_bias_gather(table, index)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_an_empty_index_takes_an_empty_table(backend):
    """N = 0: nothing to gather, so a table without rows is no error (the native op alone refused it); its gradient is
    empty. A table without rows for an index with entries is refused, forward and backward."""
    table = torch.randn(0, 3, requires_grad=True)
    out = ops.rel_pos_bias_gather(table, torch.zeros(0, 0, dtype=torch.long), backend=backend)
    out.sum().backward()
    assert out.shape == (3, 0, 0) and table.grad.shape == (0, 3)
    assert torch.ops.vlmo_fast.rel_pos_bias_gather_backward(torch.randn(3, 0, 0), torch.zeros(0, 0, dtype=torch.long),
                                                            0).shape == (0, 3)
    with pytest.raises(ValueError, match=r"rows must be positive \(>= 0 for an empty index\), got 0"):
        torch.ops.vlmo_fast.rel_pos_bias_gather_backward(torch.randn(3, 2, 2), torch.zeros(2, 2, dtype=torch.long), 0)


def test_public_op_names_its_own_arguments():
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 10\) \(the rows of table\)"):
        ops.rel_pos_bias_gather(torch.randn(10, 3), torch.full((4, 4), 10))
    with pytest.raises(ValueError, match=r"index must have shape \(4, 4\) \(\(N, N\), square\)"):
        ops.rel_pos_bias_gather(torch.randn(10, 3), torch.zeros(4, 5, dtype=torch.long))


def test_torch_path_under_compile_never_reads_a_negative_index_from_the_tables_end(monkeypatch):
    """In a compiled graph the public range check cannot read values; a negative value, which indexing would read
    from the end of the table, is sent past the end, where the compiled gather's bounds check stops it. (Eager
    indexing, with tracing faked, raises the same way.)"""
    from vlmo_fast.ops import relpos_gather

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    table = torch.randn(7, 3)
    with pytest.raises(IndexError):
        relpos_gather.gather_bias(table, torch.full((4, 4), -1))
    good = torch.randint(0, 7, (4, 4))
    assert torch.equal(relpos_gather.gather_bias(table, good), table.t()[:, good])


def test_public_op_names_a_non_tensor_index():
    with pytest.raises(TypeError, match="index must be a torch.Tensor, got list"):
        ops.rel_pos_bias_gather(torch.randn(5, 2), [[0, 1], [1, 0]])


def test_backward_op_rejects_bad_inputs():
    grad = torch.randn(3, 4, 4)
    with pytest.raises(ValueError, match=r"bias_index values must lie in \[0, 5\)"):
        torch.ops.vlmo_fast.rel_pos_bias_gather_backward(grad, torch.full((4, 4), 5), 5)
    with pytest.raises(ValueError, match=r"bias_index values must lie in \[0, 5\)"):
        torch.ops.vlmo_fast.rel_pos_bias_gather_backward(grad, torch.full((4, 4), 2**32 + 1), 5)
    with pytest.raises(ValueError, match="grad must be contiguous"):
        torch.ops.vlmo_fast.rel_pos_bias_gather_backward(grad.transpose(1, 2), torch.zeros(4, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="grad must have shape"):
        torch.ops.vlmo_fast.rel_pos_bias_gather_backward(torch.randn(3, 4, 5), torch.zeros(4, 4, dtype=torch.long), 5)


def test_public_op_checks_and_backend_reasons():
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ops.rel_pos_bias_gather(torch.randn(10, 3), torch.full((4, 4), 11), backend="cuda")
    t64 = torch.randn(10, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        ops.rel_pos_bias_gather(t64, torch.zeros(4, 4, dtype=torch.long), backend="cuda")
    assert ops.rel_pos_bias_gather(t64, torch.zeros(4, 4, dtype=torch.long)).dtype == torch.float64


def test_index_is_rechecked_after_in_place_change():
    table = torch.randn(6, 2)
    index = torch.zeros(4, 4, dtype=torch.long)
    ops.rel_pos_bias_gather(table, index, backend="cuda")
    index[0, 0] = 6  # out of range now: neither the cached check nor the cached int32 copy may let it through
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        torch.ops.vlmo_fast.rel_pos_bias_gather(table, index)
    index[0, 0] = 5
    assert torch.equal(ops.rel_pos_bias_gather(table, index, backend="cuda"), table.t()[:, index])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_a_write_behind_the_version_counter_never_reaches_a_kernel(dtype):
    """A write through .numpy() does not bump the version counter, so the cached range check cannot see it: the
    kernels read their own int32 copy, checked after copying, and stay on the old values instead of reading
    past the table (an int32 index used to be handed over as it was: a segfault)."""
    table = torch.randn(9, 4)
    index = torch.randint(0, 9, (5, 5), dtype=dtype)
    before = ops.rel_pos_bias_gather(table, index, backend="cuda")
    scores = torch.randn(2, 4, 5, 5)
    p_before = ops.masked_softmax(scores, bias_table=table, bias_index=index, backend="cuda")
    index.numpy()[0, 0] = 10**9
    assert torch.equal(ops.rel_pos_bias_gather(table, index, backend="cuda"), before)
    assert torch.equal(ops.masked_softmax(scores, bias_table=table, bias_index=index, backend="cuda"), p_before)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_inference_mode_tensors(backend):
    """Tensors made under torch.inference_mode have no version counter: nothing about them is cached (it used to
    raise), and the fresh int32 index copy lives until the kernel has run (it was freed before the launch)."""
    q = torch.randn(2, 3, 5, 4)
    table, index = torch.randn(9, 3), torch.randint(0, 9, (5, 5))
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        want = ops.rel_pos_attention(q, q, q, bias_table=table, bias_index=index, key_padding_mask=keep,
                                     backend="torch")
    with torch.inference_mode():
        q_i, table_i, index_i, keep_i = (t.clone() for t in (q, table, index, keep))
        for _ in range(2):
            got = ops.rel_pos_attention(q_i, q_i, q_i, bias_table=table_i, bias_index=index_i,
                                        key_padding_mask=keep_i, backend=backend)
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(ops.rel_pos_bias_gather(table_i, index_i, backend=backend), table.t()[:, index])


def test_torch_compile_traces_without_graph_breaks():
    table = torch.randn(30, 8, requires_grad=True)
    index = torch.randint(0, 30, (7, 7))

    def f(t):
        return native.rel_pos_bias_gather_native(t[:, 2:6], index) * 2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(table)
    got.sum().backward()
    g = table.grad.clone()
    table.grad = None
    want = f(table)
    want.sum().backward()
    assert torch.equal(got, want) and torch.allclose(g, table.grad)


def test_cpu_auto_policy():
    """"auto" takes the CPU kernel only where it was measured faster than PyTorch (csrc/README.md)."""
    from vlmo_fast.ops import backend

    declines = native._gather_auto_declines
    index = relpos.fusion_relative_position_index(40, 14)
    assert "PyTorch" in declines(torch.randn(10, 3), torch.zeros(4, 4, dtype=torch.long))
    assert declines(torch.randn(1126, 12), index) is None
    impl = backend.select("rel_pos_bias_gather", "auto", torch.randn(1126, 12), index)
    assert impl is native.rel_pos_bias_gather_native if _native.native_available() else impl is None


@pytest.mark.parametrize("device", ["cpu", "cuda-emu"], indirect=True)
def test_deterministic_mode_keeps_the_atomic_table_gradient_off_the_cuda_kernel(device, monkeypatch,
                                                                              deterministic_mode):
    """The CUDA backward adds into the table with atomics: under PyTorch's deterministic mode "auto" leaves a table
    that takes a gradient to the PyTorch path and backend="cuda" says why (with warn_only: warns and runs); a gather
    without one still runs the CUDA kernel, and the C++ CPU kernel (no atomics) takes both."""
    monkeypatch.setitem(native.CPU_AUTO_MIN_ELEMENTS, "rel_pos_bias_gather", 0)
    cuda = native._runs_cuda(torch.device(device))
    index = relpos.fusion_relative_position_index(4, 2).to(device)
    table = torch.randn(relpos.num_table_rows(2), 3, device=device, requires_grad=True)
    out = ops.rel_pos_bias_gather(table, index)
    assert ops_backend.last_selected()["rel_pos_bias_gather"] == ("torch" if cuda else "cuda")
    grad = torch.randn_like(out)
    out.backward(grad)
    want = reference_backward(grad, index, table.shape[0])
    assert max_err(table.grad, want) <= 1e-5 * want.abs().max().item()
    if cuda:
        with pytest.raises(ValueError, match="atomics .*deterministic mode"):
            ops.rel_pos_bias_gather(table, index, backend="cuda")
    with torch.no_grad():
        out = ops.rel_pos_bias_gather(table, index)
    assert ops_backend.last_selected()["rel_pos_bias_gather"] == "cuda"
    assert torch.equal(out, table.detach().t()[:, index])
    torch.use_deterministic_algorithms(True, warn_only=True)
    ops.rel_pos_bias_gather(table, index)
    assert ops_backend.last_selected()["rel_pos_bias_gather"] == ("torch" if cuda else "cuda")
    if cuda:
        with pytest.warns(UserWarning, match="backend='cuda' runs although .*not deterministic"):
            ops.rel_pos_bias_gather(table, index, backend="cuda")
        assert ops_backend.last_selected()["rel_pos_bias_gather"] == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_an_op_on_another_device_leaves_the_current_device_alone():
    """The launchers select their tensors' device with cudaSetDevice, which PyTorch's runtime shares: the ops run
    under a device guard, so the current device is the same after an op on another one."""
    torch.cuda.set_device(0)
    table = torch.randn(9, 4, device="cuda:1")
    index = torch.randint(0, 9, (5, 5), device="cuda:1")
    ops.rel_pos_bias_gather(table, index, backend="cuda")
    ops.masked_softmax(torch.randn(1, 4, 5, 5, device="cuda:1"), bias_table=table, bias_index=index, backend="cuda")
    assert torch.cuda.current_device() == 0
