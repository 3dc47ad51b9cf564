"""The Triton rel-pos attention kernel: on CPU through Triton's interpreter (TRITON_INTERPRET=1, set in conftest)
against float64 references; on GPU (marked `gpu`) against the flash-attention numerics rule and for determinism."""

import pytest
import torch

import vlmo_fast as vf
from vlmo_fast import ops
from vlmo_fast.model import relpos
from vlmo_fast.ops import backend as ops_backend
from vlmo_fast.ops import triton_attention as ta
from vlmo_fast.reference import ReferenceVLMo

from attn_ref import eager_attention, reference_attention
from attn_ref import padding as _padding
from numerics import assert_twice_eager
from threads import run_in_threads

on_gpu = torch.cuda.is_available()
# Without CUDA the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1); with CUDA the
# interpreter is off and the Triton backend refuses CPU tensors, so every tensor of the tests below (inputs, masks,
# indices, tables, biases, upstream gradients) is made on DEV.
DEV = "cuda" if on_gpu else "cpu"
EPS32 = torch.finfo(torch.float32).eps


# The fp32 tests' floor for the 2x rule, in ulps of the float64 result's largest magnitude: kernel and eager errors
# are both about an ulp there, so twice the eager error alone depends on which of them happened to round luckier
# (30 seeds needed at most 2.4 ulps on top of it).
FP32_ULPS = 8


def fp32_floor(want):
    return FP32_ULPS * EPS32 * want.abs().max().item()


def qkv_views(b, h, n, d, dtype=torch.float32, device=DEV):
    """q, k, v as the model makes them: permuted views of one (B, N, 3, H, D) projection (strided, not contiguous)."""
    qkv = torch.randn(b, n, 3, h, d, dtype=dtype, device=device).permute(2, 0, 3, 1, 4)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
    return q, k, v


def padding(b, n, full_row=None, device=DEV):
    return _padding(b, n, full_row, device)


def fusion_index(n, device=DEV):
    """A real VLMo fusion index of length n when n = Lt + W² + 1 for a small W, else a random index."""
    for w in (2, 3, 4, 14):
        lt = n - (w * w + 1)
        if 1 <= lt <= 196:
            return relpos.fusion_relative_position_index(lt, w).to(device), relpos.num_table_rows(w)
    return torch.randint(0, 50, (n, n), device=device), 50


def leaves64(*tensors):
    """float64 copies of the leaves for the reference: its gradients must not be rounded to the inputs' dtype."""
    return [t.detach().double().requires_grad_() for t in tensors]


def grads(out, leaves, g):
    return torch.autograd.grad(out, leaves, g, retain_graph=True)


def check_close(got, want, rtol=2e-5, name=""):
    # relative to the tensor's magnitude, floored so that rounding noise on an exactly-zero gradient
    # (e.g. dq with a single key) does not count as an error
    scale = want.abs().max().clamp_min(1e-2)
    err = (got.double() - want.double()).abs().max() / scale
    assert err <= rtol, f"{name}: relative error {err:.2e}"


def check_twice_eager(names, got, eager, want, floor=0.0):
    """The numerics rule: each result's max error against float64 at most twice the eager math's in the same precision
    (same inputs), plus ``floor`` (a float, or a callable of the reference giving one), plus, for an fp16/bf16 result,
    the error of the reference itself rounded to that precision (tests/numerics.py)."""
    for name, a, e, r in zip(names, got, eager, want):
        assert torch.isfinite(a).all(), name
        assert_twice_eager(name, a, e, r, floor(r) if callable(floor) else floor)


@pytest.mark.parametrize(
    "n,form,b",
    [(1, "table", 2), (29, "table", 3), (45, "dense", 2), (45, "none", 2), (97, "table", 2), (237, "table", 2),
     (257, "dense", 3), (257, "table", 3)],
)
def test_fp32_matches_float64(n, form, b):
    h, d = 2, 16
    q, k, v = qkv_views(b, h, n, d)
    index, rows = fusion_index(n)
    full = torch.randn(rows, 3 * h, device=DEV, requires_grad=True)
    dense = torch.randn(h, n, n, device=DEV, requires_grad=True)
    keep = padding(b, n, full_row=2 if b > 2 else None)
    kw = {"table": dict(bias_table=full[:, h : 2 * h], bias_index=index), "dense": dict(bias=dense), "none": {}}[form]

    def bias_of(full, dense):
        return {"table": full[:, h : 2 * h].t()[:, index], "dense": dense, "none": None}[form]

    def leaves_of(q, k, v, full, dense):
        return [q, k, v] + ({"table": [full], "dense": [dense], "none": []}[form])

    leaves = leaves_of(q, k, v, full, dense)
    out = ops.rel_pos_attention(q, k, v, key_padding_mask=keep, backend="triton", **kw)
    l64 = leaves64(q, k, v, full, dense)
    ref = reference_attention(*l64[:3], bias_of(*l64[3:]), keep)
    eager = eager_attention(q, k, v, bias_of(full, dense), keep)  # the official math in fp32: the rounding yardstick
    if b > 2:
        assert torch.all(out[2] == 0)  # fully padded batch row: zeros, not NaN
    g = torch.randn_like(out)
    got, want, base = grads(out, leaves, g), grads(ref, leaves_of(*l64), g.double()), grads(eager, leaves, g)
    # A gradient that is exactly 0 (one key: dS = dP - delta = 0, so dq, dk and the bias gradient) has no eager error
    # to compare with, but the kernel's dP = dO·v and delta = dO·O are two D-term fp32 sums of the same products,
    # whose difference is rounding noise of about sqrt(D)·eps·Σ|dO·v|, times scale·|k| (dq), scale·|q| (dk) or B
    # (dbias). Any other result gets a few ulps of its magnitude (fp32_floor).
    cancel = EPS32 * d**0.5 * (g.abs() * v.abs()).sum(-1).max().item()
    zero_floor = cancel * max(d**-0.5 * max(q.abs().max().item(), k.abs().max().item()), b)

    def floor(want):
        return fp32_floor(want) if want.abs().max() > 0 else zero_floor

    check_twice_eager(["out", "dq", "dk", "dv", "dbias"], (out,) + got, (eager,) + base, (ref,) + want, floor)
    if form == "table":  # only this layer's columns of the full table receive gradient
        assert got[3][:, :h].abs().sum() == 0 and got[3][:, 2 * h :].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["table", "dense"])
