"""The model against the eager official math (vlmo_fast.reference) on every forward path, and its input checks."""

import copy

import pytest
import torch

import vlmo_fast as vf
from vlmo_fast._native import native_available
from vlmo_fast.config import loss_names
from vlmo_fast.model import multiway
from vlmo_fast.ops import backend as ops_backend
from vlmo_fast.ops import native
from vlmo_fast.reference import ReferenceVLMo

from numerics import assert_twice_eager

PATHS = ("infer", "infer_text", "infer_image", "infer_text_ft", "infer_image_ft", "infer_text_mlm")
ALL_TASKS = loss_names(itm=1, itc=1, mlm=1)


def make_pair(**kw):
    cfg = vf.preset("vlmo_tiny_patch16", **kw)
    fast = vf.VLMo(cfg)
    with torch.no_grad():
        for p in fast.parameters():  # move everything off its init so no term is trivially 0 or 1
            p.add_(torch.randn_like(p) * 0.05)
        if fast.relative_position_bias_table is not None:
            fast.relative_position_bias_table.normal_(std=0.5)
    ref = ReferenceVLMo(cfg)
    ref.load_state_dict(fast.state_dict())
    return cfg, fast, ref


def make_batch(cfg, b=3, pad=True):
    lt, s = cfg.max_text_len, cfg.image_size
    ids = torch.randint(1000, 30000, (b, lt))
    ids[:, 0] = 101
    masks = torch.ones(b, lt, dtype=torch.long)
    if pad:
        for row, n in enumerate([lt, 5, 1][:b]):
            masks[row, n:] = 0
            ids[row, n:] = 0
    mlm = ids.clone()
    mlm[:, 2] = 103
    return {
        "text_ids": ids, "text_masks": masks, "text_ids_mlm": mlm,
        "text_labels": torch.full_like(ids, -100), "text_labels_mlm": torch.full_like(ids, -100),
        "image": [torch.randn(b, 3, s, s)],
    }


def assert_outputs_close(a, b, rtol=1e-5):
    assert set(a) == set(b)
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, torch.Tensor) and va.is_floating_point():
            scale = vb.abs().max().clamp_min(1e-6)
            err = (va - vb).abs().max() / scale
            assert err <= rtol, f"{key}: relative error {err:.2e}"
            assert torch.isfinite(va).all(), key
        else:
            assert (va is None) == (vb is None), key


@pytest.mark.parametrize("image_size,max_text_len", [(224, 40), (384, 40), (64, 12)])
def test_every_path_matches_reference_eval(image_size, max_text_len):
    cfg, fast, ref = make_pair(image_size=image_size, max_text_len=max_text_len, drop_path_rate=0.1)
    fast.eval(), ref.eval()
    batch = make_batch(cfg, b=2 if image_size == 384 else 3)
    with torch.no_grad():
        for name in PATHS:
            assert_outputs_close(getattr(fast, name)(batch), getattr(ref, name)(batch))
        assert_outputs_close(fast.infer(batch, mask_text=True), ref.infer(batch, mask_text=True))
        # the plain-tensor API gives the same features
        out = fast.infer_text_ft(batch)
        assert torch.allclose(fast.text_embedding(batch["text_ids"], batch["text_masks"]), out["cls_feats"])
        assert torch.allclose(fast.image_embedding(batch["image"][0]), fast.infer_image_ft(batch)["cls_feats"])
        x = fast.fusion(batch["text_ids"], batch["text_masks"], batch["image"][0])
        assert torch.allclose(x[:, : cfg.max_text_len], fast.infer(batch)["text_feats"])


def native_kernels_for_auto(monkeypatch):
    """Let "auto" take the native C++ CPU kernels at any size: at this file's sizes its CPU policy
    (``native.CPU_AUTO_MIN_ELEMENTS``) leaves every op to PyTorch, and the test would compare torch with torch."""
    if not native_available():
        pytest.skip("the native extension is not built")
    monkeypatch.setattr(native, "CPU_AUTO_MIN_ELEMENTS", dict.fromkeys(native.CPU_AUTO_MIN_ELEMENTS, 0))


