"""The native fused scale + bias + key-mask + softmax (backend="cuda": C++ on CPU tensors, CUDA on CUDA tensors)
against float64 references, for the output and every gradient, plus its argument checks and torch.compile tracing."""

import pytest
import torch

from native_helpers import LARGER_EMULATED_GPU, assert_rule, devices, max_err, padding
from vlmo_fast import ops
from vlmo_fast.model import relpos
from vlmo_fast.ops import backend as ops_backend
from vlmo_fast.ops import native
from vlmo_fast.ops.softmax import softmax_torch

# Every device of the native tests, plus the CUDA kernels again with the staged kernels taking rows of up to 256 keys
# (native.cuda_softmax_kernel("staged")), emulated and on a GPU.
DEVICES = devices() + ["cuda-emu+staged", pytest.param("cuda+staged", marks=pytest.mark.gpu)]


def reference(scores, scale, bias, keep):
    """float64 reference: fully masked batch rows give zeros."""
    s = scores.double() * scale
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1), nan=0.0)


def make_inputs(b, h, n, form, device, dtype=torch.float32, table_dtype=torch.float32):
    scores = (torch.randn(b, h, n, n, device=device) * 3).to(dtype)
    full_table = torch.randn(60, 3 * h, device=device, dtype=table_dtype)
    index = torch.randint(0, 60, (n, n), device=device)
    dense = torch.randn(h, n, n, device=device)
    keep = padding(b, n, device)
    return scores, full_table, index, dense, keep


def run(scores, scale, form, full_table, index, dense, keep, h, backend, out_dtype=None):
    """Output and gradients (scores, bias) of the public op; leaves are fresh copies of the given tensors."""
    s = scores.detach().clone().requires_grad_()
    kw = {}
    leaf = None
    if form == "table":
        leaf = full_table.detach().clone().requires_grad_()
        kw = dict(bias_table=leaf[:, h : 2 * h], bias_index=index)  # a strided column slice, as the model passes
    elif form == "dense":
        leaf = dense.detach().clone().requires_grad_()
        kw = dict(bias=leaf)
    p = ops.masked_softmax(s, scale=scale, key_padding_mask=keep, out_dtype=out_dtype, backend=backend, **kw)
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(7)).to(p.device, p.dtype)
    p.backward(g)
    return p, s.grad, (None if leaf is None else leaf.grad), g


def float64_reference(scores, scale, form, full_table, index, dense, keep, h, g):
    s = scores.detach().double().requires_grad_()
    leaf, bias = None, None
    if form == "table":
        leaf = full_table.detach().double().requires_grad_()
        bias = leaf[:, h : 2 * h].t()[:, index]
    elif form == "dense":
        leaf = dense.detach().double().requires_grad_()
        bias = leaf
    p = reference(s, scale, bias, keep)
    p.backward(g.double())
    return p, s.grad, (None if leaf is None else leaf.grad)


@pytest.mark.parametrize("device", DEVICES + [LARGER_EMULATED_GPU, LARGER_EMULATED_GPU + "+staged"],
                         indirect=True)
@pytest.mark.parametrize("n", [1, 40, 237, 257])
@pytest.mark.parametrize("form", ["table", "dense", "none"])
def test_fp32_matches_float64(device, n, form):
    b, h, scale = 3, 2, 0.37
    scores, full_table, index, dense, keep = make_inputs(b, h, n, form, device)
    p, ds, dbias, g = run(scores, scale, form, full_table, index, dense, keep, h, "cuda")
    ref_p, ref_ds, ref_dbias = float64_reference(scores, scale, form, full_table, index, dense, keep, h, g)
    assert p.dtype == torch.float32 and p.shape == scores.shape
    assert max_err(p, ref_p) < 2e-6
    assert torch.all(p[2] == 0) and torch.all(ds[2] == 0)  # the fully padded batch row
    assert max_err(ds, ref_ds) < 1e-5 * max(1.0, ref_ds.abs().max().item())
    if dbias is not None:
        assert max_err(dbias, ref_dbias) < 1e-5 * max(1.0, ref_dbias.abs().max().item())
        if form == "table":  # only the slice's columns of the big table receive gradient
            assert dbias[:, :h].abs().sum() == 0 and dbias[:, 2 * h :].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("form", ["table", "dense"])