def test_low_precision_within_twice_eager_error(dtype, form):
    """fp16/bf16 output and every gradient (the table's or the dense bias's) within twice the error of the official
    math in the same precision (same inputs), both measured against float64; a half and a fully padded batch row."""
    b, h, n, d = 3, 2, 45, 32
    q32, k32, v32 = qkv_views(b, h, n, d)
    index, rows = fusion_index(n)
    bias_leaf = (torch.randn(rows, h, device=DEV) if form == "table" else torch.randn(h, n, n, device=DEV))
    bias_leaf.requires_grad_()
    keep = padding(b, n, full_row=2)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32))

    def bias_of(leaf):
        return leaf.t()[:, index] if form == "table" else leaf

    kw = dict(bias_table=bias_leaf, bias_index=index) if form == "table" else dict(bias=bias_leaf)
    out = ops.rel_pos_attention(q, k, v, key_padding_mask=keep, backend="triton", **kw)
    assert out.dtype == dtype
    assert torch.all(out[2] == 0)  # the fully padded batch row: zeros, not NaN
    eager = eager_attention(q, k, v, bias_of(bias_leaf), keep)
    l64 = leaves64(q, k, v, bias_leaf)  # the exact inputs, differentiated in float64: the gradients are not rounded
    ref = reference_attention(*l64[:3], bias_of(l64[3]), keep)
    g = torch.randn_like(out)
    leaves = [q, k, v, bias_leaf]
    got, want, base = grads(out, leaves, g), grads(ref, l64, g.double()), grads(eager, leaves, g)
    check_twice_eager(["out", "dq", "dk", "dv", "dbias"], (out,) + got, (eager,) + base, (ref,) + want, 1e-6)
    assert torch.all(got[0][2] == 0) and torch.all(got[1][2] == 0) and torch.all(got[2][2] == 0)


def test_fp32_inputs_under_autocast_give_the_autocast_dtype_like_the_torch_path():
    """Under autocast the official math's products (and the PyTorch path's) run in the autocast dtype and give it:
    fp32 q, k, v through the kernels give bf16 too, within twice the error of that path against float64, with fp32
    gradients for every leaf."""
    b, h, n, d = 2, 2, 45, 32
    q, k, v = (t.requires_grad_() for t in qkv_views(b, h, n, d))
    index, rows = fusion_index(n)
    table = torch.randn(rows, h, device=DEV, requires_grad=True)
    keep = padding(b, n, full_row=1)
    leaves = [q, k, v, table]
    g = torch.randn(b, h, n, d, device=DEV)
    results = {}
    for backend in ("triton", "torch"):
        with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
            out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep,
                                        backend=backend)
        assert out.dtype == torch.bfloat16, backend
        results[backend] = (out,) + grads(out, leaves, g.to(out.dtype))
        assert [t.dtype for t in results[backend][1:]] == [torch.float32] * 4, backend
    l64 = leaves64(q, k, v, table)
    ref = reference_attention(*l64[:3], l64[3].t()[:, index], keep)
    want = (ref,) + grads(ref, l64, g.to(torch.bfloat16).double())
    check_twice_eager(["out", "dq", "dk", "dv", "dtable"], results["triton"], results["torch"], want, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_gradient_uses_the_unrounded_output(dtype):
    """delta = Σ_d dO·O from the output rounded to fp16/bf16 errs alike for every score of a row, and the bias
    gradient sums whole rows: the H100 run failed the 2x rule on it (fp16, N = 941). The forward keeps what the
    rounding lost when the bias needs a gradient, and what rounding P for the P·V product lost (the interpreter rounds
    P as the GPU does): without the second part the low part did not help, and the kernel reached 3.8x the official
    math's error at N = 237 on some seeds. The table gradient is now far more exact than the official math's."""
    b, h, n, d = 2, 2, 237, 64
    index, rows = relpos.fusion_relative_position_index(40, 14).to(DEV), relpos.num_table_rows(14)
    q, k, v = (torch.randn(b, h, n, d, device=DEV).to(dtype).requires_grad_() for _ in range(3))
    table = (torch.randn(rows, h, device=DEV) * 0.5).requires_grad_()
    keep = padding(b, n)
    l64 = leaves64(q, k, v, table)
    ref = reference_attention(*l64[:3], l64[3].t()[:, index], keep)
    g = torch.randn(b, h, n, d, device=DEV).to(dtype)
    want = torch.autograd.grad(ref, l64[3], g.double())[0]
    eager = eager_attention(q, k, v, table.t()[:, index], keep)
    err_eager = (torch.autograd.grad(eager, table, g)[0].double() - want).abs().max()
    errors = {}
    for store_lo in (True, False):
        out, _, lo = ta.rel_pos_attn_fwd(q, k, v, None, table, index, keep, d**-0.5, store_lo)
        assert lo.shape == (out.shape if store_lo else (0,))
        errors[store_lo] = (torch.autograd.grad(out, table, g)[0].double() - want).abs().max()
    assert errors[True] <= 0.1 * errors[False] and errors[True] <= 0.1 * err_eager, (errors, err_eager)
    # the public op keeps the low part exactly when the bias needs a gradient
    calls = []
    real = ta._forward

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    ta._forward = spy
    try:
        ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, backend="triton")
        ops.rel_pos_attention(q, k, v, bias_table=table.detach(), bias_index=index, backend="triton")
        with torch.no_grad():
            ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, backend="triton")
        ta.KEEP_LOW_PART = False  # (the benchmark's measure of its cost)
        ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, backend="triton")
    finally:
        ta._forward, ta.KEEP_LOW_PART = real, True
    assert calls == [True, False, False, False]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int16, torch.uint8])
def test_every_accepted_index_dtype_gives_the_same_result(index_dtype):
    """The op accepts int64, int32, int16 and uint8 indices: each is used as positions (a uint8 tensor used directly
    as an index would be read as a mask)."""
    b, h, n, d = 2, 2, 29, 16
    q, k, v = qkv_views(b, h, n, d)
    table = torch.randn(50, h, device=DEV, requires_grad=True)
    index = torch.randint(0, 50, (n, n), device=DEV)
    keep = padding(b, n)
    results = []
    for idx in (index, index.to(index_dtype)):
        out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=idx, key_padding_mask=keep,
                                    backend="triton")
        results.append((out,) + grads(out, [q, k, v, table], torch.ones_like(out)))
    for a, e in zip(*results):
        assert torch.equal(a, e)


def two_runs_against_float64(b, h, n, d, keep, scale=None):
    """Two forward+backward passes with a table bias (fp32): the same bits, and the output and every gradient (dq,
    dk, dv, dtable) within twice the eager error against float64. Returns the first run's results."""
    q, k, v = qkv_views(b, h, n, d)
    index, rows = fusion_index(n)
    table = torch.randn(rows, h, device=DEV, requires_grad=True)
    leaves = [q, k, v, table]
    g = torch.randn(b, h, n, d, device=DEV)
    runs = []
    for _ in range(2):
        out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep, scale=scale,
                                    backend="triton")
        runs.append((out,) + grads(out, leaves, g))
    for a, e in zip(*runs):
        assert torch.equal(a, e)
    l64 = leaves64(*leaves)
    ref = reference_attention(*l64[:3], l64[3].t()[:, index], keep, scale=scale)
    eager = eager_attention(q, k, v, table.t()[:, index], keep, scale=scale)
    want, base = (ref,) + grads(ref, l64, g.double()), (eager,) + grads(eager, leaves, g)
    check_twice_eager(["out", "dq", "dk", "dv", "dtable"], runs[0], base, want, fp32_floor)
    return runs[0]


