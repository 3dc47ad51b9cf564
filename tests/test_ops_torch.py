"""The PyTorch paths of the ops seam against float64 references, and their argument checks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmo_fast import ops
from vlmo_fast._native import native_available
from vlmo_fast.model import relpos
from vlmo_fast.ops import backend as ops_backend

from attn_ref import eager_attention, reference_attention
from attn_ref import padding as attn_padding
from numerics import assert_twice_eager
from threads import run_in_threads


def padding(b, n):
    return attn_padding(b, n, full_row=2 if b > 2 else None)


@pytest.mark.parametrize("n", [1, 40, 237, 257])
@pytest.mark.parametrize("form", ["table", "dense", "none"])
def test_attention_matches_float64(n, form):
    b, h, d = 3, 2, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    full_table = torch.randn(50, h * 3, dtype=torch.float64)
    table = full_table[:, h : 2 * h].clone().requires_grad_()  # a contiguous copy for a leaf with a grad
    index = torch.randint(0, 50, (n, n))
    dense = torch.randn(h, n, n, dtype=torch.float64, requires_grad=True)
    keep = padding(b, n)
    kw = {"table": dict(bias_table=table, bias_index=index), "dense": dict(bias=dense), "none": {}}[form]
    bias = {"table": table.t()[:, index] if form == "table" else None, "dense": dense, "none": None}[form]
    out = ops.rel_pos_attention(q, k, v, key_padding_mask=keep, **kw)
    ref = reference_attention(q, k, v, bias, keep)
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.all(out[2] == 0) if b > 2 else True
    g = torch.randn_like(out)
    leaves = [q, k, v] + ([table] if form == "table" else [dense] if form == "dense" else [])
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    for a, e in zip(got, want):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, e, atol=1e-10)


def test_attention_strided_table_slice_gets_gradient():
    h, n = 4, 29
    table = torch.randn(60, h * 3, requires_grad=True)
    index = torch.randint(0, 60, (n, n))
    q, k, v = (torch.randn(2, h, n, 8) for _ in range(3))
    out = ops.rel_pos_attention(q, k, v, bias_table=table[:, h : 2 * h], bias_index=index)
    ref = reference_attention(q, k, v, table[:, h : 2 * h].t()[:, index])
    assert torch.allclose(out.double(), ref, atol=1e-5)
    out.sum().backward()
    assert table.grad[:, :h].abs().sum() == 0 and table.grad[:, 2 * h :].abs().sum() == 0
    assert table.grad[:, h : 2 * h].abs().sum() > 0


def low_precision_attention_inputs(dtype):
    """A model held in fp16/bf16: q, k, v strided views of one projection, the fp32 table's strided column slice, a
    half and a fully padded batch row."""
    b, h, n, d = 3, 3, 237, 32
    qkv = torch.randn(b, n, 3, h, d).to(dtype).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D) views, not contiguous
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
    assert not q.is_contiguous()
    full = torch.randn(1126, 3 * h, requires_grad=True)
    index = relpos.fusion_relative_position_index(40, 14)
    return q, k, v, full, h, index, padding(b, n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_low_precision_within_twice_eager_error(dtype):
    """The low-precision inputs above through "auto", which on CPU at this size takes the native softmax inside the
    PyTorch attention path: the output and every gradient (dq, dk, dv, the table's) within twice the error of the
    official math in the same precision, both against float64. (backend="torch" is that official math, bit for bit:
    the rule could not fail on it.)"""
    if not native_available():
        pytest.skip("without the native softmax, auto is the PyTorch path: the eager yardstick itself")
    q, k, v, full, h, index, keep = low_precision_attention_inputs(dtype)
    ops_backend.clear_selected()
    out = ops.rel_pos_attention(q, k, v, bias_table=full[:, h : 2 * h], bias_index=index, key_padding_mask=keep,
                                backend="auto")
    assert ops_backend.last_selected()["masked_softmax"] == "cuda"  # the softmax that ran: not the yardstick's
    assert out.dtype == dtype and torch.all(out[2] == 0)
    eager = eager_attention(q, k, v, full[:, h : 2 * h].t()[:, index], keep)
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v, full)]  # unrounded reference gradients
    ref = reference_attention(*l64[:3], l64[3][:, h : 2 * h].t()[:, index], keep)
    g = torch.randn(out.shape).to(dtype)
    leaves = [q, k, v, full]
    got = (out,) + torch.autograd.grad(out, leaves, g)
    base = (eager,) + torch.autograd.grad(eager, leaves, g)
    want = (ref,) + torch.autograd.grad(ref, l64, g.double())
    for name, a, e, r in zip(["out", "dq", "dk", "dv", "dtable"], got, base, want):
        assert torch.isfinite(a).all(), name
        assert_twice_eager(name, a, e, r, 1e-6)
    assert got[4][:, :h].abs().sum() == 0 and got[4][:, 2 * h :].abs().sum() == 0  # only the slice's columns


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_torch_path_takes_low_precision_inputs(dtype):
    """The same inputs through backend="torch": its own softmax, the dtype kept, zeros for the fully padded row,
    finite gradients, and gradient only for the table slice's columns."""
    q, k, v, full, h, index, keep = low_precision_attention_inputs(dtype)
    ops_backend.clear_selected()
    out = ops.rel_pos_attention(q, k, v, bias_table=full[:, h : 2 * h], bias_index=index, key_padding_mask=keep,
                                backend="torch")
    assert ops_backend.last_selected()["masked_softmax"] == "torch"
    assert out.dtype == dtype and torch.all(out[2] == 0)
    grads = torch.autograd.grad(out, [q, k, v, full], torch.randn(out.shape).to(dtype))
    assert all(torch.isfinite(t).all() for t in grads)
    assert grads[3][:, :h].abs().sum() == 0 and grads[3][:, 2 * h :].abs().sum() == 0
    assert grads[3][:, h : 2 * h].abs().sum() > 0


def test_masked_softmax_matches_float64():
    b, h, n = 3, 2, 237
    scores = torch.randn(b, h, n, n, requires_grad=True)
    bias = torch.randn(h, n, n)
    keep = padding(b, n)
    p = ops.masked_softmax(scores, scale=0.3, bias=bias, key_padding_mask=keep)

    def official(s):  # the math in s's precision: fully masked rows give zeros
        return torch.nan_to_num(torch.softmax((s * 0.3 + bias.to(s.dtype)).masked_fill(~keep[:, None, None, :],
                                                                                     float("-inf")), -1), nan=0.0)

    s64, s32 = scores.detach().double().requires_grad_(), scores.detach().clone().requires_grad_()
    ref, eager = official(s64), official(s32)
    assert torch.allclose(p.double(), ref, atol=1e-6)
    assert torch.all(p[2] == 0)
    g = torch.randn_like(p)
    p.backward(g)
    want = torch.autograd.grad(ref, s64, g.double())[0]
    base = torch.autograd.grad(eager, s32, g)[0]
    assert torch.isfinite(scores.grad).all() and torch.all(scores.grad[2] == 0)
    # fp32 against float64: within twice the error of the same math in fp32, plus a few ulps of the result's size
    err, err_eager = (scores.grad.double() - want).abs().max(), (base.double() - want).abs().max()
    floor = 4 * torch.finfo(torch.float32).eps * want.abs().max()
    assert err <= 2 * err_eager + floor, f"dscores: {err:.3e} vs eager {err_eager:.3e}"
    assert ops.masked_softmax(scores.half(), out_dtype=torch.float32).dtype == torch.float32


def test_split_qkv_takes_plain_views_where_no_gradient_is_taken(monkeypatch):
    """split_qkv's autograd Function only shapes the backward: without a gradient (inference, no_grad, a qkv that
    needs none) the same q, k, v come back as plain views of the packed projection, and the Function is not run."""
    from vlmo_fast.ops import attention as attention_module

    b, n, h, d = 2, 7, 3, 4
    qkv = torch.randn(b, n, 3 * h * d)
    want = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    calls = []
    real = attention_module._SplitQKV.apply
    monkeypatch.setattr(attention_module._SplitQKV, "apply", lambda *a: calls.append(1) or real(*a))
    leaf = qkv.clone().requires_grad_()
    for packed, grad in ((qkv, True), (leaf, False)):
        with torch.set_grad_enabled(grad):
            got = attention_module.split_qkv(packed, h)
        for a, e in zip(got, want):
            assert torch.equal(a, e) and a.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    assert calls == []
    got = attention_module.split_qkv(leaf, h)  # a gradient to take: the Function
    assert calls == [1] and all(t.requires_grad for t in got)


def test_multiway_layernorm_matches_torch():
    x = torch.randn(2, 237, 48, dtype=torch.float64)
    w = [torch.randn(48, dtype=torch.float64) for _ in range(2)]
    bb = [torch.randn(48, dtype=torch.float64) for _ in range(2)]
    out = ops.multiway_layernorm(x, w, bb, split=40, eps=1e-6)
    ref = torch.cat([F.layer_norm(x[:, :40], (48,), w[0], bb[0], 1e-6), F.layer_norm(x[:, 40:], (48,), w[1], bb[1], 1e-6)], 1)
    assert torch.allclose(out, ref)
    assert torch.allclose(ops.multiway_layernorm(x, w[:1], bb[:1]), F.layer_norm(x, (48,), w[0], bb[0], 1e-6))


def test_multiway_ffn_routes_rows():
    d, hidden = 16, 64
    x = torch.randn(2, 30, d, dtype=torch.float64)
    experts = [ops.FFNExpert(*(torch.randn(*s, dtype=torch.float64) for s in [(d,), (d,), (hidden, d), (hidden,), (d, hidden), (d,)]))
               for _ in range(2)]
    gamma = torch.randn(d, dtype=torch.float64)

    def one(xs, e):
        hh = F.layer_norm(xs, (d,), e.norm_weight, e.norm_bias, 1e-6)
        return xs + gamma * F.linear(F.gelu(F.linear(hh, e.fc1_weight, e.fc1_bias)), e.fc2_weight, e.fc2_bias)

    out = ops.multiway_ffn(x, experts, split=10, gamma=gamma)
    assert torch.allclose(out, torch.cat([one(x[:, :10], experts[0]), one(x[:, 10:], experts[1])], 1))
    assert torch.allclose(ops.multiway_ffn(x, experts[1:], gamma=gamma), one(x, experts[1]))


def test_rel_pos_bias_gather():
    table = torch.randn(1126, 24, requires_grad=True)
    index = relpos.fusion_relative_position_index(40, 14)
    bias = ops.rel_pos_bias_gather(table[:, 12:], index)
    assert bias.shape == (12, 237, 237) and bias.is_contiguous()
    assert bias[3, 1, 50] == table[index[1, 50], 15]
    bias.sum().backward()
    counts = torch.bincount(index.flatten(), minlength=1126).float()
    assert torch.allclose(table.grad[:, 12:], counts[:, None].expand(-1, 12))


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(q=torch.randn(2, 3, 5)), ValueError, "q must be 4-D"),
        (dict(k=torch.randn(2, 3, 6, 8)), ValueError, "same shape"),
        (dict(v=torch.randn(2, 3, 5, 8, dtype=torch.float64)), TypeError, "same dtype"),
        (dict(q=torch.randint(0, 3, (2, 3, 5, 8))), TypeError, "q must have dtype"),
        (dict(bias_table=torch.randn(10, 3)), ValueError, "together"),
        (dict(bias_table=torch.randn(10, 4), bias_index=torch.zeros(5, 5, dtype=torch.long)), ValueError, "H=3"),
        (dict(bias_table=torch.randn(10, 3), bias_index=torch.full((5, 5), 10)), ValueError, r"\[0, 10\)"),
        (dict(bias_table=torch.randn(10, 3), bias_index=torch.full((5, 5), -1)), ValueError, r"\[0, 10\)"),
        (dict(bias_table=torch.randn(10, 3), bias_index=torch.zeros(4, 4, dtype=torch.long)), ValueError, "bias_index must have shape"),
        (dict(bias_table=torch.randn(10, 3), bias_index=torch.zeros(5, 5)), TypeError, "bias_index must have dtype"),
        (dict(bias=torch.randn(3, 5, 4)), ValueError, "bias must have shape"),
        (dict(bias=torch.randn(3, 5, 5), bias_table=torch.randn(10, 3), bias_index=torch.zeros(5, 5, dtype=torch.long)), ValueError, "not both"),
        (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
        (dict(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask must be bool or integer"),
        (dict(backend="cudnn"), ValueError, "backend must be one of"),
        (dict(scale="x"), TypeError, "scale must be a real number"),
        (dict(scale=True), TypeError, "scale must be a real number"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
    ],
)
def test_attention_bad_inputs(kwargs, err, match):
    args = dict(q=torch.randn(2, 3, 5, 8), k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    if q.shape != (2, 3, 5, 8) and "k" not in kwargs:
        k = v = q
    with pytest.raises(err, match=match):
        ops.rel_pos_attention(q, k, v, **args)


def test_index_is_rechecked_after_in_place_change():
    q = k = v = torch.randn(1, 2, 4, 8)
    table = torch.randn(6, 2)
    index = torch.zeros(4, 4, dtype=torch.long)
    ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index)
    index[0, 0] = 6  # out of range now: the cached check must not let it through
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        ops.rel_pos_attention(q, k, v, bias_table=table, bias_index=index)


def test_tensor_memo_survives_another_threads_entries_while_it_drops_freed_ones():
    """The memos (checked indices, mask parts) are shared by every thread running forwards: an entry added by another
    thread while one drops the freed tensors' entries made that one raise "dictionary changed size during
    iteration". Here the other thread's insertion is made from inside that pass, deterministically."""
    from vlmo_fast.ops._memo import TensorMemo

    memo = TensorMemo(size=2)
    alive = [torch.zeros(1) for _ in range(3)]
    for i, t in enumerate(alive):
        assert memo.get(t, (), lambda i=i: i) == i
    other = torch.zeros(1)

    class RefAddingAnEntry:  # the weak reference the pass calls, as if another thread ran meanwhile
        def __call__(self):
            memo._entries[(id(other), None)] = (lambda: other, (other._version, None), "other")
            return None  # this entry's tensor is gone

    memo._entries[(-1, None)] = (RefAddingAnEntry(), (0, None), "gone")
    t = torch.zeros(1)
    assert memo.get(t, (), lambda: "new") == "new"  # past the size: the pass runs (and raised here)
    assert memo.get(t, (), lambda: "recomputed") == "new"  # remembered
    assert (-1, None) not in memo._entries


def test_tensor_memo_keeps_a_cuda_tensors_values_per_stream(monkeypatch):
    """A value made on one CUDA stream (an int32 index copy, mask parts) may still be being written when another
    stream reads it, and its memory goes back to the first stream's pool when freed: each stream gets its own
    (here the stream a CUDA tensor would be on is played by stream_key)."""
    from vlmo_fast.ops import _memo

    assert _memo.stream_key(torch.zeros(1)) is None  # off CUDA: one value per tensor, as before
    stream = ["A"]
    monkeypatch.setattr(_memo, "stream_key", lambda t: stream[0])
    memo = _memo.TensorMemo()
    t = torch.zeros(1)
    assert memo.get(t, (), lambda: "made on A") == "made on A"
    stream[0] = "B"
    assert memo.get(t, (), lambda: "made on B") == "made on B"
    assert memo.get(t, (), lambda: "again") == "made on B"
    stream[0] = "A"
    assert memo.get(t, (), lambda: "again") == "made on A"
    facts = _memo.TensorMemo(per_stream=False)  # a check that passed holds on every stream
    assert facts.get(t, (), lambda: "checked") == "checked"
    stream[0] = "B"
    assert facts.get(t, (), lambda: "checked again") == "checked"
    # a device copy of a CPU tensor: its stream is the destination's (stream_of), here played for a "device" tensor
    seen = []
    monkeypatch.setattr(_memo, "stream_key", lambda t: seen.append(t) or stream[0])
    device_table, stream[0] = torch.zeros(2), "C"
    assert memo.get(t, (), lambda: "copy", stream_of=device_table) == "copy" and seen[-1] is device_table


def test_tensor_memo_inside_a_cuda_graph_capture(monkeypatch):
    """A capture runs on a stream of its own and may not read the host (the stream and the capture are played here):
    - "reuse" (index copies): the value a call before the capture made, on any stream, for the same tensor, version
      and extra key, kept for good (the graph reads it on every replay); none (no warm-up, a changed tensor, another
      key, an inference tensor) is a clear error, where computing would end the capture with a CUDA error;
    - "skip" (range checks): a value made before, or nothing (the check would see only the capture's values);
    - None (mask parts): computed inside the capture and never kept, so each replay recomputes it and no other graph
      or stream reads this graph's buffers."""
    import gc
    import weakref

    from vlmo_fast.ops import _memo

    stream, capture = ["warm-up"], [False]
    monkeypatch.setattr(_memo, "stream_key", lambda t: stream[0])
    monkeypatch.setattr(_memo, "capturing", lambda t: capture[0])
    reuse, skip, masks = (_memo.TensorMemo(4, capture="reuse"), _memo.TensorMemo(per_stream=False, capture="skip"),
                          _memo.TensorMemo())

    class Value:  # (weak-referenceable, to see what keeps it alive)
        pass

    t, other = torch.zeros(1), torch.zeros(1)
    made = Value()
    assert reuse.get(t, (7,), lambda value=made: value) is made
    assert skip.get(t, (7,), lambda: "checked") == "checked"
    assert masks.get(t, (7,), lambda: "warm-up's parts") == "warm-up's parts"

    def host_read():
        raise AssertionError("computed inside a capture")

    stream[0], capture[0] = "capture", True
    assert reuse.get(t, (7,), host_read) is made
    assert skip.get(t, (7,), host_read) == "checked" and skip.get(other, (7,), host_read) is None
    assert masks.get(t, (7,), lambda: "captured") == "captured"
    assert masks.get(t, (7,), lambda: "captured again") == "captured again"  # never kept from a capture
    for tensor, extra in ((t, (8,)), (other, (7,))):
        with pytest.raises(RuntimeError, match="run the captured code once first, outside the capture"):
            reuse.get(tensor, extra, host_read)
    with torch.inference_mode():
        frozen = torch.zeros(1)
    with pytest.raises(RuntimeError, match="inference tensor"):
        reuse.get(frozen, (7,), host_read)
    t.add_(1)  # a new version: what was made before is stale
    with pytest.raises(RuntimeError, match="warm-up"):
        reuse.get(t, (7,), host_read)
    stream[0], capture[0] = "capture", False  # that stream outside a capture: its own values, as before
    assert masks.get(t, (7,), lambda: "eager") == "eager"
    # what the graph read stays alive when the memo drops everything (full of live tensors) and the caller lets go
    alive = weakref.ref(made)
    keep = [torch.zeros(1) for _ in range(8)]
    for i, k in enumerate(keep):
        reuse.get(k, (i,), Value)
    del made
    gc.collect()
    assert alive() is not None and all(reuse._entries.get((id(t), s)) is None for s in ("warm-up", "capture"))


@pytest.mark.gpu
def test_gpu_tensor_memo_values_are_per_stream():
    from vlmo_fast.ops._memo import TensorMemo

    memo = TensorMemo()
    t = torch.zeros(1, device="cuda")
    on_default = memo.get(t, (), lambda: object())
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        on_side = memo.get(t, (), lambda: object())
        assert memo.get(t, (), lambda: None) is on_side
    assert on_side is not on_default and memo.get(t, (), lambda: None) is on_default


def test_forwards_from_several_threads_give_each_its_own_outputs():
    """A server may run forwards of one model in several threads (under no_grad, where the memos are used): each
    gets the outputs a lone forward of its batch gives."""
    import vlmo_fast as vf

    torch.manual_seed(0)
    model = vf.VLMo(vf.preset("vlmo_tiny_patch16")).eval()
    cfg = model.config
    batches = []
    for i in range(4):
        ids = torch.randint(1000, 2000, (2, cfg.max_text_len))
        masks = torch.ones_like(ids)
        masks[:, 5 + 3 * i:] = 0
        batches.append({"text_ids": ids, "text_masks": masks,
                        "image": [torch.randn(2, 3, cfg.image_size, cfg.image_size)]})
    with torch.no_grad():
        want = [model.infer(b)["cls_feats"] for b in batches]
    got = {}

    def serve(i):
        with torch.no_grad():
            for _ in range(5):
                got.setdefault(i, []).append(model.infer(batches[i])["cls_feats"])

    assert run_in_threads(serve, 4) == []
    for i in range(4):
        assert len(got[i]) == 5 and all(torch.allclose(out, want[i], atol=1e-6) for out in got[i])


def test_layernorm_and_ffn_bad_inputs():
    x = torch.randn(2, 10, 8)
    w = torch.ones(8)
    with pytest.raises(ValueError, match="split is required"):
        ops.multiway_layernorm(x, [w, w], [w, w])
    with pytest.raises(ValueError, match="split must be an int"):
        ops.multiway_layernorm(x, [w, w], [w, w], split=11)
    with pytest.raises(ValueError, match="split must be an int"):
        ops.multiway_layernorm(x, [w, w], [w, w], split=True)
    with pytest.raises(ValueError, match="same number of experts, got 2 and 1"):
        ops.multiway_layernorm(x, [w, w], [w], split=3)
    with pytest.raises(ValueError, match=r"weight\[1\] must have shape"):
        ops.multiway_layernorm(x, [w, torch.ones(7)], [w, w], split=3)
    with pytest.raises(ValueError, match="x must be 3-D"):
        ops.multiway_layernorm(x[0], [w], [w])
    e = ops.FFNExpert(w, w, torch.randn(32, 8), torch.randn(32), torch.randn(8, 32), torch.randn(8))
    with pytest.raises(TypeError, match="FFNExpert"):
        ops.multiway_ffn(x, [tuple(e)])
    with pytest.raises(ValueError, match="fc2_weight"):
        ops.multiway_ffn(x, [e._replace(fc2_weight=torch.randn(8, 31))])
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\), got 1.0"):
        ops.multiway_ffn(x, [e], drop_path=1.0)
    with pytest.raises(TypeError, match="drop_path must be a real number, got str"):  # not a comparison's TypeError
        ops.multiway_ffn(x, [e], drop_path="0.1")
    with pytest.raises(ValueError, match=r"fc1_weight must be a 2-D \(hidden, D=8\) tensor, got \(32,\)"):
        ops.multiway_ffn(x, [e._replace(fc1_weight=torch.randn(32))])
    # LayerNorm's epsilon: a positive finite number (eps=-1 gave NaN on an all-zero row, a string a deep TypeError)
    for bad, err in ((-1.0, ValueError), (0.0, ValueError), (float("nan"), ValueError), ("a", TypeError),
                     (True, TypeError)):
        with pytest.raises(err, match="eps must be"):
            ops.multiway_layernorm(x, [w], [w], eps=bad)
        with pytest.raises(err, match="eps must be"):
            ops.multiway_ffn(x, [e], eps=bad)
        with pytest.raises(err, match="eps must be"):
            ops.norm_linear(x, w, w, torch.randn(4, 8), eps=bad)
    # a numpy integer split is an integer
    want = ops.multiway_layernorm(x, [w, 2 * w], [w, w], split=3)
    assert torch.equal(ops.multiway_layernorm(x, [w, 2 * w], [w, w], split=np.int64(3)), want)


def test_softmax_out_dtype_and_scale_are_checked():
    s = torch.randn(1, 2, 3, 3)
    for bad in (torch.int32, torch.bool, "float32"):
        with pytest.raises(TypeError, match="out_dtype must be a floating-point torch.dtype"):
            ops.masked_softmax(s, out_dtype=bad)
    assert ops.masked_softmax(s, out_dtype=torch.float64).dtype == torch.float64
    learnable = torch.tensor(0.5, requires_grad=True)  # taken as a number: its gradient would be dropped
    with pytest.raises(TypeError, match="scale is a tensor that requires grad"):
        ops.masked_softmax(s, scale=learnable)
    with pytest.raises(TypeError, match="scale is a tensor that requires grad"):
        ops.rel_pos_attention(s, s, s, scale=learnable)
    assert torch.equal(ops.masked_softmax(s, scale=learnable.detach()), ops.masked_softmax(s, scale=0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layernorm_torch_path_takes_half_x_with_fp32_weights_on_every_device(dtype):
    """torch's CUDA layer_norm refuses a half-precision x with fp32 weights (its CPU kernel takes it): the PyTorch
    path normalises such inputs in fp32 and rounds once, the same on both devices."""
    x = torch.randn(2, 7, 16).to(dtype)
    w = [torch.randn(16), torch.randn(16)]
    b = [torch.randn(16), torch.randn(16)]
    y = ops.multiway_layernorm(x, w, b, split=3, backend="torch")
    want = torch.cat([F.layer_norm(x[:, :3].float(), (16,), w[0], b[0], 1e-6),
                      F.layer_norm(x[:, 3:].float(), (16,), w[1], b[1], 1e-6)], dim=1).to(dtype)
    assert y.dtype == dtype and torch.equal(y, want)


def test_backend_choice_is_recorded_in_eager_calls_only():
    """The op seam remembers which backend ran each op's latest call (benchmark rows report it); a torch.compile
    trace records nothing (a Python side effect in a traced graph)."""
    from vlmo_fast.ops import backend

    s = torch.randn(1, 2, 5, 5)
    backend.clear_selected()
    compiled = torch.compile(lambda t: ops.masked_softmax(t, backend="torch"), fullgraph=True, backend="eager")
    torch._dynamo.reset()
    compiled(s)
    assert backend.last_selected() == {}
    ops.masked_softmax(s, backend="torch")
    assert backend.last_selected() == {"masked_softmax": "torch"}


def test_auto_selection_changes_nothing_a_compiled_graph_guards_on():
    """"auto" reads its per-device candidates; it never fills them while an op runs. (It did on first use: inside a
    torch.compile trace that changed a dict the graph's guards read, so the second call of a model compiled before
    any eager call recompiled.) A compiled op on a device type no op has seen compiles once."""
    from torch._dynamo.testing import CompileCounter

    from vlmo_fast.ops import backend

    before = {key: list(impls) for key, impls in backend._AUTO_CANDIDATES.items()}
    for op in backend.available():
        assert backend.select(op, "auto", torch.zeros(1, device="meta")) is None  # no kernel backend runs on meta
    assert {key: list(impls) for key, impls in backend._AUTO_CANDIDATES.items()} == before

    counter = CompileCounter()
    torch._dynamo.reset()
    fn = torch.compile(lambda t: ops.masked_softmax(t), backend=counter)
    for _ in range(3):
        fn(torch.randn(1, 2, 5, 5, device="meta"))
    assert counter.frame_count == 1


def test_a_backend_registered_again_with_fewer_devices_leaves_no_stale_candidates(monkeypatch):
    from vlmo_fast.ops import backend

    monkeypatch.setattr(backend, "_REGISTRY", {})
    monkeypatch.setattr(backend, "_AUTO_CANDIDATES", {})
    backend.register("op_x", "cuda", lambda t: t, lambda t: None, priority=1, auto_devices=("cuda", "cpu"))
    assert backend.select("op_x", "auto", torch.zeros(1)) is not None
    backend.register("op_x", "cuda", lambda t: t, lambda t: None, priority=1, auto_devices=("cuda",))
    assert backend.select("op_x", "auto", torch.zeros(1)) is None and ("op_x", "cpu") not in backend._AUTO_CANDIDATES