def test_low_precision_within_twice_eager_error(device, dtype, out_dtype, form):
    b, h, n, scale = 3, 2, 237, 0.125
    scores, full_table, index, dense, keep = make_inputs(b, h, n, form, device, dtype)
    p, ds, dbias, g = run(scores, scale, form, full_table, index, dense, keep, h, "cuda", out_dtype)
    pe, dse, dbe, _ = run(scores, scale, form, full_table, index, dense, keep, h, "torch", out_dtype)
    ref_p, ref_ds, ref_dbias = float64_reference(scores, scale, form, full_table, index, dense, keep, h, g)
    assert p.dtype == (out_dtype or dtype) and ds.dtype == dtype
    assert_rule("p", p, pe, ref_p, 1e-6)
    assert_rule("dscores", ds, dse, ref_ds, 1e-6)
    assert_rule("dbias", dbias, dbe, ref_dbias, 1e-6)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("n", [40, 237, 1100])  # register-row kernel and the two-pass long-row kernel (> 1024)
@pytest.mark.parametrize("grad", ["randn", "constant"])
def test_large_logits_keep_eager_precision(device, n, grad):
    """Logits of tens (|lse| up to ~150): the backward recomputes p from the fp32 lse, whose rounding error
    (|lse|·2^-24) scales a whole row; it must not reach the outputs or gradients (fp32, err <= 2x eager). A constant
    upstream gradient makes every exact dscores 0, the case where a row-wide factor shows most. (Its table gradient
    is then a sum of B·H·N rounding-level row residues whose size depends on summation order alone, so the table
    gradient is checked with the random upstream gradient, against a baseline that allows for the order of its sums:
    see below.)"""
    b, h = 2, 2
    scores = torch.randn(b, h, n, n, device=device) * 40
    table = torch.randn(4, 3 * h, device=device)
    index = torch.randint(0, 4, (n, n), device=device)
    keep = padding(b, n, device)
    g = torch.randn(scores.shape) if grad == "randn" else torch.full(scores.shape, 0.75)
    g = g.to(device)
    results = {}
    for backend in ("cuda", "torch"):
        s = scores.clone().requires_grad_()
        leaf = table.clone().requires_grad_()
        p = ops.masked_softmax(s, scale=1.0, bias_table=leaf[:, h : 2 * h], bias_index=index, key_padding_mask=keep,
                               backend=backend)
        p.backward(g)
        results[backend] = (p, s.grad, leaf.grad)
    s64 = scores.double().requires_grad_()
    t64 = table.double().requires_grad_()
    gathered = t64[:, h : 2 * h].t()[:, index]
    gathered.retain_grad()
    p64 = reference(s64, 1.0, gathered, keep)
    p64.backward(g.double())
    for name, got, eager, want in zip(("p", "dscores"), results["cuda"], results["torch"], (p64, s64.grad)):
        assert_rule(name, got, eager, want, 1e-7)
    if grad == "randn":
        # Each table row sums up to B·N²/R = 605K terms at N = 1100, each off by the fp32 rounding of its logit
        # (|x| ~ 160: ulp 1.5e-5), which float64 does not have; the sum's error is a random walk of those and of the
        # additions' rounding, so one fp32 computation's error is one draw of it: eager's draw was 2x luckier than the
        # kernel's on two CI seeds (kernel/eager ratios over 16 seeds: median 0.95, 0.79-1.80). The baseline is the
        # largest of eager's error, eager's errors with the query rows in two other orders (the same math, the same
        # terms, other summation orders), and three fp32 sums of the exact terms in random orders.
        got, want = results["cuda"][2], t64.grad
        e_kernel = max_err(got, want)
        e_eager = max_err(results["torch"][2], want)
        for _ in range(2):
            perm = torch.randperm(n, device=device)
            leaf = table.clone().requires_grad_()
            ops.masked_softmax(scores[:, :, perm].contiguous(), scale=1.0, bias_table=leaf[:, h : 2 * h],
                               bias_index=index[perm].contiguous(), key_padding_mask=keep,
                               backend="torch").backward(g[:, :, perm].contiguous())
            e_eager = max(e_eager, max_err(leaf.grad, want))
        terms = gathered.grad.detach().cpu().reshape(h, -1).t()
        e_order = 0.0
        for _ in range(3):
            order = torch.randperm(terms.shape[0])
            summed = torch.zeros(table.shape[0], h).index_add_(0, index.cpu().reshape(-1)[order], terms[order].float())
            e_order = max(e_order, max_err(summed, want[:, h : 2 * h].cpu()))
        scale = max(1.0, want.abs().max().item())
        assert e_kernel <= 2 * max(e_eager, e_order) + 1e-7 * scale, (
            f"dtable: kernel error {e_kernel:.3e} vs eager {e_eager:.3e} (largest of 3 row orders), one fp32 sum of "
            f"the exact terms in a random order {e_order:.3e}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_vlmo_fusion_index_table_gradient(device):
    """The real index: every text→image pair of a head lands on one table row (the contention case)."""
    b, h, n = 2, 3, 237
    scores = torch.randn(b, h, n, n, device=device)
    table = torch.randn(1126, 4 * h, device=device)
    index = relpos.fusion_relative_position_index(40, 14).to(device)
    keep = torch.ones(b, n, dtype=torch.bool, device=device)
    keep[0, 25:40] = False
    p, ds, dt, g = run(scores, 0.125, "table", table, index, None, keep, h, "cuda")
    ref_p, ref_ds, ref_dt = float64_reference(scores, 0.125, "table", table, index, None, keep, h, g)
    assert max_err(p, ref_p) < 2e-6
    assert max_err(dt, ref_dt) < 1e-5 * max(1.0, ref_dt.abs().max().item())
    # the score gradient too, within twice the error of the PyTorch path in fp32 (same inputs and upstream gradient)
    _, ds_eager, _, _ = run(scores, 0.125, "table", table, index, None, keep, h, "torch")
    assert_rule("dscores", ds, ds_eager, ref_ds, 1e-7)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_index_dtypes_and_non_contiguous_inputs(device, index_dtype):
    """Strided scores (a permuted view), a strided table (a column slice), a transposed index of every accepted dtype
    and an int keep mask: the output, the score gradient (back into the permuted buffer) and the table gradient (into
    the sliced buffer's columns only) match float64."""
    b, h, n = 2, 3, 37
    base = torch.randn(b, n, h, n, device=device)
    table_buf = torch.randn(200, 2 * h, device=device)
    index = torch.randint(0, 200, (n, n), device=device).to(index_dtype)
    index_t = index.t()  # non-contiguous index
    keep = torch.rand(b, n, device=device) > 0.3
    keep[:, 0] = True
    g = torch.randn(b, h, n, n, device=device)
    b64, t64 = base.double().requires_grad_(), table_buf.double().requires_grad_()
    want = reference(b64.permute(0, 2, 1, 3), 0.5, t64[:, h:].t()[:, index_t.long()], keep)
    want.backward(g.double())
    for backend in ("cuda", "torch"):  # the torch path must take every accepted dtype too
        base_l, table_l = base.clone().requires_grad_(), table_buf.clone().requires_grad_()
        scores, table = base_l.permute(0, 2, 1, 3), table_l[:, h:]  # non-contiguous (B, H, N, N); strided table
        assert not scores.is_contiguous() and not table.is_contiguous()
        got = ops.masked_softmax(scores, scale=0.5, bias_table=table, bias_index=index_t,
                                 key_padding_mask=keep.int(), backend=backend)
        assert max_err(got, want) < 2e-6, backend
        got.backward(g)
        assert max_err(base_l.grad, b64.grad) < 1e-5 * max(1.0, b64.grad.abs().max().item()), backend
        assert max_err(table_l.grad, t64.grad) < 1e-5 * max(1.0, t64.grad.abs().max().item()), backend
        assert torch.all(table_l.grad[:, :h] == 0), backend


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_out_dtype_variants(device):
    """fp16/bf16 outputs from fp32 scores (the CUDA build compiles only (in, fp32) and (in, in) pairs: the wrapper
    runs other pairs through fp32)."""
    scores = torch.randn(2, 2, 19, 19, device=device)
    for out_dtype in (torch.float16, torch.bfloat16):
        got = ops.masked_softmax(scores, out_dtype=out_dtype, backend="cuda")
        assert got.dtype == out_dtype
        # fp32 math, one rounding to out_dtype: within one ulp of the correctly rounded float64 result
        assert max_err(got, reference(scores, 1.0, None, None).to(out_dtype)) <= torch.finfo(out_dtype).eps


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_empty_batch_and_single_key(device):
    p = ops.masked_softmax(torch.randn(0, 2, 5, 5, device=device, requires_grad=True), backend="cuda")
    assert p.shape == (0, 2, 5, 5)
    s = torch.randn(2, 1, 3, 1, device=device, requires_grad=True)
    p = ops.masked_softmax(s, bias=torch.randn(1, 3, 1, device=device), backend="cuda")
    assert torch.all(p == 1)
    p.sum().backward()
    assert torch.all(s.grad == 0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("n_k", [31, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513, 1024, 1025])
@pytest.mark.parametrize("form", ["dense", "none"])
def test_every_row_length_tier_with_fewer_queries_than_keys(device, n_k, form):
    """Each register tier of the CUDA kernel (ceil(Nk/32) rounded up to 1..32 per lane) at both of its edges, the loop
    kernel past 1024, and Nq != Nk (a dense bias or none allows it)."""
    b, h, n_q, scale = 3, 2, 5, 0.3
    scores = torch.randn(b, h, n_q, n_k, device=device) * 3
    keep = padding(b, n_k, device)
    dense = torch.randn(h, n_q, n_k, device=device) if form == "dense" else None
    s = scores.clone().requires_grad_()
    leaf = None if dense is None else dense.clone().requires_grad_()
    p = ops.masked_softmax(s, scale=scale, bias=leaf, key_padding_mask=keep, backend="cuda")
    g = torch.randn_like(p)
    p.backward(g)
    s64 = scores.double().requires_grad_()
    d64 = None if dense is None else dense.double().requires_grad_()
    want = reference(s64, scale, d64, keep)
    want.backward(g.double())
    assert max_err(p, want) < 2e-6
    assert max_err(s.grad, s64.grad) < 1e-5 * max(1.0, s64.grad.abs().max().item())
    if dense is not None:
        assert max_err(leaf.grad, d64.grad) < 1e-5 * max(1.0, d64.grad.abs().max().item())
    assert torch.all(p[2] == 0) and torch.all(s.grad[2] == 0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("form", ["table", "dense"])
def test_every_output_element_is_written(device, form):
    """Poison the outputs, call the launchers directly, and check that nothing was left unwritten: the probabilities,
    the row log-sum-exp, the score gradient and the bias gradient. The bias gradient as the op allocates it: zeros
    for the CUDA kernels (they accumulate), torch.empty memory for the CPU ones (they overwrite: poisoned here). The
    index leaves table rows 50..59 unused: their gradient is zero, and must still be written."""
    b, h, n = 3, 2, 45
    scores, full_table, index, dense, keep = make_inputs(b, h, n, form, device)
    table = full_table[:, h : 2 * h]
    index32 = index.remainder(50).to(torch.int32)
    if form == "table":
        kw = dict(table=table.data_ptr(), table_s0=table.stride(0), table_s1=table.stride(1), table_rows=60,
                  index=index32.data_ptr(), keep=keep.data_ptr(), bias=0)
    else:
        kw = dict(table=0, table_s0=0, table_s1=0, table_rows=0, index=0, keep=keep.data_ptr(), bias=dense.data_ptr())
    out = torch.full_like(scores, float("nan"))
    lse = torch.full((b, h, n), float("nan"), device=device)
    extra = native._launch_args(scores.device)
    launcher = native._launcher("masked_softmax_forward", scores.device)
    launcher(scores=scores.data_ptr(), scores_dtype=0, out=out.data_ptr(), out_dtype=0, lse=lse.data_ptr(),
             batch=b, heads=h, n_q=n, n_k=n, scale=1.0, **kw, **extra)
    assert not out.isnan().any() and not lse.isnan().any()
    ds, dp = torch.full_like(scores, float("nan")), torch.randn_like(scores)  # held: pointers outlive the launch
    poison = 0.0 if native._runs_cuda(scores.device) else float("nan")
    dgrad = torch.full((60, h) if form == "table" else (h, n, n), poison, device=device)
    native._launcher("masked_softmax_backward", scores.device)(
        dp=dp.data_ptr(), dp_dtype=0, scores=scores.data_ptr(), scores_dtype=0,
        lse=lse.data_ptr(), dscores=ds.data_ptr(), batch=b, heads=h, n_q=n, n_k=n, scale=1.0,
        dbias=dgrad.data_ptr() if form == "dense" else 0, dtable=dgrad.data_ptr() if form == "table" else 0,
        **kw, **extra)
    if device == "cuda":
        torch.cuda.synchronize()
    assert not ds.isnan().any() and not dgrad.isnan().any()
    if form == "table":
        assert torch.all(dgrad[50:] == 0)


@pytest.mark.gpu
def test_launch_arguments_of_an_index_less_cuda_device_name_the_current_device():
    if not torch.cuda.is_available() or native._native_missing(torch.device("cuda")):
        pytest.skip("needs CUDA and the CUDA kernels")
    args = native._launch_args(torch.device("cuda"))
    assert args["device"] == torch.cuda.current_device()
    assert args["stream"] == torch.cuda.current_stream().cuda_stream


@pytest.mark.parametrize("device", ["cuda-emu+staged", pytest.param("cuda+staged", marks=pytest.mark.gpu)],
                         indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [3, 37, 237])
def test_staged_slices_at_every_alignment(device, dtype, n):
    """The staged kernels move each block's slice in 16-byte vectors plus an unaligned head and tail: operands and
    outputs that start at every element offset within 16 bytes (views into larger buffers), with slices shorter than
    one vector (n = 3) and long ones, give the float64 answer, and nothing around the outputs is written."""
    b, h, scale = 3, 2, 0.3
    numel = b * h * n * n
    per_vector = 16 // torch.empty(0, dtype=dtype).element_size()
    code = native._DTYPE_CODE[dtype]
    keep = padding(b, n, device)
    dense = torch.randn(h, n, n, device=device)
    kw = dict(bias=dense.data_ptr(), table=0, table_s0=0, table_s1=0, table_rows=0, index=0, keep=keep.data_ptr(),
              **native._launch_args(keep.device))

    def view(buf, offset):
        return buf[offset : offset + numel].view(b, h, n, n)

    for offset in range(per_vector):
        s_buf, g_buf = (torch.randn(numel + 2 * per_vector, device=device).to(dtype) for _ in range(2))
        p_buf, ds_buf = (torch.full((numel + 2 * per_vector,), float("nan"), device=device, dtype=dtype)
                         for _ in range(2))
        scores, g, p, ds = view(s_buf, offset), view(g_buf, offset), view(p_buf, offset), view(ds_buf, offset)
        lse = torch.empty(b, h, n, device=device)
        dbias = torch.zeros(h, n, n, device=device)
        native._launcher("masked_softmax_forward", scores.device)(
            scores=scores.data_ptr(), scores_dtype=code, out=p.data_ptr(), out_dtype=code, lse=lse.data_ptr(),
            batch=b, heads=h, n_q=n, n_k=n, scale=scale, **kw)
        native._launcher("masked_softmax_backward", scores.device)(
            dp=g.data_ptr(), dp_dtype=code, scores=scores.data_ptr(), scores_dtype=code, lse=lse.data_ptr(),
            dscores=ds.data_ptr(), batch=b, heads=h, n_q=n, n_k=n, scale=scale, dbias=dbias.data_ptr(),
            dtable=0, **kw)
        s64 = scores.double().requires_grad_()
        d64 = dense.double().requires_grad_()
        want = reference(s64, scale, d64, keep)
        want.backward(g.double())
        for out_buf in (p_buf, ds_buf):  # untouched around the outputs
            assert out_buf[:offset].isnan().all() and out_buf[offset + numel :].isnan().all(), offset
        eps = torch.finfo(dtype).eps
        assert max_err(p, want) < 2 * eps, offset
        assert max_err(ds, s64.grad) < 4 * eps * max(1.0, s64.grad.abs().max().item()), offset
        assert max_err(dbias, d64.grad) < 1e-5 * max(1.0, d64.grad.abs().max().item()), offset
        assert torch.all(p[2] == 0) and torch.all(ds[2] == 0)


def test_cuda_softmax_kernel_choice_is_checked():
    if native._C is None or not native._CUDA_COMPILED:
        with pytest.raises(RuntimeError, match="vlmo_fast._C"):
            native.cuda_softmax_kernel()
    with pytest.raises(ValueError, match="kind must be one of"):
        native.cuda_softmax_kernel("fastest")


def test_backend_reports_unsupported_inputs():
    s = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        ops.masked_softmax(s, backend="cuda")
    # auto quietly takes the PyTorch path for what the kernels do not take
    assert ops.masked_softmax(s, backend="auto").dtype == torch.float64
    assert native._softmax_unsupported(torch.randn(1, 1, 4, 4), None, None, None, None, torch.float32) is None
    assert "bias" in native._softmax_unsupported(torch.randn(1, 1, 4, 4), torch.randn(1, 4, 4, dtype=torch.float64),
                                                 None, None, None, torch.float32)


def _op_args(**over):
    b, h, n = 2, 2, 6
    args = dict(scores=torch.randn(b, h, n, n), scale=1.0, bias=None, bias_table=torch.randn(10, h),
                bias_index=torch.randint(0, 10, (n, n)), keep=torch.ones(b, n, dtype=torch.bool),
                out_dtype=torch.float32)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,err,match",
    [
        (dict(scores=torch.randn(2, 2, 6, 6).transpose(2, 3)), ValueError, "scores must be contiguous"),
        (dict(scores=torch.randn(2, 6, 6)), ValueError, "scores must be a 4-D"),
        (dict(scores=torch.randint(0, 3, (2, 2, 6, 6))), TypeError, "scores must have dtype"),
        (dict(bias_table=torch.randn(10, 3)), ValueError, r"bias_table must have shape \(R, H=2\)"),
        (dict(bias_table=torch.randn(10, 2, dtype=torch.float16)), TypeError, "bias_table must have dtype"),
        (dict(bias_index=torch.full((6, 6), 10)), ValueError, r"bias_index values must lie in \[0, 10\)"),
        (dict(bias_index=torch.full((6, 6), -1)), ValueError, r"bias_index values must lie in \[0, 10\)"),
        (dict(bias_index=torch.zeros(5, 6, dtype=torch.long)), ValueError, "bias_index must have shape"),
        (dict(bias_index=torch.zeros(6, 6)), TypeError, "bias_index must have dtype"),
        (dict(bias_index=None), ValueError, "together"),
        (dict(bias=torch.randn(2, 6, 6)), ValueError, "not both"),
        (dict(bias=torch.randn(2, 6, 5), bias_table=None, bias_index=None), ValueError, "bias must have shape"),
        (dict(keep=torch.ones(2, 5, dtype=torch.bool)), ValueError, "keep must have shape"),
        (dict(keep=torch.ones(2, 6)), TypeError, "keep must have dtype"),
        (dict(out_dtype=torch.float64), TypeError, "out_dtype"),
    ],
)
def test_op_rejects_bad_inputs(over, err, match):
    """The custom op itself (reachable as torch.ops.vlmo_fast.masked_softmax) checks everything it hands a kernel."""
    with pytest.raises(err, match=match):
        torch.ops.vlmo_fast.masked_softmax(**_op_args(**over))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("shape", [(2, 2, 0, 0), (0, 2, 5, 5)])
def test_empty_scores(device, shape):
    """Nothing to compute: empty outputs and zero bias gradients, with every bias form."""
    n = shape[-1]
    for form in ("table", "dense", "none"):
        scores = torch.randn(shape, device=device)
        table, index = torch.randn(6, 6, device=device), torch.zeros(n, n, dtype=torch.long, device=device)
        dense = torch.randn(2, n, n, device=device)
        p, ds, grad, _ = run(scores, 0.5, form, table, index, dense, None, 2, "cuda")
        assert p.shape == shape and ds.shape == shape
        assert grad is None or torch.all(grad == 0)
    if n == 0:  # no keys: an empty table is fine too (every backend took it but the native one)
        p, ds, grad, _ = run(torch.randn(shape, device=device), 0.5, "table", torch.randn(0, 6, device=device),
                             torch.zeros(0, 0, dtype=torch.long, device=device), None, None, 2, "cuda")
        assert p.shape == ds.shape == shape and grad.shape == (0, 6)
    with pytest.raises(ValueError, match=r"bias_index values must lie in \[0, 0\) \(the rows of bias_table\)"):
        run(torch.randn(2, 2, 3, 3, device=device), 0.5, "table", torch.randn(0, 6, device=device),
            torch.zeros(3, 3, dtype=torch.long, device=device), None, None, 2, "cuda")


def test_public_op_rejects_bad_inputs():
    s = torch.randn(2, 2, 6, 6)
    with pytest.raises(TypeError, match="scale must be a real number"):
        ops.masked_softmax(s, scale="0.5", backend="cuda")
    with pytest.raises(ValueError, match=r"bias_index values must lie in \[0, 10\)"):
        ops.masked_softmax(s, bias_table=torch.randn(10, 2), bias_index=torch.full((6, 6), 10), backend="cuda")
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ops.masked_softmax(s, key_padding_mask=torch.ones(2, 5, dtype=torch.bool), backend="cuda")


def test_torch_compile_traces_without_graph_breaks():
    b, h, n = 2, 2, 9
    scores = torch.randn(b, h, n, n, requires_grad=True)
    table = torch.randn(12, 2 * h, requires_grad=True)
    index = torch.randint(0, 12, (n, n))
    keep = padding(b, n)

    def f(s, t):
        return native.masked_softmax_native(s, 0.5, None, t[:, h:], index, keep, torch.float32)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(scores, table)
    got.sum().backward()
    g_s, g_t = scores.grad.clone(), table.grad.clone()
    scores.grad = table.grad = None
    want = f(scores, table)
    want.sum().backward()
    assert torch.equal(got, want)
    assert torch.allclose(g_s, scores.grad) and torch.allclose(g_t, table.grad)


def test_fake_tensor_shapes_match_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _op_args()
    p, lse = torch.ops.vlmo_fast.masked_softmax(**args)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        fp, flse = torch.ops.vlmo_fast.masked_softmax(**fake)
    assert fp.shape == p.shape and fp.dtype == p.dtype and flse.shape == lse.shape and flse.dtype == lse.dtype


def test_cpu_auto_picks_the_native_kernel():
    """CPU policy: inside a block the fused kernel wins from about 256K score elements (image and fused sequences),
    so "auto" takes it there; for text-sized and toy score tensors it does not, so "auto" keeps PyTorch, while an
    explicit request still runs the kernel."""
    from vlmo_fast.ops import backend

    big = torch.randn(2, 12, 197, 197)
    tiny = torch.randn(2, 12, 40, 40)
    args = (None, None, None, None, torch.float32)
    assert backend.select("masked_softmax", "auto", big, *args) is native.masked_softmax_native
    assert backend.select("masked_softmax", "auto", tiny, *args) is None
    assert backend.select("masked_softmax", "cuda", tiny, *args) is native.masked_softmax_native


def test_softmax_torch_is_the_eager_comparison():
    """The eager comparison in the numerics tests is the package's own PyTorch path."""
    s = torch.randn(2, 2, 7, 7)
    assert max_err(softmax_torch(s, 1.0, None, None, torch.float32), reference(s, 1.0, None, None)) < 1e-6


@pytest.mark.parametrize("device", [d for d in devices() if d != "cpu"], indirect=True)
@pytest.mark.parametrize("form", ["table", "dense"])
def test_cuda_long_rows_take_the_loop_kernel(device, form):
    """Nk > 1024 runs the two-pass loop kernels instead of the register-resident ones."""
    b, h, n, scale = 2, 1, 1030, 0.2
    scores, full_table, index, dense, keep = make_inputs(b, h, n, form, device)
    p, ds, dbias, g = run(scores, scale, form, full_table, index, dense, keep, h, "cuda")
    ref_p, ref_ds, ref_dbias = float64_reference(scores, scale, form, full_table, index, dense, keep, h, g)
    assert max_err(p, ref_p) < 2e-6
    assert max_err(ds, ref_ds) < 1e-5 * max(1.0, ref_ds.abs().max().item())
    assert max_err(dbias, ref_dbias) < 1e-5 * max(1.0, ref_dbias.abs().max().item())


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream():
    """The kernels launch on the caller's current stream: on a side stream that is still busy (sleeping) before it
    writes the scores, a launch on any other stream would read the stale buffer (all 7) and get another result."""
    b, h, n = 4, 3, 237
    scores, full_table, index, dense, keep = make_inputs(b, h, n, "table", "cuda")
    want = reference(scores, 0.1, full_table[:, h : 2 * h].t()[:, index], keep)
    buf = torch.full_like(scores, 7.0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of milliseconds of a busy stream
        buf.copy_(scores)
        got = ops.masked_softmax(buf, scale=0.1, bias_table=full_table[:, h : 2 * h], bias_index=index,
                                 key_padding_mask=keep, backend="cuda")
    torch.cuda.synchronize()
    assert max_err(got, want) < 2e-6


def test_double_backward_is_refused_not_wrong():
    """A gradient penalty through the kernel: its gradient is not differentiable, an error, never a silent constant
    (once_differentiable let it through when the incoming gradient did not require grad)."""
    s = torch.randn(1, 1, 3, 3, requires_grad=True)
    p = ops.masked_softmax(s, backend="cuda")
    (g,) = torch.autograd.grad((p * torch.randn_like(p)).sum(), s, create_graph=True)
    with pytest.raises(RuntimeError, match="a second derivative through a fused kernel op is not implemented"):
        (g * s).sum().backward()
    table = torch.randn(5, 2, requires_grad=True)
    index = torch.randint(0, 5, (3, 3))
    for out, leaf in ((ops.rel_pos_bias_gather(table, index, backend="cuda"), table),
                      (ops.multiway_layernorm(s.reshape(1, 3, 3), [torch.ones(3, requires_grad=True)],
                                              [torch.zeros(3)], backend="cuda"), s)):
        (g,) = torch.autograd.grad(out.pow(2).sum(), leaf, create_graph=True)
        with pytest.raises(RuntimeError, match="a second derivative through a fused kernel op"):
            (g * g).sum().backward()


@pytest.mark.parametrize("device", ["cpu", "cuda-emu"], indirect=True)
def test_deterministic_mode_keeps_atomic_bias_gradients_off_the_cuda_kernels(device, monkeypatch, deterministic_mode):
    """The CUDA kernels add the bias and table gradients with atomics, in no fixed order. Under PyTorch's deterministic
    mode "auto" gives such calls to the PyTorch path (deterministic in that mode) and backend="cuda" says why (with
    warn_only, as PyTorch's own ops: a warning, and the kernels run); calls without a bias gradient still take the
    CUDA kernels, and the C++ CPU kernels (no atomics) take everything."""
    monkeypatch.setitem(native.CPU_AUTO_MIN_ELEMENTS, "masked_softmax", 0)  # "auto" may pick the kernels at this size
    cuda = native._runs_cuda(torch.device(device))
    b, h, n = 3, 2, 9
    scores, full_table, index, dense, keep = make_inputs(b, h, n, "table", device)
    for form in ("table", "dense"):
        p, ds, dbias, g = run(scores, 0.5, form, full_table, index, dense, keep, h, "auto")
        assert ops_backend.last_selected()["masked_softmax"] == ("torch" if cuda else "cuda")
        want = float64_reference(scores, 0.5, form, full_table, index, dense, keep, h, g)
        for name, got, ref in zip(("p", "ds", "dbias"), (p, ds, dbias), want):
            assert max_err(got, ref) <= 1e-5 * max(1.0, ref.abs().max().item()), name
        if cuda:
            with pytest.raises(ValueError, match="atomics .*deterministic mode"):
                run(scores, 0.5, form, full_table, index, dense, keep, h, "cuda")
    with torch.no_grad():
        p = ops.masked_softmax(scores, scale=0.5, bias=dense, key_padding_mask=keep, backend="auto")
    assert ops_backend.last_selected()["masked_softmax"] == "cuda"
    assert max_err(p, reference(scores, 0.5, dense, keep)) <= 1e-5
    torch.use_deterministic_algorithms(True, warn_only=True)
    run(scores, 0.5, "table", full_table, index, dense, keep, h, "auto")
    assert ops_backend.last_selected()["masked_softmax"] == ("torch" if cuda else "cuda")
    if cuda:
        with pytest.warns(UserWarning, match="backend='cuda' runs although .*not deterministic"):
            p, ds, dbias, g = run(scores, 0.5, "table", full_table, index, dense, keep, h, "cuda")
        assert ops_backend.last_selected()["masked_softmax"] == "cuda"
        want = float64_reference(scores, 0.5, "table", full_table, index, dense, keep, h, g)
        assert max_err(dbias, want[2]) <= 1e-5 * max(1.0, want[2].abs().max().item())


@pytest.mark.parametrize("device", devices(), indirect=True)
def test_a_nan_row_stays_nan_and_a_masked_row_is_zeros(device):
    """A row of NaN logits comes out NaN, as on the PyTorch path (a diverging model must show); the C++ kernel
    took it for a fully masked row and wrote zeros. A row whose keys are all masked is zeros."""
    s = torch.randn(2, 1, 3, 4, device=device)
    s[0, 0, 1] = float("nan")
    keep = torch.tensor([[True, True, True, True], [False, False, False, False]], device=device)
    p = ops.masked_softmax(s, key_padding_mask=keep, backend="cuda")
    want = ops.masked_softmax(s, key_padding_mask=keep, backend="torch")
    assert torch.isnan(p[0, 0, 1]).all() and torch.isnan(want[0, 0, 1]).all()
    assert torch.equal(p[1], torch.zeros_like(p[1]))
    torch.testing.assert_close(p[0, 0, [0, 2]], want[0, 0, [0, 2]])