def test_backward_is_deterministic_and_scale_is_honoured():
    """Two backward passes give the same bits, and a custom scale reaches the forward and every gradient (dq, dk, dv
    and the table's), each checked against float64 under the same scale."""
    two_runs_against_float64(2, 2, 29, 16, padding(2, 29), scale=0.3)


def test_deterministic_mode_runs_fixed_configurations_without_the_autotuner(monkeypatch, deterministic_mode):
    """Under torch.use_deterministic_algorithms(True) the three tuned kernels run DETERMINISTIC_CONFIGS (each one of
    their autotune candidates) and the autotuner is never asked: its timed choice can differ between processes and
    ranks, and with it the order of the sums. Output and every gradient (table included) against float64, at an N no
    tile divides, with padding and a fully masked batch row; two runs give the same bits."""
    from triton.runtime.autotuner import Autotuner

    candidates = {"fwd": ta.FWD_CONFIGS, "dkdv": ta.DKDV_CONFIGS, "dq": ta.DQ_CONFIGS}
    assert set(ta.DETERMINISTIC_CONFIGS) == set(candidates)
    for name, config in ta.DETERMINISTIC_CONFIGS.items():
        assert config in candidates[name], name
        assert config[1] != ta.WHOLE_ROW  # any N
    assert ta.configs_pinned()

    def refuse(self, *args, **kwargs):
        raise AssertionError("the autotuner ran in deterministic mode")

    monkeypatch.setattr(Autotuner, "run", refuse)
    out = two_runs_against_float64(3, 2, 45, 16, padding(3, 45, full_row=2))[0]
    assert torch.all(out[2] == 0)


def _same_bits_as_the_fixed_configurations(monkeypatch, b, h, n, d, dtype):
    """Deterministic mode's results are the fixed configurations' whatever the autotuner would pick: the same bits
    with the autotuners held to other candidates, and as the autotuners' own run of DETERMINISTIC_CONFIGS outside the
    mode."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in qkv_views(b, h, n, d))
    index, rows = fusion_index(n)
    table = torch.randn(rows, h, device=DEV, requires_grad=True)
    keep = padding(b, n)
    g = torch.randn(b, h, n, d, device=DEV, dtype=dtype)

    def run():
        out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep,
                                    backend="triton")
        return (out,) + grads(out, [q, k, v, table], g)

    # other candidates with other key blocks (for the forward and dQ the order their sums take), and query blocks
    others = {name: next(c for c in CANDIDATES[name] if c[1] not in (ta.DETERMINISTIC_CONFIGS[name][1], ta.WHOLE_ROW)
                         and c[0] != ta.DETERMINISTIC_CONFIGS[name][0])
              for name in TUNERS}
    assert torch.are_deterministic_algorithms_enabled()  # the deterministic_mode fixture; it restores the mode
    for name in TUNERS:
        pin(monkeypatch, name, *others[name])
    pinned = run()
    torch.use_deterministic_algorithms(False)
    for name in TUNERS:
        pin(monkeypatch, name, *ta.DETERMINISTIC_CONFIGS[name])
    tuned = run()
    for a, e in zip(pinned, tuned):
        assert torch.equal(a, e)


def test_deterministic_mode_is_the_fixed_configurations(monkeypatch, deterministic_mode):
    _same_bits_as_the_fixed_configurations(monkeypatch, 2, 2, 45, 16, torch.float32)


@pytest.mark.gpu
def test_gpu_deterministic_mode_is_the_fixed_configurations(monkeypatch, deterministic_mode):
    _same_bits_as_the_fixed_configurations(monkeypatch, 16, 12, 237, 64, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_deterministic_mode_ignores_the_sm_count(monkeypatch, deterministic_mode):
    """The dQ kernel groups the batch by the card's SM count, which sets the order the table gradient adds up in; in
    deterministic mode it does not, so cards of one architecture with other SM counts (H100 PCIe 114, SXM 132) agree
    bit for bit."""
    b, h, n, d = 64, 12, 237, 64
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in qkv_views(b, h, n, d))
    index = relpos.fusion_relative_position_index(40, 14).cuda()
    table = torch.randn(1126, h, device="cuda", requires_grad=True)
    keep = padding(b, n)
    runs = []
    for sms in (114, 132, 16):
        monkeypatch.setattr(ta, "_sm_count", lambda index, sms=sms: sms)
        out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep)
        runs.append(grads(out, [table], torch.ones_like(out))[0])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_autotuner_choice_outside_deterministic_mode(monkeypatch):
    """Outside PyTorch's deterministic mode the launches go through the autotuners (PIN_CONFIGS None follows the
    mode; True pins them anyway, as the benchmark's vlmo_fast[deterministic] rows do)."""
    from triton.runtime.autotuner import Autotuner

    assert not torch.are_deterministic_algorithms_enabled()
    assert ta.PIN_CONFIGS is None and not ta.configs_pinned()
    calls = []
    real = Autotuner.run

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counting)
    q, k, v = qkv_views(1, 1, 5, 16)
    out = ops.rel_pos_attention(q, k, v, backend="triton")
    out.sum().backward()
    assert {ta._fwd_tuned, ta._dkdv_tuned, ta._dq_tuned} <= set(calls)
    calls.clear()
    monkeypatch.setattr(ta, "PIN_CONFIGS", True)
    out = ops.rel_pos_attention(q, k, v, backend="triton")
    out.sum().backward()
    assert not calls


def test_dq_grid_takes_a_program_per_batch_row_without_a_bias_gradient(monkeypatch):
    """Without a bias gradient the dQ kernel has no partials to share, so each batch row gets its own programs; with
    one, the batch is grouped for about DQ_PROGRAMS_PER_SM programs per SM. Either way dQ, dK and dV are the same
    bits (each batch row's dQ is the same loop)."""
    assert ta._group_count(128, 12, 237, False, 132) == 128
    monkeypatch.setattr(ta, "interpreting", lambda: False)
    assert ta._group_count(128, 12, 237, True, 132) == 11  # 4 x 132 programs over 4 query blocks x 12 heads
    assert ta._group_count(128, 12, 237, True, 108) == 9
    monkeypatch.setattr(ta, "DQ_PROGRAMS_PER_SM", 16)
    assert ta._group_count(128, 12, 237, True, 132) == 44
    assert ta._group_count(3, 12, 237, True, 132) == 3  # never more groups than batch rows
    monkeypatch.undo()
    b, h, n, d = 3, 2, 29, 16
    q, k, v = qkv_views(b, h, n, d)
    index, rows = fusion_index(n)
    table = torch.randn(rows, h, device=DEV)
    keep = padding(b, n)
    results = []
    for table_grad in (False, True):
        leaf = table.clone().requires_grad_(table_grad)
        out = ops.rel_pos_attention(q, k, v, bias_table=leaf, bias_index=index, key_padding_mask=keep,
                                    backend="triton")
        results.append(grads(out, [q, k, v], torch.ones_like(out)))
    for a, e in zip(*results):
        assert torch.equal(a, e)


