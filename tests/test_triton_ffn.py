"""The fused Multiway FFN and LayerScale residual (Triton kernels around cuBLAS GEMMs): through Triton's interpreter
on CPU against float64 references and the PyTorch path, with DropPath, autocast, checkpointing and compile."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import vlmo_fast as vf
from vlmo_fast import ops
from vlmo_fast.reference import Block as OfficialBlock
from vlmo_fast.model.multiway import Block as FastBlock
from vlmo_fast.model import relpos
from vlmo_fast.ops.triton_attention import interpreting

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "profile"))
from profiling import saved_bytes_per_sample  # noqa: E402  (what benchmarks/profile/activation_memory.py counts)
from numerics import assert_twice_eager  # noqa: E402

D, HID = 32, 128


@pytest.fixture(autouse=True)
def _cpu_tensors_need_the_interpreter(request):
    """The tests without the gpu mark run the Triton kernels on CPU tensors, through Triton's interpreter, which
    conftest turns on only where there is no CUDA device; on a GPU machine the Triton backend refuses CPU tensors."""
    if request.node.get_closest_marker("gpu") is None and not interpreting():
        pytest.skip("CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set where there is no CUDA)")


def expert(dtype=torch.float32):
    parts = [1 + 0.1 * torch.randn(D), 0.1 * torch.randn(D), 0.05 * torch.randn(HID, D), 0.1 * torch.randn(HID),
             0.05 * torch.randn(D, HID), 0.1 * torch.randn(D)]
    return ops.FFNExpert(*(p.to(dtype).requires_grad_() for p in parts))


def reference_ffn(x, experts, split, gamma, scales=None):
    """float64 official math: slice, per-expert LN + MLP, γ, per-half DropPath factors (given), cat."""
    x = x.double()
    segs = [(0, split), (split, x.shape[1])] if len(experts) == 2 else [(0, x.shape[1])]
    parts = []
    for i, ((lo, hi), e) in enumerate(zip(segs, experts)):
        e = [t.double() for t in e]
        xs = x[:, lo:hi]
        h = F.layer_norm(xs, (x.shape[-1],), e[0], e[1], 1e-6)
        y = F.linear(F.gelu(F.linear(h, e[2], e[3])), e[4], e[5])
        if gamma is not None:
            y = gamma.double() * y
        if scales is not None:
            y = y * scales[i].double()[:, None, None]
        parts.append(xs + y)
    return torch.cat(parts, 1)


def large_mean_row(d, center, spread, dtype=torch.float32):
    """A row center + spread·N(0, 1) whose mean is exactly ``center`` after rounding to ``dtype``: the deviations come
    in ± pairs (rounding is symmetric about a representable center), so no implementation can differ by how it
    rounds the mean, only by how it gets the variance."""
    z = spread * torch.randn(d // 2)
    return (center + torch.cat([z, -z, torch.zeros(d % 2)])[torch.randperm(d)]).to(dtype)


def with_large_mean_rows(x):
    """x (B, N, D) with two rows whose mean dwarfs their spread, as in a residual stream far from zero: 300 + N(0, 1)
    (the last row of the first sample) and 1e3 + 0.1·N(0, 1) (the first row of the last). A one-pass variance
    E[x²] - E[x]² loses most or all of their digits in fp32; a two-pass one does not."""
    x = x.detach().clone()
    x[0, -1] = large_mean_row(x.shape[-1], 300.0, 1.0, x.dtype)
    x[-1, 0] = large_mean_row(x.shape[-1], 1e3, 0.1, x.dtype)
    return x


def leaves_of(x, experts, gamma):
    return [x] + ([gamma] if gamma is not None else []) + [t for e in experts for t in e]


def assert_within_twice_eager(out, eager, ref, leaves, g, rel_slack=False, what="", ref_leaves=None):
    """``out`` and its gradients of ``leaves`` (output gradient ``g``) within twice the error of ``eager`` (the
    official math run the same way), both against the float64 ``ref``. Slack: 1e-6, or with ``rel_slack`` (fp32
    runs) 1e-6 of the result's size, plus for an fp16/bf16 result the reference's own rounding to it
    (tests/numerics.py). ``ref_leaves``: float64 copies of the leaves that ``ref`` was computed from (for
    half-precision leaves, whose own gradients would round the reference's)."""
    got = torch.autograd.grad(out, leaves, g.to(out.dtype))
    base = torch.autograd.grad(eager, leaves, g.to(eager.dtype))
    want = torch.autograd.grad(ref, leaves if ref_leaves is None else ref_leaves, g.double())
    for i, (a, r, e) in enumerate(zip((out,) + got, (ref,) + want, (eager,) + base)):
        slack = 1e-6 * r.detach().abs().max().clamp_min(1.0).item() if rel_slack else 1e-6
        assert_twice_eager(f"{what}tensor {i}", a, e, r, slack)


@pytest.mark.parametrize("n,split,two", [(237, 40, True), (40, None, False), (197, None, False), (13, 0, True),
                                         (13, 13, True), (1, None, False)])
@pytest.mark.parametrize("with_gamma", [True, False])
def test_fp32_matches_float64(n, split, two, with_gamma):
    x = with_large_mean_rows(torch.randn(2, n, D)).requires_grad_()
    experts = [expert(), expert()] if two else [expert()]
    gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_() if with_gamma else None
    out = ops.multiway_ffn(x, experts, split=split if two else None, gamma=gamma, backend="triton")
    ref = reference_ffn(x, experts, split, gamma)
    eager = ops.multiway_ffn(x, experts, split=split if two else None, gamma=gamma, backend="torch")
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_within_twice_eager(out, eager, ref, leaves_of(x, experts, gamma), torch.randn_like(out), rel_slack=True)


def test_droppath_draws_like_the_official_block_and_rescales():
    x = torch.randn(6, 29, D, requires_grad=True)
    experts = [expert(), expert()]
    gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_()
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(7)
        out = ops.multiway_ffn(x, experts, split=12, gamma=gamma, drop_path=0.5, training=True, backend=backend)
        results.append((out,) + torch.autograd.grad(out, leaves_of(x, experts, gamma), torch.ones_like(out)))
    for a, e in zip(*results):
        assert torch.allclose(a, e, atol=2e-6, rtol=1e-5)
    # the draws: per sample, separately for the text and image halves, rescaled by 1/keep
    torch.manual_seed(7)
    masks = [(0.5 + torch.rand(6, 1, 1)).floor_().reshape(-1) / 0.5 for _ in range(2)]
    ref = reference_ffn(x, experts, 12, gamma, masks)
    assert torch.allclose(results[0][0].double(), ref, atol=1e-5)
    dropped = (masks[0] == 0) & (masks[1] != 0)
    assert dropped.any() or ((masks[0] == 0) | (masks[1] == 0)).any()
    # eval is deterministic: no draw at all
    state = torch.get_rng_state()
    ops.multiway_ffn(x, experts, split=12, gamma=gamma, drop_path=0.5, training=False, backend="triton")
    assert torch.equal(state, torch.get_rng_state())


def test_autocast_bf16_within_twice_eager_error():
    x = with_large_mean_rows(torch.randn(2, 45, D)).requires_grad_()
    experts = [expert(), expert()]
    gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_()
    ref = reference_ffn(x, experts, 16, gamma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.multiway_ffn(x, experts, split=16, gamma=gamma, backend="triton")
        eager = ops.multiway_ffn(x, experts, split=16, gamma=gamma, backend="torch")
    assert out.dtype == torch.float32  # the residual stream stays fp32 under autocast, as in the official block
    # no slack relative to the result's size: the output and dx are dominated by the fp32 residual (x, and g through
    # the skip), so a slack of an ulp of their magnitude would let a wrong FFN branch through
    assert_within_twice_eager(out, eager, ref, leaves_of(x, experts, gamma), torch.randn_like(out))


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randn(3, 29, D, requires_grad=True)
    experts = [expert(), expert()]
    gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_()
    leaves = leaves_of(x, experts, gamma)

    def f(x_):
        return ops.multiway_ffn(x_, experts, split=12, gamma=gamma, drop_path=0.3, training=True, backend="triton")

    torch.manual_seed(11)
    plain = torch.autograd.grad(f(x).sum(), leaves)
    torch.manual_seed(11)
    ckpt = torch.autograd.grad(checkpoint(f, x, use_reentrant=False).sum(), leaves)
    for a, e in zip(plain, ckpt):
        assert torch.equal(a, e)


def test_compile_traces_the_fused_ffn_and_norm_linear():
    x = torch.randn(2, 29, D, requires_grad=True)
    y = torch.randn(2, 29, D, requires_grad=True)
    experts = [expert(), expert()]
    gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_()
    attn_gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_()
    params = norm_linear_params()

    def f(x_):
        out = ops.multiway_ffn(x_, experts, split=12, gamma=gamma, attn_out=y, attn_gamma=attn_gamma,
                               backend="triton")
        return ops.norm_linear(out, *params, backend="triton")

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(out, f(x), atol=1e-6)
    for a, e in zip(torch.autograd.grad(out.sum(), [x, y, params[2]]), torch.autograd.grad(f(x).sum(), [x, y, params[2]])):
        assert torch.allclose(a, e, atol=1e-6)


def test_scaled_residual():
    x = torch.randn(4, 29, D, requires_grad=True)
    y = torch.randn(4, 29, D, requires_grad=True)
    gamma = torch.randn(D, requires_grad=True)
    for training in (False, True):
        res = []
        for backend in ("triton", "torch"):
            torch.manual_seed(3)
            out = ops.scaled_residual(x, y, gamma, drop_path=0.4, training=training, backend=backend)
            res.append((out,) + torch.autograd.grad(out, [x, y, gamma], torch.randn(out.shape, generator=torch.Generator().manual_seed(0))))
        for a, e in zip(*res):
            assert torch.allclose(a, e, atol=1e-5)
    out = ops.scaled_residual(x, y, None, backend="triton")
    assert torch.allclose(out, x + y)
    with pytest.raises(ValueError, match="y must have shape"):
        ops.scaled_residual(x, y[:, :3], gamma)
    # a wider y or gamma promotes the sum (official x + γ·y): auto takes the torch path, triton says why not
    x16 = x.detach().half()
    for y_, g_ in ((y.detach(), None), (y.detach().half(), gamma.detach())):
        out = ops.scaled_residual(x16, y_, g_)
        assert out.dtype == torch.float32
        with pytest.raises(ValueError, match="wider than x"):
            ops.scaled_residual(x16, y_, g_, backend="triton")


@pytest.mark.parametrize("n", [1, 237, 257])
def test_scaled_residual_matches_float64(n):
    """x + DropPath(γ·y) at odd sizes (one row per sample; 237 and 257 rows: partial row tiles and dγ partials;
    D = 97: masked columns), in eval and with DropPath in training: the fp32 kernel's output and every gradient within twice
    the eager error against float64; float64 inputs take the PyTorch path, exact."""
    b, d, drop = 2, 97, 0.3
    x, y = (torch.randn(b, n, d, requires_grad=True) for _ in range(2))
    gamma = torch.randn(d, requires_grad=True)
    for training in (False, True):
        seed = int(torch.randint(0, 2**31, (1,)))
        runs = []
        for backend in ("triton", "torch"):
            torch.manual_seed(seed)
            runs.append(ops.scaled_residual(x, y, gamma, drop_path=drop, training=training, backend=backend))
        torch.manual_seed(seed)  # the official DropPath's draw, in the dtype of γ·y
        mask = (1 - drop + torch.rand(b, 1, 1)).floor_().double() / (1 - drop) if training else 1.0
        ref = x.double() + gamma.double() * y.double() * mask
        assert_within_twice_eager(*runs, ref, [x, y, gamma], torch.randn(b, n, d), rel_slack=True,
                                  what=f"training {training}: ")
        leaves = [t.detach().double().requires_grad_() for t in (x, y, gamma)]
        torch.manual_seed(seed)
        out = ops.scaled_residual(*leaves, drop_path=drop, training=training)  # auto: the PyTorch path
        assert out.dtype == torch.float64
        torch.manual_seed(seed)  # drawn in float64 now
        mask = (1 - drop + torch.rand(b, 1, 1, dtype=torch.float64)).floor_() / (1 - drop) if training else 1.0
        want = leaves[0] + leaves[2] * leaves[1] * mask
        g = torch.randn(b, n, d, dtype=torch.float64)
        for a, e in zip((out,) + torch.autograd.grad(out, leaves, g), (want,) + torch.autograd.grad(want, leaves, g)):
            assert torch.allclose(a, e, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        ops.scaled_residual(*leaves, backend="triton")


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_scaled_residual_rejects_bad_arguments(backend):
    x, y, gamma = torch.randn(2, 5, D), torch.randn(2, 5, D), torch.randn(D)
    meta = torch.device("meta")
    cases = [
        (dict(x=x[0]), ValueError, r"x must be 3-D, got shape \(5, 32\)"),
        (dict(x=x.tolist()), TypeError, "x must be a torch.Tensor, got list"),
        (dict(x=x.long(), y=y.long()), TypeError, "x must have dtype in"),
        (dict(y=y.int()), TypeError, "y must have dtype in"),
        (dict(y=y.to(meta)), ValueError, "y must be on cpu, got meta"),
        (dict(gamma=gamma[:-1]), ValueError, r"gamma must have shape \(32,\), got \(31,\)"),
        (dict(gamma=gamma[None]), ValueError, "gamma must be 1-D"),
        (dict(gamma=gamma.long()), TypeError, "gamma must have dtype in"),
        (dict(gamma=gamma.to(meta)), ValueError, "gamma must be on cpu, got meta"),
        (dict(drop_path=-0.5), ValueError, r"drop_path must be in \[0, 1\), got -0.5"),
        (dict(drop_path=1.0), ValueError, r"drop_path must be in \[0, 1\), got 1.0"),
        (dict(drop_path=float("nan")), ValueError, r"drop_path must be in \[0, 1\), got nan"),
        (dict(drop_path="0.1"), TypeError, "drop_path must be a real number, got str"),
        (dict(drop_path=True), TypeError, "drop_path must be a real number, got bool"),
    ]
    for over, err, match in cases:
        kw = dict(x=x, y=y, gamma=gamma, drop_path=0.1, training=True, backend=backend)
        kw.update(over)
        with pytest.raises(err, match=match):
            ops.scaled_residual(kw.pop("x"), kw.pop("y"), kw.pop("gamma"), **kw)


def test_mixed_parameter_dtypes_follow_torch_rules():
    """Every backend accepts exactly the dtype mixes torch does: LayerNorm weights in x's dtype or float32, Linear
    weights in x's dtype outside autocast, any under it; a wider γ promotes the sum (torch path)."""
    x = torch.randn(2, 7, D, dtype=torch.bfloat16)
    for backend in ("triton", "torch"):
        with pytest.raises(TypeError, match=r"experts.fc1_weight\[0\] must have x's dtype \(torch.bfloat16\) outside"):
            ops.multiway_ffn(x, [expert()], backend=backend)
        with pytest.raises(TypeError, match=r"experts.norm_weight\[0\] must have x's dtype \(torch.float32\), got"):
            ops.multiway_ffn(x.float(), [expert(torch.bfloat16)], backend=backend)
        with pytest.raises(TypeError, match=r"bias\[0\] must have x's dtype \(torch.float16\) or torch.float32"):
            ops.multiway_layernorm(x.half(), [torch.ones(D)] * 2, [torch.zeros(D, dtype=torch.bfloat16)] * 2, split=3,
                                   backend=backend)
        with pytest.raises(TypeError, match=r"weight\[0\] must have x's dtype \(torch.float64\), got torch.float32"):
            ops.multiway_layernorm(x.double(), [torch.ones(D)], [torch.zeros(D)], backend=backend)
        mixed = expert(torch.bfloat16)
        mixed = mixed._replace(norm_weight=mixed.norm_weight.float(), norm_bias=mixed.norm_bias.float())
        out = ops.multiway_ffn(x, [mixed], backend=backend)  # float32 LayerNorm weights: torch's mixed LayerNorm
        assert out.dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ops.multiway_ffn(x.float(), [expert()], backend=backend).dtype == torch.float32
    gamma = torch.full((D,), 0.1)
    assert ops.multiway_ffn(x, [expert(torch.bfloat16)], gamma=gamma).dtype == torch.float32  # auto: torch path
    with pytest.raises(ValueError, match="gamma is wider than x"):
        ops.multiway_ffn(x, [expert(torch.bfloat16)], gamma=gamma, backend="triton")


def strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another layout: sliced out of a larger tensor (a vector: every other element; a matrix
    or batch: the first columns of wider rows), or (3-D) batch-major storage."""
    t = t.detach()
    if kind == "slice" and t.dim() == 1:
        out = torch.stack([t, torch.full_like(t, float("nan"))], -1)[:, 0]
    elif kind == "slice":
        out = torch.cat([t, torch.full_like(t, float("nan"))], -1)[..., : t.shape[-1]]
    else:
        out = t.transpose(0, 1).contiguous().transpose(0, 1)
    assert not out.is_contiguous() and torch.equal(out, t)
    return out.requires_grad_()


@pytest.mark.parametrize("which", ["x", "y", "gamma"])
@pytest.mark.parametrize("kind", ["slice", "transposed"])
def test_scaled_residual_takes_strided_inputs(which, kind):
    if which == "gamma" and kind == "transposed":
        pytest.skip("a vector has one layout besides contiguous: the slice")
    t = {"x": torch.randn(3, 7, D), "y": torch.randn(3, 7, D), "gamma": torch.randn(D)}
    t = {k: strided(v, kind) if k == which else v.requires_grad_() for k, v in t.items()}
    out = ops.scaled_residual(t["x"], t["y"], t["gamma"], backend="triton")
    g = torch.randn(out.shape)
    ref = t["x"].double() + t["gamma"].double() * t["y"].double()
    leaves = [t["x"], t["y"], t["gamma"]]
    for a, r in zip((out,) + torch.autograd.grad(out, leaves, g), (ref,) + torch.autograd.grad(ref, leaves, g.double())):
        assert (a.double() - r).abs().max() <= 1e-5 * r.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("which", ["x", "norm_weight", "norm_bias", "fc1_weight", "gamma"])
def test_multiway_ffn_takes_strided_inputs(which):
    """Parameters or activations that are views (sliced from a wider tensor; x also in batch-major storage) give
    the same answer as contiguous ones: the kernels get dense copies, never strided pointers they would misread."""
    x = torch.randn(2, 13, D, requires_grad=True)
    experts = [expert(), expert()]
    gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_()
    if which == "x":
        x = strided(x, "transposed")
    elif which == "gamma":
        gamma = strided(gamma, "slice")
    else:
        field = ops.FFNExpert._fields.index(which)
        experts[1] = ops.FFNExpert(*(strided(t, "slice") if i == field else t for i, t in enumerate(experts[1])))
    out = ops.multiway_ffn(x, experts, split=5, gamma=gamma, backend="triton")
    ref = reference_ffn(x, experts, 5, gamma)
    g = torch.randn_like(out)
    leaves = leaves_of(x, experts, gamma)
    for a, r in zip((out,) + torch.autograd.grad(out, leaves, g), (ref,) + torch.autograd.grad(ref, leaves, g.double())):
        assert (a.double() - r).abs().max() <= 1e-5 * r.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_layernorm_of_constant_rows_gives_the_bias_exactly(device):
    """The fused FFN's LayerNorm: a constant row normalises to exactly b (x - mean = 0), not a rounding residue
    amplified by 1/sqrt(eps). (On CPU the interpreter; on a GPU the compiled kernel, which contracts to FMAs.)"""
    from vlmo_fast.ops.triton_ffn import multiway_ln_fwd

    x = torch.tensor([3.3, -1234.5678, 0.1])[None, :, None].expand(2, 3, D).contiguous().to(device)
    w0, b0, w1, b1 = (t.to(device) for t in (1 + torch.randn(D), torch.randn(D), 1 + torch.randn(D), torch.randn(D)))
    for eps in (1e-6, 1e-12):
        h, mean, rstd = multiway_ln_fwd(x, w0, b0, w1, b1, 1, eps, torch.float32)
        # expert-grouped rows: the text rows (position < split = 1) of both samples first, then the image rows
        assert torch.equal(h[:2], b0.expand(2, D)) and torch.equal(h[2:], b1.expand(4, D))
        assert torch.equal(mean, x[:, :, 0].reshape(-1))
        # the variance is exactly 0 too (h = b holds whatever rstd is, but the backward scales by it): the shortcut
        # mean(c²) - dm² left a residue, contracted to an FMA on a GPU (0.3% of rstd at eps = 1e-12 on the H100)
        torch.testing.assert_close(rstd, torch.full_like(rstd, eps**-0.5), rtol=1e-5, atol=0)


def test_block_with_triton_backend_matches_the_official_block():
    cfg = vf.preset("vlmo_tiny_patch16", embed_dim=32, num_heads=2, image_size=32, max_text_len=8)
    fast = FastBlock(cfg, drop_path=0.2, with_vlffn=False)
    official = OfficialBlock(cfg, drop_path=0.2, with_vlffn=False)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.05 * torch.randn_like(p))
    official.load_state_dict(fast.state_dict())
    fast.backend = "triton"
    n = 8 + 5
    x = torch.randn(3, n, 32, requires_grad=True)
    keep = torch.ones(3, n, dtype=torch.bool)
    keep[1, 4:8] = False
    table = torch.randn(relpos.num_table_rows(2), 2 * cfg.depth, requires_grad=True)
    index = relpos.fusion_relative_position_index(8, 2)
    outs = []
    for block, call in ((fast, lambda: fast(x, keep, "vl", (table[:, :2], index))),
                        (official, lambda: official(x, mask=keep.long(), modality_type="vl",
                                                    relative_position_bias=table[:, :2].t()[:, index]))):
        block.train()
        torch.manual_seed(21)
        out = call()
        outs.append((out,) + torch.autograd.grad(out, [x, table] + list(block.parameters()), torch.ones_like(out)))
    for a, e in zip(*outs):
        assert torch.allclose(a, e, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_ffn_and_residual_at_vlmo_base_sizes(dtype):
    """The compiled Triton FFN and LayerScale-residual kernels on the card at VLMo-base sizes (D = 768, 4D hidden,
    N = 237 split at 40) under autocast: the output and every gradient within twice the error of the official math
    run the same way (the PyTorch path), both against float64; the Triton kernels are what ran."""
    from vlmo_fast.ops import backend as ops_backend

    dev, d, hid = "cuda", 768, 3072
    gen = torch.Generator().manual_seed(5)

    def param(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=gen)).to(dev).requires_grad_()

    experts = [ops.FFNExpert(param(d, scale=0.1, shift=1.0), param(d, scale=0.1), param(hid, d, scale=0.03),
                             param(hid, scale=0.1), param(d, hid, scale=0.02), param(d, scale=0.1)) for _ in range(2)]
    gamma = param(d, scale=0.05, shift=0.1)
    x = param(4, 237, d)
    ref = reference_ffn(x, experts, 40, gamma)
    ops_backend.clear_selected()
    with torch.autocast("cuda", dtype=dtype):
        out = ops.multiway_ffn(x, experts, split=40, gamma=gamma, backend="triton")
        assert ops_backend.last_selected()["multiway_ffn"] == "triton"
        eager = ops.multiway_ffn(x, experts, split=40, gamma=gamma, backend="torch")
    g = torch.randn(out.shape, generator=gen).to(dev)
    assert_within_twice_eager(out, eager, ref, leaves_of(x, experts, gamma), g, what="ffn ")
    # the attention half's residual: x + γ·y with y the projection's low-precision output
    y = param(4, 237, d).detach().to(dtype).requires_grad_()
    ops_backend.clear_selected()
    res = ops.scaled_residual(x, y, gamma, backend="triton")
    assert ops_backend.last_selected()["scaled_residual"] == "triton"
    eager = ops.scaled_residual(x, y, gamma, backend="torch")
    ref = x.double() + gamma.double() * y.double()
    leaves = [x, y, gamma]
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(l64[0] + l64[2] * l64[1], l64, g.double())
    got, base = torch.autograd.grad(res, leaves, g), torch.autograd.grad(eager, leaves, g)
    for i, (a, r, e) in enumerate(zip((res,) + got, (ref,) + want, (eager,) + base)):
        err, err_eager = (a.double() - r).abs().max(), (e.double() - r).abs().max()
        assert err <= 2 * err_eager + 1e-6, f"residual tensor {i}: {err:.2e} vs eager {err_eager:.2e}"


# ---- the attention half's prologue (norm_linear) and the first residual taken inside the FFN op -----------------


def norm_linear_params(out_features=3 * D, dtype=torch.float32, with_bias=True):
    parts = [1 + 0.1 * torch.randn(D), 0.1 * torch.randn(D), 0.05 * torch.randn(out_features, D)]
    parts.append(0.1 * torch.randn(out_features) if with_bias else None)
    return [p if p is None else p.to(dtype).requires_grad_() for p in parts]


def reference_norm_linear(x, nw, nb, w, b):
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    return F.linear(F.layer_norm(x.double(), (x.shape[-1],), nw.double(), nb.double(), 1e-6), w.double(), d64(b))


@pytest.mark.parametrize("n", [237, 1, 13])
@pytest.mark.parametrize("with_bias", [True, False])
def test_norm_linear_fp32_matches_float64(n, with_bias):
    x = with_large_mean_rows(torch.randn(2, n, D) * 3 + 1).requires_grad_()
    params = norm_linear_params(with_bias=with_bias)
    out = ops.norm_linear(x, *params, backend="triton")
    eager = ops.norm_linear(x, *params, backend="torch")
    ref = reference_norm_linear(x, *params)
    assert out.shape == (2, n, 3 * D) and out.dtype == torch.float32
    leaves = [x] + [p for p in params if p is not None]
    assert_within_twice_eager(out, eager, ref, leaves, torch.randn_like(out), rel_slack=True)


def test_norm_linear_under_autocast_within_twice_eager_error_and_strided_x():
    x = with_large_mean_rows(torch.randn(3, 45, D)).requires_grad_()
    params = norm_linear_params()
    g = torch.randn(3, 45, 3 * D)
    for xs in (x, strided(x, "transposed")):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.norm_linear(xs, *params, backend="triton")
            eager = ops.norm_linear(xs, *params, backend="torch")
        assert out.dtype == eager.dtype == torch.bfloat16  # the projection runs in the autocast dtype, as F.linear
        assert_within_twice_eager(out, eager, reference_norm_linear(xs, *params), [xs] + params, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_within_twice_eager_error(dtype):
    """A model held in fp16/bf16 without autocast: x, every parameter and the attention output in that dtype (and
    rows with a large mean). The FFN op (alone and taking the attention residual), norm_linear and scaled_residual:
    the output and every gradient within twice the error of the official math in that dtype, both against float64
    computed from the very same (rounded) inputs, with unrounded reference gradients."""

    def half(t):
        return t.detach().to(dtype).requires_grad_()

    def f64(ts):
        return [t.detach().double().requires_grad_() for t in ts]

    x = half(with_large_mean_rows(torch.randn(2, 29, D)))
    y = half(torch.randn(2, 29, D))
    experts = [expert(dtype), expert(dtype)]
    gamma, attn_gamma = (half(0.1 + 0.05 * torch.randn(D)) for _ in range(2))
    for with_res in (False, True):
        kw = dict(split=12, gamma=gamma, attn_out=y, attn_gamma=attn_gamma) if with_res else dict(split=12, gamma=gamma)
        out = ops.multiway_ffn(x, experts, backend="triton", **kw)
        eager = ops.multiway_ffn(x, experts, backend="torch", **kw)
        assert out.dtype == eager.dtype == dtype
        leaves = ([y, attn_gamma] if with_res else []) + leaves_of(x, experts, gamma)
        l64 = f64(leaves)
        e64 = [ops.FFNExpert(*l64[-12:-6]), ops.FFNExpert(*l64[-6:])]
        if with_res:
            ref = reference_block_tail(l64[2], l64[0], l64[1], e64, 12, l64[3])
        else:
            ref = reference_ffn(l64[0], e64, 12, l64[1])
        assert_within_twice_eager(out, eager, ref, leaves, torch.randn(out.shape).to(dtype),
                                  what=f"ffn (attention residual {with_res}) ", ref_leaves=l64)
    params = [half(p) for p in norm_linear_params()]
    out = ops.norm_linear(x, *params, backend="triton")
    eager = ops.norm_linear(x, *params, backend="torch")
    assert out.dtype == eager.dtype == dtype
    l64 = f64([x] + params)
    assert_within_twice_eager(out, eager, reference_norm_linear(*l64), [x] + params,
                              torch.randn(out.shape).to(dtype), what="norm_linear ", ref_leaves=l64)
    out = ops.scaled_residual(x, y, gamma, backend="triton")
    eager = ops.scaled_residual(x, y, gamma, backend="torch")
    assert out.dtype == eager.dtype == dtype
    l64 = f64([x, y, gamma])
    assert_within_twice_eager(out, eager, l64[0] + l64[2] * l64[1], [x, y, gamma], torch.randn(out.shape).to(dtype),
                              what="scaled_residual ", ref_leaves=l64)


def test_norm_linear_rejects_bad_arguments():
    x = torch.randn(2, 5, D)
    nw, nb, w, b = norm_linear_params()
    with pytest.raises(ValueError, match="x must be 3-D"):
        ops.norm_linear(x[0], nw, nb, w, b)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(32,\)"):
        ops.norm_linear(x, nw[:-1], nb, w, b)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.norm_linear(x, nw, nb, w[0], b)
    with pytest.raises(ValueError, match=r"weight must have shape \(96, 32\)"):
        ops.norm_linear(x, nw, nb, w[:, :-1], b)
    with pytest.raises(ValueError, match=r"bias must have shape \(96,\)"):
        ops.norm_linear(x, nw, nb, w, b[:-1])
    with pytest.raises(TypeError, match=r"weight must have x's dtype \(torch.bfloat16\) outside autocast"):
        ops.norm_linear(x.bfloat16(), nw, nb, w, b)
    for i, name in enumerate(("norm_weight", "norm_bias", "weight")):  # LayerNorm without affine: not this op
        args = [nw, nb, w]
        args[i] = None
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got NoneType"):
            ops.norm_linear(x, *args, b)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_norm_linear_and_ffn_take_empty_inputs(shape):
    x = torch.randn(*shape, D, requires_grad=True)
    params = norm_linear_params()
    out = ops.norm_linear(x, *params, backend="triton")
    assert out.shape == (*shape, 3 * D)
    grads = torch.autograd.grad(out.sum(), [x] + params)
    assert grads[0].shape == x.shape and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    y = torch.randn(*shape, D, requires_grad=True)
    out = ops.multiway_ffn(x, [expert(), expert()], split=0, gamma=torch.ones(D), attn_out=y, backend="triton")
    assert out.shape == x.shape
    assert torch.autograd.grad(out.sum(), y)[0].shape == y.shape


def reference_block_tail(x, y, attn_gamma, experts, split, gamma):
    """float64: the attention half's residual x + γ1·y, then the Multiway FFN (no DropPath)."""
    x1 = x.double() + (attn_gamma.double() if attn_gamma is not None else 1.0) * y.double()
    return reference_ffn(x1, experts, split, gamma)


@pytest.mark.parametrize("with_attn_gamma", [True, False])
def test_ffn_takes_the_attention_residual(with_attn_gamma):
    x = torch.randn(2, 29, D, requires_grad=True)
    y = torch.randn(2, 29, D, requires_grad=True)
    attn_gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_() if with_attn_gamma else None
    experts = [expert(), expert()]
    gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_()
    out = ops.multiway_ffn(x, experts, split=12, gamma=gamma, attn_out=y, attn_gamma=attn_gamma, backend="triton")
    eager = ops.multiway_ffn(x, experts, split=12, gamma=gamma, attn_out=y, attn_gamma=attn_gamma, backend="torch")
    ref = reference_block_tail(x, y, attn_gamma, experts, 12, gamma)
    leaves = [y] + ([attn_gamma] if attn_gamma is not None else []) + leaves_of(x, experts, gamma)
    assert_within_twice_eager(out, eager, ref, leaves, torch.randn_like(out), rel_slack=True)


def test_ffn_with_the_attention_residual_is_the_two_ops_bit_for_bit():
    """Taking the first residual inside the FFN op (and recomputing it in the backward) changes no bit of the output
    or of any gradient against the residual op followed by the FFN op, DropPath included (the same draws, in the
    same order: the attention half's first); under autocast too."""
    x = torch.randn(3, 29, D, requires_grad=True)
    y = torch.randn(3, 29, D).bfloat16().requires_grad_()
    attn_gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_()
    experts = [expert(), expert()]
    gamma = (0.1 + 0.05 * torch.randn(D)).requires_grad_()
    leaves = [y, attn_gamma] + leaves_of(x, experts, gamma)
    for autocast in (False, True):
        results = []
        for fused in (True, False):
            torch.manual_seed(5)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if fused:
                    out = ops.multiway_ffn(x, experts, split=12, gamma=gamma, drop_path=0.4, training=True,
                                           attn_out=y, attn_gamma=attn_gamma, backend="triton")
                else:
                    x1 = ops.scaled_residual(x, y, attn_gamma, drop_path=0.4, training=True, backend="triton")
                    out = ops.multiway_ffn(x1, experts, split=12, gamma=gamma, drop_path=0.4, training=True,
                                           backend="triton")
            results.append((out,) + torch.autograd.grad(out, leaves, torch.ones_like(out)))
        for i, (a, e) in enumerate(zip(*results)):
            assert torch.equal(a, e), f"tensor {i} (autocast {autocast})"


def test_ffn_attention_residual_arguments_are_checked():
    x = torch.randn(2, 9, D)
    experts = [expert()]
    with pytest.raises(ValueError, match=r"attn_out must have shape \(2, 9, 32\)"):
        ops.multiway_ffn(x, experts, attn_out=x[:, :3])
    with pytest.raises(ValueError, match="attn_gamma is given without attn_out"):
        ops.multiway_ffn(x, experts, attn_gamma=torch.ones(D))
    with pytest.raises(ValueError, match=r"attn_gamma must have shape \(32,\)"):
        ops.multiway_ffn(x, experts, attn_out=x, attn_gamma=torch.ones(D + 1))
    for backend in ("auto", "triton", "torch"):  # the sum would be promoted past the FFN's weights
        with pytest.raises(TypeError, match=r"attn_out must not be wider than x \(torch.float16\), got torch.float32"):
            ops.multiway_ffn(x.half(), [expert(torch.float16)], attn_out=x, backend=backend)
        with pytest.raises(TypeError, match=r"attn_gamma must not be wider than x \(torch.float32\), got torch.float64"):
            ops.multiway_ffn(x, experts, attn_out=x, attn_gamma=torch.ones(D, dtype=torch.float64), backend=backend)


def test_droppath_draws_in_the_dtype_of_the_official_branch():
    """The official DropPath draws its random numbers in the dtype of γ·y: bf16 for a layer-scale-free model
    (base_plus) under bf16 autocast, whose bf16 draws give about 1 mask in 200 different from fp32 ones. The Triton
    ops draw in that dtype too, so both backends drop the same samples (and follow the same random stream)."""
    x = torch.randn(1200, 1, D, requires_grad=True)  # many samples (draws), few rows (the interpreter is slow)
    y = torch.randn(1200, 1, D).bfloat16().requires_grad_()
    experts = [expert(), expert()]
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(13)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.multiway_ffn(x, experts, split=1, drop_path=0.5, training=True, attn_out=y, backend=backend)
            res = ops.scaled_residual(x, y, None, drop_path=0.5, training=True, backend=backend)
        results.append((out, res, torch.rand(1)))
    (out, res, after), (eager_out, eager_res, eager_after) = results
    assert torch.equal(after, eager_after)  # the same amount of the random stream consumed
    assert torch.allclose(res, eager_res, atol=1e-6)  # a different mask would change a whole sample by |y| ~ 1
    assert torch.allclose(out, eager_out, atol=1e-2)


def test_fused_block_keeps_under_half_the_activations_of_the_official_block():
    """One VLMo-base fusion layer (N = 237 = 40 text + 197 image, D = 768) in training under bf16 autocast: what the
    Triton block keeps for its backward, itemised below, and less than half of what the official block keeps. Not
    kept: the two LayerNorm outputs (recomputed from their inputs), the residual stream between the halves
    (recomputed from the block input and the attention output), GELU's output, the attention probabilities."""
    cfg = vf.preset("vlmo_base_patch16")
    lt, w = 40, 14
    n, d, heads = lt + w * w + 1, cfg.embed_dim, cfg.num_heads
    index = relpos.fusion_relative_position_index(lt, w)
    table = torch.randn(relpos.num_table_rows(w), heads, requires_grad=True)
    fast = FastBlock(cfg, drop_path=0.1, with_vlffn=False).train()
    fast.backend = "triton"
    official = OfficialBlock(cfg, drop_path=0.1, with_vlffn=False).train()

    def run(block, official_call):
        def go(batch):
            x = torch.randn(batch, n, d, requires_grad=True)
            keep = torch.ones(batch, n, dtype=torch.bool)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if official_call:
                    block(x, mask=keep.long(), modality_type="vl", relative_position_bias=table.t()[:, index])
                else:
                    block(x, keep, "vl", (table, index))
        return go

    ours = saved_bytes_per_sample(run(fast, False))
    theirs = saved_bytes_per_sample(run(official, True))
    bf16, fp32 = 2, 4
    expected = (n * d * fp32  # the block input (LayerNorm 1's backward; the residual is recomputed from it)
                + 3 * n * d * bf16  # q, k, v
                + n * d * bf16  # the attention output (the projection's input)
                + n * d * bf16  # what rounding it lost (the bias gradient's row sums)
                + 2 * heads * n * fp32  # the attention's row statistics (max and 1/sum)
                + n * d * bf16  # the projection's output (γ1's gradient, and the recomputed residual)
                + n * 4 * d * bf16  # fc1's output (GELU recomputed from it)
                + n * d * bf16  # fc2's output (γ2's gradient)
                + n  # the key padding mask (bool)
                + 2 * 2 * fp32)  # the DropPath factors (two per sample for each half)
    assert ours == expected, (ours, expected)
    assert ours < 0.5 * theirs, (ours, theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_norm_linear_and_attention_residual_at_vlmo_base_sizes(dtype):
    """On the card at VLMo-base sizes under autocast: the qkv(norm1(x)) prologue (D = 768 -> 2304) and the FFN op
    taking the attention half's residual, output and every gradient within twice the official math's error against
    float64; the Triton implementations are what ran."""
    from vlmo_fast.ops import backend as ops_backend

    dev, d, hid, n = "cuda", 768, 3072, 237
    gen = torch.Generator().manual_seed(9)

    def param(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=gen)).to(dev).requires_grad_()

    def check(out, eager, ref, leaves, what):
        assert_within_twice_eager(out, eager, ref, leaves, torch.randn(out.shape, generator=gen).to(dev), what=what)

    x = param(4, n, d)
    params = [param(d, scale=0.1, shift=1.0), param(d, scale=0.1), param(3 * d, d, scale=0.03), param(3 * d, scale=0.1)]
    ops_backend.clear_selected()
    with torch.autocast("cuda", dtype=dtype):
        out = ops.norm_linear(x, *params, backend="triton")
        assert ops_backend.last_selected()["norm_linear"] == "triton"
        eager = ops.norm_linear(x, *params, backend="torch")
    check(out, eager, reference_norm_linear(x, *params), [x] + params, "norm_linear ")

    experts = [ops.FFNExpert(param(d, scale=0.1, shift=1.0), param(d, scale=0.1), param(hid, d, scale=0.03),
                             param(hid, scale=0.1), param(d, hid, scale=0.02), param(d, scale=0.1)) for _ in range(2)]
    gamma, attn_gamma = param(d, scale=0.05, shift=0.1), param(d, scale=0.05, shift=0.1)
    y = param(4, n, d).detach().to(dtype).requires_grad_()
    kw = dict(split=40, gamma=gamma, attn_out=y, attn_gamma=attn_gamma)
    ops_backend.clear_selected()
    with torch.autocast("cuda", dtype=dtype):
        out = ops.multiway_ffn(x, experts, backend="triton", **kw)
        assert ops_backend.last_selected()["multiway_ffn"] == "triton"
        eager = ops.multiway_ffn(x, experts, backend="torch", **kw)
    check(out, eager, reference_block_tail(x, y, attn_gamma, experts, 40, gamma),
          [y, attn_gamma] + leaves_of(x, experts, gamma), "ffn with the attention residual ")


def test_compile_traces_the_triton_block_without_graph_breaks():
    """A whole Multiway block on the Triton backend (norm_linear, attention, the FFN op with the first residual)
    traces into one graph, forward and backward, with the same results as eager."""
    cfg = vf.preset("vlmo_tiny_patch16", embed_dim=32, num_heads=2, image_size=32, max_text_len=8)
    block = FastBlock(cfg, drop_path=0.0, with_vlffn=False).train()
    block.backend = "triton"
    x = torch.randn(2, 13, 32, requires_grad=True)
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[1, 3:8] = False
    table = torch.randn(relpos.num_table_rows(2), 2, requires_grad=True)
    index = relpos.fusion_relative_position_index(8, 2)

    def f(x_):
        return block(x_, keep, "vl", (table, index))

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    eager = f(x)
    assert torch.allclose(out, eager, atol=1e-6)
    leaves = [x, table] + list(block.parameters())
    for a, e in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(eager.sum(), leaves)):
        assert torch.allclose(a, e, atol=1e-5)


def test_experts_without_some_parameters_and_double_backward_are_clear():
    """A LayerNorm without affine parameters or a Linear without bias (the PyTorch path takes them) is a reason the
    kernels step aside for, not an AttributeError inside them; a second derivative through the fused FFN is a clear
    error, not one about out= arguments."""
    x = torch.randn(2, 5, D)
    e = expert()
    for field in ("norm_weight", "fc1_bias"):
        partial = e._replace(**{field: None})
        with pytest.raises(ValueError, match="an expert without a LayerNorm affine weight/bias or a Linear bias"):
            ops.multiway_ffn(x, [partial], backend="triton")
        assert ops.multiway_ffn(x, [partial], backend="auto").shape == x.shape  # the PyTorch path
    xg = x.clone().requires_grad_()
    out = ops.multiway_ffn(xg, [e], backend="triton")
    upstream = torch.ones_like(out, requires_grad=True)
    (g,) = torch.autograd.grad(out, xg, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="a second derivative through a fused kernel op is not implemented"):
        g.sum().backward()
    # a gradient penalty: the incoming gradient (of out.sum()) needs none, the inputs do; once_differentiable gave
    # the gradient as a constant here, so the penalty's gradient was silently wrong
    (g,) = torch.autograd.grad(ops.multiway_ffn(xg, [e], backend="triton").sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="a second derivative through a fused kernel op is not implemented"):
        ((g * xg).sum() + (g * g).sum()).backward()


def test_eager_calls_skip_the_custom_op_dispatch_and_compiled_graphs_hold_the_ops():
    """Eager calls run the kernels' Python entry points directly (the custom-op dispatch costs about 8 us a call on
    the host, which a small-batch or inference step is made of); a compiled graph holds the custom ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    cfg = vf.preset("vlmo_tiny_patch16", embed_dim=32, num_heads=2, image_size=32, max_text_len=8)
    block = FastBlock(cfg, drop_path=0.0, with_vlffn=False).train()
    block.backend = "triton"
    x = torch.randn(2, 13, 32, requires_grad=True)
    table = torch.randn(relpos.num_table_rows(2), 2, requires_grad=True)
    index = relpos.fusion_relative_position_index(8, 2)
    with Seen() as seen:
        block(x, None, "vl", (table, index)).sum().backward()
    assert not [op for op in seen.ops if op.startswith("vlmo_fast.")], seen.ops
    assert x.grad is not None and table.grad is not None

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    torch.compile(lambda t: block(t, None, "vl", (table, index)), backend=counter, fullgraph=True)(x)
    code = "".join(m.code for g in counter.graphs for m in g.modules() if hasattr(m, "code"))  # (subgraphs too)
    assert "vlmo_fast.rel_pos_attn_fwd" in code and "vlmo_fast.multiway_ln_fwd" in code, code