def assert_within_twice_eager(got, eager, want, floor):
    """Every floating output of ``got`` within twice the error of ``eager`` (the official math in the same
    precision), both against the float64 ``want``, plus ``floor`` and, for an fp16/bf16 output, the reference's own
    rounding to it (tests/numerics.py)."""
    assert set(got) == set(eager) == set(want)
    for key, r in want.items():
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            assert_twice_eager(key, got[key], eager[key], r, floor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_half_precision_model_matches_reference(dtype, backend, monkeypatch):
    """A model held in fp16/bf16 without autocast: attention logits are q.float() @ k.float()ᵀ as officially (fp32),
    not a half-precision product, so on the torch path the fusion and both retrieval paths equal the eager official
    math in the same dtype, bit for bit. "auto", allowed the native C++ softmax on CPU at these sizes, rounds
    differently: it must stay within twice the official math's error, both against float64."""
    if backend == "auto":
        native_kernels_for_auto(monkeypatch)
    cfg, fast, ref = make_pair(image_size=64, max_text_len=12)
    fast.eval().to(dtype).set_backend(backend), ref.eval().to(dtype)
    ref64 = copy.deepcopy(ref).double()  # the same (rounded) weights, in float64
    batch = make_batch(cfg)
    batch["image"] = [batch["image"][0].to(dtype)]
    batch64 = dict(batch, image=[batch["image"][0].double()])
    with torch.no_grad():
        for name in ("infer", "infer_text_ft", "infer_image_ft"):
            ops_backend.clear_selected()
            got = getattr(fast, name)(batch)
            assert ops_backend.last_selected()["masked_softmax"] == ("cuda" if backend == "auto" else "torch"), name
            if backend == "torch":
                assert_outputs_close(got, getattr(ref, name)(batch), rtol=0.0)
            else:
                assert_within_twice_eager(got, getattr(ref, name)(batch), getattr(ref64, name)(batch64), 1e-6)


def test_output_keys_and_shapes():
    cfg, fast, _ = make_pair()
    batch = make_batch(cfg)
    lt, n_img = cfg.max_text_len, cfg.num_image_tokens
    out = fast.infer(batch)
    assert set(out) == {"text_feats", "image_feats", "cls_feats", "raw_cls_feats", "image", "text_labels",
                        "text_ids", "text_masks"}
    assert out["text_feats"].shape == (3, lt, 64) and out["image_feats"].shape == (3, n_img, 64)
    assert out["cls_feats"].shape == (3, 64) and torch.equal(out["raw_cls_feats"], out["text_feats"][:, 0])
    t = fast.infer_text(batch)
    assert set(t) == {"text_feats", "image_feats", "cls_feats", "cls_vlffn_feats", "raw_cls_feats", "image_masks",
                      "text_labels", "text_ids", "text_masks"}
    assert torch.allclose(t["cls_feats"].norm(dim=-1), torch.ones(3))
    assert torch.allclose(t["cls_vlffn_feats"].norm(dim=-1), torch.ones(3))
    i = fast.infer_image(batch)
    assert i["image_masks"].shape == (3, n_img) and i["text_ids"] is None
    assert fast.infer_image_ft(batch)["cls_vlffn_feats"] is None
    assert fast(batch).keys() == out.keys()


@pytest.mark.parametrize("device,backend", [("cpu", "auto"), ("cpu", "cuda"), ("cuda-emu", "cuda")],
                         indirect=["device"])
def test_training_mode_same_random_stream_and_gradients(device, backend):
    """DropPath (per-sample, separate text/image draws) and BERT dropout consume the RNG exactly as the official
    model, so with the same seed the fast model and the reference give the same outputs and gradients. With
    backend="cuda" every attention softmax runs in the native kernel (the C++ one on CPU; on "cuda-emu" the CUDA
    kernel in the CPU emulator), its bias gathered from each layer's strided slice of the shared table."""
    cfg, fast, ref = make_pair(drop_path_rate=0.5)
    fast.set_backend(backend)
    fast.train(), ref.train()
    batch = make_batch(cfg, b=4)
    results = []
    for model in (fast, ref):
        torch.manual_seed(1234)
        out = model.infer(batch)
        t = model.infer_text(batch)
        i = model.infer_image(batch)
        terms = [out["cls_feats"], out["image_feats"].pow(2) / out["image_feats"].numel(), t["cls_vlffn_feats"],
                 i["cls_feats"]]
        loss = sum(x.sum() for x in terms)
        model.zero_grad()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        sum(x.detach().abs().sum() for x in terms)))
    (l1, g1, size), (l2, g2, _) = results
    # the loss sums terms of both signs (|terms| ~ 100, loss ~ 0.1): float32 rounding is relative to their size
    assert (l1 - l2).abs() <= 1e-6 * size, (l1, l2, size)
    assert set(g1) == set(g2)
    for name in g1:
        scale = g2[name].abs().max().clamp_min(1e-8)
        assert ((g1[name] - g2[name]).abs().max() / scale) < 1e-4, name
    assert g1["relative_position_bias_table"].abs().sum() > 0
    # drop path really dropped something: a different seed changes the output
    torch.manual_seed(99)
    assert not torch.allclose(fast.infer(batch)["cls_feats"], fast.infer(batch)["cls_feats"])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(backend, monkeypatch):
    """set_grad_checkpointing (--activation-checkpointing) recomputes each block in the backward: under the
    pretraining objectives, with DropPath drawing in the blocks and ITM's negatives drawn from the global RNG between
    the forwards, the recomputation must replay the very draws, so the losses and every gradient are the plain run's."""
    cfg, fast, _ = make_pair(drop_path_rate=0.5, loss_names=ALL_TASKS)
    fast.set_backend(backend).train()
    fast.current_tasks = ["mlm", "itc", "itm"]
    batch = make_batch(cfg, b=4)
    batch["text_labels_mlm"][:, 2] = batch["text_ids"][:, 2]
    calls = []
    real = multiway.checkpoint
    monkeypatch.setattr(multiway, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    results = []
    for on in (False, True):
        fast.set_grad_checkpointing(on)
        torch.manual_seed(7)
        out = fast(batch)
        loss = vf.objectives.total_loss(out)
        fast.zero_grad()
        loss.backward()
        results.append(({k: v.detach() for k, v in out.items() if "loss" in k},
                         {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}))
    (plain_losses, plain), (ckpt_losses, ckpt) = results
    assert len(calls) >= 6 * cfg.depth  # every block of the six passes (4 fusion, text, image) was recomputed
    assert plain_losses.keys() == {"mlm_loss", "itc_loss", "itm_loss"}
    assert all(torch.equal(plain_losses[k], ckpt_losses[k]) for k in plain_losses)
    assert plain.keys() == ckpt.keys() and len(plain) > 50
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


def test_eval_is_deterministic():
    cfg, fast, _ = make_pair(drop_path_rate=0.5)
    fast.eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        assert torch.equal(fast.infer(batch)["cls_feats"], fast.infer(batch)["cls_feats"])


def test_base_plus_structure_matches_reference():
    cfg = vf.preset("vlmo_base_plus_patch16", depth=3, vlffn_start_layer_index=2, embed_dim=64, num_heads=4,
                    image_size=64, max_text_len=12)
    fast = vf.VLMo(cfg).eval()
    ref = ReferenceVLMo(cfg).eval()
    ref.load_state_dict(fast.state_dict())
    batch = make_batch(cfg)
    with torch.no_grad():
        for name in PATHS:
            assert_outputs_close(getattr(fast, name)(batch), getattr(ref, name)(batch))
        # absolute text positions allow shorter text outside fusion
        short = {"text_ids": batch["text_ids"][:, :7], "text_masks": batch["text_masks"][:, :7]}
        assert_outputs_close(fast.infer_text_ft(short), ref.infer_text_ft(short))


def test_nlvr2_second_image_uses_type_2():
    cfg, fast, ref = make_pair(loss_names=loss_names(nlvr2=1))
    with torch.no_grad():
        fast.token_type_embeddings.weight[2].normal_()
    ref.load_state_dict(fast.state_dict())
    fast.eval(), ref.eval()
    batch = make_batch(cfg)
    batch["image_0"] = [torch.randn_like(batch["image"][0])]
    batch["image_1"] = [torch.randn_like(batch["image"][0])]
    with torch.no_grad():
        a1, a2 = fast.infer(batch, image_token_type_idx=1), fast.infer(batch, image_token_type_idx=2)
        assert torch.equal(a1["image"], batch["image_0"][0]) and torch.equal(a2["image"], batch["image_1"][0])
        assert_outputs_close(a2, ref.infer(batch, image_token_type_idx=2))
        logits = fast.nlvr2_classifier(torch.cat([a1["cls_feats"], a2["cls_feats"]], dim=-1))
        assert logits.shape == (3, 2)


def test_padded_rows_are_finite_and_padding_is_ignored():
    cfg, fast, _ = make_pair()
    fast.eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        out = fast.infer(batch)
        assert torch.isfinite(out["text_feats"]).all() and torch.isfinite(out["cls_feats"]).all()
        # changing ids under the mask does not change any unpadded output
        other = dict(batch, text_ids=batch["text_ids"].clone())
        other["text_ids"][1, 5:] = 2000
        out2 = fast.infer(other)
        assert torch.allclose(out["cls_feats"], out2["cls_feats"], atol=1e-6)
        # a text with every token masked (text-only path) gives zeros from attention, never NaN
        empty = dict(batch, text_masks=torch.zeros_like(batch["text_masks"]))
        assert torch.isfinite(fast.infer_text(empty)["cls_feats"]).all()


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda b, c: b.update(image=[torch.randn(3, 3, 32, 32)]), ValueError, r"image\'\]\[0\] must have shape"),
        (lambda b, c: b.update(image=[torch.randn(3, 64, 64)]), ValueError, "must have shape"),
        (lambda b, c: b.update(image=[torch.randint(0, 255, (3, 3, 64, 64))]), TypeError, "floating-point"),
        (lambda b, c: b.update(image=torch.randn(3, 3, 64, 64)), TypeError, "list holding the image"),
        (lambda b, c: b.update(text_ids=b["text_ids"][:, :-1], text_masks=b["text_masks"][:, :-1]), ValueError,
         "exactly max_text_len"),
        (lambda b, c: b.update(text_ids=torch.cat([b["text_ids"], b["text_ids"][:, :1]], 1),
                               text_masks=torch.cat([b["text_masks"], b["text_masks"][:, :1]], 1)), ValueError,
         "exactly max_text_len"),
        (lambda b, c: b.update(image=[torch.randn(2, 3, 64, 64)]), ValueError, "image batch"),
        (lambda b, c: b.update(text_masks=b["text_masks"][:2]), ValueError, "text_masks must have the shape"),
        (lambda b, c: b.update(text_ids=b["text_ids"].float()), TypeError, "text_ids must be an int64 or int32"),
        (lambda b, c: b.update(text_ids=b["text_ids"].short()), TypeError, "text_ids must be an int64 or int32"),
        (lambda b, c: b.update(text_masks=b["text_masks"].float()), TypeError, "text_masks must be"),
        (lambda b, c: b.update(text_ids=b["text_ids"] + 40000), ValueError, r"text_ids must lie in \[0, 30522\)"),
        (lambda b, c: b.pop("text_ids"), ValueError, "missing the key 'text_ids'"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, err, match):
    cfg, fast, _ = make_pair()
    batch = make_batch(cfg)
    mutate(batch, cfg)
    with pytest.raises(err, match=match):
        fast.infer(batch)