def test_whole_row_dq_tiles_only_run_where_a_row_fits():
    """The 16 x 256 dQ candidates keep the batch sum of dS in registers, valid only while one tile holds the whole
    row: the autotuner's pruning drops them past N = 256 (the candidate test above runs them at N = 45), and for head
    dims that are not multiples of 16 (base_plus's 34), where they compile to kilobytes of register spills."""
    import triton

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m, n, _, _ in ta.DQ_CONFIGS]
    whole = [c for c in configs if c.kwargs["BLOCK_N"] == ta.WHOLE_ROW]
    assert whole
    others = [c for c in configs if c not in whole]
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert ta._whole_rows_fit(configs, {"N": 256, "D": 64, "Q": bf16}) == configs
    assert ta._whole_rows_fit(configs, {"N": 237, "D": 48, "Q": bf16}) == configs
    assert ta._whole_rows_fit(configs, {"N": 237, "D": 32, "Q": bf16}) == configs
    assert ta._whole_rows_fit(configs, {"N": 237, "D": 34, "Q": bf16}) == others
    assert ta._whole_rows_fit(configs, {"N": 237, "D": 40, "Q": bf16}) == others
    assert ta._whole_rows_fit(configs, {"N": 257, "D": 64, "Q": bf16}) == others
    # 256-key K and V tiles of 256 bytes per key would not fit an H100's shared memory with 2 stages
    assert ta._whole_rows_fit(configs, {"N": 237, "D": 128, "Q": bf16}) == others
    assert ta._whole_rows_fit(configs, {"N": 237, "D": 64, "Q": fp32}) == others
    assert ta._dq_tuned.early_config_prune is ta._whole_rows_fit


def test_head_dim_padding_34():
    """base_plus has head_dim 34: padded inside the kernel to the next power of two. A half and a fully padded batch
    row, the table bias, and a random upstream gradient: the output and every gradient against float64."""
    b, h, n, d = 3, 2, 40, 34
    q, k, v = qkv_views(b, h, n, d)
    index, rows = fusion_index(n)
    table = torch.randn(rows, h, device=DEV, requires_grad=True)
    keep = padding(b, n, full_row=2)
    leaves = [q, k, v, table]
    out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep, backend="triton")
    assert torch.all(out[2] == 0)
    l64 = leaves64(*leaves)
    ref = reference_attention(*l64[:3], l64[3].t()[:, index], keep)
    eager = eager_attention(q, k, v, table.t()[:, index], keep)
    g = torch.randn_like(out)
    got, want = (out,) + grads(out, leaves, g), (ref,) + grads(ref, l64, g.double())
    check_twice_eager(["out", "dq", "dk", "dv", "dtable"], got, (eager,) + grads(eager, leaves, g), want, fp32_floor)


def test_unsupported_inputs_raise_with_explicit_backend():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="backend='triton' cannot run these inputs: dtype"):
        ops.rel_pos_attention(q, q, q, backend="triton")
    big = torch.randn(1, 1, 4, 130, device=DEV)
    with pytest.raises(ValueError, match="head dim 130"):
        ops.rel_pos_attention(big, big, big, backend="triton")


def test_auto_never_picks_the_interpreter_on_cpu():
    """CPU tensors: "auto" never takes the Triton kernels (the interpreter is for tests); an explicit request runs
    them in the interpreter, or, where it is off (a CUDA host), says why not."""
    q = torch.randn(1, 2, 8, 16)
    assert ops_backend.select("attention", "auto", q, q, q, None, None, None, None) is not ta.attention_triton
    if ta.interpreting():
        assert ops_backend.select("attention", "triton", q, q, q, None, None, None, None) is ta.attention_triton
    else:
        with pytest.raises(ValueError, match="CPU tensors need TRITON_INTERPRET=1"):
            ops_backend.select("attention", "triton", q, q, q, None, None, None, None)


