"""vlmo_fast.accelerate on a module tree that mirrors the official classes and attribute names
(vlmo_fast.reference): outputs, gradients, parameter and state-dict identity, the report, the round trip, DDP."""

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import vlmo_fast as vf
from vlmo_fast._native import native_available
from vlmo_fast.config import loss_names
from vlmo_fast.ops import backend as ops_backend
from vlmo_fast.reference import ReferenceVLMo

from dist_utils import run_distributed


def official_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = vf.preset("vlmo_tiny_patch16", drop_path_rate=kw.pop("drop_path_rate", 0.2), **kw)
    model = ReferenceVLMo(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(cfg, b=3):
    ids = torch.randint(1000, 2000, (b, cfg.max_text_len))
    masks = torch.ones(b, cfg.max_text_len, dtype=torch.long)
    masks[1, 4:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    mlm = ids.clone()
    mlm[:, 2] = 103
    return {"text_ids": ids, "text_masks": masks, "text_ids_mlm": mlm, "text_labels_mlm": labels,
            "text_labels": torch.full_like(ids, -100),
            "image": [torch.randn(b, 3, cfg.image_size, cfg.image_size)]}


def run_paths(model, b, train, seed=5):
    model.train(train)
    torch.manual_seed(seed)
    outs = [model.infer(b)["cls_feats"], model.infer_text(b)["cls_vlffn_feats"], model.infer_image(b)["cls_feats"],
            model.infer_text_ft(b)["cls_feats"]]
    loss = sum(o.sum() for o in outs)
    model.zero_grad()
    loss.backward()
    return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device,backend", [("cpu", "auto"), ("cuda-emu", "cuda")], indirect=["device"])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_outputs_and_gradients_equal_the_original(gather, train, device, backend):
    """backend="cuda" on "cuda-emu": the attention softmax of the accelerated official modules runs in the CUDA kernel
    (CPU emulator), with the official dense bias or the table gathered in the kernel."""
    model = official_model()
    original = copy.deepcopy(model)
    b = batch(model.config)
    report = vf.accelerate(model, backend=backend, gather_bias_in_kernel=gather)
    assert len(report.replaced) == 4 and not report.left_alone
    outs, grads = run_paths(model, b, train)
    ref_outs, ref_grads = run_paths(original, b, train)
    for a, e in zip(outs, ref_outs):
        assert torch.allclose(a, e, atol=1e-5, rtol=1e-5)
    assert set(grads) == set(ref_grads)
    for name in grads:
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        assert (grads[name] - ref_grads[name]).abs().max() / scale < 1e-4, name


def test_parameters_state_dict_and_round_trip():
    model = official_model()
    params = list(model.parameters())
    keys = list(model.state_dict())
    opt = torch.optim.AdamW(model.parameters())
    vf.accelerate(model)
    assert all(a is b for a, b in zip(params, model.parameters()))  # the same Parameter objects
    assert list(model.state_dict()) == keys
    assert opt.param_groups[0]["params"][0] is params[0]
    b = batch(model.config)
    model.eval()
    with torch.no_grad():
        fast = model.infer(b)["cls_feats"]
    assert vf.deaccelerate(model) == 4
    assert all("forward" not in blk.__dict__ for blk in model.transformer.blocks)
    with torch.no_grad():
        back = model.infer(b)["cls_feats"]
    original = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(back, original.infer(b)["cls_feats"])  # exactly the official code path again
    assert torch.allclose(fast, back, atol=1e-5)
    # a second accelerate works, and a repeated one reports "already accelerated"
    vf.accelerate(model)
    again = vf.accelerate(model)
    assert not again.replaced and all(why == "already accelerated" for _, why in again.left_alone)
    switched = vf.accelerate(model, backend="torch")  # another backend: the blocks switch to it
    assert all(why == "already accelerated; backend now 'torch'" for _, why in switched.left_alone)
    assert all(b._vlmo_fast_backend == "torch" for b in model.transformer.blocks)


def test_transformer_and_single_block_and_unsupported_cases():
    model = official_model()
    report = vf.accelerate(model.transformer)
    assert report.replaced == [f"blocks.{i}" for i in range(4)]
    vf.deaccelerate(model.transformer)
    blk = model.transformer.blocks[1]
    assert vf.accelerate(blk).replaced == [""]
    vf.deaccelerate(blk)
    model.transformer.blocks[2].attn.attn_drop = nn.Dropout(0.1)
    model.transformer.blocks[3].mlp_text.act = nn.ReLU()
    report = vf.accelerate(model)
    assert report.replaced == ["transformer.blocks.0", "transformer.blocks.1"]
    reasons = dict(report.left_alone)
    assert "attention dropout" in reasons["transformer.blocks.2"]
    assert "ReLU" in reasons["transformer.blocks.3"]
    assert "attention dropout" in str(report)
    assert vf.accelerate(nn.Linear(3, 3)).left_alone[0][1].startswith("no official Block")
    with pytest.raises(TypeError):
        vf.accelerate("not a module")
    fast = vf.VLMo(vf.preset("vlmo_tiny_patch16"))  # an easy mistake: one clear error, not a reason per block
    for m in (fast, fast.transformer, fast.transformer.blocks[0]):
        with pytest.raises(TypeError, match=f"vlmo_fast's own {type(m).__name__}, which runs the fused kernels"):
            vf.accelerate(m)
    plus = ReferenceVLMo(vf.preset("vlmo_base_plus_patch16", depth=2, vlffn_start_layer_index=1, embed_dim=32,
                                   num_heads=2, image_size=32, max_text_len=8))
    rep = vf.accelerate(plus, gather_bias_in_kernel=True)
    assert len(rep.replaced) == 2 and rep.bias_gather.startswith("left alone")


@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_under_autocast(backend):
    """bf16 autocast on CPU: the accelerated model's features and every parameter gradient within twice the error of
    the original model under the same autocast, both against the original in float64. backend="cuda" runs the native
    C++ softmax inside the accelerated attention."""
    if backend == "cuda" and not native_available():
        pytest.skip("the native extension is not built")
    model = official_model(seed=int(torch.randint(2**31, ())), drop_path_rate=0.0)  # fresh: the test seed decides
    original = copy.deepcopy(model)
    ref_model = copy.deepcopy(model).double()
    vf.accelerate(model, backend=backend)
    b = batch(model.config)
    keys = ("text_feats", "image_feats", "cls_feats")

    def run(m, inputs, autocast):
        m.eval()
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m.infer(inputs)
        feats = [out[key] for key in keys]
        sum(f.double().pow(2).mean() for f in feats).backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        return dict(zip(keys, (f.detach() for f in feats)), **grads)

    ops_backend.clear_selected()
    got = run(model, b, True)
    assert ops_backend.last_selected()["masked_softmax"] == ("cuda" if backend == "cuda" else "torch")
    eager = run(original, b, True)
    want = run(ref_model, dict(b, image=[b["image"][0].double()]), False)
    assert set(got) == set(eager) == set(want) and "relative_position_bias_table" in want
    for name, r in want.items():
        err, err_eager = (got[name].double() - r).abs().max(), (eager[name].double() - r).abs().max()
        assert err <= 2 * err_eager + 1e-7, f"{name}: {err:.3e} vs eager {err_eager:.3e}"


def test_from_official():
    src = official_model()
    cfg = {"model_arch": "vlmo_tiny_patch16", "image_size": 64, "max_text_len": 12, "drop_path_rate": 0.2,
           "loss_names": {"itm": 1, "itc": 1, "mlm": 1, "textmlm": 0, "vqa": 0, "nlvr2": 0, "irtr": 0}}
    model = vf.from_official(src.state_dict(), cfg)
    assert isinstance(model, vf.VLMo)
    b = batch(src.config)
    model.eval(), src.eval()
    with torch.no_grad():
        assert torch.allclose(model.infer(b)["cls_feats"], src.infer(b)["cls_feats"], atol=1e-5)
    # newer transformers versions save no position_ids buffer (an arange): strict loading took it for missing
    without_ids = {k: v for k, v in src.state_dict().items() if k != "text_embeddings.position_ids"}
    strict = vf.from_official(without_ids, cfg, strict=True)
    assert torch.equal(strict.text_embeddings.position_ids, model.text_embeddings.position_ids)
    # the text-only stage starts from a BEiT checkpoint, converted as the official loader converts it
    from vlmo_fast.checkpoint import convert_beit_checkpoint

    text_cfg = dict(cfg, max_text_len=196, loss_names={"textmlm": 1})
    beit = {"cls_token": torch.randn(1, 1, 64), "blocks.0.mlp.fc1.weight": torch.randn(256, 64)}
    beit.update({f"blocks.{i}.attn.relative_position_bias_table": torch.randn(52, 4) for i in range(4)})
    text_model = vf.from_official(beit, text_cfg)
    want = convert_beit_checkpoint(beit, text_model)
    assert torch.equal(text_model.transformer.blocks[0].mlp_imag.fc1.weight, beit["blocks.0.mlp.fc1.weight"])
    assert torch.equal(text_model.relative_position_bias_table, want["relative_position_bias_table"])
    with pytest.raises(ValueError, match="model_arch"):
        vf.from_official(src.state_dict(), dict(cfg, model_arch="vit_base"))
    with pytest.raises(TypeError):
        vf.from_official(src.state_dict(), ["not", "a", "dict"])
    with pytest.raises(TypeError, match=r"config\['loss_names'\]: loss_names\['itm'\] must be a number"):
        vf.from_official(src.state_dict(), dict(cfg, loss_names={"itm": "1"}))
    with pytest.raises(TypeError, match="loss_names'] must be a dict"):
        vf.from_official(src.state_dict(), dict(cfg, loss_names=["itm", "itc"]))
    with pytest.raises(ValueError, match="unknown task"):
        vf.from_official(src.state_dict(), dict(cfg, loss_names={"itmm": 1}))
    # as the official loader, strict=False by default: a fine-tuning config keeps its new head's initialisation and
    # leaves out the pretraining heads; strict=True refuses that
    irtr = dict(cfg, loss_names={"irtr": 1})
    ft = vf.from_official(src.state_dict(), irtr)
    assert not hasattr(ft, "mlm_score") or ft.mlm_score is None
    assert torch.equal(ft.transformer.blocks[0].attn.qkv.weight, src.transformer.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="strict=True"):  # a CheckpointError
        vf.from_official(src.state_dict(), irtr, strict=True)
    on = vf.from_official(src.state_dict(), dict(cfg, loss_names={"itm": True, "itc": 0.5, "mlm": np.int64(2),
                                                                   "vqa": 0}))
    assert on.config.loss_names["itm"] == 1 and on.config.loss_names["itc"] == 1 and on.config.loss_names["mlm"] == 1 and on.config.loss_names["vqa"] == 0
    # a dict without loss_names takes the official default (itm, itc, mlm: the pretraining heads), as every other
    # missing key does; it used to build a model with no head at all
    default = vf.from_official(src.state_dict(), {k: v for k, v in cfg.items() if k != "loss_names"}, strict=True)
    assert default.config.loss_names == vf.loss_names(itm=1, itc=1, mlm=1)


def _ddp_step(rank, world, accelerated):
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = official_model(seed=0, drop_path_rate=0.1, loss_names=loss_names(mlm=1, itc=1))
    if accelerated:
        vf.accelerate(model)
    model.current_tasks = ["mlm", "itc"]
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # the pooler is unused
    torch.manual_seed(100)
    full = batch(model.config, b=4)
    local = {k: (v[rank * 2 : rank * 2 + 2] if isinstance(v, torch.Tensor) else [v[0][rank * 2 : rank * 2 + 2]])
             for k, v in full.items()}
    torch.manual_seed(7 + rank)
    out = ddp(local)
    loss = vf.objectives.total_loss(out)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_ddp_training_step_matches_the_original():
    fast = run_distributed(_ddp_step, 2, True)
    slow = run_distributed(_ddp_step, 2, False)
    for (lf, gf), (ls, gs) in zip(fast, slow):
        assert abs(lf - ls) < 1e-5
        for name in gs:
            scale = gs[name].abs().max().clamp_min(1e-6)
            assert (gf[name] - gs[name]).abs().max() / scale < 1e-4, name
    # DDP averaged the gradients: both ranks hold the same ones
    for name in fast[0][1]:
        assert torch.allclose(fast[0][1][name], fast[1][1][name])


def test_gathered_bias_keeps_one_device_copy_per_index():
    """The official module's index tensors live on the CPU: the device copy is made once per index (and again only
    when that index changes), so the kernels' per-index caches hold across forwards. A meta-device table stands in
    for a GPU one here (a copy to it is a new tensor, as to CUDA)."""
    from vlmo_fast.accelerate import _bind_get_rel_pos_bias

    module = torch.nn.Module()
    module.num_layers = 2
    module.relative_position_bias_table = torch.nn.Parameter(torch.zeros(10, 4, device="meta"))
    get = _bind_get_rel_pos_bias(module)
    text, image = torch.arange(9).view(3, 3), torch.arange(4).view(2, 2)
    first = get(text)
    assert len(first) == 2 and first[0].index.device.type == "meta" and first[0].index is first[1].index
    assert first[0].table.shape == (10, 2)
    get(image)
    assert get(text)[0].index is first[0].index  # the same copy, with another index used in between
    text.add_(0)  # changed in place: a new copy
    assert get(text)[0].index is not first[0].index


def test_gathered_bias_copy_traces_in_one_graph_after_eager_use():
    """The device-copy cache must not break torch.compile: after eager calls filled it, a fullgraph trace of the
    function still works (the copy is a plain .to() in the graph)."""
    from vlmo_fast.accelerate import _bind_get_rel_pos_bias

    module = torch.nn.Module()
    module.num_layers = 2
    module.relative_position_bias_table = torch.nn.Parameter(torch.randn(10, 4))
    get = _bind_get_rel_pos_bias(module)
    index = torch.arange(9).view(3, 3)
    get(index)  # eager: fills the cache

    def gathered(i):
        return torch.stack([b.table[b.index].sum() for b in get(i)])

    torch._dynamo.reset()
    compiled = torch.compile(gathered, fullgraph=True, backend="eager")
    assert torch.equal(compiled(index), gathered(index))


def test_blocks_whose_modules_the_fused_path_would_bypass_are_left_alone():
    """The fused block reads norm1/norm2 and MLP parameters instead of calling those modules: a LayerNorm subclass
    with its own forward, one without an affine weight, or a forward hook on a submodule would silently stop
    mattering, so those blocks are left alone, saying why."""

    class ScaledNorm(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    model = official_model()
    blocks = model.transformer.blocks
    blocks[0].norm1 = ScaledNorm(blocks[0].norm1.normalized_shape, eps=blocks[0].norm1.eps)
    blocks[1].norm2_imag = nn.LayerNorm(blocks[1].norm2_imag.normalized_shape, elementwise_affine=False)
    blocks[2].mlp_text.fc1.register_forward_hook(lambda *args: None)

    class LoRALinear(nn.Linear):  # a subclass whose forward adds to the weight's product
        def forward(self, x):
            return super().forward(x) + 1.0

    fc2 = blocks[3].mlp_imag.fc2
    blocks[3].mlp_imag.fc2 = LoRALinear(fc2.in_features, fc2.out_features)
    original = copy.deepcopy(model)
    report = vf.accelerate(model, gather_bias_in_kernel=True)
    reasons = dict(report.left_alone)
    assert reasons["transformer.blocks.0"] == "norm1 is a ScaledNorm with its own forward"
    assert reasons["transformer.blocks.1"] == "norm2_imag has no affine weight and bias"
    assert reasons["transformer.blocks.2"] == "mlp_text.fc1 has forward or backward hooks, which the fused block would not run"
    assert reasons["transformer.blocks.3"] == "mlp_imag.fc2 is a LoRALinear with its own forward"
    # every block left alone runs the official forward, which takes the dense bias only: no in-kernel gather
    assert report.bias_gather.startswith("left alone: transformer.blocks.0, transformer.blocks.1")
    b = batch(model.config)
    model.eval(), original.eval()
    torch.testing.assert_close(model.infer(b)["cls_feats"], original.infer(b)["cls_feats"])


def test_settings_changed_after_accelerating_are_followed():
    """The fused block reads the DropPath rate at each call, and steps back to the official forward when a dropout
    is turned on or a hook is put on a submodule after accelerating (both used to be ignored silently). A float
    mask is taken as the official attention takes it (nonzero = keep)."""
    model = official_model(drop_path_rate=0.3)
    vf.accelerate(model, gather_bias_in_kernel=True)
    original = official_model(drop_path_rate=0.3)
    b = batch(model.config)

    def both(fn):
        outs = []
        for m in (model, original):
            torch.manual_seed(3)
            outs.append(fn(m))
        return outs

    for m in (model, original):
        for blk in m.transformer.blocks:
            blk.drop_path.drop_prob = 0.0
    a, e = both(lambda m: m.train().infer(b)["cls_feats"])
    torch.testing.assert_close(a, e)
    for m in (model, original):
        m.transformer.blocks[1].mlp_text.drop = nn.Dropout(0.5)
    calls = []
    model.transformer.blocks[0].mlp_imag.fc1.register_forward_hook(lambda *args: calls.append(1))
    a, e = both(lambda m: m.train().infer(b)["cls_feats"])
    torch.testing.assert_close(a, e)
    assert calls  # the hook ran: block 0 took the official forward
    # a full backward hook on a submodule, and global module hooks (run for every module called), likewise
    grads = []
    model.transformer.blocks[2].norm2_text.register_full_backward_hook(lambda *args: grads.append(1))
    model.train().infer_text(b)["cls_feats"].sum().backward()  # (the text expert runs in every layer here)
    assert grads
    seen = set()
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.add(id(m)))
    try:
        model.eval().infer(b)
    finally:
        handle.remove()
    assert id(model.transformer.blocks[1].mlp_text.fc2) in seen
    blk = model.transformer.blocks[3]
    x = torch.randn(2, 7, model.config.embed_dim)
    keep = torch.tensor([[1.0, 1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    model.eval()
    torch.testing.assert_close(blk(x, mask=keep, modality_type="image"),
                               type(blk).forward(blk, x, mask=keep, modality_type="image"))


def test_submodules_replaced_after_accelerating_are_followed():
    """A LoRA-style Linear injected, or the activation swapped, after accelerating (what peft does to a model built
    earlier) sends the block back to its official forward: the fused path read the weights and bypassed both,
    silently (wrong outputs, no gradient for the adapter's parameters)."""

    class LoRALinear(nn.Linear):
        def __init__(self, base):
            super().__init__(base.in_features, base.out_features)
            self.weight, self.bias = base.weight, base.bias
            self.A = nn.Parameter(torch.randn(2, base.in_features) * 0.5)
            self.B = nn.Parameter(torch.randn(base.out_features, 2) * 0.5)

        def forward(self, x):
            return super().forward(x) + x @ self.A.t() @ self.B.t()

    def change(m):
        torch.manual_seed(11)
        m.transformer.blocks[0].attn.proj = LoRALinear(m.transformer.blocks[0].attn.proj)
        m.transformer.blocks[1].mlp_text.fc1 = LoRALinear(m.transformer.blocks[1].mlp_text.fc1)
        m.transformer.blocks[2].mlp_imag.act = nn.GELU(approximate="tanh")

    model, original = official_model(), official_model()
    vf.accelerate(model)
    b = batch(model.config)
    run_paths(model, b, train=True)  # accelerated calls before the change
    change(model), change(original)
    outs, grads = run_paths(model, b, train=True)
    outs_e, grads_e = run_paths(original, b, train=True)
    for a, e in zip(outs, outs_e):
        torch.testing.assert_close(a, e)
    assert grads.keys() == grads_e.keys() and "transformer.blocks.0.attn.proj.A" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_e[name], msg=name)
    # changed back to a plain GELU: the fused path again
    from vlmo_fast.accelerate import _changed_since
    assert _changed_since(model.transformer.blocks[2]) == "mlp_imag activation is GELU('tanh'), not exact GELU"
    model.transformer.blocks[2].mlp_imag.act = nn.GELU()
    assert _changed_since(model.transformer.blocks[2]) is None
    # a hook or a dropout present when the structure is re-checked is not remembered with it: once gone, the block
    # is back on the fused path (it stayed on the official one)
    blk = model.transformer.blocks[3]
    handle = blk.norm1.register_forward_hook(lambda *args: None)
    blk.attn.attn_drop = nn.Dropout(0.1)
    blk.mlp_text.act = nn.GELU()  # a registration: the structure is checked again now
    assert _changed_since(blk).startswith("attention dropout 0.1 > 0")
    blk.attn.attn_drop.p = 0.0
    assert _changed_since(blk) == "norm1 has forward or backward hooks, which the fused block would not run"
    handle.remove()
    assert _changed_since(blk) is None
    # changes that register nothing are seen too: a class swapped in place, a submodule deleted
    blk.mlp_text.fc1.__class__ = LoRALinear
    assert _changed_since(blk) == "mlp_text.fc1 is a LoRALinear with its own forward"
    blk.mlp_text.fc1.__class__ = nn.Linear
    assert _changed_since(blk) is None
    del model.transformer.blocks[1].norm2_text
    assert _changed_since(model.transformer.blocks[1]) == "not an official Block (no attribute 'norm2_text')"


def test_a_compiled_accelerated_block_is_not_recompiled_by_unrelated_modules():
    """The structure check must not guard a compiled block on anything outside it: building other modules (another
    model, a metric per epoch) made it recompile, and past the recompile limit run eagerly."""
    from torch._dynamo.testing import CompileCounter

    model = official_model().eval()
    vf.accelerate(model)
    blk = model.transformer.blocks[3]
    counter = CompileCounter()
    compiled = torch.compile(blk, backend=counter, fullgraph=True)
    x = torch.randn(2, 7, model.config.embed_dim)
    want = type(blk).forward(blk, x, modality_type="image")
    for _ in range(4):
        nn.Linear(2, 2), nn.LayerNorm(3)
        torch.testing.assert_close(compiled(x, modality_type="image"), want)
    assert counter.frame_count == 1


def test_a_deep_copy_runs_its_own_weights():
    """The accelerated forward is bound to its block: a deep copy of the model (as EMA or model averaging make) runs
    the copy's weights and gives the copy its gradients (a closure kept running the original's)."""
    model = official_model()
    vf.accelerate(model, gather_bias_in_kernel=True)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    reference = official_model()
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(0.5)
    b = batch(model.config)
    model.eval(), clone.eval(), reference.eval()
    out = clone.infer(b)["cls_feats"]
    torch.testing.assert_close(out, reference.infer(b)["cls_feats"])
    out.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert clone.transformer.blocks[0].attn.proj.weight.grad is not None
    # a pickled accelerated model (torch.save of the whole module) loads back, accelerated, with its own weights
    import pickle

    restored = pickle.loads(pickle.dumps(clone))
    assert restored.transformer.blocks[0].forward.module is restored.transformer.blocks[0]
    torch.testing.assert_close(restored.infer(b)["cls_feats"], out)


def test_an_inference_mode_forward_first_does_not_break_training():
    """The in-kernel gather keeps each index's device copy for later forwards: made during a forward under
    torch.inference_mode (a sanity validation before training), it must still be a normal tensor, or every later
    training forward fails to save it for backward."""
    model = official_model()
    vf.accelerate(model, backend="cuda" if native_available() else "auto", gather_bias_in_kernel=True)
    b = batch(model.config)
    model.eval()
    with torch.inference_mode():
        model.infer(b)
    model.train()
    model.infer(b)["cls_feats"].sum().backward()
    assert model.relative_position_bias_table.grad is not None
    # on a GPU the copy is a new tensor (on the CPU here it is the index itself): a meta copy stands in for it
    from vlmo_fast.accelerate import _device_copy

    with torch.inference_mode():
        copy_made_there = _device_copy(torch.arange(4), torch.device("meta"))
    assert not copy_made_there.is_inference()


def _replicate_as_data_parallel(module, new_value):
    """What ``torch.nn.parallel.replicate`` does for one more GPU (it needs CUDA devices): each module's
    ``_replicate_for_data_parallel()``, then the replicas' children, and per-device copies of the parameters set as
    plain attributes (``new_value`` stands for the broadcast to the other device)."""
    modules = list(module.modules())
    copies = {id(m): m._replicate_for_data_parallel() for m in modules}
    for m in modules:
        replica = copies[id(m)]
        for key, child in m._modules.items():
            setattr(replica, key, None if child is None else copies[id(child)])
        for key, p in m._parameters.items():
            setattr(replica, key, None if p is None else new_value(p))
    return copies[id(module)]


@pytest.mark.parametrize("gather", [False, True])
def test_a_data_parallel_replica_runs_its_own_weights(gather):
    """nn.DataParallel's replicas shallow-copy each module's __dict__: the accelerated forward (and the bias gather)
    stayed bound to the original blocks, so every GPU ran the first GPU's weights and sent it the gradients."""
    model = official_model()
    report = vf.accelerate(model, gather_bias_in_kernel=gather)
    assert report.replaced
    leaves = {}

    def halved(p):
        leaves[p] = p.detach().clone().requires_grad_()
        return leaves[p] * 0.5

    b = batch(model.config)
    model.eval()
    replica = _replicate_as_data_parallel(model, halved)
    out = replica.infer(b)["cls_feats"]
    reference = official_model()
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(0.5)
    reference.eval()
    want = reference.infer(b)["cls_feats"]
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    by_name = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if by_name[name].grad is not None:
            torch.testing.assert_close(leaves[p].grad * 2, by_name[name].grad, msg=name)  # d(0.5 w) = 0.5 dw
    assert replica.transformer.blocks[0].forward.module is replica.transformer.blocks[0]
    assert model.transformer.blocks[0].forward.module is model.transformer.blocks[0]  # the original is untouched
    vf.deaccelerate(model)
    assert "_replicate_for_data_parallel" not in model.transformer.blocks[0].__dict__


@pytest.mark.parametrize("gather", [False, True])
def test_an_accelerated_model_and_its_replicas_are_freed_when_dropped(gather):
    """The bound forwards held their module strongly from its own __dict__ (and each block's structure record held
    the block): a dropped accelerated model, and every DataParallel replica made at each forward, lived on until a
    full garbage collection, which in a long run may come late (measured: 14 of 30 dropped models and 236 MiB, five
    steps' worth of replicas). Plain reference counting frees them now."""
    import gc
    import weakref

    model = official_model()
    vf.accelerate(model, gather_bias_in_kernel=gather)
    b = batch(model.config)
    model.eval()
    replica = _replicate_as_data_parallel(model, lambda p: p.detach().clone())
    replica.infer(b)
    model.infer(b)
    alive = [weakref.ref(m) for m in (model, replica, model.transformer.blocks[0], replica.transformer.blocks[0])]
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model, replica
        assert [ref() is None for ref in alive] == [True] * 4
    finally:
        if enabled:
            gc.enable()