def test_bad_token_type_and_backend():
    cfg, fast, _ = make_pair()
    batch = make_batch(cfg)
    with pytest.raises(ValueError, match="image_token_type_idx"):
        fast.infer(batch, image_token_type_idx=2)
    with pytest.raises(ValueError, match="backend"):
        fast.set_backend("fastest")
    with pytest.raises(ValueError, match="exactly max_text_len"):
        fast.infer_text({"text_ids": batch["text_ids"][:, :5], "text_masks": batch["text_masks"][:, :5]})


def test_backend_torch_and_auto_agree(monkeypatch):
    """On CPU at these sizes "auto" runs the PyTorch path (the same bits as "torch"). Allowed the native C++ softmax,
    it stays within twice the torch path's error against the float64 official model (plus a few fp32 ulps)."""
    cfg, fast, ref = make_pair()
    fast.eval()
    ref64 = ref.double().eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        want = ref64.infer(dict(batch, image=[batch["image"][0].double()]))["cls_feats"]
        ops_backend.clear_selected()
        plain = fast.set_backend("auto").infer(batch)["cls_feats"]
        assert set(ops_backend.last_selected().values()) == {"torch"}
        b = fast.set_backend("torch").infer(batch)["cls_feats"]
        assert torch.equal(plain, b)
        native_kernels_for_auto(monkeypatch)
        ops_backend.clear_selected()
        a = fast.set_backend("auto").infer(batch)["cls_feats"]
        assert ops_backend.last_selected()["masked_softmax"] == "cuda"
    err, err_torch = (a.double() - want).abs().max(), (b.double() - want).abs().max()
    assert err <= 2 * err_torch + 8 * torch.finfo(torch.float32).eps * want.abs().max(), (err, err_torch)