def test_torch_compile_traces_without_graph_breaks():
    b, h, n, d = 2, 2, 29, 16
    index, rows = fusion_index(n)
    table = torch.randn(rows, h, device=DEV, requires_grad=True)
    keep = padding(b, n)

    def fn(q, k, v, table):
        return ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep,
                                     backend="triton").sum(-1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    q, k, v = qkv_views(b, h, n, d)
    out = compiled(q, k, v, table)
    check_close(out, fn(q, k, v, table))
    g1 = torch.autograd.grad(out.sum(), [q, table])
    g2 = torch.autograd.grad(fn(q, k, v, table).sum(), [q, table])
    for a, e in zip(g1, g2):
        check_close(a, e)


def test_a_bad_index_is_a_clear_error_under_torch_compile():
    """The public range check needs the index's values, which a trace cannot read: the Triton op checks the int32
    copy its kernels read (once per index tensor, at run time), so a bad index is this error, not a failed bincount
    or a shape mismatch deep inside."""
    b, h, n, d = 1, 2, 7, 16
    table = torch.randn(10, h, device=DEV)
    index = torch.randint(0, 10, (n, n), device=DEV)
    index[3, 4] = 10

    def fn(q):
        return ops.rel_pos_attention(q, q, q, bias_table=table, bias_index=index, backend="triton")

    q = torch.randn(b, h, n, d, device=DEV)
    with pytest.raises(Exception, match=r"bias_index values must lie in \[0, 10\)"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q)


def test_the_registered_op_checks_index_values_past_int32():
    """The op torch.compile calls checks the index itself; values past int32 are checked before narrowing (2**32 + 1
    narrowed first would read row 1)."""
    n, h = 4, 2
    q = torch.randn(1, h, n, 8, device=DEV)
    table = torch.randn(7, h, device=DEV)
    for value in (2**32 + 1, -(2**32) + 2):
        with pytest.raises(ValueError, match=r"bias_index values must lie in \[0, 7\)"):
            torch.ops.vlmo_fast.rel_pos_attn_fwd(q, q, q, None, table, torch.full((n, n), value, device=DEV), None,
                                                 1.0, False)


@pytest.mark.parametrize("form", ["table", "dense"])
def test_empty_backward_gives_the_fake_kernels_layout(form):
    """B = 0: the bias gradient is zeros laid out as the fake kernel says (contiguous), also for a transposed table or
    bias, so a compiled graph's strides hold."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    h, n, r = 2, 5, 9
    q = torch.randn(0, h, n, 8, device=DEV)
    index = torch.randint(0, r, (n, n), device=DEV)
    table = torch.randn(h, r, device=DEV).t() if form == "table" else None
    bias = torch.randn(h, n, n, device=DEV).transpose(1, 2) if form == "dense" else None
    args = (q, q, q, bias, table, index if form == "table" else None, None, 0.3)
    out, lse, lo = torch.ops.vlmo_fast.rel_pos_attn_fwd(*args, False)
    bwd_args = (torch.zeros_like(out), q, q, q, out, lse, bias, table, args[5], None, 0.3, True, lo)
    real = torch.ops.vlmo_fast.rel_pos_attn_bwd(*bwd_args)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.vlmo_fast.rel_pos_attn_bwd(*bwd_args)
    assert real[1].shape == fake[1].shape and real[1].stride() == fake[1].stride()
    assert real[1].is_contiguous() and not real[1].any()


def test_meta_tensors_with_a_table_give_the_output_shape():
    """Shape propagation on meta tensors (no values): the index range check is left to a run with values."""
    q = torch.randn(2, 2, 5, 8, device="meta")
    out = ops.rel_pos_attention(q, q, q, bias_table=torch.randn(9, 2, device="meta"),
                                bias_index=torch.zeros(5, 5, dtype=torch.long, device="meta"))
    assert out.shape == (2, 2, 5, 8) and out.device.type == "meta"


def test_fp32_dv_stays_within_twice_eager_at_large_logits():
    """The backward rebuilds P from per-row statistics: from one fp32 log-sum-exp (an ulp of |m| at logits ~ 90,
    8e-6) its dominant entries erred far more than the eager softmax's (exp(0) = 1 there): dv, P's linear image,
    7.9e-6 against eager's 3.0e-7 in this case (a fuzz find). From the row max and 1/sum, P is as exact as eager's.
    (dq, dk and the bias gradient also depend on the row sums of dO·O, whose fp32 cancellation at such peaked rows
    is the flash backward's own.)"""
    seed, scale = 2026120700270, 1.6243008370900889
    g = torch.Generator().manual_seed(seed * 1000)
    leaves = [torch.randn(1, 1, 3, 17, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    gout = torch.randn(1, 1, 3, 17, generator=torch.Generator().manual_seed(seed * 1000 + 7), dtype=torch.float64)

    def dv(fn, dtype):
        ls = [t.to(dtype).to(DEV).requires_grad_() for t in leaves]
        return torch.autograd.grad(fn(*ls), ls[2], gout.to(dtype).to(DEV))[0].double().cpu()

    ref = dv(lambda q, k, v: reference_attention(q, k, v, None, None, scale), torch.float64)
    err_eager = (dv(lambda q, k, v: eager_attention(q, k, v, None, None, scale), torch.float32) - ref).abs().max()
    kern = dv(lambda q, k, v: ops.rel_pos_attention(q, k, v, scale=scale, backend="triton"), torch.float32)
    assert (kern - ref).abs().max() <= 2 * err_eager + 8 * torch.finfo(torch.float32).eps * ref.abs().max()


def test_a_gradient_penalty_through_the_kernel_is_an_error_not_a_wrong_value():
    q = torch.randn(1, 2, 5, 8, device=DEV, requires_grad=True)
    table = torch.randn(7, 2, device=DEV, requires_grad=True)
    index = torch.randint(0, 7, (5, 5), device=DEV)
    out = ops.rel_pos_attention(q, q, q, bias_table=table, bias_index=index, backend="triton")
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="a second derivative through a fused kernel op is not implemented"):
        ((g * q).sum() + (g * g).sum()).backward()


def test_model_with_triton_backend_matches_reference():
    cfg = vf.preset("vlmo_tiny_patch16", image_size=32, max_text_len=6, depth=2, vlffn_start_layer_index=1,
                    drop_path_rate=0.0)
    fast = vf.VLMo(cfg, backend="triton").to(DEV)
    with torch.no_grad():
        fast.relative_position_bias_table.normal_()
    ref = ReferenceVLMo(cfg).to(DEV)
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(1000, 2000, (2, 6), device=DEV)
    masks = torch.ones(2, 6, dtype=torch.long, device=DEV)
    masks[1, 3:] = 0
    batch = {"text_ids": ids, "text_masks": masks, "image": [torch.randn(2, 3, 32, 32, device=DEV)]}
    a, e = fast.infer(batch), ref.infer(batch)
    check_close(a["text_feats"], e["text_feats"])
    a["cls_feats"].sum().backward()
    e["cls_feats"].sum().backward()
    check_close(fast.relative_position_bias_table.grad, ref.relative_position_bias_table.grad, rtol=1e-4)
    check_close(fast.transformer.blocks[0].attn.qkv.weight.grad, ref.transformer.blocks[0].attn.qkv.weight.grad,
                rtol=1e-4)


@pytest.mark.skipif(on_gpu, reason="the interpreter's single configuration is what this test replaces")
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_every_autotune_candidate_computes_the_same(monkeypatch, kernel):
    """On a GPU the autotuner may pick any candidate; the interpreter otherwise runs one (64 x 64). Here each
    candidate tile shape of one kernel runs in turn, on tiles that do not divide N = 45, with a half and a fully
    padded batch row and the table gradient (the dQ candidates also fill the padded partials differently)."""
    import triton

    tuner = {"fwd": ta._fwd_tuned, "dkdv": ta._dkdv_tuned, "dq": ta._dq_tuned}[kernel]
    shapes = {"fwd": ta.FWD_CONFIGS, "dkdv": ta.DKDV_CONFIGS, "dq": ta.DQ_CONFIGS}[kernel]
    b, h, n, d = 3, 2, 45, 16
    q, k, v = qkv_views(b, h, n, d)
    index, rows = fusion_index(n)
    table = torch.randn(rows, h, device=DEV, requires_grad=True)
    keep = padding(b, n, full_row=2)
    ref = reference_attention(q, k, v, table.t()[:, index], keep)
    g = torch.randn_like(ref, dtype=torch.float32)
    want = grads(ref, [q, k, v, table], g.double())
    for m, bn, warps, stages in shapes:
        monkeypatch.setattr(tuner, "configs", [triton.Config({"BLOCK_M": m, "BLOCK_N": bn}, num_warps=warps,
                                                             num_stages=stages)])
        out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep,
                                    backend="triton")
        tag = f"{kernel} {m}x{bn}"
        check_close(out, ref, name=f"{tag} out")
        for name, a, r in zip(["dq", "dk", "dv", "dtable"], grads(out, [q, k, v, table], g), want):
            check_close(a, r, rtol=5e-5, name=f"{tag} {name}")
        assert tuner.best_config.kwargs == {"BLOCK_M": m, "BLOCK_N": bn}  # this candidate is what ran


# ---- GPU (H100/H200): the flash-attention numerics rule at VLMo sizes ---------------------------------------------
# The autotuner would compile and time every candidate for every new key (dtype, bias form, N, ...): the numerics
# tests pin each kernel to one configuration, and test_gpu_every_candidate_meets_the_numerics_rule runs each
# candidate once, so the GPU suite's time goes to checks rather than to compiling.

TUNERS = {"fwd": "_fwd_tuned", "dkdv": "_dkdv_tuned", "dq": "_dq_tuned"}
CANDIDATES = {"fwd": ta.FWD_CONFIGS, "dkdv": ta.DKDV_CONFIGS, "dq": ta.DQ_CONFIGS}


def pin(monkeypatch, kernel, m, bn, warps, stages):
    import triton

    monkeypatch.setattr(getattr(ta, TUNERS[kernel]), "configs",
                        [triton.Config({"BLOCK_M": m, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)])


@pytest.fixture
def one_config(monkeypatch):
    for kernel in TUNERS:
        pin(monkeypatch, kernel, *CANDIDATES[kernel][0])


def check_rule(got, eager, ref, names):
    """Each result within twice the official math's error in the same precision (both against float64)."""
    for name, a, e, r in zip(names, got, eager, ref):
        assert torch.isfinite(a).all(), name
        err = (a.double() - r.double()).abs().max()
        err_eager = (e.double() - r.double()).abs().max()
        assert err <= 2 * err_eager + 1e-5 * r.abs().max(), f"{name}: {err:.3e} vs eager {err_eager:.3e}"


@pytest.mark.gpu
def test_gpu_auto_picks_triton_and_model_matches_reference(one_config):
    """VLMo-base (2 layers) on the GPU's auto backend against the official math, with a random relative-position
    table (the bias gather and the in-kernel index run): fp32 features and gradients closely, and under bf16
    autocast every feature and gradient within twice the error of the official math in bf16 (both against fp32)."""
    cfg = vf.preset("vlmo_base_patch16", depth=2, vlffn_start_layer_index=1, drop_path_rate=0.0)
    fast = vf.VLMo(cfg).cuda().eval()
    with torch.no_grad():
        fast.relative_position_bias_table.normal_(0.0, 0.5)
    ref = ReferenceVLMo(cfg).cuda().eval()
    ref.load_state_dict(fast.state_dict())
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    assert ops_backend.select("attention", "auto", q, q, q, None, None, None, None) is ta.attention_triton
    ids = torch.randint(1000, 2000, (4, 40), device="cuda")
    masks = torch.ones(4, 40, dtype=torch.long, device="cuda")
    masks[1:, 9:] = 0
    batch = {"text_ids": ids, "text_masks": masks, "image": [torch.randn(4, 3, 224, 224, device="cuda")]}
    keys = ("text_feats", "image_feats", "cls_feats")

    def run(model, dtype=None):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model.infer(batch)
        feats = [out[key].float() for key in keys]
        sum(f.pow(2).mean() for f in feats).backward()
        named = dict(model.named_parameters())
        return feats + [named[p].grad.float() for p in ("relative_position_bias_table",
                                                          "transformer.blocks.0.attn.qkv.weight")]

    a, e = run(fast), run(ref)
    for name, x, y in zip(keys + ("d_table", "d_qkv"), a, e):
        check_close(x, y, rtol=1e-4, name=f"fp32 {name}")
    fast16, ref16 = run(fast, torch.bfloat16), run(ref, torch.bfloat16)
    for name, x, y, r in zip(keys + ("d_table", "d_qkv"), fast16, ref16, e):
        err, err_official = (x - r).abs().max(), (y - r).abs().max()
        assert err <= 2 * err_official + 1e-5 * r.abs().max(), f"bf16 {name}: {err:.3e} vs official {err_official:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(TUNERS))
def test_gpu_every_candidate_meets_the_numerics_rule(monkeypatch, kernel):
    """Whichever candidate the autotuner picks on the card, it computes right: each tile shape of one kernel (the
    other two pinned) in bf16 at N = 237 with the gathered table, a half and a fully padded row."""
    b, h, n, d = 4, 12, 237, 64
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in qkv_views(b, h, n, d, device="cuda"))
    index = relpos.fusion_relative_position_index(40, 14).cuda()
    table = (torch.randn(relpos.num_table_rows(14), h, device="cuda") * 0.5).requires_grad_()
    keep = padding(b, n, full_row=b - 1).cuda()
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    ref = reference_attention(*leaves64[:3], leaves64[3].t()[:, index], keep)
    eager = eager_attention(q, k, v, table.t()[:, index], keep)
    g = torch.randn_like(eager)
    want = (ref,) + grads(ref, leaves64, g.double())
    base = (eager,) + grads(eager, [q, k, v, table], g)
    for other in TUNERS:
        pin(monkeypatch, other, *CANDIDATES[other][0])
    for config in CANDIDATES[kernel]:
        pin(monkeypatch, kernel, *config)
        out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep,
                                    backend="triton")
        got = (out,) + grads(out, [q, k, v, table], g)
        check_rule(got, base, want, [f"{kernel} {config} {name}" for name in ("out", "dq", "dk", "dv", "dtable")])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,form", [(237, "table"), (237, "dense"), (617, "table"), (941, "table"), (40, "none")])
def test_gpu_numerics_rule(dtype, n, form, one_config):
    b, h, d = (8, 12, 64) if n == 237 else (2, 12, 64)
    q32, k32, v32 = qkv_views(b, h, n, d, device="cuda")
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32))
    if n == 40:
        index, rows = relpos.text_relative_position_index(40, 14).cuda(), relpos.num_table_rows(14)
    else:
        w = {237: 14, 617: 24, 941: 30}[n]
        index, rows = relpos.fusion_relative_position_index(40, w).cuda(), relpos.num_table_rows(w)
    full = (torch.randn(rows, 12 * h, device="cuda") * 0.5).requires_grad_()
    dense = torch.randn(h, n, n, device="cuda", requires_grad=True)
    keep = padding(b, n, full_row=b - 1).cuda()
    kw = {"table": dict(bias_table=full[:, h : 2 * h], bias_index=index), "dense": dict(bias=dense), "none": {}}[form]

    def bias_of(full, dense):
        return {"table": full[:, h : 2 * h].t()[:, index], "dense": dense, "none": None}[form]

    def leaves_of(q, k, v, full, dense):
        return [q, k, v] + ({"table": [full], "dense": [dense], "none": []}[form])

    leaves = leaves_of(q, k, v, full, dense)
    # the float64 reference differentiates float64 copies: its gradients must not be rounded to the inputs' dtype
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, full, dense)]
    out = ops.rel_pos_attention(q, k, v, key_padding_mask=keep, backend="triton", **kw)
    ref = reference_attention(*leaves64[:3], bias_of(*leaves64[3:]), keep)
    eager = eager_attention(q, k, v, bias_of(full, dense), keep)
    g = torch.randn_like(out)
    got, base = grads(out, leaves, g), grads(eager, leaves, g)
    want = grads(ref, leaves_of(*leaves64), g.double())
    check_rule((out,) + got, (eager,) + base, (ref,) + want, ["out", "dq", "dk", "dv", "dbias"])
    assert torch.all(out[b - 1] == 0)


