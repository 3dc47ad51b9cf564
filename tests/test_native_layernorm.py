"""The native modality-split LayerNorm (backend="cuda": C++ on CPU tensors, CUDA on CUDA tensors) against float64
references for the output and every gradient (dx, and dγ/dβ of every expert), its argument checks, and tracing."""

import pytest
import torch
import torch.nn.functional as F

from native_helpers import LARGER_EMULATED_GPU, assert_rule, devices, max_err
from vlmo_fast import _native, ops
from vlmo_fast.ops import native


def run(x, weights, biases, split, backend, eps=1e-6, gy=None):
    """Output and gradients of the public op on fresh leaves."""
    xl = x.detach().clone().requires_grad_()
    wl = [None if w is None else w.detach().clone().requires_grad_() for w in weights]
    bl = [None if b is None else b.detach().clone().requires_grad_() for b in biases]
    y = ops.multiway_layernorm(xl, wl, bl, split=split, eps=eps, backend=backend)
    if gy is None:
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device, y.dtype)
    y.backward(gy)
    return y, [xl.grad] + [t.grad for t in wl + bl if t is not None], gy


def reference(x, weights, biases, split, gy, eps=1e-6):
    """float64: LayerNorm of each row block with its expert, then cat (the official slice + cat)."""
    xd = x.detach().double().requires_grad_()
    wd = [None if w is None else w.detach().double().requires_grad_() for w in weights]
    bd = [None if b is None else b.detach().double().requires_grad_() for b in biases]
    d = x.shape[-1]
    if len(weights) == 1:
        y = F.layer_norm(xd, (d,), wd[0], bd[0], eps)
    else:
        y = torch.cat([F.layer_norm(xd[:, :split], (d,), wd[0], bd[0], eps),
                       F.layer_norm(xd[:, split:], (d,), wd[1], bd[1], eps)], 1)
    y.backward(gy.double())
    return y, [xd.grad] + [t.grad for t in wd + bd if t is not None]


def params(experts, d, device, dtype=torch.float32):
    w = [(1 + 0.5 * torch.randn(d, device=device)).to(dtype) for _ in range(experts)]
    b = [(0.5 * torch.randn(d, device=device)).to(dtype) for _ in range(experts)]
    return w, b