def test_hooks_on_block_submodules_run_and_take_effect():
    """The fused block reads its submodules' parameters; while one has hooks the block calls them as the official
    Block does (the same math, the same DropPath draws), so feature-extracting or output-changing hooks work as
    with the official model."""
    cfg, fast, ref = make_pair(drop_path_rate=0.5, loss_names=ALL_TASKS)
    batch = make_batch(cfg)
    names = ("norm1", "attn", "attn.proj", "norm2_text", "norm2_imag", "mlp_text", "mlp_text.fc1", "mlp_imag",
             "mlp_vl")
    for training in (False, True):
        seen = []
        for model in (fast, ref):
            model.train(training)
            fired, handles = set(), []
            for layer in (0, cfg.depth - 1):  # a layer below the VL-FFN start (split FFN) and one with the VL-FFN
                block = model.transformer.blocks[layer]
                for name in names:
                    if getattr(block, name.split(".")[0]) is None:  # no VL-FFN below its start layer
                        continue
                    handles.append(block.get_submodule(name).register_forward_hook(
                        lambda m, args, out, key=(layer, name): fired.add(key)))
            handles.append(model.transformer.blocks[0].mlp_text.register_forward_hook(lambda m, args, out: 0.5 * out))
            torch.manual_seed(7)
            with torch.no_grad():
                out = model.infer(batch)["cls_feats"]
            for h in handles:
                h.remove()
            torch.manual_seed(7)
            with torch.no_grad():
                unhooked = model.infer(batch)["cls_feats"]
            seen.append((out, fired))
            assert not torch.allclose(out, unhooked)  # the output-changing hook took effect
        (a, fired_fast), (e, fired_ref) = seen
        assert fired_fast == fired_ref and (0, "mlp_text.fc1") in fired_fast and (cfg.depth - 1, "mlp_vl") in fired_ref
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-6), (a - e).abs().max()