@pytest.mark.gpu
def test_gpu_deterministic_bit_identical(one_config):
    b, h, n, d = 16, 12, 237, 64
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in qkv_views(b, h, n, d, device="cuda"))
    index = relpos.fusion_relative_position_index(40, 14).cuda()
    table = torch.randn(1126, h, device="cuda", requires_grad=True)
    keep = padding(b, n).cuda()
    runs = []
    for _ in range(3):
        out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep)
        runs.append((out,) + grads(out, [q, k, v, table], torch.ones_like(out)))
    for other in runs[1:]:
        for a, e in zip(runs[0], other):
            assert torch.equal(a, e)


@pytest.mark.gpu
def test_gpu_memory_is_not_quadratic_in_batch():
    """Forward + backward allocate the outputs, the gradients, the row statistics and the table gradient's per-group
    partials, and nothing the size of the (B, H, N, N) scores: what is left is well under one fp32 score tensor."""
    b, h, n, d = 64, 12, 237, 64
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in qkv_views(b, h, n, d, device="cuda"))
    index = relpos.fusion_relative_position_index(40, 14).cuda()
    table = torch.randn(1126, h, device="cuda", requires_grad=True)
    keep = padding(b, n).cuda()

    def run():
        out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep)
        return out, grads(out, [q, k, v, table], torch.ones_like(out))

    run()  # autotuning (its timing buffers) and the index caches, outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kept = run()
    peak = torch.cuda.max_memory_allocated() - base
    act = q.numel() * q.element_size()
    stats = 2 * b * h * n * 4  # lse, delta
    groups = ta._group_count(b, h, n, True, torch.cuda.get_device_properties(0).multi_processor_count)
    parts = groups * h * ta._part_size(n) ** 2 * 4
    dense = h * n * ta._bias_row(n) * 4  # the table gathered into the row-padded (H, N, N) bias the batch shares
    # out, its rounding residue (kept for the bias gradient), dO, dq, dk, dv; d_table
    expected = 6 * act + stats + parts + dense + 2 * table.numel() * 4
    scores_fp32 = b * h * n * n * 4
    assert peak - expected < 0.1 * scores_fp32, (
        f"peak {peak / 2**20:.0f} MiB, of which {expected / 2**20:.0f} MiB expected, vs one fp32 score tensor "
        f"{scores_fp32 / 2**20:.0f} MiB")
    del kept