def with_large_mean_rows(x):
    """x (B, N, D) with two rows whose mean dwarfs their spread (a residual stream far from zero): 300 + N(0, 1) (the
    last row of the first sample) and 1e3 + 0.1·N(0, 1) (the first row of the last), where a one-pass variance
    E[x²] - E[x]² loses most or all of its digits in fp32. Their deviations come in ± pairs, so the mean is exactly
    the center after rounding to x's dtype: implementations cannot differ by how they round the mean, only by how
    they get the variance."""
    x = x.clone()
    d = x.shape[-1]
    for (bi, ni), center, spread in (((0, -1), 300.0, 1.0), ((-1, 0), 1e3, 0.1)):
        z = spread * torch.randn(d // 2)
        row = center + torch.cat([z, -z, torch.zeros(d % 2)])[torch.randperm(d)]
        x[bi, ni] = row.to(x.device, x.dtype)
    return x


# VLMo sizes and odd ones; then each register tier of the CUDA kernels (ceil(D/32) rounded up to 1, 2, 4, 8, 12, 16,
# 24 or 32 values per lane) at or just past its edge
_SIZES = [(1, 48), (40, 1), (237, 768), (257, 97), (40, 1024)] + [(9, d) for d in (32, 33, 65, 129, 257, 385, 513, 769)]


@pytest.mark.parametrize("device", devices() + [LARGER_EMULATED_GPU], indirect=True)
@pytest.mark.parametrize("n,d", _SIZES)
@pytest.mark.parametrize("split", ["one", 0, "mid", "end"])
def test_fp32_matches_float64(device, n, d, split):
    b = 3
    x = with_large_mean_rows(torch.randn(b, n, d, device=device) * 2 + 0.5)
    experts = 1 if split == "one" else 2
    split = {"one": None, 0: 0, "mid": min(40, n) // 2 + (n > 1), "end": n}[split] if experts == 2 else None
    w, bb = params(experts, d, device)
    y, grads, gy = run(x, w, bb, split, "cuda")
    ye, grads_e, _ = run(x, w, bb, split, "torch", gy=gy)
    yr, grads_r = reference(x, w, bb, split, gy)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_rule("y", y, ye, yr, 1e-6)
    for name, got, eager, ref in zip(["dx", "dw0", "dw1", "db0", "db1"] if experts == 2 else ["dx", "dw0", "db0"],
                                     grads, grads_e, grads_r):
        assert_rule(name, got, eager, ref, 1e-5)


@pytest.mark.parametrize("b,n,d,split", [(2, 237, 768, 40), (3, 41, 97, 32), (8, 40, 97, None)])
def test_cpu_rows_far_from_zero_beat_eager(b, n, d, split):
    """Every row at 100 + N(0, 1), fp32. Eager's error is then dominated by the fp32 rounding of the saved mean (up
    to half an ulp of 100, 4e-6), which shifts every x̂ of a row alike. The C++ kernel measures that rounding residue
    (mean_D(x - μ), exact near μ) in the forward and again in the backward, so its y and dx errors are a fraction of
    eager's (at most 0.05x and 0.12x over 12 seeds; the kernel without the residue reached 0.41x and 0.35x), and
    dγ/dβ stay within twice eager's error with no absolute slack."""
    experts = 1 if split is None else 2
    names = ["dx", "dw0", "dw1", "db0", "db1"] if experts == 2 else ["dx", "dw0", "db0"]
    for seed in range(4):
        torch.manual_seed(seed)
        x = torch.randn(b, n, d) + 100.0
        w, bb = params(experts, d, "cpu")
        y, grads, gy = run(x, w, bb, split, "cuda")
        ye, grads_e, _ = run(x, w, bb, split, "torch", gy=gy)
        yr, grads_r = reference(x, w, bb, split, gy)
        assert max_err(y, yr) <= 0.15 * max_err(ye, yr), seed
        assert max_err(grads[0], grads_r[0]) <= 0.15 * max_err(grads_e[0], grads_r[0]), seed
        for name, got, eager, ref in zip(names, grads, grads_e, grads_r):
            assert_rule(name, got, eager, ref, 0.0)


def test_cpu_weight_gradients_over_many_rows_are_summed_in_chunks(one_thread):
    """dβ = Σ_rows dy over 32768 rows on one thread: a running fp32 sum's error grows with the row count (eager's
    too); the C++ kernel sums chunks of 16 rows first, so its error stays well below eager's (0.12x at 65536 rows,
    where the running sum had eager's error)."""
    x = torch.randn(128, 256, 64, generator=torch.Generator().manual_seed(4))
    w, bb = params(1, 64, "cpu")
    _, grads, gy = run(x, w, bb, None, "cuda")
    _, grads_e, _ = run(x, w, bb, None, "torch", gy=gy)
    db_ref = gy.double().sum(dim=(0, 1))
    assert max_err(grads[2], db_ref) <= 0.5 * max_err(grads_e[2], db_ref)


@pytest.mark.parametrize("device", devices(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32])
def test_low_precision_within_twice_eager_error(device, dtype, param_dtype):
    b, n, d, split = 4, 237, 768, 40
    x = with_large_mean_rows((torch.randn(b, n, d, device=device) * 2 + 0.5).to(dtype))
    w, bb = params(2, d, device, dtype if param_dtype == "same" else param_dtype)
    y, grads, gy = run(x, w, bb, split, "cuda")
    ye, grads_e, _ = run(x, w, bb, split, "torch", gy=gy)
    yr, grads_r = reference(x, w, bb, split, gy)
    assert y.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == w[0].dtype
    assert_rule("y", y, ye, yr, 1e-6)
    for name, got, eager, ref in zip(["dx", "dw0", "dw1", "db0", "db1"], grads, grads_e, grads_r):
        assert_rule(name, got, eager, ref, 1e-6)


@pytest.mark.parametrize("device", devices(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1])
def test_vectorized_tiers_and_misaligned_rows(device, dtype, offset):
    """D a multiple of the vector width at every register tier of the CUDA kernels: aligned rows take the vectorized
    kernels (16-, 8- or 4-byte accesses), rows starting one element off 16 bytes (offset 1, views into a larger
    buffer) the scalar ones; both meet the numerics rule for y, dx and every expert's dγ, dβ."""
    b, n, split = 2, 5, 2
    for d in (64, 128, 256, 384, 512, 768, 1024):  # 2, 4, 8, 12, 16, 24, 32 values per lane
        buf = torch.randn(b * n * d + offset, device=device).to(dtype).requires_grad_()
        x = buf[offset:].view(b, n, d)  # the op gets this view: its rows start `offset` elements into the buffer
        w, bb = params(2, d, device)
        wl, bl = [t.clone().requires_grad_() for t in w], [t.clone().requires_grad_() for t in bb]
        y = ops.multiway_layernorm(x, wl, bl, split=split, eps=1e-6, backend="cuda")
        gy = torch.randn(y.shape, device=device).to(dtype)
        y.backward(gy)
        grads = [buf.grad[offset:].view(b, n, d)] + [t.grad for t in wl + bl]
        ye, grads_e, _ = run(x, w, bb, split, "torch", gy=gy)
        yr, grads_r = reference(x, w, bb, split, gy)
        assert_rule(f"y d={d}", y, ye, yr, 1e-6)
        for name, got, eager, ref in zip(["dx", "dw0", "dw1", "db0", "db1"], grads, grads_e, grads_r):
            assert_rule(f"{name} d={d}", got, eager, ref, 1e-5)


@pytest.mark.parametrize("device", devices(), indirect=True)
def test_every_backend_returns_the_dtype_of_layer_norm_under_autocast(device):
    """Under autocast a half-precision x comes out in F.layer_norm's dtype on every backend: fp32 on CUDA (layer_norm
    is among CUDA autocast's fp32 ops, as for the official nn.LayerNorm), x's own on CPU; the values agree. (Only the
    GPU case meets the CUDA rule: the emulated kernels take CPU tensors, under CPU autocast.)"""
    x = torch.randn(2, 9, 64, device=device).to(torch.bfloat16)
    w, bb = params(2, 64, device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        want = F.layer_norm(x, (64,), w[1], bb[1], 1e-6)
        outs = {backend: ops.multiway_layernorm(x, w, bb, split=4, backend=backend)
                for backend in ("cuda", "torch", "auto")}
    assert want.dtype == (torch.float32 if x.is_cuda else torch.bfloat16)
    for backend, y in outs.items():
        assert y.dtype == want.dtype, backend
        assert max_err(y[:, 4:], want[:, 4:]) < 2e-2 * want.abs().max().item(), backend
        assert max_err(y, outs["torch"]) < 2e-2 * want.abs().max().item(), backend


def test_non_contiguous_x_and_missing_affine():
    x = torch.randn(30, 3, 64).transpose(0, 1)  # (3, 30, 64), not contiguous
    w, b0 = torch.randn(64), torch.randn(64)
    y = ops.multiway_layernorm(x, [None, w], [b0, None], split=11, backend="cuda")
    ref = torch.cat([F.layer_norm(x[:, :11].double(), (64,), None, b0.double(), 1e-6),
                     F.layer_norm(x[:, 11:].double(), (64,), w.double(), None, 1e-6)], 1)
    assert max_err(y, ref) < 1e-5


@pytest.mark.parametrize("device", devices(), indirect=True)
def test_strided_single_expert_parameters(device):
    """One expert's weight and bias may be views (every other element of a buffer, an expanded scalar); their
    gradients reach the buffers they view."""
    x = torch.randn(2, 7, 24, device=device)
    gy = torch.randn(2, 7, 24, device=device)
    buf = (1 + torch.randn(48, device=device)).requires_grad_()
    scalar = torch.full((1,), 1.5, device=device, requires_grad=True)
    results = []
    for backend, dt in (("cuda", torch.float32), ("ref", torch.float64)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (buf, scalar)]
        for w, b in ((leaves[0][::2], leaves[0][1::2]), (leaves[1].expand(24), leaves[0][::2])):
            if backend == "cuda":
                assert not w.is_contiguous()
                y = ops.multiway_layernorm(x, [w], [b], backend="cuda")
            else:
                y = F.layer_norm(x.double(), (24,), w, b, 1e-6)
            y.backward(gy.to(dt))
            results.append(y)
        results += [t.grad for t in leaves]
    for got, want in zip(results[:4], results[4:]):
        assert max_err(got, want) < 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("device", devices(), indirect=True)
@pytest.mark.parametrize("shape", [(2, 0, 8), (0, 5, 8)])
def test_no_rows(device, shape):
    """No rows to normalise: an empty output and zero parameter gradients (not uninitialised memory)."""
    x = torch.randn(shape, device=device)
    w, b = params(2, 8, device)
    y, grads, _ = run(x, w, b, 0, "cuda")
    assert y.shape == shape and grads[0].shape == shape
    for g in grads[1:]:
        assert g.shape == (8,) and torch.all(g == 0)


@pytest.mark.parametrize("device", devices() + [LARGER_EMULATED_GPU], indirect=True)
@pytest.mark.parametrize("d", [7, 768, 1000])
def test_constant_rows_give_the_bias_exactly(device, d):
    """A constant row has x - mean = 0, so y = b exactly (as eager): a mean off by a rounding residue would be
    amplified by rstd = 1/sqrt(eps) (an error of ~1e-3 at eps = 1e-6). The gradients stay finite and match eager."""
    values = torch.tensor([3.3, -1234.5678, 1e-3, 0.1, 7.0], device=device)
    x = values[None, :, None].expand(2, 5, d).contiguous()
    w, b = params(2, d, device)
    for eps in (1e-6, 1e-12):
        y, grads, gy = run(x, w, b, 2, "cuda", eps=eps)
        ye, eager, _ = run(x, w, b, 2, "torch", eps=eps, gy=gy)
        assert torch.equal(y[:, :2], b[0].expand(2, 2, d)) and torch.equal(y[:, 2:], b[1].expand(2, 3, d))
        ref_y, ref = reference(x, w, b, 2, gy, eps=eps)
        for name, got, e, r in zip(("dx", "dw0", "dw1", "db0", "db1"), grads, eager, ref):
            assert torch.isfinite(got).all()
            assert_rule(name, got, e, r, 1e-6)


@pytest.mark.parametrize("device", devices(), indirect=True)
def test_one_feature_rows_have_zero_input_gradient(device):
    """D = 1: y = b whatever x, so dx = 0 exactly; an FMA-fused w·dy - mean(w·dy) leaves a rounding residue that
    rstd = 1/sqrt(eps) amplifies (O(1) at eps 1e-12)."""
    x = torch.randn(3, 5, 1, device=device)
    w, b = params(2, 1, device)
    for eps in (1e-5, 1e-12):
        y, grads, _ = run(x, w, b, 2, "cuda", eps=eps)
        assert torch.equal(y[:, :2], b[0].expand(3, 2, 1)) and torch.equal(y[:, 2:], b[1].expand(3, 3, 1))
        assert torch.all(grads[0] == 0)


def test_weight_gradient_goes_to_each_expert():
    """Rows before split only feed expert 0's dγ/dβ, the others only expert 1's."""
    b, n, d, split = 2, 10, 16, 4
    x = torch.randn(b, n, d)
    w = [torch.ones(d, requires_grad=True) for _ in range(2)]
    bb = [torch.zeros(d, requires_grad=True) for _ in range(2)]
    gy = torch.zeros(b, n, d)
    gy[:, :split] = 1.0  # gradient only on expert 0's rows
    ops.multiway_layernorm(x, w, bb, split=split, backend="cuda").backward(gy)
    assert torch.all(bb[0].grad == b * split) and torch.all(bb[1].grad == 0) and torch.all(w[1].grad == 0)


@pytest.mark.parametrize("device", devices(), indirect=True)
def test_every_output_element_is_written(device):
    b, n, d, split = 3, 29, 80, 7
    x = torch.randn(b, n, d, device=device)
    w = torch.randn(2, d, device=device)
    bias = torch.randn(2, d, device=device)
    y = torch.full_like(x, float("nan"))
    mean = torch.full((b * n,), float("nan"), device=device)
    rstd = torch.full_like(mean, float("nan"))
    extra = native._launch_args(x.device)
    native._launcher("multiway_layernorm_forward", x.device)(
        x=x.data_ptr(), dtype=0, y=y.data_ptr(), mean=mean.data_ptr(), rstd=rstd.data_ptr(), rows=b * n,
        seq_len=n, dim=d, split=split, weight=w.data_ptr(), bias=bias.data_ptr(), eps=1e-6, **extra)
    dx = torch.full_like(x, float("nan"))
    dw = torch.full((2, d), float("nan"), device=device)
    db = torch.full_like(dw, float("nan"))
    ws, dy = {}, torch.randn_like(x)  # tensors, not temporaries: a pointer must outlive the launch
    if native._runs_cuda(x.device):
        size = native._C.multiway_layernorm_backward_workspace_cuda(rows=b * n, seq_len=n, dim=d, split=split,
                                                                    dtype=0, device=extra["device"])
        workspace = torch.full((size,), float("nan"), device=device)
        ws["workspace"] = workspace.data_ptr()
    native._launcher("multiway_layernorm_backward", x.device)(
        dy=dy.data_ptr(), x=x.data_ptr(), dtype=0, mean=mean.data_ptr(), rstd=rstd.data_ptr(),
        dx=dx.data_ptr(), rows=b * n, seq_len=n, dim=d, split=split, weight=w.data_ptr(), dweight=dw.data_ptr(),
        dbias=db.data_ptr(), num_experts=2, **ws, **extra)
    for t in (y, mean, rstd, dx, dw, db):
        assert not t.isnan().any()


@pytest.mark.parametrize(
    "over,err,match",
    [
        (dict(x=torch.randn(2, 5, 8).transpose(0, 1)), ValueError, "x must be contiguous"),
        (dict(x=torch.randn(5, 8)), ValueError, "x must be a 3-D"),
        (dict(x=torch.randn(2, 5, 8, dtype=torch.float64)), TypeError, "x must have dtype"),
        (dict(x=torch.randn(2, 5, 0)), ValueError, "D must be at least 1"),
        (dict(weight=torch.randn(2, 7)), ValueError, r"weight must have shape \(E, D=8\)"),
        (dict(weight=torch.randn(3, 8)), ValueError, r"weight must have shape \(E, D=8\)"),
        (dict(weight=torch.randn(2, 8, dtype=torch.float16)), TypeError, "weight must have dtype"),
        (dict(bias=torch.randn(1, 8)), ValueError, "bias must have shape"),
        (dict(split=6), ValueError, r"split must lie in \[0, N=5\]"),
        (dict(split=-1), ValueError, r"split must lie in \[0, N=5\]"),
        (dict(weight=torch.randn(1, 8), bias=torch.randn(1, 8), split=2), ValueError, "split must be -1"),
    ],
)
def test_op_rejects_bad_inputs(over, err, match):
    args = dict(x=torch.randn(2, 5, 8), weight=torch.randn(2, 8), bias=torch.randn(2, 8), split=2, eps=1e-6)
    args.update(over)
    with pytest.raises(err, match=match):
        torch.ops.vlmo_fast.multiway_layernorm(**args)


def test_backend_reports_unsupported_inputs():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    w = torch.ones(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        ops.multiway_layernorm(x, [w], [w], backend="cuda")
    assert ops.multiway_layernorm(x, [w], [w], backend="auto").dtype == torch.float64
    with pytest.raises(ValueError, match="split is required"):  # the public checks still run first
        ops.multiway_layernorm(x.float(), [w.float(), w.float()], [w.float(), w.float()], backend="cuda")


def test_torch_compile_traces_without_graph_breaks():
    x = torch.randn(2, 9, 16, requires_grad=True)
    w = [torch.randn(16, requires_grad=True) for _ in range(2)]
    bb = [torch.randn(16, requires_grad=True) for _ in range(2)]

    def f(x, w0, w1, b0, b1):
        return native.multiway_layernorm_native(x, (w0, w1), (b0, b1), 4, 1e-6)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, *w, *bb)
    got.sum().backward()
    grads = [t.grad.clone() for t in [x] + w + bb]
    for t in [x] + w + bb:
        t.grad = None
    want = f(x, *w, *bb)
    want.sum().backward()
    assert torch.equal(got, want)
    for g, t in zip(grads, [x] + w + bb):
        assert torch.allclose(g, t.grad)


def test_cpu_auto_policy():
    """"auto" takes the CPU kernel only where it was measured faster than PyTorch (csrc/README.md)."""
    from vlmo_fast.ops import backend

    declines = native._layernorm_auto_declines
    w = torch.ones(768)
    small, big = torch.randn(2, 5, 768), torch.randn(8, 237, 768)
    assert "PyTorch" in declines(small, (w, w), (w, w), 2)
    assert "PyTorch" in declines(torch.randn(2, 237, 768), (w,), (w,), None)  # one expert: PyTorch up to ~1M
    assert declines(big, (w, w), (w, w), 40) is None and declines(big, (w,), (w,), None) is None
    impl = backend.select("multiway_layernorm", "auto", big, (w, w), (w, w), 40)
    assert impl is native.multiway_layernorm_native if _native.native_available() else impl is None
    if _native.native_available():  # small inputs: "auto" takes PyTorch, an explicit request still the kernel
        assert backend.select("multiway_layernorm", "auto", small, (w, w), (w, w), 2) is None
        assert backend.select("multiway_layernorm", "cuda", small, (w, w), (w, w), 2) is native.multiway_layernorm_native


@pytest.mark.parametrize("device", [d for d in devices() if d != "cpu"], indirect=True)
def test_cuda_rows_longer_than_the_register_limit_are_declined(device):
    x = torch.randn(2, 3, 1100, device=device)
    w = torch.ones(1100, device=device)
    with pytest.raises(ValueError, match="1024"):
        ops.multiway_layernorm(x, [w], [w], backend="cuda")
    assert ops.multiway_layernorm(x, [w], [w], backend="auto").shape == x.shape  # PyTorch path