def test_global_module_hooks_see_the_blocks_submodules():
    cfg, fast, _ = make_pair()
    seen = set()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.add(id(m)))
    try:
        with torch.no_grad():
            fast.eval().infer(make_batch(cfg))
    finally:
        handle.remove()
    assert {id(fast.transformer.blocks[0].mlp_text.fc1), id(fast.transformer.blocks[-1].norm1)} <= seen


@pytest.mark.parametrize("modality", ["text", "image", "vl"])
def test_unfused_block_is_the_fused_block(modality):
    cfg, fast, _ = make_pair(drop_path_rate=0.5, loss_names=ALL_TASKS)
    fast.train()
    n = {"text": cfg.max_text_len, "image": 5, "vl": cfg.max_text_len + 5}[modality]
    x = torch.randn(3, n, cfg.embed_dim)
    for block in (fast.transformer.blocks[0], fast.transformer.blocks[-1]):
        torch.manual_seed(3)
        fused = block(x, None, modality, None)
        torch.manual_seed(3)
        unfused = block.forward_calling_submodules(x, None, modality, None)
        assert torch.allclose(fused, unfused, rtol=1e-5, atol=1e-6)


def test_torch_func_transforms_run_the_pytorch_path(monkeypatch):
    """torch.func.vmap and torch.func.grad through the model: the kernels' autograd Functions have no vmap rules
    (torch raised "must override the setup_context staticmethod"), so under a transform "auto" runs the PyTorch
    path, and the result equals the model's own batched / autograd result; an explicit kernel backend is refused
    with a message naming the transform."""
    native_kernels_for_auto(monkeypatch)  # outside a transform, "auto" takes the C++ kernels here
    cfg, fast, _ = make_pair(image_size=64, max_text_len=12)
    fast.eval()
    batch = make_batch(cfg, b=3)
    ids, masks, images = batch["text_ids"], batch["text_masks"], batch["image"][0]
    ops_backend.clear_selected()
    with torch.no_grad():
        want = fast.infer(batch)["cls_feats"]
    assert "cuda" in ops_backend.last_selected().values()

    def one(i, m, img):
        return fast.infer({"text_ids": i[None], "text_masks": m[None], "image": [img[None]]})["cls_feats"][0]

    with torch.no_grad():
        got = torch.func.vmap(one)(ids, masks, images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.func.grad(lambda img: fast.image_embedding(img).square().sum())(images)
    leaf = images.clone().requires_grad_()
    fast.image_embedding(leaf).square().sum().backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-4, atol=1e-6)
    x = torch.randn(2, 2, 5, 8)
    with pytest.raises(ValueError, match="torch.func transforms"):
        torch.func.vmap(lambda t: vf.ops.multiway_layernorm(t, [torch.ones(8)], [torch.zeros(8)], backend="cuda"))(x)