def test_official_indices_are_computed_in_kernel_and_agree_with_the_loaded_index(monkeypatch):
    assert ta._structure(relpos.fusion_relative_position_index(12, 4), relpos.num_table_rows(4)) == (12, 4, 196)
    assert ta._structure(relpos.image_relative_position_index(4), relpos.num_table_rows(4)) == (0, 4, 196)
    assert ta._structure(relpos.text_relative_position_index(40, 14), relpos.num_table_rows(14)) == (40, 14, 196)
    assert ta._structure(relpos.fusion_relative_position_index(40, 14), relpos.num_table_rows(14)) == (40, 14, 196)
    assert ta._structure(torch.randint(0, 446, (29, 29)), 446) is None
    b, h, d = 2, 2, 16
    for index, rows in [(relpos.fusion_relative_position_index(12, 4), relpos.num_table_rows(4)),
                        (relpos.image_relative_position_index(4), relpos.num_table_rows(4)),
                        (relpos.text_relative_position_index(29, 4), relpos.num_table_rows(4))]:
        n, index = index.shape[0], index.to(DEV)
        q, k, v = qkv_views(b, h, n, d)
        table = torch.randn(rows, h, device=DEV, requires_grad=True)
        keep = padding(b, n)
        results = []
        for policy, structured in (("in-kernel", True), ("in-kernel", False), ("dense", True)):
            monkeypatch.setattr(ta, "TABLE_BIAS", policy)
            monkeypatch.setattr(ta, "STRUCTURED_INDEX", structured)
            out = ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep,
                                        backend="triton")
            results.append((out,) + grads(out, [q, k, v, table], torch.ones_like(out)))
        # the index computed in the kernel, loaded, or the table gathered into a dense bias first: the same values
        # in the same order, so the same bits
        for other in results[1:]:
            for a, e in zip(results[0], other):
                assert torch.equal(a, e)


def test_kernels_compile_for_the_gpu_without_one():
    """Triton lowers every kernel configuration the model uses to sm_90 and sm_80 machine code (PTX + ptxas) without a
    GPU, catching what the CPU interpreter cannot (types, layouts, register and shared-memory limits). The model's
    launches are captured from the host code and compiled with the JIT's specialization of those arguments; on
    sm_90 no VLMo-base autotune configuration may spill registers (with the Triton version CI pins, STRICT_TRITON in
    triton_aot.py; other versions allocate differently), on sm_80 each launch needs a spill-free one."""
    import os
    import subprocess
    import sys

    if ta.TRITON_VERSION < (3, 6):  # it calls the JIT's binder and _pack_args, internals that 3.6 reshaped
        pytest.skip(f"the static compile check drives Triton >= 3.6's JIT internals; this is {ta.triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--arch", "90", "80"], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ok = [line for line in proc.stdout.splitlines() if line.startswith("sm_90 ok")]
    assert len(ok) >= 50, proc.stdout  # 3 attention forms x 18 launches/configurations + the FFN kernels
    assert sum(line.startswith("sm_80 ok") for line in proc.stdout.splitlines()) == len(ok), proc.stdout
    base = [line for line in ok if "[base]" in line or "[base ffn]" in line]
    assert len(base) >= 21, proc.stdout
    if "the strict sm_90 rule applies to" not in proc.stdout:
        assert all(line.endswith("spill 0") for line in base), proc.stdout


class _EagerAutotuner:
    """Stands in for the autotuner of Triton 3.2-3.3: its constructor asks the driver for a benchmarker unless one
    is given (here the asking raises, as it does on a machine without a GPU)."""

    def __init__(self, fn, arg_names, configs, key, reset_to_zero, restore_value, pre_hook=None, post_hook=None,
                 prune_configs_by=None, warmup=None, rep=None, use_cuda_graph=False, do_bench=None):
        if do_bench is None:
            raise RuntimeError("0 active drivers ([]). There should only be one.")
        self.fn, self.configs, self.key, self.reset_to_zero, self.do_bench = fn, configs, key, reset_to_zero, do_bench


def test_autotuners_that_ask_the_driver_at_construction_get_a_lazy_benchmarker(monkeypatch):
    import triton.runtime.autotuner as autotuner

    monkeypatch.setattr(autotuner, "Autotuner", _EagerAutotuner)
    tuner = ta._autotune(["c0", "c1"], key=["N"], reset_to_zero=["DPART"])(ta._bwd_dq)
    assert isinstance(tuner, _EagerAutotuner)
    assert (tuner.fn, tuner.configs, tuner.key, tuner.reset_to_zero) == (ta._bwd_dq, ["c0", "c1"], ["N"], ["DPART"])
    assert tuner.do_bench is ta._bench_on_the_device


def test_autotuners_that_look_the_benchmarker_up_late_are_built_as_usual():
    from triton.runtime.autotuner import Autotuner

    tuner = ta._autotune(ta._config_list(ta.FWD_CONFIGS), key=["N"])(ta._fwd)
    assert type(tuner) is Autotuner and tuner.fn is ta._fwd
    if ta.TRITON_VERSION >= (3, 4):  # the benchmarker is looked up at the first tuning: Triton's own default
        assert tuner._do_bench is None and ta._fwd_tuned._do_bench is None and ta._dq_tuned._do_bench is None


def test_triton_older_than_the_tested_floor_is_left_to_the_torch_path(monkeypatch):
    """An untested Triton never runs: the support check gives the reason (so "auto" passes the kernels over on CUDA,
    where they are its candidates) and "triton" raises it."""
    import triton

    b, h, n, d = 2, 2, 9, 16
    q, k, v = (torch.randn(b, h, n, d, device=DEV) for _ in range(3))
    keep = padding(b, n)
    ref = ops.rel_pos_attention(q, k, v, key_padding_mask=keep, backend="torch")
    assert ta.TRITON_VERSION >= ta.MIN_TRITON
    assert ta.unsupported(q, k, v, None, None, None, keep) is None
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.setattr(ta, "TRITON_VERSION", (3, 2))
    assert "Triton 3.2.0 is older than 3.4" in ta.unsupported(q, k, v, None, None, None, keep)
    torch.testing.assert_close(ops.rel_pos_attention(q, k, v, key_padding_mask=keep), ref)  # auto: torch
    with pytest.raises(ValueError, match=r"Triton 3\.2\.0 is older than 3\.4, the oldest these kernels are tested"):
        ops.rel_pos_attention(q, k, v, key_padding_mask=keep, backend="triton")
    x = torch.randn(2, 5, 8, device=DEV)
    with pytest.raises(ValueError, match=r"Triton 3\.2\.0 is older than 3\.4"):
        ops.scaled_residual(x, torch.randn_like(x), backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_split_qkv_gradient_is_the_packed_one_and_free_after_the_triton_backward(backend, monkeypatch):
    """q, k, v taken from the packed projection by split_qkv get the gradient autograd's own split gives. After the
    Triton attention backward (which writes dq, dk, dv packed) it is that buffer itself, no copy; after the PyTorch
    path it is one stacked copy."""
    from vlmo_fast.ops import attention as attention_module

    b, h, n, d = 2, 3, 29, 16
    index, rows = fusion_index(n)
    table = torch.randn(rows, h, device=DEV, requires_grad=True)
    keep = padding(b, n)
    qkv = torch.randn(b, n, 3 * h * d, device=DEV, requires_grad=True)
    seen = []
    real = attention_module._packed_view
    monkeypatch.setattr(attention_module, "_packed_view", lambda *a: seen.append(real(*a)) or seen[-1])

    def attend(q, k, v):
        return ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index, key_padding_mask=keep,
                                     backend=backend)

    out = attend(*attention_module.split_qkv(qkv, h))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [qkv, table], g)
    q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # autograd's own split
    want = torch.autograd.grad(attend(q, k, v), [qkv, table], g)
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    assert len(seen) == 1 and (seen[0] is not None) == (backend == "triton")
    if backend == "triton":
        assert seen[0].shape == qkv.shape and seen[0].is_contiguous()


def test_triton_launches_from_several_threads_take_turns(monkeypatch):
    """Triton's autotuner keeps the call it runs on the shared kernel object (its arguments, reset when the call
    ends), and a kernel's first launch can see it compiled before its binary is loaded: launches from several
    threads (inference served from a thread pool) failed while another tuned or loaded. Every launch of these ops
    now holds one lock: here each launch lingers, and no two overlap; each thread gets its lone call's output."""
    import time

    from vlmo_fast.ops import triton_ffn

    inside, overlaps = [0], []
    real = ta._launch

    def lingering(*args, **kwargs):
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.05)  # (a thread switch here let another thread's launch run)
        real(*args, **kwargs)
        inside[0] -= 1

    monkeypatch.setattr(ta, "_launch", lingering)
    b, h, n, d = 2, 2, 13, 8
    index, rows = fusion_index(n)
    inputs = [(torch.randn(b, h, n, d, device=DEV), torch.randn(rows, h, device=DEV)) for _ in range(3)]

    def attend(q, table):
        return ops.rel_pos_attention(q, q, q, bias_table=table, bias_index=index, key_padding_mask=padding(b, n),
                                     backend="triton")

    with torch.no_grad():
        want = [attend(q, table) for q, table in inputs]
        got = {}

        def serve(i):
            got[i] = attend(*inputs[i])
            x = torch.randn(2, 5, 8, device=DEV)
            got[(i, "residual")] = (ops.scaled_residual(x, x, backend="triton"), x + x)

        errors = run_in_threads(serve, 3)
    assert errors == [] and max(overlaps) == 1 and len(overlaps) == 6  # (three lone calls, then three threads)
    for i in range(3):
        torch.testing.assert_close(got[i], want[i])
        torch.testing.assert_close(*got[(i, "residual")])
    assert triton_ffn.launch_device is ta.launch_device  # the FFN's launches take the same lock


@pytest.mark.gpu
def test_gpu_threads_tuning_new_shapes_at_once_all_succeed():
    """The race the launch lock closes, on the GPU's own autotuner (the test above holds it to one config under the
    interpreter): threads that each meet a length of their own at once (a server's pool meeting new lengths), so
    that each launch tunes while the others wait, all get their lone call's output and gradients."""
    b, h, d = 2, 4, 64
    cases = []
    for n in (37, 53, 71, 97):
        index, rows = fusion_index(n)
        cases.append((torch.randn(b, h, n, d, device=DEV, dtype=torch.bfloat16), torch.randn(rows, h, device=DEV),
                      index, padding(b, n)))

    def attend(i):
        q, table, index, keep = (t.detach().requires_grad_(t.is_floating_point()) for t in cases[i])
        out = ops.rel_pos_attention(q, q, q, bias_table=table, bias_index=index, key_padding_mask=keep,
                                    backend="triton")
        grads = torch.autograd.grad(out.float().square().sum(), [q, table])
        torch.cuda.synchronize()
        return (out.detach(),) + grads

    got = {}

    def serve(i):
        got[i] = attend(i)

    errors = run_in_threads(serve, len(cases))
    assert errors == []
    for i in range(len(cases)):
        for a, e in zip(got[i], attend(i)):  # alone, now that every length is tuned
            torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-2)