def test_a_float64_reference_computes_in_float64():
    """The official .float() on attention scores and logits (the reference's and the objectives') rounded a float64
    model, the tests' truth, to fp32: its error was the size of an fp32 run's. float64 now stays float64 there, and
    the fast model in float64 matches it to rounding."""
    from vlmo_fast import objectives

    cfg, fast, ref = make_pair()
    fast, ref = fast.double().set_backend("torch"), ref.double()
    batch = make_batch(cfg)
    batch["image"] = [batch["image"][0].double()]
    batch["text_labels_mlm"][:, 2] = batch["text_ids"][:, 2]
    tasks = ["mlm", "itc", "itm"]
    torch.manual_seed(0)
    got = objectives.compute_tasks(fast, batch, tasks)
    torch.manual_seed(0)
    want = objectives.compute_tasks(ref, batch, tasks)
    for key in ("mlm_loss", "itc_loss", "itm_loss"):
        assert want[key].dtype == torch.float64 and got[key].dtype == torch.float64, key
        assert (got[key] - want[key]).abs() <= 1e-12 * want[key].abs().clamp_min(1.0), key
    assert objectives.total_loss(want).dtype == torch.float64
    # the features too (the reference's attention scores were fp32): the two float64 models agree to rounding
    fast.eval(), ref.eval()
    for name in ("infer", "infer_text_ft", "infer_image_ft"):
        a, b = getattr(fast, name)(batch), getattr(ref, name)(batch)
        for key in ("text_feats", "image_feats", "cls_feats"):
            if a.get(key) is not None:
                assert (a[key] - b[key]).abs().max() <= 1e-12 * b[key].abs().max(), (name, key)
