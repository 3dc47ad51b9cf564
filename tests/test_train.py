"""The training loop: official optimizer groups and schedule, BEiT conversion, convergence parity with the official
math, 2-process equivalence, exact resume, faults (NaN losses, SIGTERM, corrupt images, bad data roots), CLI."""

import contextlib
import copy
import io
import csv
import errno
import json
import math
import multiprocessing
import os
import re
import select
import shutil
import signal
import sys
import tarfile
import time
import warnings

import pyarrow as pa
import pytest
import torch

import vlmo_fast as vf
from vlmo_fast import data as vdata
from vlmo_fast import objectives
from vlmo_fast.checkpoint import CheckpointError, convert_beit_checkpoint, load_checkpoint, looks_like_beit, \
    read_state_dict, save_checkpoint
from vlmo_fast.config import loss_names
from vlmo_fast.model import relpos
from vlmo_fast.train import TrainConfig, train
from vlmo_fast.train import loop as train_loop
from vlmo_fast.train.config import build_parser, config_from_args
from vlmo_fast.train.optim import OfficialAdamW, build_optimizer, build_scheduler, freeze_for_textmlm, lr_factor, \
    param_groups
from vlmo_fast.train.state import list_checkpoints

from dist_utils import run_distributed


def small_cfg(out_dir, root, **kw):
    values = dict(arch="vlmo_tiny_patch16", image_size=32, max_text_len=12, data_root=root, out_dir=str(out_dir),
                  batch_size=8, per_device_batch_size=8, max_steps=6, warmup_steps=2, learning_rate=5e-4,
                  num_workers=0, log_every=1, save_every=1000, tensorboard=False, seed=5, drop_path_rate=0.1,
                  final_eval=False)
    values.update(kw)
    return TrainConfig(**values)


def losses(summary):
    return [h["loss"] for h in summary["history"]]


# ---- optimizer, schedule, freezing, conversion ----------------------------------------------------------------


def test_official_parameter_groups():
    model = vf.VLMo(vf.preset("vlmo_tiny_patch16", loss_names=loss_names(vqa=1)))
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, weight_decay=0.01, lr_mult=20)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert "relative_position_bias_table" in members["no_decay"]  # its name contains "bias"
    assert "transformer.blocks.0.attn.q_bias" in members["no_decay"]
    assert "transformer.blocks.0.norm1.weight" in members["no_decay"]
    assert "transformer.norm.weight" in members["no_decay"]
    assert "transformer.blocks.0.norm2_text.weight" in members["decay"]  # "norm2.weight" does not match (Q14)
    assert "transformer.blocks.0.gamma_1" in members["decay"] and "transformer.cls_token" in members["decay"]
    assert "vqa_classifier.1.weight" in members["decay/head"] and "vqa_classifier.0.bias" in members["no_decay/head"]
    assert sum(len(m) for m in members.values()) == sum(1 for _ in model.parameters())
    # spec §6.3: decay groups at the configured weight decay, no-decay groups at 0; the heads at lr x lr_mult
    for wd in (0.01, 0.05):
        groups = {g["name"]: g for g in param_groups(model, lr=1e-4, weight_decay=wd, lr_mult=20)}
        assert {k: g["weight_decay"] for k, g in groups.items()} == {"decay": wd, "no_decay": 0.0, "decay/head": wd,
                                                                     "no_decay/head": 0.0}
        assert {k: g["lr"] for k, g in groups.items()} == pytest.approx({"decay": 1e-4, "no_decay": 1e-4,
                                                                          "decay/head": 20e-4, "no_decay/head": 20e-4})
    # the optimizer keeps them (and a group's own values win over the optimizer's defaults)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05, lr_mult=20)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.05, "no_decay": 0.0,
                                                                        "decay/head": 0.05, "no_decay/head": 0.0}
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(
        {"decay": 1e-4, "no_decay": 1e-4, "decay/head": 20e-4, "no_decay/head": 20e-4})


def _official_adamw_by_hand(p, grads, lr, betas, eps, weight_decay):
    """The official optimizer's update (transformers 4.8.1 AdamW), element by element in Python floats (float64)."""
    b1, b2 = betas
    p, m, v = list(p), [0.0] * len(p), [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            m[i] = m[i] * b1 + (1 - b1) * gi
            v[i] = v[i] * b2 + (1 - b2) * gi * gi
            p[i] -= lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m[i] / (math.sqrt(v[i]) + eps)
            p[i] -= lr * weight_decay * p[i]
    return p


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("scale", [1e-2, 1e-6, 1e-8])
def test_official_adamw_matches_the_official_update_rule(scale, fused):
    """float64: equal to the hand computation at every gradient size, including gradients near eps where torch's
    AdamW (eps after the bias correction, decay before the update) moves the weights visibly differently; both the
    foreach path and torch's fused kernel with the rewritten hyperparameters."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(7, generator=gen, dtype=torch.float64)
    grads = [torch.randn(7, generator=gen, dtype=torch.float64) * scale for _ in range(5)]
    kw = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    results = {}
    for name, cls, extra in (("official", OfficialAdamW, dict(fused=fused)), ("torch", torch.optim.AdamW, {})):
        p = torch.nn.Parameter(p0.clone())
        frozen = torch.nn.Parameter(p0.clone())  # never gets a gradient: untouched, no decay either
        opt = cls([p, frozen], **kw, **extra)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        assert torch.equal(frozen, p0)
        results[name] = p.detach()
    expected = torch.tensor(_official_adamw_by_hand(p0.tolist(), [g.tolist() for g in grads], **kw),
                            dtype=torch.float64)
    torch.testing.assert_close(results["official"], expected, rtol=1e-14 if not fused else 1e-13, atol=1e-15)
    moved = (expected - p0).abs().max()
    gap = (results["torch"] - expected).abs().max() / moved
    assert gap > (1e-2 if scale <= 1e-6 else 1e-5)  # the two rules differ, most for gradients near eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_adamw_fused_equals_foreach_in_low_precision(dtype):
    """The fused kernel and the foreach ops apply the same rule to fp32/bf16 weights: equal to rounding (both
    against the float64 hand computation, the fused one no further from it than 2x the foreach one), with
    parameters at different step counts (one skipped a step), lr 0 (the first warmup step) and a no-decay group."""
    gen = torch.Generator().manual_seed(3)
    p0 = [torch.randn(n, generator=gen) * 0.05 for n in (33, 5, 1)]  # updates of ~1e-3 are resolvable in bf16
    steps = [[torch.randn(p.shape, generator=gen) * 1e-3 for p in p0] for _ in range(4)]
    lrs = [0.0, 1e-3, 2e-3, 1e-3]
    results = {}
    for fused in (False, True):
        params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in p0]
        opt = OfficialAdamW([{"params": params[:2], "weight_decay": 0.05}, {"params": params[2:]}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0, fused=fused)
        for k, (gs, lr) in enumerate(zip(steps, lrs)):
            for group in opt.param_groups:
                group["lr"] = lr
            for i, (p, g) in enumerate(zip(params, gs)):
                p.grad = None if (k == 1 and i == 1) else g.to(dtype)
            opt.step()
        results[fused] = [p.detach().double() for p in params]
        assert opt.state[params[1]]["step"] == 3 and opt.state[params[0]]["step"] == 4
    # float64 reference of the same schedule (param 1 skips step 2 and so has its own step count)
    ref = []
    for i, p in enumerate(p0):
        wd = 0.05 if i < 2 else 0.0
        x, m, v, t = p.to(dtype).double(), 0.0, 0.0, 0
        for k, (gs, lr) in enumerate(zip(steps, lrs)):
            if k == 1 and i == 1:
                continue
            t += 1
            g = gs[i].to(dtype).double()
            m = 0.9 * m + 0.1 * g
            v = 0.98 * v + 0.02 * g * g
            x = x - lr * math.sqrt(1 - 0.98 ** t) / (1 - 0.9 ** t) * m / (v.sqrt() + 1e-8)
            x = x - lr * wd * x
        ref.append(x)
    for foreach, fused, r, p in zip(results[False], results[True], ref, p0):
        moved = (r - p.to(dtype).double()).abs().max()
        assert moved > 0
        err_foreach = (foreach - r).abs().max()
        err_fused = (fused - r).abs().max()
        ulp = torch.finfo(dtype).eps * r.abs().max()  # one rounding of the result
        assert err_fused <= 2 * err_foreach + ulp, (dtype, err_fused, err_foreach)
        assert err_fused <= 0.05 * moved + ulp


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_adamw_fused_on_cuda(dtype):
    """CUDA: the fused kernel with the rewritten hyperparameters applies the official rule as the foreach ops do
    (fp32: to a few roundings; bf16 weights: within one bf16 rounding), over several steps."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    p0 = [torch.randn(n, device="cuda", generator=gen) * 0.05 for n in (4096, 768, 1)]
    grads = [[torch.randn(p.shape, device="cuda", generator=gen) * 1e-3 for p in p0] for _ in range(3)]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in p0]
        # lr 1e-2: three steps move the weights (~3e-2) far more than the tolerance below (~3e-3 in bf16)
        opt = OfficialAdamW([{"params": params[:2], "weight_decay": 0.05}, {"params": params[2:]}], lr=1e-2,
                            betas=(0.9, 0.98), eps=1e-8, fused=fused)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(dtype)
            opt.step()
        results.append([p.detach().float() for p in params])
    for i, (a, b, p) in enumerate(zip(results[0], results[1], p0)):
        ulps = 8 if dtype == torch.float32 else 2  # a few fp32 roundings; bf16 also rounds m, v between ops
        scale = torch.maximum(b.abs().max(), p.abs().max())  # a weight can end near 0: its start sets the ulp
        tol = ulps * torch.finfo(dtype).eps * scale
        assert (a - b).abs().max() <= tol
        if i == 0:  # 4096 weights: the fused update moved some by ~3 steps of lr, far beyond the tolerance
            assert (a - p.to(dtype).float()).abs().max() > 4 * tol


def test_official_adamw_fused_option():
    """fused=None falls back to the foreach ops where the kernel's bias-correction switch cannot work (β2 within 1e-6
    of 1) or lr·wd = 1; fused=True there is an error; a non-bool is refused."""
    def run(fused, betas=(0.9, 1 - 1e-7), lr=1e-3, wd=0.0):
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        OfficialAdamW([p], lr=lr, betas=betas, weight_decay=wd, fused=fused).step()
        return p.detach()

    with pytest.raises(RuntimeError, match="fused=True"):
        run(True)
    torch.testing.assert_close(run(None), run(False))
    assert (run(None) < 1).all()
    torch.testing.assert_close(run(None, betas=(0.9, 0.98), lr=0.5, wd=2.0), torch.zeros(3))  # (1 - lr·wd) = 0
    # a gradient laid out unlike its parameter (the kernel would pair the wrong elements): foreach, same result
    results = []
    for fused in (None, False):
        p = torch.nn.Parameter(torch.zeros(8, 4))
        p.grad = torch.arange(32.0).reshape(4, 8).t()
        OfficialAdamW([p], lr=1e-2, betas=(0.9, 0.98), fused=fused).step()
        results.append(p.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert results[0][1, 0] != results[0][0, 1]  # element (1, 0) moved by its own gradient (1.0), not (0, 1)'s (8.0)
    with pytest.raises(TypeError, match="fused"):
        OfficialAdamW([torch.nn.Parameter(torch.ones(1))], fused="yes")


def test_official_adamw_groups_state_dict_and_resume():
    """The optimizer kinds, a bad kind refused, and a resumed OfficialAdamW continuing exactly."""
    model = vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=32, max_text_len=6, depth=2, vlffn_start_layer_index=1))
    opt = build_optimizer(model, lr=1e-3)
    assert isinstance(opt, OfficialAdamW) and isinstance(build_optimizer(model, 1e-3, kind="torch"), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(model, 1e-3, kind="sgd")
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(4)]

    def run(o, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            o.step()

    start = {k: v.clone() for k, v in model.state_dict().items()}
    run(opt, grads[:2])
    saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the state tensors
    run(opt, grads[2:])
    full = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    opt2 = build_optimizer(model, lr=1e-3)
    run(opt2, grads[:2])
    opt3 = build_optimizer(model, lr=1e-3)
    opt3.load_state_dict(saved)
    run(opt3, grads[2:])
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_training_starts_task_heads_from_their_initialisation(tmp_path):
    """Spec Q11: the official code builds the VQA/NLVR2 heads after loading the starting weights, so a fine-tuning run
    from a fine-tuned checkpoint loads the backbone but not the head."""
    cfg = vf.preset("vlmo_tiny_patch16", image_size=32, max_text_len=6, loss_names=loss_names(vqa=1))
    tuned = vf.VLMo(cfg)
    with torch.no_grad():
        for p in tuned.parameters():
            p.fill_(7.0)
    save_checkpoint(tuned, tmp_path / "vqa.safetensors")
    torch.manual_seed(0)
    fresh = vf.VLMo(cfg)
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    report = train_loop.initialise_from(fresh, str(tmp_path / "vqa.safetensors"))
    assert "task heads not loaded" in report and "vqa_classifier.0.weight" in report
    for k, v in fresh.state_dict().items():
        if k.startswith("vqa_classifier."):
            assert torch.equal(v, init[k]), k
        elif v.is_floating_point():
            assert torch.all(v == 7.0), k


def test_schedule_linear_and_cosine():
    assert [lr_factor(s, 10, 110) for s in (0, 5, 10, 60, 110, 200)] == pytest.approx([0, 0.5, 1.0, 0.5, 0, 0])
    # cosine after the warmup: 0.5 (1 + cos(pi p)) at progress p = (s - 10) / 100, computed here by hand
    cosine = [1.0, 0.5 * (1 + math.cos(math.pi * 0.2)), 0.5 * (1 + math.cos(math.pi * 0.25)), 0.5,
              0.5 * (1 + math.cos(math.pi * 0.75)), 0.5 * (1 + math.cos(math.pi * 0.99)), 0.0]
    assert [lr_factor(s, 10, 110, "cosine") for s in (10, 30, 35, 60, 85, 109, 110)] == pytest.approx(cosine)
    assert cosine[1] == pytest.approx(0.9045, abs=1e-4) and cosine[4] == pytest.approx(0.1464, abs=1e-4)
    assert [lr_factor(s, 10, 110, "cosine") for s in (0, 5)] == pytest.approx([0, 0.5])  # the same warmup
    # end_lr > 0: the decay ends at end_factor (0.2 here) and stays there; the warmup is unchanged
    assert [lr_factor(s, 10, 110, "linear", 0.2) for s in (0, 5, 10, 35, 60, 109, 110, 200)] == pytest.approx(
        [0, 0.5, 1.0, 0.8, 0.6, 0.208, 0.2, 0.2])
    assert [lr_factor(s, 10, 110, "cosine", 0.2) for s in (5, 10, 30, 60, 85, 110, 200)] == pytest.approx(
        [0.5, 1.0, 0.2 + 0.8 * cosine[1], 0.6, 0.2 + 0.8 * cosine[4], 0.2, 0.2])
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(60, 10, 110, "step")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, 4, 8)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 1.5, 1.0, 0.5])
    # end_lr is an absolute learning rate: 0.5 of a base lr 2 is a factor 0.25
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, 0, 4, end_lr=0.5)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0, 1.625, 1.25, 0.875, 0.5])


def test_textmlm_freezing_and_beit_conversion():
    model = vf.VLMo(vf.preset("vlmo_tiny_patch16", max_text_len=40, loss_names=loss_names(textmlm=1)))
    trainable = freeze_for_textmlm(model)
    assert "transformer.blocks.0.mlp_text.fc1.weight" in trainable and "relative_position_bias_table" in trainable
    assert "transformer.norm.weight" in trainable and "text_embeddings.word_embeddings.weight" in trainable
    assert "transformer.blocks.0.attn.qkv.weight" not in trainable
    assert "transformer.blocks.0.mlp_imag.fc1.weight" not in trainable
    beit = {"cls_token": torch.randn(1, 1, 64), "blocks.0.mlp.fc1.weight": torch.randn(256, 64),
            "blocks.1.norm2.weight": torch.randn(64), "blocks.0.attn.qkv.weight": torch.randn(192, 64)}
    for layer in range(4):  # 64 px: a 4x4 grid, (2*4-1)^2 + 3 = 52 rows
        beit[f"blocks.{layer}.attn.relative_position_bias_table"] = torch.full((52, 4), float(layer))
        beit[f"blocks.{layer}.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    assert looks_like_beit(beit)
    out = convert_beit_checkpoint(beit, model)
    assert "transformer.blocks.0.mlp_imag.fc1.weight" in out and "transformer.blocks.1.norm2_imag.weight" in out
    assert "transformer.cls_token" in out and "transformer.blocks.0.attn.relative_position_index" in out
    table = out["relative_position_bias_table"]
    assert table.shape == model.relative_position_bias_table.shape
    assert torch.all(table[:52, 4:8] == 1.0) and torch.all(table[:52, 12:16] == 3.0)
    assert torch.all(table[52:] == 0)  # text rows untouched (zeros at init)
    # a BEiT checkpoint of another image size (48 and 128 px) was copied row for row: its CLS rows landed on patch
    # offsets, and a larger grid's rows on the text rows. Its patch offsets are resampled to the model's grid.
    for window in (3, 8):
        rows = (2 * window - 1) ** 2 + 3
        other = {f"blocks.{layer}.attn.relative_position_bias_table": torch.randn(rows, 4) for layer in range(4)}
        notes = []
        table = convert_beit_checkpoint(other, model, notes)["relative_position_bias_table"]
        merged = torch.cat([other[f"blocks.{layer}.attn.relative_position_bias_table"] for layer in range(4)], 1)
        torch.testing.assert_close(table[:52], relpos.resize_table(merged, 52, 4))
        assert torch.equal(table[49:52], merged[-3:]) and torch.all(table[52:] == 0)
        assert notes == [f"BEiT relative_position_bias_table blocks: {rows} -> 52 rows (bicubic, BEiT grid: the "
                         f"model's 4x4 patches)"]
    bad = {f"blocks.{layer}.attn.relative_position_bias_table": torch.randn(51, 4) for layer in range(4)}
    with pytest.raises(CheckpointError, match="BEiT tables: relative_position_bias_table with 51 rows does not fit"):
        convert_beit_checkpoint(bad, model)


# ---- the loop ------------------------------------------------------------------------------------------------


def test_convergence_parity_with_the_official_math(tmp_path, synthetic_root):
    """Same seed, fp32: the fast model and the eager official math give the same loss at every step."""
    fast = train(small_cfg(tmp_path / "fast", synthetic_root, max_steps=10))
    ref = train(small_cfg(tmp_path / "ref", synthetic_root, max_steps=10, model_impl="reference"))
    a, b = losses(fast), losses(ref)
    assert len(a) == len(b) == 10
    for step, (x, y) in enumerate(zip(a, b)):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6), f"step {step + 1}: {x} vs {y}"
    assert fast["final"]["loss"] < a[0]


def test_resume_continues_the_same_trajectory(tmp_path, synthetic_root):
    full = train(small_cfg(tmp_path / "full", synthetic_root, max_steps=6, save_every=3, keep_last=5, num_workers=1))
    ckpts = list_checkpoints(str(tmp_path / "full"))
    assert [os.path.basename(p) for p in ckpts] == ["step_00000003.pt", "step_00000006.pt"]
    resumed_dir = tmp_path / "resumed"
    os.makedirs(resumed_dir / "checkpoints")
    shutil.copy(ckpts[0], resumed_dir / "checkpoints")
    shutil.copy(tmp_path / "full" / "log.csv", resumed_dir)  # holds steps 1-6: 4-6 are dropped and logged again
    resumed = train(small_cfg(resumed_dir, synthetic_root, max_steps=6, save_every=3, keep_last=5, num_workers=1))
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(losses(full)[3:], rel=1e-6)
    with open(resumed_dir / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r["loss"]] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_of_another_trajectory_are_set_aside_not_kept_over_this_runs(tmp_path, synthetic_root, capsys):
    """A run resumed from an earlier checkpoint (a roll-back), or started afresh in a used folder, moves the later
    steps' checkpoints into checkpoints/superseded/: keep-last, which keeps the highest steps, used to delete the
    new run's checkpoints as soon as they were written and keep the old run's, which resume=auto then continued."""
    run = tmp_path / "run"
    train(small_cfg(run, synthetic_root, max_steps=6, save_every=2, keep_last=5))
    names = lambda folder: sorted(os.listdir(folder))  # noqa: E731
    assert names(run / "checkpoints") == [f"step_0000000{i}.pt" for i in (2, 4, 6)]
    capsys.readouterr()
    rolled = train(small_cfg(run, synthetic_root, max_steps=5, save_every=1, keep_last=1,
                             resume=str(run / "checkpoints" / "step_00000002.pt")))
    assert rolled["last_checkpoint"] == str(run / "checkpoints" / "step_00000005.pt")
    assert names(run / "checkpoints") == ["step_00000005.pt", "superseded"]
    assert names(run / "checkpoints" / "superseded") == ["step_00000004.pt", "step_00000006.pt"]
    assert "checkpoints: moved" in capsys.readouterr().out
    fresh = train(small_cfg(run, synthetic_root, max_steps=2, save_every=1, keep_last=1, resume="none"))
    assert names(run / "checkpoints") == ["step_00000002.pt", "superseded"] and fresh["steps"] == 2
    # the roll-back's step 5 joined the first run's files there, under a name of its own
    assert names(run / "checkpoints" / "superseded") == ["step_00000004.pt", "step_00000005.pt", "step_00000006.pt"]
    # set aside again, a step already there: the later roll-back's file replaces it (a run killed and resumed again
    # and again sets aside the same steps each time: kept side by side, the copies filled the disk)
    from vlmo_fast.train.state import set_aside_later_checkpoints

    (run / "checkpoints" / "step_00000005.pt").write_bytes(b"another trajectory's step 5")
    set_aside_later_checkpoints(str(run), 2)
    assert names(run / "checkpoints" / "superseded") == ["step_00000004.pt", "step_00000005.pt", "step_00000006.pt"]
    assert (run / "checkpoints" / "superseded" / "step_00000005.pt").read_bytes() == b"another trajectory's step 5"


def test_resume_auto_falls_back_past_an_unreadable_checkpoint(tmp_path, synthetic_root, capsys):
    """A checkpoint a crash of the machine left empty or cut short is skipped (and said), not the end of the run;
    a partial write a killed process left is removed; a file of weights alone is not a training checkpoint."""
    run = tmp_path / "run"
    full = train(small_cfg(run, synthetic_root, max_steps=4, save_every=2, keep_last=5))
    folder = run / "checkpoints"
    whole = (folder / "step_00000004.pt").read_bytes()
    (folder / "step_00000004.pt").write_bytes(whole[: len(whole) // 2])
    (folder / "step_00000005.pt").write_bytes(b"")
    (folder / ".tmp-abcstep_00000006.pt").write_bytes(whole)
    capsys.readouterr()
    resumed = train(small_cfg(run, synthetic_root, max_steps=4, save_every=2, keep_last=5))
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000002.pt at step 2" in out
    assert "checkpoints: skipped" in out and "step_00000005.pt" in out and "removed" in out
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(losses(full)[2:], rel=1e-6)
    assert sorted(os.listdir(folder)) == ["step_00000002.pt", "step_00000004.pt", "superseded"]
    weights = tmp_path / "weights.safetensors"
    vf.save_checkpoint(vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=32, max_text_len=12)), weights)
    with pytest.raises(CheckpointError, match="is not a training checkpoint .*training starts from one given as "):
        train(small_cfg(tmp_path / "other", synthetic_root, max_steps=1, warmup_steps=0, resume=str(weights)))
    # none loads: the run is not started over (retraining from step 0, its log rewritten, with exit status 0)
    for name in ("step_00000002.pt", "step_00000004.pt"):
        (folder / name).write_bytes(b"")
    none_loads = r"holds checkpoints but none loads \(skipped .*step_00000004.pt.*--resume none starts over there"
    with pytest.raises(ValueError, match=none_loads):
        train(small_cfg(run, synthetic_root, max_steps=4, save_every=2, keep_last=5))
    assert sorted(os.listdir(folder)) == ["step_00000002.pt", "step_00000004.pt", "superseded"]


def test_a_torchrun_restart_resumes_its_newest_checkpoint_whatever_resume_said(tmp_path, synthetic_root, capsys,
                                                                                monkeypatch):
    """torchrun --max-restarts runs the same command again: with --resume none (or PATH) every restart went back
    to the start (or PATH), setting the job's progress aside. A restart (TORCHELASTIC_RESTART_COUNT > 0) resumes the
    job's newest checkpoint (one written since the job began), and says so; PATH may be gone by then (--keep-last);
    an earlier run's checkpoints left in the folder are not the job's."""
    run = tmp_path / "run"
    full = train(small_cfg(run, synthetic_root, max_steps=4, save_every=2, keep_last=5, resume="none"))
    os.unlink(run / "checkpoints" / "step_00000004.pt")  # killed after step 2's save
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    capsys.readouterr()
    resumed = train(small_cfg(run, synthetic_root, max_steps=4, save_every=2, keep_last=5, resume="none"))
    out = capsys.readouterr().out
    assert "torchrun restart 1: resuming" in out and "step_00000002.pt at step 2" in out
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(losses(full)[2:], rel=1e-6)
    # --resume PATH, which --keep-last 1 deleted once the job saved a later step
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    path = run / "checkpoints" / "step_00000002.pt"
    train(small_cfg(run, synthetic_root, max_steps=6, save_every=2, keep_last=1, resume=str(path)))
    assert not path.exists()
    os.unlink(run / "checkpoints" / "step_00000006.pt")
    shutil.copy(run / "checkpoints" / "superseded" / "step_00000004.pt", run / "checkpoints")  # the job's step 4
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    capsys.readouterr()
    again = train(small_cfg(run, synthetic_root, max_steps=6, save_every=2, keep_last=1, resume=str(path)))
    assert "step_00000004.pt at step 4" in capsys.readouterr().out and again["steps"] == 6
    # the first attempt failed before saving anything: the folder's checkpoints are an earlier run's, not resumed
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setattr(train_loop.data_setup, "train_stream", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(small_cfg(run, synthetic_root, max_steps=6, save_every=2, keep_last=1, resume="none"))
    monkeypatch.undo()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    capsys.readouterr()
    fresh = train(small_cfg(run, synthetic_root, max_steps=2, save_every=2, keep_last=1, resume="none"))
    out = capsys.readouterr().out
    assert "torchrun restart" not in out and "resumed from" not in out and fresh["steps"] == 2


def test_a_resume_refuses_a_checkpoint_damaged_inside_its_data(tmp_path, synthetic_root, capsys):
    """Bytes zeroed inside a tensor's data: the mapped load read it without complaint and the resumed run trained
    on garbage (NaN losses). Each record is checked against its checksum first: resume=auto falls back past the file
    (and says why); an explicit --resume is a one-line error naming the damaged record."""
    import zipfile

    run = tmp_path / "run"
    full = train(small_cfg(run, synthetic_root, max_steps=4, save_every=2, keep_last=5))
    path = run / "checkpoints" / "step_00000004.pt"
    with zipfile.ZipFile(path) as archive:  # the largest record: a tensor's bytes, stored uncompressed
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    start = data.index(b"PK\x03\x04", record.header_offset) + 30 + len(record.filename) + len(record.extra)
    data[start + 16 : start + 4096] = bytes(4080)
    path.write_bytes(bytes(data))
    damaged = rf"step_00000004.pt is damaged: its record .*{record.filename.split('/')[-1]} does not match its checksum"
    with pytest.raises(CheckpointError, match=damaged):
        train(small_cfg(tmp_path / "explicit", synthetic_root, max_steps=6, resume=str(path)))
    capsys.readouterr()
    resumed = train(small_cfg(run, synthetic_root, max_steps=4, save_every=2, keep_last=5))
    out = capsys.readouterr().out
    assert "skipped" in out and "is damaged" in out and "step_00000002.pt at step 2" in out
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(losses(full)[2:], rel=1e-6)


def test_deterministic_runs_in_pytorchs_deterministic_mode_and_restores_it(tmp_path, synthetic_root, monkeypatch):
    """--deterministic turns PyTorch's deterministic mode on for the run (warn_only), with cuBLAS's fixed workspace
    (a value already in the environment is kept), and restores the previous mode and environment afterwards; on CPU
    the losses are the same bits as without it."""
    from vlmo_fast import objectives

    seen = []
    real = objectives.total_loss

    def recording(out):
        mode = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        seen.append(mode + (os.environ.get("CUBLAS_WORKSPACE_CONFIG"),))
        return real(out)

    monkeypatch.setattr(objectives, "total_loss", recording)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    on = train(small_cfg(tmp_path / "on", synthetic_root, max_steps=3, deterministic=True))
    assert seen and set(seen) == {(True, True, ":4096:8")}
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()
    seen.clear()
    off = train(small_cfg(tmp_path / "off", synthetic_root, max_steps=3))
    assert seen and set(seen) == {(False, False, None)}
    assert losses(on) == losses(off)
    seen.clear()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    train(small_cfg(tmp_path / "kept", synthetic_root, max_steps=1, warmup_steps=0, deterministic=True))
    assert set(seen) == {(True, True, ":16:8")} and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    seen.clear()
    torch.use_deterministic_algorithms(True)  # the caller's strict mode is not relaxed
    try:
        train(small_cfg(tmp_path / "strict", synthetic_root, max_steps=1, warmup_steps=0, deterministic=True))
        assert set(seen) == {(True, False, ":16:8")} and torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
def test_gpu_deterministic_training_reruns_bit_for_bit(tmp_path, synthetic_root, monkeypatch):
    """On a GPU (bf16 autocast, the Triton kernels) two --deterministic runs from the same seed give the same losses
    and the same weights, bit for bit, even when the attention's autotuners would pick other tiles in the second run
    (as another process may: here they are held to other candidates)."""
    import triton

    from vlmo_fast.ops import triton_attention as ta

    tuners = ((ta._fwd_tuned, ta.FWD_CONFIGS), (ta._dkdv_tuned, ta.DKDV_CONFIGS), (ta._dq_tuned, ta.DQ_CONFIGS))
    runs = []
    for i in range(2):
        for tuned, candidates in tuners:
            m, n, warps, stages = candidates[0] if i == 0 else next(
                c for c in candidates if c[1] not in (candidates[0][1], ta.WHOLE_ROW))
            monkeypatch.setattr(tuned, "configs", [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps,
                                                                 num_stages=stages)])
        runs.append(train(small_cfg(tmp_path / f"run{i}", synthetic_root, max_steps=3, device="cuda",
                                    deterministic=True)))
    assert losses(runs[0]) == losses(runs[1])
    weights = [read_state_dict(r["last_checkpoint"]) for r in runs]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_an_fp16_run_resumes_from_a_run_that_kept_no_loss_scaler(tmp_path, synthetic_root):
    """A bf16/fp32 checkpoint holds an empty GradScaler state; resuming it with --precision fp16 starts a fresh
    scaler (GradScaler.load_state_dict refuses an empty state)."""
    first = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=2, save_every=2, precision="fp32"))
    assert first["stop_reason"] == "max_steps"
    resumed = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=3, save_every=3, precision="fp16"))
    assert resumed["stop_reason"] == "max_steps" and len(resumed["history"]) == 1
    # an fp16 run logs the GradScaler's scale, log.csv too (a new column after the fp32 rows); the fp32 run had none
    assert "grad_scale" not in first["history"][-1] and resumed["history"][0]["grad_scale"] == 2.0 ** 16
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        assert [r["grad_scale"] for r in csv.DictReader(f)] == ["", "", "65536.0"]


def test_an_fp16_run_logs_the_grad_scale_the_scaler_halves_at_an_update_it_skips(tmp_path, synthetic_root,
                                                                                  monkeypatch):
    """A finite loss with an inf gradient: the GradScaler skips the update and halves its scale, which no column
    showed (the loop's own skipped_steps counts non-finite losses)."""
    real, calls = train_loop.sync_replicated_grads, []

    def inf_gradient_at_step_2(model):
        real(model)
        calls.append(1)
        if len(calls) == 2:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("inf"))

    monkeypatch.setattr(train_loop, "sync_replicated_grads", inf_gradient_at_step_2)
    summary = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=3, log_every=1, precision="fp16"))
    assert [h["grad_scale"] for h in summary["history"]] == [2.0 ** 16, 2.0 ** 15, 2.0 ** 15]
    assert summary["skipped_steps"] == 0 and all(math.isfinite(h["loss"]) for h in summary["history"])


def test_training_on_tar_shards_has_no_evaluation_to_fail(tmp_path, capsys):
    shards = vdata.write_synthetic_shards(str(tmp_path / "shards"), n=48, samples_per_shard=16, image_size=32)
    summary = train(small_cfg(tmp_path / "run", None, datasets=[os.path.join(os.path.dirname(shards[0]), "*.tar")],
                              max_steps=2, final_eval=True, eval_every=1))
    assert summary["stop_reason"] == "max_steps" and summary["metrics"] == {}
    assert "no final evaluation: the training data are tar shards" in capsys.readouterr().out


def test_shards_given_as_a_folder_train_and_a_pattern_that_names_nothing_is_named(tmp_path, capsys):
    """--datasets takes a folder of shards as a path (it used to ask for --data-root), and a pattern matching no file
    is an error naming it (it said "no shards in []")."""
    from vlmo_fast import cli

    shards = vdata.write_synthetic_shards(str(tmp_path / "shards"), n=16, samples_per_shard=8, image_size=32)
    summary = train(small_cfg(tmp_path / "run", None, datasets=[os.path.dirname(shards[0]) + "/"], max_steps=1,
                              warmup_steps=0))
    assert summary["stop_reason"] == "max_steps"
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    for pattern, error in ((str(tmp_path / "empty" / "*.tar"), "no shards match"),
                           (str(tmp_path / "shards" / "x-{0..3}.tar"), "shard not found"),
                           (str(tmp_path / "empty") + "/", "no tar shards")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["pretrain", "--datasets", pattern, "--out-dir", str(tmp_path / "bad"), "--max-steps", "1",
                      "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and error in err[0] and str(tmp_path) in err[0], err


_CRASH_WITH_LIVE_WORKERS = """
import sys
from vlmo_fast import objectives
from vlmo_fast.train import TrainConfig, train

original = objectives.compute_itc
calls = []


def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("injected failure at step 2")
    return original(*args, **kwargs)


objectives.compute_itc = failing
datasets = [sys.argv[2]] if len(sys.argv) > 2 else ["coco"]
train(TrainConfig(arch="vlmo_tiny_patch16", image_size=32, max_text_len=12, out_dir=sys.argv[1], batch_size=8,
                  per_device_batch_size=8, max_steps=4, num_workers=2, tensorboard=False, datasets=datasets))
"""


@pytest.mark.parametrize("data", ["synthetic", "shards"])
def test_a_run_that_fails_with_data_workers_running_exits(tmp_path, data):
    """An uncaught error with DataLoader workers alive (the workers ignore SIGTERM, so that a signal to the process
    group does not kill them while the main process saves a checkpoint) ended in a process that never exited:
    multiprocessing's exit handler stops them with SIGTERM and then waits for them. Both streams' workers (the arrow
    datasets' persistent ones, the shards' per-epoch ones)."""
    import subprocess
    import sys

    args = [sys.executable, "-c", _CRASH_WITH_LIVE_WORKERS, str(tmp_path / "run")]
    if data == "shards":
        shards = vdata.write_synthetic_shards(str(tmp_path / "shards"), n=48, samples_per_shard=6, image_size=32)
        args.append(os.path.join(os.path.dirname(shards[0]), "*.tar"))
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the failed run did not exit")
    assert done.returncode == 1 and "RuntimeError: injected failure at step 2" in done.stderr
    assert "Exception ignored" not in done.stderr and "killed by signal" not in done.stderr


def _shard_run(rank, world, out_dir, pattern, steps, workers):
    cfg = small_cfg(out_dir, None, datasets=[pattern], max_steps=steps, per_device_batch_size=8 // world,
                    save_every=5, keep_last=5, num_workers=workers, warmup_steps=1)
    return losses(train(cfg))


def _resumed_from_step_5(tmp_path, name, full_dir):
    resumed_dir = tmp_path / name
    os.makedirs(resumed_dir / "checkpoints")
    shutil.copy(full_dir / "checkpoints" / "step_00000005.pt", resumed_dir / "checkpoints")
    return resumed_dir


@pytest.mark.parametrize("world,workers,indexed", [(1, 2, False), (2, 2, False), (1, 2, True)])
def test_a_run_on_tar_shards_resumes_exactly(tmp_path, capsys, recwarn, world, workers, indexed):
    """A run on tar shards resumed mid-epoch continues the uninterrupted run's trajectory, over the epoch's end: the
    checkpoint holds every rank's position in the shards (it used to restart the epoch's shards). 8 shards of 7 over
    world x 2 readers; step 5 is mid-epoch, a reader due next that is not the first. One image is unreadable: left
    out, it must neither shrink one rank's batch (two processes then failed in the all-gather) nor shift the resumed
    positions. Indexed: 7 x 7 + 3 samples, the index written again after the change, so the readers split a shard
    (26 samples each); without, the change left the index stale and the readers take whole shards."""
    shards = vdata.write_synthetic_shards(str(tmp_path / "shards"), n=52 if indexed else 56, samples_per_shard=7,
                                          image_size=32)
    with tarfile.open(shards[2]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shards[2], "w") as tar:
        for m, data in members:
            data = b"not an image" if m.name == members[4][0].name and m.name.endswith(".png") else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    # the same size (tar's padding): only the time tells the change, and a file system of coarse times (4-10 ms ticks
    # on older kernels) can give the rewrite the time of the first write
    st = os.stat(shards[2])
    os.utime(shards[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert any(m.name.endswith(".png") for m, _ in members[4:5])
    if indexed:
        vdata.write_shard_index(shards)
    pattern = os.path.join(os.path.dirname(shards[0]), "*.tar")
    run = (lambda out: _shard_run(0, 1, str(out), pattern, 9, workers)) if world == 1 else \
        (lambda out: run_distributed(_shard_run, world, str(out), pattern, 9, workers)[0])
    full = run(tmp_path / "full")
    capsys.readouterr()
    resumed = run(_resumed_from_step_5(tmp_path, "resumed", tmp_path / "full"))
    assert resumed == pytest.approx(full[5:], rel=1e-6)
    if world == 1:  # (the warnings of other processes are not seen here)
        assert any("not using the shard index" in str(w.message) for w in recwarn) == (not indexed)
    if world == 1:
        assert "the tar shards continue where they were (epoch 0;" in capsys.readouterr().out
        # another layout restarts the epoch's shards, and says why
        other = _resumed_from_step_5(tmp_path, "other", tmp_path / "full")
        _shard_run(0, 1, str(other), pattern, 6, 1)
        assert ("the tar shards restart epoch 0 (samples of it are seen again): another --num-workers"
                in capsys.readouterr().out)


@pytest.mark.filterwarnings("ignore:gcc train. reading the 1 of its 30 official files")  # one gcc shard, on purpose
def test_evaluation_reads_the_datasets_that_have_a_val_split(tmp_path, synthetic_root, capsys):
    """vg and sbu have no val split (spec §7): a run on vg alone has nothing to evaluate on (it used to train, save,
    and then fail at the final evaluation), one on vg and coco evaluates on coco's val split, and a val file that is
    missing is an error before the first step, not after the last."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    shutil.copy(root / "coco_caption_karpathy_train.arrow", root / "vg.arrow")  # the same columns as vg's

    def run(name, datasets, final_eval=True):
        return train(small_cfg(tmp_path / name, str(root), datasets=datasets, max_steps=1, warmup_steps=0,
                               final_eval=final_eval))

    alone = run("vg", ["vg"])
    assert alone["stop_reason"] == "max_steps" and alone["metrics"] == {}
    assert "no final evaluation: none of the datasets vg has a val split" in capsys.readouterr().out
    mixed = run("mixed", ["vg", "coco"])
    assert "val/r_mean" in mixed["metrics"] and "val/itc_i2t_acc" in mixed["metrics"]
    os.remove(root / "coco_caption_karpathy_val.arrow")
    with pytest.raises(FileNotFoundError, match="coco_caption_karpathy_val.arrow: the coco val split"):
        run("no_val", ["vg", "coco"])
    assert not (tmp_path / "no_val" / "checkpoints").exists() or not os.listdir(tmp_path / "no_val" / "checkpoints")
    # without an evaluation, the val files are not needed
    assert run("no_eval", ["vg", "coco"], final_eval=False)["stop_reason"] == "max_steps"
    # nor when the evaluation reads nothing (the MLM-only stages)
    assert train(small_cfg(tmp_path / "mlm", str(root), datasets=["coco"], tasks=["mlm"], max_steps=1,
                           warmup_steps=0, final_eval=True))["metrics"] == {}
    # with several datasets, one whose val files are absent is left out of the evaluation, with a warning
    shutil.copy(root / "coco_caption_karpathy_train.arrow", root / "conceptual_caption_train_0.arrow")
    shutil.copy(root / "coco_caption_karpathy_test.arrow", root / "coco_caption_karpathy_val.arrow")
    with pytest.warns(UserWarning, match=r"the evaluation reads the val splits of coco only: gcc \(no "
                                         r"conceptual_caption_val_0.arrow\)"):
        both = run("gcc", ["coco", "gcc"])
    assert "val/r_mean" in both["metrics"]


def test_the_loop_follows_the_configured_schedule_and_weight_decay(tmp_path, synthetic_root):
    """--warmup-steps as a fraction (int(6 x 0.45) = 2 steps, official), the linear decay to --end-lr, --schedule
    cosine and --weight-decay reach the run: the lr logged for each step (the lr of that step's update) and the
    optimizer the checkpoint saved."""
    lr, end = 5e-4, 1e-4
    run = train(small_cfg(tmp_path / "linear", synthetic_root, tasks=["itc"], max_steps=6, warmup_steps=0.45,
                          end_lr=end, weight_decay=0.05))
    # step s (1-based) updates with (s - 1) / 2 of lr in the warmup, then from lr down towards end_lr (reached after
    # the last step)
    expected = [0.0, lr / 2, lr] + [end + (lr - end) * (1 - k / 4) for k in (1, 2, 3)]
    assert [h["lr"] for h in run["history"]] == pytest.approx(expected, rel=1e-9)
    groups = {g["name"]: g for g in torch.load(run["last_checkpoint"], weights_only=True)["optimizer"]["param_groups"]}
    assert {k: g["weight_decay"] for k, g in groups.items()} == {"decay": 0.05, "no_decay": 0.0}
    assert {k: g["initial_lr"] for k, g in groups.items()} == pytest.approx({"decay": lr, "no_decay": lr})
    cosine = train(small_cfg(tmp_path / "cosine", synthetic_root, tasks=["itc"], max_steps=5, warmup_steps=1,
                             schedule="cosine"))
    expected = [0.0, lr] + [lr * 0.5 * (1 + math.cos(math.pi * p)) for p in (0.25, 0.5, 0.75)]
    assert [h["lr"] for h in cosine["history"]] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_textmlm_training_changes_only_the_text_parameters(tmp_path, synthetic_root, monkeypatch):
    """The language stage through train() (spec §5.1): after two updates (with weight decay) every frozen parameter
    is exactly as initialised, and the trainable ones (named here from the spec, not from the code) moved."""
    initial = {}
    real = train_loop.build_model

    def recording(cfg):
        model = real(cfg)
        initial.update({k: v.detach().clone() for k, v in model.named_parameters()})
        return model

    monkeypatch.setattr(train_loop, "build_model", recording)
    run = train(small_cfg(tmp_path / "text", synthetic_root, tasks=["textmlm"], max_steps=2, warmup_steps=0,
                          weight_decay=0.05))
    final = read_state_dict(run["last_checkpoint"])
    trainable = ("text_embeddings", "token_type_embeddings", "mlp_text", "norm2_text", "mlm_score",
                 "relative_position_bias_table", "transformer.norm")
    frozen = [k for k in initial if not any(t in k for t in trainable)]
    assert "transformer.blocks.0.attn.qkv.weight" in frozen and "transformer.blocks.0.mlp_imag.fc1.weight" in frozen
    assert "transformer.blocks.0.norm1.weight" in frozen and "transformer.patch_embed.proj.weight" in frozen
    for k in frozen:
        assert torch.equal(final[k], initial[k]), k
    for k in ("transformer.blocks.0.mlp_text.fc1.weight", "text_embeddings.word_embeddings.weight",
              "mlm_score.transform.dense.weight", "transformer.norm.weight", "transformer.blocks.1.norm2_text.weight"):
        assert not torch.equal(final[k], initial[k]), k


def test_log_csv_holds_training_and_evaluation_rows(tmp_path, synthetic_root):
    train(small_cfg(tmp_path / "csv", synthetic_root, max_steps=5, log_every=1, eval_every=2, eval_batches=1))
    with open(tmp_path / "csv" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    trained = [r for r in rows if r["loss"]]
    evaluated = [r for r in rows if r["val/itc_i2t_acc"]]
    assert [int(r["step"]) for r in trained] == [1, 2, 3, 4, 5] and all(float(r["loss"]) > 0 for r in trained)
    assert [int(r["step"]) for r in evaluated] == [2, 4] and all(r["val/r_mean"] for r in evaluated)


def test_resume_refuses_another_runs_checkpoint_and_logs_changed_options(tmp_path, synthetic_root, capsys):
    """A fine-tuning run pointed at a pretraining run's folder must not silently continue that run."""
    train(small_cfg(tmp_path / "run", synthetic_root, max_steps=1, warmup_steps=0))
    with pytest.raises(ValueError, match=r"belongs to another run \(tasks \['itc', 'itm', 'mlm'\] .*vs \['itc'\]"):
        train(small_cfg(tmp_path / "run", synthetic_root, max_steps=2, tasks=["itc"]))
    with pytest.raises(ValueError, match=r"optimizer 'official' \(checkpoint\) vs 'torch'"):
        train(small_cfg(tmp_path / "run", synthetic_root, max_steps=2, optimizer="torch"))
    # the same run, spelled differently: tasks in another order, the preset's text length given explicitly
    longer = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=2, warmup_steps=0,
                             tasks=["itm", "mlm", "itc"], max_text_len=None))
    assert longer["steps"] == 2
    assert "with changed options: max_steps 1 -> 2" in capsys.readouterr().out
    # run again as it is: nothing to train, said once; its summary, log and checkpoints stay as they were
    files = {name: (tmp_path / "run" / name).read_bytes() for name in ("summary.json", "log.csv")}
    checkpoints = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    again = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=2, warmup_steps=0))
    assert again["already_complete"] and again["steps"] == 2 and again["stop_reason"] == "max_steps"
    assert again["final"] == json.loads(files["summary.json"])["final"] and "loss" in again["final"]
    assert "already complete" in capsys.readouterr().out
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files} == files
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == checkpoints
    # a run stopped (e.g. by a signal) on its last step has not finished: the rerun saves and evaluates as usual
    summary_path = tmp_path / "run" / "summary.json"
    summary_path.write_text(json.dumps(dict(json.loads(files["summary.json"]), stop_reason="signal 15")))
    finishing = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=2, warmup_steps=0))
    assert "already_complete" not in finishing and finishing["stop_reason"] == "max_steps"
    assert json.loads(summary_path.read_text())["stop_reason"] == "max_steps"


def _distributed_run(rank, world, out_dir, root, tasks, gather_with_grad):
    cfg = small_cfg(out_dir, root, max_steps=3 if gather_with_grad else 1, per_device_batch_size=8 // world, tasks=tasks,
                    gather_with_grad=gather_with_grad, drop_path_rate=0.0)
    summary = train(cfg)
    return losses(summary)


@pytest.mark.parametrize("gather_with_grad", [True, False])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, synthetic_root, gather_with_grad):
    one = run_distributed(_distributed_run, 1, str(tmp_path / "one"), synthetic_root, ["itc"], gather_with_grad)[0]
    two = run_distributed(_distributed_run, 2, str(tmp_path / "two"), synthetic_root, ["itc"], gather_with_grad)
    assert two[0] == pytest.approx(two[1], rel=1e-6)  # every rank computes the full global loss
    if gather_with_grad:
        assert two[0] == pytest.approx(one, rel=1e-5)  # loss and gradients (hence every later loss) match
    else:
        # official: no gradient through the gather, so DDP's average gives each rank's local part, 1/world of the
        # ITC gradient: the first loss matches, the trajectories then differ by design
        assert two[0][0] == pytest.approx(one[0], rel=1e-5)


def _pretrain_run(rank, world, out_dir, root):
    cfg = small_cfg(out_dir, root, max_steps=3, per_device_batch_size=4, tasks=["mlm", "itc", "itm"])
    return losses(train(cfg))


def test_two_process_pretraining_with_every_objective(tmp_path, synthetic_root):
    """MLM + ITC + ITM under DDP without the per-step unused-parameter search: the model's dead text position
    embeddings (spec Q8) are left out of the reducer, so steps after the first do not stall waiting for their
    gradient."""
    runs = run_distributed(_pretrain_run, 2, str(tmp_path / "two"), synthetic_root)
    assert len(runs[0]) == 3 and all(math.isfinite(x) for x in runs[0])
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


def test_processes_that_do_not_share_the_output_folder_or_the_data_fail_together(tmp_path, synthetic_root):
    """Several nodes: rank 0 alone writes checkpoints, every rank reads the one it resumes, and each rank builds its
    sample order from its own data. A node-local --out-dir resumed a stale file of the same name there (the ranks
    then trained on from different weights) or failed only at the resume; a node's partial copy of the data made
    the ranks skip samples and then hang. Each is refused at start, on every rank."""
    import shutil

    from vlmo_fast import data as vdata

    # (1) --out-dir on each node's own disk
    local = run_distributed(_local_out_dir_run, 2, str(tmp_path / "local"), synthetic_root)
    assert all("--out-dir" in r and "is not the same folder for every process: rank 1 on" in r for r in local), local
    assert "cannot read what rank 0" in local[0] and "file system every node shares" in local[1]
    # (2) --resume PATH naming another file, or none, on rank 1 (a relative path, another working directory)
    a = train(small_cfg(tmp_path / "a", synthetic_root, max_steps=1, warmup_steps=0))["last_checkpoint"]
    b = train(small_cfg(tmp_path / "b", synthetic_root, max_steps=1, warmup_steps=0, seed=9))["last_checkpoint"]
    for other, why in ((b, "read another file there than rank 0 on"),
                       (str(tmp_path / "gone.pt"), r"cannot read it \(rank 1 on .*: FileNotFoundError: training "
                                                   r"checkpoint file not found: .*gone.pt\)")):
        got = run_distributed(_resume_run, 2, str(tmp_path / "shared"), synthetic_root, [a, other])
        for rank, r in enumerate(got):
            assert re.match(rf"CheckpointError: resuming {re.escape([a, other][rank])}: {why}.* the path must name "
                            rf"the same file for every process", r), r
    gone = str(tmp_path / "gone.pt")  # a wrong path, on every rank: the plain error, as in a one-process run
    got = run_distributed(_resume_run, 2, str(tmp_path / "shared"), synthetic_root, [gone, gone])
    assert got == [f"FileNotFoundError: training checkpoint file not found: {gone}"] * 2, got
    # (3) a node whose copy of the data is partial
    partial = str(tmp_path / "partial")
    shutil.copytree(synthetic_root, partial)
    vdata.write_synthetic(partial, n_train=96, n_val=32, n_test=32, image_size=64, seed=3, overwrite=True)
    got = run_distributed(_data_run, 2, str(tmp_path / "data"), [synthetic_root, partial])
    assert all(r.startswith("ValueError: the processes found different training samples (rank 0: ") and
               "every process must read the same data files" in r for r in got), got


def test_partial_or_slurm_launch_environments_are_refused(tmp_path, synthetic_root, monkeypatch):
    """RANK without WORLD_SIZE trained as a lone non-main rank that wrote nothing and exited 0; srun starting several
    tasks without torchrun gave as many independent one-process runs into one folder; a world without MASTER_ADDR
    ended in torch's traceback."""
    from vlmo_fast.train.distributed import launch_environment

    assert launch_environment({}) == (1, 0, 0)
    assert launch_environment({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) == (1, 0, 0)  # srun -n 1
    assert launch_environment({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == (1, 0, 0)  # an sbatch script's one python
    full = dict(WORLD_SIZE="4", RANK="3", LOCAL_RANK="1", MASTER_ADDR="node0", MASTER_PORT="29500",
                SLURM_STEP_NUM_TASKS="2")  # (torchrun under srun: the workers have torchrun's variables)
    assert launch_environment(full) == (4, 3, 1)
    assert launch_environment({"WORLD_SIZE": "1"}) == launch_environment({"RANK": "0"}) == (1, 0, 0)  # one process
    # srun starting several tasks without torchrun: each trains alone (a sweep, each with its --out-dir), said once
    with pytest.warns(UserWarning, match=r"srun started 2 tasks \(SLURM_STEP_NUM_TASKS\) without torchrun: each "
                                         r"trains alone.*start one torchrun per node"):
        assert launch_environment({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}) == (1, 0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert launch_environment({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}) == (1, 0, 0)
    for env, message in (({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not: launch with torchrun"),
                         ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
                         (dict(full, MASTER_ADDR=""), "WORLD_SIZE=4 but MASTER_ADDR is not set"),
                         (dict(full, RANK="4"), "expected 0 <= RANK < WORLD_SIZE"),
                         (dict(full, RANK="one"), "RANK='one' is not an integer")):
        with pytest.raises(ValueError, match=message):
            launch_environment(env)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="RANK=1 is set but WORLD_SIZE is not"):
        train(small_cfg(tmp_path / "run", synthetic_root, max_steps=1, warmup_steps=0))
    assert not (tmp_path / "run").exists()


def test_a_resume_on_another_number_of_processes_says_what_changes(tmp_path, synthetic_root, capsys):
    """The global batch is the same, but each step's objectives see a micro-batch of per-process batch x processes
    samples (the ITC/ITM negatives): the log says so, where the loss curve would otherwise jump unexplained."""
    for name in ("run", "same"):
        run_distributed(_data_run, 2, str(tmp_path / name), [synthetic_root] * 2)
    capsys.readouterr()
    train(small_cfg(tmp_path / "run", synthetic_root, max_steps=2, warmup_steps=0, per_device_batch_size=4))
    assert ("with changed options: max_steps 1 -> 2, processes 2 -> 1: micro-batches of 4 samples, not 8 (the "
            "ITC/ITM negatives of a step's objectives come from its micro-batch), gradient accumulation 2"
            in capsys.readouterr().out)
    train(small_cfg(tmp_path / "same", synthetic_root, max_steps=2, warmup_steps=0, per_device_batch_size=8))
    assert ("with changed options: per_device_batch_size 4 -> 8, max_steps 1 -> 2, processes 2 -> 1\n"
            in capsys.readouterr().out)  # (micro-batches of 8 samples, as before)


def _own_group_run(rank, world, out, root):
    import torch.distributed as dist

    dist.init_process_group("gloo")  # the caller's own group (the Python API): train uses it and leaves it
    summary = train(small_cfg(out, root, max_steps=1, warmup_steps=0, per_device_batch_size=4))
    assert dist.is_initialized() and dist.get_world_size() == 2
    dist.barrier()
    return summary["steps"]


def test_train_uses_a_process_group_the_caller_made_and_leaves_it(tmp_path, synthetic_root):
    assert run_distributed(_own_group_run, 2, str(tmp_path / "own"), synthetic_root) == [1, 1]


def _local_out_dir_run(rank, world, base, root):
    from vlmo_fast.train import state

    state.SHARED_WAIT_S = 0.5  # (how long a rank waits for the token rank 0 wrote: a network file system's caches)
    return _train_error(small_cfg(os.path.join(base, f"node{rank}"), root, max_steps=1, warmup_steps=0,
                                  per_device_batch_size=4))


def _resume_run(rank, world, out, root, resumes):
    return _train_error(small_cfg(out, root, max_steps=2, per_device_batch_size=4, resume=resumes[rank]))


def _data_run(rank, world, out, roots):
    return _train_error(small_cfg(out, roots[rank], max_steps=1, warmup_steps=0, per_device_batch_size=4))


def _train_error(cfg):
    try:
        train(cfg)
    except (ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "trained"


def test_non_finite_losses_skip_and_then_stop(tmp_path, synthetic_root, monkeypatch):
    real = objectives.total_loss
    calls = {"n": 0}

    def flaky(ret):
        calls["n"] += 1
        if calls["n"] in (2, 4, 5, 6):  # a diverged objective: its own entry is NaN, and so is the total
            ret["itm_loss"] = ret["itm_loss"] * float("nan")
        return real(ret)

    monkeypatch.setattr(objectives, "total_loss", flaky)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        summary = train(small_cfg(tmp_path / "nan", synthetic_root, max_steps=10, max_bad_steps=3, log_every=2))
    assert summary["skipped_steps"] == 4 and summary["stop_reason"].startswith("3 non-finite losses")
    # numbered as the log rows number steps (from 1), with the values that step had
    notices = [line for line in printed.getvalue().splitlines() if ": non-finite loss (" in line]
    assert [line.split(":")[0] for line in notices] == ["step 2", "step 4", "step 5", "step 6"], notices
    assert all("'itm_loss': nan" in line for line in notices), notices
    assert summary["last_checkpoint"] and os.path.isfile(summary["last_checkpoint"])
    # the steps are logged in pairs, each pair with one skipped step (2 and 4): the logged averages leave the skipped
    # steps' NaN out; the 6th, which stops the run, ends a pair of skipped steps: its row shows the values it had
    history = summary["history"]
    assert [h["skipped_steps"] for h in history] == [1, 2, 4]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["itm_loss"]) for h in history[:2]), history
    assert math.isnan(history[2]["itm_loss"])
    # the stopping step counts as every skipped step: the checkpoint holds step 6, its batch and its skip (it was
    # step 5 with 6 batches read, or, with a periodic save at 6, that save's 5 batches and 3 skips); a resumed run
    # thus trains on every batch after it, whatever --save-every was
    assert summary["steps"] == 6 and summary["last_checkpoint"].endswith("step_00000006.pt")
    states = []
    for save_every in (100, 6):
        calls["n"] = 0
        with contextlib.redirect_stdout(io.StringIO()):
            run = train(small_cfg(tmp_path / f"nan{save_every}", synthetic_root, max_steps=10, max_bad_steps=3,
                                  log_every=2, save_every=save_every))
        state = torch.load(run["last_checkpoint"], weights_only=True)
        states.append((state["step"], state["data"], state["counts"], state["scheduler"]))
    assert states[0] == states[1] and states[0][0] == 6 and states[0][2]["skipped_steps"] == 4, states


@pytest.mark.parametrize("wwm", [True, False])
def test_the_masking_options_reach_the_training_collate(tmp_path, synthetic_root, wwm):
    """--mlm-prob and --whole-word-masking are the training stream's collate's (the collators are tested with them
    in test_data_masking)."""
    from vlmo_fast.train import data_setup

    cfg = small_cfg(tmp_path, synthetic_root, mlm_prob=0.3, whole_word_masking=wwm)
    model_config = vf.preset(cfg.arch, image_size=cfg.image_size, max_text_len=cfg.max_text_len)
    info = train_loop.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    collate = data_setup.train_stream(cfg, model_config, info).loader.collate_fn.collate
    assert collate.mlm_prob == 0.3 and collate.mlm == ("whole_word" if wwm else "plain")


def test_a_batch_without_masked_tokens_is_named_in_the_notice(tmp_path, synthetic_root, monkeypatch):
    """Short captions in a small batch can leave the MLM without any target (as in the official masking): its loss
    is NaN and the step is skipped; the notice says why rather than reading as a divergence."""
    from vlmo_fast.train import data_setup

    real = data_setup.train_stream

    def stream_with_an_unmasked_second_batch(*args, **kwargs):
        inner = real(*args, **kwargs)

        class Stream:
            n = 0

            def __next__(self):
                batch = next(inner)
                Stream.n += 1
                if Stream.n == 2:
                    batch["text_labels_mlm"] = torch.full_like(batch["text_labels_mlm"], -100)
                    batch["text_ids_mlm"] = batch["text_ids"].clone()
                return batch

            def __getattr__(self, name):
                return getattr(inner, name)

        return Stream()

    monkeypatch.setattr(data_setup, "train_stream", stream_with_an_unmasked_second_batch)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        summary = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=3))
    notices = [line for line in printed.getvalue().splitlines() if ": non-finite loss (" in line]
    assert summary["skipped_steps"] == 1 and len(notices) == 1, notices
    assert notices[0].startswith("step 2:") and "'mlm_loss': nan" in notices[0] and "no masked token" in notices[0]


def test_a_skipped_first_update_does_not_warn_about_the_scheduler(tmp_path, synthetic_root, monkeypatch):
    import warnings

    real, calls = objectives.total_loss, {"n": 0}

    def first_is_nan(ret):
        calls["n"] += 1
        return real(ret) * float("nan") if calls["n"] == 1 else real(ret)

    monkeypatch.setattr(objectives, "total_loss", first_is_nan)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        summary = train(small_cfg(tmp_path / "first", synthetic_root, max_steps=2))
    assert summary["skipped_steps"] == 1 and summary["stop_reason"] == "max_steps"
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in seen]


class _SignalsItself(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGTERM)  # as a group-wide SIGTERM reaches a worker
        return torch.tensor(i)


def test_loader_workers_leave_sigterm_to_the_main_process():
    loader = vdata.build_loader(_SignalsItself(), batch_size=2, collate=torch.stack, train=False, num_workers=1)
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_saves_a_checkpoint_before_exit(tmp_path, synthetic_root, monkeypatch, workers):
    """With data-loader workers the signal also reaches them, as when a scheduler or ``timeout`` signals the whole
    process group: they must survive until the main process has saved."""
    import multiprocessing

    real = objectives.total_loss
    calls = {"n": 0}

    def signalling(ret):
        calls["n"] += 1
        if calls["n"] == 3:
            children = multiprocessing.active_children()
            assert len(children) == workers
            for child in children:
                os.kill(child.pid, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(ret)

    monkeypatch.setattr(objectives, "total_loss", signalling)
    summary = train(small_cfg(tmp_path / "sig", synthetic_root, max_steps=10, num_workers=workers))
    assert summary["stop_reason"] == f"signal {int(signal.SIGTERM)}" and summary["steps"] == 3
    assert os.path.basename(summary["last_checkpoint"]) == "step_00000003.pt"
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def _in_worker_when_awaited(monkeypatch, flag, sample, batch, act):
    """The data worker runs ``act`` at its ``sample``-th sample once the main process awaits its ``batch``-th batch
    (prefetching would otherwise decide the step it happens in)."""
    from vlmo_fast.train import data_setup

    real, real_next, count = data_setup.SeededSamples.__getitem__, data_setup.TrainStream.__next__, {"n": 0, "b": 0}

    def in_worker(self, key):  # (in the worker: its own copy of the count)
        count["n"] += 1
        if count["n"] == sample:
            for _ in range(600):
                if flag.exists():
                    break
                time.sleep(0.1)
            act()
        return real(self, key)

    def awaited(self):  # (in the main process)
        count["b"] += 1
        if count["b"] == batch:
            flag.touch()
        return real_next(self)
    monkeypatch.setattr(data_setup.SeededSamples, "__getitem__", in_worker)
    monkeypatch.setattr(data_setup.TrainStream, "__next__", awaited)


def test_a_signal_while_a_worker_is_stuck_saves_the_step_and_exits(tmp_path, synthetic_root, monkeypatch, capsys):
    """A worker stuck in a read (a hung network file system) held a one-process run at its wait for a batch: the
    scheduler's SIGTERM was noted, never acted on, and nothing was saved before its SIGKILL. The run now stops at the
    wait and saves where the step began (here inside a gradient accumulation: the position and RNG states of the
    step's start), so the resumed run continues the very trajectory of an uninterrupted one."""
    def signal_and_hang():  # (in the worker, once the main process waits for its batch)
        time.sleep(0.5)
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(3600)

    kw = dict(max_steps=4, warmup_steps=0, batch_size=8, per_device_batch_size=4)
    with monkeypatch.context() as patch:
        # the first sample of step 3's second micro-batch
        _in_worker_when_awaited(patch, tmp_path / "waiting", sample=21, batch=6, act=signal_and_hang)
        t0 = time.time()
        stopped = train(small_cfg(tmp_path / "stuck", synthetic_root, num_workers=1, **kw))
    assert stopped["stop_reason"] == "signal 15" and stopped["steps"] == 2 and time.time() - t0 < 120
    assert "signal 15 while waiting for step 3's batch 2 of 2: stopping at step 2" in capsys.readouterr().out
    assert not [c for c in multiprocessing.active_children() if c.is_alive()]  # the stuck worker is gone
    resumed = train(small_cfg(tmp_path / "stuck", synthetic_root, num_workers=1, **kw))
    whole = train(small_cfg(tmp_path / "whole", synthetic_root, num_workers=1, **kw))
    assert losses(stopped) + losses(resumed) == pytest.approx(losses(whole), rel=1e-6)


def _stuck_at(n):
    from vlmo_fast.train import data_setup

    real, count = data_setup.SeededSamples.__getitem__, {"n": 0}

    def stuck(self, key):  # (in the worker: its own copy of the count)
        count["n"] += 1
        if count["n"] == n:
            time.sleep(3600)
        return real(self, key)
    return stuck


@pytest.mark.parametrize("where", ["signal during the step's forward", "signal as the stream counts its batch"])
def test_a_signal_noted_before_a_wait_stops_there_and_saves_the_step(tmp_path, synthetic_root, monkeypatch, where):
    """A signal that came during a step's forward, with its next micro-batch stuck in a worker: the run waited for it
    (nothing saved before the scheduler's SIGKILL). And one that came inside the stream's next, after the stream had
    counted the batch it never returned (accumulation 1, no workers): the saved position skipped that batch. The run
    stops before the wait, and saves the position, RNG states and bad-sample count of the step's start (the resumed
    run reads the step's first micro-batch again: its unreadable images had been counted twice)."""
    from vlmo_fast import objectives
    from vlmo_fast.train import data_setup

    root = _with_corrupt_images(synthetic_root, tmp_path / "corrupt", every=3)

    kw = dict(max_steps=4, warmup_steps=0, data_timeout=120.0)
    if where.startswith("signal during"):
        kw.update(batch_size=8, per_device_batch_size=4, num_workers=1)
        real_loss, calls = objectives.total_loss, {"n": 0}

        def loss(ret):
            calls["n"] += 1
            if calls["n"] == 5:  # step 3's first micro-batch
                os.kill(os.getpid(), signal.SIGTERM)
            return real_loss(ret)
        patches = [(data_setup.SeededSamples, "__getitem__", _stuck_at(21)), (objectives, "total_loss", loss)]
    else:
        kw.update(batch_size=4, per_device_batch_size=4, num_workers=0)
        real_next, calls = data_setup.TrainStream.__next__, {"n": 0}

        def counted(self):
            batch = real_next(self)
            calls["n"] += 1
            if calls["n"] == 3:  # the stream has counted step 3's batch
                os.kill(os.getpid(), signal.SIGTERM)
            return batch
        patches = [(data_setup.TrainStream, "__next__", counted)]
    with monkeypatch.context() as patch:
        for target, name, value in patches:
            patch.setattr(target, name, value)
        t0 = time.time()
        stopped = train(small_cfg(tmp_path / "run", root, **kw))
    assert stopped["stop_reason"] == "signal 15" and stopped["steps"] == 2 and time.time() - t0 < 100
    resumed = train(small_cfg(tmp_path / "run", root, **kw))
    whole = train(small_cfg(tmp_path / "whole", root, **kw))
    assert losses(stopped) + losses(resumed) == pytest.approx(losses(whole), rel=1e-6)
    assert stopped["bad_samples"] > 0 and resumed["bad_samples"] == whole["bad_samples"]


def test_only_the_data_workers_are_killed_at_exit(monkeypatch):
    """At exit a worker stuck in a read (it ignores SIGTERM) is killed, where multiprocessing would wait for it
    forever; a daemonic process of the program's own is left to multiprocessing's exit handler (its SIGTERM, and the
    time its cleanup takes)."""
    import multiprocessing as mp_

    from vlmo_fast.data import loader

    ctx = mp_.get_context("fork")
    ours, theirs = ctx.Process(target=time.sleep, args=(60,), daemon=True), ctx.Process(target=time.sleep, args=(60,),
                                                                                          daemon=True)
    ours.start(), theirs.start()
    monkeypatch.setattr(loader, "_WORKERS", {ours})
    before = signal.getsignal(signal.SIGCHLD)
    try:
        loader._kill_workers_at_exit()
        ours.join(10)
        assert not ours.is_alive() and theirs.is_alive()
    finally:
        signal.signal(signal.SIGCHLD, before)
        theirs.kill(), theirs.join(10)


@pytest.mark.parametrize("cause", ["a data worker killed", "an error in the forward"])
def test_an_error_inside_a_step_saves_where_the_step_began(tmp_path, synthetic_root, monkeypatch, capsys, cause):
    """A one-process run whose data worker the OOM killer ended, or whose forward raised (out of memory, a bad
    batch), in the middle of a step's gradient accumulation: the error ended the run without a save, so a resumed run
    started from the last periodic checkpoint, maybe hours back. The model and optimizer are still those of the
    step's start there: the steps since the last log row are logged, that step is saved (data position, RNG states,
    bad-sample count), the error still ends the run, and the resumed run continues the very trajectory of an
    uninterrupted one."""
    from vlmo_fast import objectives

    root = _with_corrupt_images(synthetic_root, tmp_path / "corrupt", every=3)
    kw = dict(max_steps=4, warmup_steps=0, batch_size=8, per_device_batch_size=4, num_workers=1)
    real_loss, calls = objectives.total_loss, {"n": 0}

    def loss(ret):
        calls["n"] += 1
        if calls["n"] == 8:  # step 4's second micro-batch
            raise MemoryError("fake: out of memory")
        return real_loss(ret)
    raised = RuntimeError if cause == "a data worker killed" else MemoryError
    with monkeypatch.context() as patch:
        if cause == "a data worker killed":  # step 4's second micro-batch (its first sample: the 29th)
            _in_worker_when_awaited(patch, tmp_path / "awaited", sample=29, batch=8,
                                    act=lambda: os.kill(os.getpid(), signal.SIGKILL))  # (the OOM killer's)
        else:
            patch.setattr(objectives, "total_loss", loss)
        with pytest.raises(raised):
            train(small_cfg(tmp_path / "run", root, log_every=2, **kw))
    out = capsys.readouterr().out
    assert f"{raised.__name__} in step 4: saved step 3, where it began, to " in out
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_00000003.pt"]
    assert not [c for c in multiprocessing.active_children() if c.is_alive()]  # the stream's workers are gone
    resumed = train(small_cfg(tmp_path / "run", root, log_every=2, **kw))
    whole = train(small_cfg(tmp_path / "whole", root, log_every=1, **kw))
    each = losses(whole)
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        rows = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}
    # step 3 logged at the error (a row of its own), step 4 by the resumed run
    assert rows == pytest.approx({2: (each[0] + each[1]) / 2, 3: each[2], 4: each[3]}, rel=1e-5)
    assert losses(resumed) == pytest.approx(each[3:], rel=1e-6)
    assert resumed["bad_samples"] == whole["bad_samples"]


def test_an_error_before_any_step_or_with_the_step_saved_saves_nothing(tmp_path, synthetic_root, monkeypatch, capsys):
    """No checkpoint of step 0 (nothing trained) for an error in the first step, and no second save of a step a
    periodic save holds already."""
    from vlmo_fast import objectives

    real_loss, calls = objectives.total_loss, {"n": 0, "at": 1}

    def loss(ret):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise ValueError("fake: a bad batch")
        return real_loss(ret)
    monkeypatch.setattr(objectives, "total_loss", loss)
    with pytest.raises(ValueError, match="a bad batch"):
        train(small_cfg(tmp_path / "first", synthetic_root, max_steps=3))
    assert not os.path.exists(tmp_path / "first" / "checkpoints") or not os.listdir(tmp_path / "first" / "checkpoints")
    calls.update(n=0, at=3)  # step 3, with step 2 saved by --save-every 2
    with pytest.raises(ValueError, match="a bad batch"):
        train(small_cfg(tmp_path / "saved", synthetic_root, max_steps=4, save_every=2))
    assert sorted(os.listdir(tmp_path / "saved" / "checkpoints")) == ["step_00000002.pt"]
    assert "where it began" not in capsys.readouterr().out


def test_a_stuck_worker_ends_the_run_after_the_data_timeout(tmp_path, synthetic_root, monkeypatch):
    """With several processes a rank cannot stop at its wait (the others wait in the step's collectives): a batch
    that does not come within --data-timeout ends the run with an error naming the stall, where it hung forever."""
    from vlmo_fast.train import data_setup

    real = data_setup.SeededSamples.__getitem__
    count = {"n": 0}

    def slow(self, key):
        count["n"] += 1
        if count["n"] == 1:  # the first batch may take longer (workers starting, a resumed tar stream reading on)
            time.sleep(5)
        if count["n"] == 9:
            time.sleep(3600)
        return real(self, key)

    monkeypatch.setattr(data_setup.SeededSamples, "__getitem__", slow)
    t0 = time.time()
    with pytest.raises(RuntimeError, match=r"no training batch came from the 1 data workers in 3 s \(--data-timeout\): "
                                           r"a worker is stuck"):
        train(small_cfg(tmp_path / "slow", synthetic_root, max_steps=4, warmup_steps=0, num_workers=1,
                        per_device_batch_size=4, batch_size=4, data_timeout=3.0))
    assert time.time() - t0 < 120 and not [c for c in multiprocessing.active_children() if c.is_alive()]


def test_an_output_folder_that_cannot_be_written_and_a_summary_that_cannot_be_saved(tmp_path, synthetic_root,
                                                                                   monkeypatch):
    """--out-dir that cannot be made (or written) is a one-line configuration error, where it was a traceback; a full
    disk at the summary, once the run's checkpoint is saved, warns instead of turning a finished run's exit status
    into 1."""
    from vlmo_fast.train.loop import exit_status

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out-dir .*file/run cannot be made: Not a directory"):
        train(small_cfg(tmp_path / "file" / "run", synthetic_root, max_steps=1, warmup_steps=0))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=r"--out-dir .*ro is not writable"):
        train(small_cfg(tmp_path / "ro", synthetic_root, max_steps=1, warmup_steps=0))
    monkeypatch.undo()
    json_write_fails(monkeypatch, "summary.json")
    with pytest.warns(UserWarning, match=r"summary.json not written: .*No space left on device"):
        summary = train(small_cfg(tmp_path / "full", synthetic_root, max_steps=1, warmup_steps=0))
    assert exit_status(summary) == 0 and os.path.isfile(summary["last_checkpoint"])


def json_write_fails(monkeypatch, name: str) -> None:
    """The loop's writes of the JSON file ``name`` (config.json, summary.json) fail as on a full disk."""
    real = train_loop.atomic_write_json

    def full(path, *args, **kwargs):
        if path.endswith(name):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(train_loop, "atomic_write_json", full)


def _saves_by_step(monkeypatch, signal_at=None):
    """Counts the training checkpoints written per step; sends SIGTERM to this process while writing step
    ``signal_at``'s (as a signal arriving during the save)."""
    real, counts = train_loop.save_training_checkpoint, {}

    def counting(out_dir, step, state, keep_last):
        counts[step] = counts.get(step, 0) + 1
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(out_dir, step, state, keep_last)

    monkeypatch.setattr(train_loop, "save_training_checkpoint", counting)
    return counts


def test_a_signal_stops_an_evaluation_at_its_next_batch(tmp_path, synthetic_root, monkeypatch, capsys):
    """A signal during an evaluation of the whole val split used to wait for its end (minutes for a large split, past
    a scheduler's grace period): the evaluation now stops at its next batch, and the run saves and exits."""
    real, batches = train_loop.encode, []

    def signalling(model, loader, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(model, (batches.append(1) or b for b in loader), *args, **kwargs)

    monkeypatch.setattr(train_loop, "encode", signalling)
    saves = _saves_by_step(monkeypatch)
    before = signal.getsignal(signal.SIGTERM)
    summary = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=10, eval_every=2, eval_batches=0))
    assert summary["stop_reason"] == f"signal {int(signal.SIGTERM)}" and summary["steps"] == 2
    assert batches == [] and saves == {2: 1} and summary["metrics"] == {}
    out = capsys.readouterr().out
    assert "signal 15: stopping at the end of this step or evaluation, with a checkpoint" in out
    assert "evaluation stopped by signal 15" in out
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    # the resumed run runs that evaluation before it trains on (it was lost: the next was 2 steps later)
    monkeypatch.setattr(train_loop, "encode", real)
    resumed = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=4, eval_every=2, eval_batches=0))
    assert "step 2: running the evaluation a signal stopped" in capsys.readouterr().out
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        evaluated = [int(r["step"]) for r in csv.DictReader(f) if r.get("val/itc_i2t_acc")]
    assert evaluated == [2] and resumed["steps"] == 4  # (none at 4: the last step has the final evaluation)
    # step 2's checkpoint still records its evaluation as pending: a roll-back to it runs it again, and its row
    # replaces the earlier one (one evaluation row per step in log.csv), not the training row of that step
    step2 = str(tmp_path / "run" / "checkpoints" / "step_00000002.pt")
    again = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=6, eval_every=2, eval_batches=0,
                            resume=step2))
    assert again["steps"] == 6 and "step 2: running the evaluation a signal stopped" in capsys.readouterr().out
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("val/itc_i2t_acc")] == [2, 4]
    assert [int(r["step"]) for r in rows if r.get("loss")] == [1, 2, 3, 4, 5, 6]
    # a finished run continued with more steps has no evaluation pending (the final one was its last)
    longer = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=7, eval_every=2, eval_batches=0))
    assert longer["steps"] == 7 and "running the evaluation" not in capsys.readouterr().out
    # resumed without periodic evaluations (or at max_steps), the pending one is dropped: not re-run later
    off = tmp_path / "off"
    shutil.copytree(tmp_path / "run" / "checkpoints", off / "checkpoints")
    for later in ("step_00000004.pt", "step_00000006.pt", "step_00000007.pt"):
        (off / "checkpoints" / later).unlink(missing_ok=True)
    assert train(small_cfg(off, synthetic_root, max_steps=3, eval_every=0))["steps"] == 3
    assert torch.load(off / "checkpoints" / "step_00000003.pt", weights_only=True, mmap=True)["eval_pending"] is False
    # a signal during the re-run: the run stops at once, without saving step 2 again (its file holds that state)
    monkeypatch.setattr(train_loop, "encode", signalling)
    saves = _saves_by_step(monkeypatch)
    stopped = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=6, eval_every=2, eval_batches=0,
                              resume=step2))
    assert stopped["stop_reason"] == "signal 15" and stopped["steps"] == 2 and saves == {}
    assert stopped["last_checkpoint"] == step2
    assert torch.load(step2, weights_only=True, mmap=True)["eval_pending"] is True
    # resumed from another folder's checkpoint: stopped the same way, it saves the step in its own folder
    saves.clear()
    other = train(small_cfg(tmp_path / "other", synthetic_root, max_steps=6, eval_every=2, eval_batches=0,
                            resume=step2))
    assert other["stop_reason"] == "signal 15" and saves == {2: 1}
    assert other["last_checkpoint"] == str(tmp_path / "other" / "checkpoints" / "step_00000002.pt")


def test_a_log_file_gets_one_line_per_logged_step(tmp_path, synthetic_root, capsys):
    """Output to a file (a scheduler's log), not a terminal: no progress bar (its carriage-return redraws made the
    file one endless line), one plain line per --log-every step, messages on lines of their own, the run's last line
    last. A row per step in log.csv with the run's elapsed time."""
    train(small_cfg(tmp_path / "run", synthetic_root, max_steps=6, log_every=2))
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == ["step 2/6", "step 4/6", "step 6/6"]
    assert "loss=" in lines[-2] and lines[-1].startswith("done: 6 steps")
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6] and all(float(r["elapsed_s"]) >= 0 for r in rows)


class _FakeWriter:
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.purge_step = purge_step
        _FakeWriter.made.append(self)

    def add_scalar(self, *args):
        pass

    def close(self):
        pass


def test_a_resumed_run_purges_tensorboards_later_steps_and_continues_its_clock(tmp_path, synthetic_root,
                                                                              monkeypatch):
    """TensorBoard kept the steps a killed run logged after its last checkpoint, and the resumed run logged them
    again (duplicates); the writer now purges them. The run's elapsed time continues over the resume, and a stop
    logs the steps since the last row (they were never logged: the resumed run starts after them)."""
    import sys
    import types

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    saves = _saves_by_step(monkeypatch, signal_at=3)
    first = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=6, log_every=2, save_every=3,
                            tensorboard=True))
    assert first["stop_reason"] == "signal 15" and saves == {3: 1}
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 3]  # step 3: a row for the step since step 2
    # the resumed clock starts from the checkpoint's time (taken as the save began: the first run's row 3 and its
    # summary, made after that save, also count the save itself, which the resumed run does not, so comparing with
    # them is timing luck)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step_00000003.pt", weights_only=True)["elapsed_s"]
    second = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=6, log_every=2, save_every=3,
                             tensorboard=True))
    assert [w.purge_step for w in _FakeWriter.made[-2:]] == [1, 4]  # a fresh start purges an older run's too
    assert second["elapsed_s"] > saved  # the run's time, not the second part's alone
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]
    assert float(rows[2]["elapsed_s"]) >= round(saved, 1)


def test_a_run_that_fails_while_starting_closes_its_log(tmp_path, synthetic_root, monkeypatch):
    """An error between the log's creation and the first step (here config.json cannot be written: a full disk)
    closes the log: TensorBoard's writer (a thread) and the progress bar ended only with the steps' error handling,
    so a caller that goes on (a sweep) kept them."""
    import sys
    import types

    class Writer(_FakeWriter):
        closed = []

        def close(self):
            Writer.closed.append(self)

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)

    json_write_fails(monkeypatch, "config.json")
    with pytest.raises(OSError, match="No space left"):
        train(small_cfg(tmp_path / "run", synthetic_root, max_steps=2, tensorboard=True))
    assert len(Writer.closed) == 1 and Writer.closed[0] is Writer.made[-1]


def test_training_accuracies_count_argmax_hits_over_the_labelled_positions():
    """mlm_acc over the masked tokens (labels -100 elsewhere), the others over every row; 0 when nothing is labelled;
    an objective whose outputs are absent gives no accuracy."""
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [0.0, 1.0], [5.0, 0.0]]])
    out = {"mlm_logits": logits, "mlm_labels": torch.tensor([[1, 1, -100], [-100, 1, 0]]),
           "itm_logits": torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), "itm_labels": torch.tensor([1, 1, 0]),
           "itc_i2t_logits": torch.eye(3)}  # (no itc_labels: no itc_acc)
    accuracies = {name: float(acc) for name, acc in train_loop._accuracies(out)}
    assert accuracies == pytest.approx({"mlm_acc": 3 / 4, "itm_acc": 2 / 3})
    unmasked = {**out, "mlm_labels": torch.full((2, 3), -100)}
    assert dict(train_loop._accuracies(unmasked))["mlm_acc"].item() == 0.0


def test_a_micro_steps_outputs_are_freed_before_its_backward_and_the_next_forward(tmp_path, synthetic_root,
                                                                                   monkeypatch):
    """No output of a micro-step (the MLM logits: B x L x vocab, fp32) stays alive into its backward, or into the
    next micro-step's forward: the step's memory peaks there. The accuracy loop's variables used to hold them across
    micro-steps (and across the step's end, through evaluations, saves and the next step's first forward), and the
    outputs lived through the backward."""
    import weakref

    made, alive_at_a_forward, alive_at_a_backward = [], [], []
    real_total_loss, real_to_device = objectives.total_loss, train_loop.to_device
    real_scale = torch.amp.GradScaler.scale

    def scale(self, outputs):  # (called on each micro-step's loss right before its backward)
        alive_at_a_backward.extend(i for i, ref in enumerate(made) if ref() is not None)
        return real_scale(self, outputs)

    def total_loss(out):
        made.append(weakref.ref(out["mlm_logits"]))
        return real_total_loss(out)

    def to_device(*args, **kwargs):  # (each micro-batch goes to the device right before its forward)
        alive_at_a_forward.extend(i for i, ref in enumerate(made) if ref() is not None)
        return real_to_device(*args, **kwargs)

    monkeypatch.setattr(objectives, "total_loss", total_loss)
    monkeypatch.setattr(train_loop, "to_device", to_device)
    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    train(small_cfg(tmp_path / "run", synthetic_root, max_steps=2, batch_size=8, per_device_batch_size=4))
    assert len(made) == 4 and alive_at_a_forward == [] and alive_at_a_backward == []


def test_samples_per_second_leaves_out_evaluation_and_save_time(tmp_path, synthetic_root, monkeypatch):
    """The rate after a periodic evaluation or save counted its time as training time (and MFU with it)."""
    import time as real_time
    import types

    clock = {"now": 1000.0}

    def tick():  # every read of the clock: 1 ms of training
        clock["now"] += 0.001
        return clock["now"]

    monkeypatch.setattr(train_loop, "time", types.SimpleNamespace(time=tick, strftime=real_time.strftime))
    real_evaluate, real_save = train_loop.evaluate, train_loop.save_training_checkpoint

    def slow_evaluate(*args, **kwargs):
        clock["now"] += 100.0  # a long evaluation
        return real_evaluate(*args, **kwargs)

    def slow_save(*args, **kwargs):
        clock["now"] += 50.0
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_loop, "evaluate", slow_evaluate)
    monkeypatch.setattr(train_loop, "save_training_checkpoint", slow_save)
    summary = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=6, log_every=3, eval_every=2,
                              eval_batches=1, save_every=2))
    rates = [h["samples_per_s"] for h in summary["history"]]
    assert len(rates) == 2 and min(rates) > 100, rates  # 8 samples a step in a few ms, not in 150 s


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, synthetic_root):
    """A job resubmitted while the first still runs would resume its checkpoints, delete them as keep-last and log
    every step twice: the folder is locked for the run (an OS file lock, gone when the process ends)."""
    from vlmo_fast.train.state import out_dir_lock

    run = tmp_path / "run"
    with out_dir_lock(str(run)):
        ready, running = os.pipe()
        child = os.fork()  # (as a DataLoader worker: it must not keep the folder locked after the run)
        if child == 0:
            os.write(running, b"1")  # running: its copy of the lock's descriptor was closed at the fork
            time.sleep(30)
            os._exit(0)
        os.close(running)  # (a child that died before writing gives end-of-file, not a read that waits forever)
        assert os.read(ready, 1) == b"1"
        os.close(ready)
        with pytest.raises(ValueError, match=r"is in use by another run \(pid \d+ on .* since .*\.lock is locked"):
            train(small_cfg(run, synthetic_root, max_steps=1, warmup_steps=0))
    try:  # released, though the forked child lives on: the folder is free again
        assert train(small_cfg(run, synthetic_root, max_steps=1, warmup_steps=0))["steps"] == 1
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_forked_child_leaving_the_lock_closes_nothing_of_its_own(tmp_path):
    """The child's copy of the lock's descriptor is closed at the fork, so its number can be reused by a file the
    child opens: leaving the lock's block in the child must not close that file."""
    from vlmo_fast.train.state import out_dir_lock

    lock = out_dir_lock(str(tmp_path / "run"))
    lock.__enter__()
    try:
        child = os.fork()
        if child == 0:
            fd = os.open(str(tmp_path / "child.txt"), os.O_RDWR | os.O_CREAT)
            lock.__exit__(None, None, None)
            try:
                os.fstat(fd)
                os._exit(0)
            except OSError:
                os._exit(1)
        assert os.waitpid(child, 0)[1] == 0
    finally:
        lock.__exit__(None, None, None)


def test_a_lock_file_planted_as_a_link_or_fifo_is_refused_and_its_target_untouched(tmp_path):
    """``<out_dir>/.lock`` is truncated and written by the run holding it: a symbolic link planted there (a shared
    runs folder, a run folder someone sent) must not make the run overwrite the file it points to, or create one."""
    from vlmo_fast.train.state import out_dir_lock

    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    for target in (victim, tmp_path / "new.txt"):
        run = tmp_path / f"run_{target.stem}"
        run.mkdir()
        (run / ".lock").symlink_to(target)
        with pytest.raises(ValueError, match=r"\.lock is not a regular file \(a symbolic link.*remove it"):
            with out_dir_lock(str(run)):
                pass
    assert victim.read_text() == "precious" and not (tmp_path / "new.txt").exists()
    fifo = tmp_path / "run_fifo"
    fifo.mkdir()
    os.mkfifo(fifo / ".lock")
    with pytest.raises(ValueError, match="not a regular file"):  # (and does not wait for a writer)
        with out_dir_lock(str(fifo)):
            pass


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch):
    import errno
    import fcntl

    from vlmo_fast.train.state import out_dir_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="no file lock on this file system"):
        with out_dir_lock(str(tmp_path / "run")):
            pass


def _evaluation_check_run(rank, world):
    import torch.distributed as dist

    from vlmo_fast.train.distributed import DistInfo

    dist.init_process_group("gloo")
    check = train_loop._signal_check({"signal": 0}, True, DistInfo(rank, world, rank, torch.device("cpu")))
    readable, unreadable = {"text_ids": torch.zeros(1, 2)}, {"bad_samples": 1}
    out = []
    for batches in ((readable, readable), (unreadable, unreadable), (unreadable, readable)):
        try:
            check(batches[rank])
            out.append("ok")
        except RuntimeError as exc:
            out.append(str(exc))
    return out


def test_fsdp_evaluation_ranks_agree_on_batches_without_a_readable_sample():
    """Under FSDP every rank runs the evaluation's forwards (collectives) and skips a batch whose samples were all
    unreadable: a batch empty on one rank only would pair different collectives (a hang). The ranks check it
    together (in the collective the signal check already makes) and raise."""
    results = run_distributed(_evaluation_check_run, 2)
    for out in results:
        assert out[:2] == ["ok", "ok"] and "no readable sample on some ranks only" in out[2]


def test_a_signal_during_the_final_save_ends_the_run_as_stopped_and_a_resume_evaluates(tmp_path, synthetic_root,
                                                                                       monkeypatch):
    """The handlers were restored before the final save and evaluation, so a signal then killed the process mid-save
    (no final checkpoint, no summary). Now the save completes, the final evaluation stops, the run exits as stopped by
    the signal, and a resumed run (at max_steps, not finished) evaluates."""
    saves = _saves_by_step(monkeypatch, signal_at=4)
    summary = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=4, save_every=2, final_eval=True))
    assert summary["stop_reason"] == f"signal {int(signal.SIGTERM)}" and summary["metrics"] == {}
    assert saves == {2: 1, 4: 1} and os.path.basename(summary["last_checkpoint"]) == "step_00000004.pt"
    monkeypatch.undo()
    resumed = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=4, save_every=2, final_eval=True))
    assert resumed["stop_reason"] == "max_steps" and "val/r_mean" in resumed["metrics"]
    # the resumed run trained no step: its summary's final values are the run's last logged ones, not {}
    assert resumed["final"]["loss"] == pytest.approx(summary["final"]["loss"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final"]["loss"] == pytest.approx(
        summary["final"]["loss"])


def test_a_signal_at_a_periodic_save_saves_the_step_once(tmp_path, synthetic_root, monkeypatch):
    saves = _saves_by_step(monkeypatch, signal_at=3)
    summary = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=10, save_every=3))
    assert summary["stop_reason"] == f"signal {int(signal.SIGTERM)}" and summary["steps"] == 3
    assert saves == {3: 1} and os.path.basename(summary["last_checkpoint"]) == "step_00000003.pt"


def _with_corrupt_images(synthetic_root, root, every=7):
    """A copy of the synthetic set whose every ``every``-th training image is not an image."""
    shutil.copytree(synthetic_root, root)
    path = root / "coco_caption_karpathy_train.arrow"
    table = vdata.read_arrow(str(path))
    images = table.column("image").to_pylist()
    for i in range(0, len(images), every):
        images[i] = b"not an image"
    vdata.write_arrow(str(path), table.set_column(table.schema.get_field_index("image"), "image",
                                                  pa.array(images, type=pa.binary())))
    return str(root)


@pytest.mark.parametrize("optimizer", ["official", "torch"])
def test_a_resumed_run_does_not_keep_its_checkpoint_mapped(tmp_path, synthetic_root, monkeypatch, optimizer):
    """The resumed checkpoint is read mapped; the loop kept the loaded state, and on the CPU the optimizer kept its
    moments as the loaded tensors themselves: the file stayed mapped (its pages, and its disk space once keep-last
    removed it) for the whole run."""
    from vlmo_fast import objectives

    kw = dict(save_every=2, keep_last=1, optimizer=optimizer)
    train(small_cfg(tmp_path / "run", synthetic_root, max_steps=2, **kw))
    real_loss, mapped = objectives.total_loss, []

    def loss(ret):
        with open("/proc/self/maps") as f:
            mapped.extend(line.split()[-1] for line in f if "step_000000" in line)
        return real_loss(ret)
    monkeypatch.setattr(objectives, "total_loss", loss)
    resumed = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=5, **kw))
    assert resumed["steps"] == 5 and mapped == []


@pytest.mark.parametrize("where", ["in an evaluation", "inside a step"])
def test_a_run_that_fails_leaves_no_data_workers_or_threads(tmp_path, synthetic_root, monkeypatch, where):
    """A run that raised kept its stream's workers (and their queues' feeder threads) until the process ended: a
    sweep calling train() again, or keeping the error (whose traceback holds the run's frame), collected them."""
    import threading

    from vlmo_fast import objectives
    from vlmo_fast.train import loop

    before = set(threading.enumerate())

    def failing(*_args, **_kw):
        raise RuntimeError("fake failure")
    if where == "in an evaluation":
        monkeypatch.setattr(loop, "evaluate", failing)
    else:
        real_loss, calls = objectives.total_loss, {"n": 0}

        def loss(ret):
            calls["n"] += 1
            return failing() if calls["n"] == 3 else real_loss(ret)
        monkeypatch.setattr(objectives, "total_loss", loss)
    with pytest.raises(RuntimeError, match="fake failure") as info:
        train(small_cfg(tmp_path / "run", synthetic_root, max_steps=4, eval_every=2, eval_batches=1, num_workers=2))
    kept = info.value  # (as a sweep that records its errors would)
    assert not [c for c in multiprocessing.active_children() if c.is_alive()]
    for t in set(threading.enumerate()) - before:
        t.join(timeout=10)
    assert not [t.name for t in set(threading.enumerate()) - before if t.is_alive()] and kept.__traceback__


def test_corrupt_images_are_skipped_and_counted(tmp_path, synthetic_root):
    root = _with_corrupt_images(synthetic_root, tmp_path / "corrupt")
    summary = train(small_cfg(tmp_path / "run", root, max_steps=4))
    assert summary["stop_reason"] == "max_steps" and summary["bad_samples"] > 0
    # a resumed run continues the counts: the same as a run that was not interrupted
    full = train(small_cfg(tmp_path / "full", root, max_steps=6))
    resumed = train(small_cfg(tmp_path / "run", root, max_steps=6))
    assert resumed["bad_samples"] == full["bad_samples"] > summary["bad_samples"]


def test_bad_data_roots_fail_at_start_with_clear_messages(tmp_path, synthetic_root):
    with pytest.raises(FileNotFoundError, match="/nonexistent/data"):
        train(small_cfg(tmp_path / "a", "/nonexistent/data"))
    root = tmp_path / "nocaption"
    shutil.copytree(synthetic_root, root)
    path = root / "coco_caption_karpathy_train.arrow"
    table = vdata.read_arrow(str(path))
    vdata.write_arrow(str(path), table.drop_columns(["caption"]))
    with pytest.raises(ValueError, match=r"coco_caption_karpathy_train\.arrow.*caption|caption.*coco_caption_karpathy_train"):
        train(small_cfg(tmp_path / "b", str(root)))


def test_export_and_cli(tmp_path, synthetic_root, capsys):
    summary = train(small_cfg(tmp_path / "exp", synthetic_root, max_steps=2))
    out = tmp_path / "model.safetensors"
    train_loop.export(summary["last_checkpoint"], str(out))
    model = vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=32, max_text_len=12))
    load_checkpoint(model, str(out), strict=True)
    # a checkpoint whose saved config this version refuses still exports its weights
    state = torch.load(summary["last_checkpoint"], weights_only=True)
    state["config"]["learning_rate"] = 0.0
    torch.save(state, tmp_path / "odd.pt")
    with pytest.warns(UserWarning, match="could not be rebuilt: learning_rate must be > 0"):
        train_loop.export(str(tmp_path / "odd.pt"), str(tmp_path / "odd.safetensors"))
    load_checkpoint(model, str(tmp_path / "odd.safetensors"), strict=True)
    parser = build_parser("vlmo-fast pretrain", "test")
    help_text = parser.format_help()
    for flag in ("--preset", "--config", "--batch-size", "--gather-with-grad", "--activation-checkpointing"):
        assert flag in help_text
    toml = tmp_path / "cfg.toml"
    toml.write_text('[train]\nmax_steps = 7\ntasks = ["mlm", "itc", "itm"]\nlearning_rate = 3e-4\n')
    cfg = config_from_args(parser.parse_args(["--preset", "task_mlm_itm_itc_base", "--config", str(toml),
                                              "--batch-size", "2048", "--warmup-steps", "0.2"]))
    assert cfg.arch == "vlmo_base_patch16" and cfg.max_steps == 7 and cfg.learning_rate == 3e-4
    assert cfg.batch_size == 2048 and cfg.warmup_steps == 0.2 and cfg.datasets == ["coco", "vg", "sbu", "gcc"]
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"lr": 1})
    with open(tmp_path / "exp" / "config.json") as f:
        assert json.load(f)["train"]["max_steps"] == 2
    assert (tmp_path / "exp" / "log.csv").read_text().startswith("step,")


def test_the_built_in_synthetic_set_is_learned(tmp_path):
    """The default run (tiny model, built-in synthetic data, no options) visibly learns within a few hundred steps:
    contrastive accuracy (the mean over the last 50 steps) and retrieval recall on the held-out split well above
    chance. At 400 steps the margins are about 2x these bounds (at 250 the run was just past the turn and a change
    of rounding could move it across them)."""
    cfg = TrainConfig(out_dir=str(tmp_path / "default"), max_steps=400, log_every=50, num_workers=1,
                      tensorboard=False)
    summary = train(cfg)
    final = summary["final"]
    chance_acc = 1 / cfg.per_device_batch_size
    assert final["itc_acc"] > 3 * chance_acc, summary["history"]
    metrics = summary["metrics"]
    chance_recall = sum(k / 500 for k in (1, 5, 10)) / 3  # 500 val images, 5 captions each
    assert metrics["val/r_mean"] > 3 * chance_recall, metrics
    assert metrics["val/itc_i2t_acc"] > 2 * chance_acc, metrics


def test_a_diverging_run_with_itm_skips_steps_and_stops(tmp_path, synthetic_root):
    """An absurd learning rate makes every logit non-finite after the first update; ITM's hard-negative sampling
    must not crash on them: the steps are skipped and the run stops after max_bad_steps, saving first."""
    summary = train(small_cfg(tmp_path / "div", synthetic_root, max_steps=8, learning_rate=1e9, warmup_steps=0,
                              max_bad_steps=2))
    assert summary["stop_reason"].startswith("2 non-finite losses"), summary["stop_reason"]
    assert summary["skipped_steps"] == 2 and os.path.isfile(summary["last_checkpoint"])


def _fsdp_run(rank, world, out_dir, root, fsdp, steps, eval_every=0):
    cfg = small_cfg(out_dir, root, max_steps=steps, per_device_batch_size=4, tasks=["itc", "mlm"], fsdp=fsdp,
                    gather_with_grad=True, save_every=2, keep_last=5, eval_every=eval_every, eval_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = losses(train(cfg))
    # the model's outputs hold no view (FSDP2 warned of the t2i logits, a transpose, 4 times a run)
    assert not [w for w in caught if "returned a view tensor" in str(w.message)]
    return result


def test_fsdp2_matches_ddp_and_resumes(tmp_path, synthetic_root):
    """FSDP2 (blocks and root sharded; the 0-d logit scales replicated, their gradients averaged) trains exactly like
    DDP, and a resumed FSDP2 run (full model and optimizer state gathered into the checkpoint) continues the same
    trajectory."""
    from vlmo_fast.train.distributed import fsdp2_unavailable

    if fsdp2_unavailable() is not None:
        pytest.skip(fsdp2_unavailable())
    ddp = run_distributed(_fsdp_run, 2, str(tmp_path / "ddp"), synthetic_root, False, 4)[0]
    fsdp = run_distributed(_fsdp_run, 2, str(tmp_path / "fsdp"), synthetic_root, True, 4)[0]
    assert fsdp == pytest.approx(ddp, rel=1e-5)
    resumed_dir = tmp_path / "resumed"
    os.makedirs(resumed_dir / "checkpoints")
    shutil.copy(tmp_path / "fsdp" / "checkpoints" / "step_00000002.pt", resumed_dir / "checkpoints")
    resumed = run_distributed(_fsdp_run, 2, str(resumed_dir), synthetic_root, True, 4)[0]
    assert resumed == pytest.approx(fsdp[2:], rel=1e-5)
    # a checkpoint whose evaluation a signal stopped: the resumed run evaluates before any training forward, which
    # made FSDP2 take the blocks for roots and fail at the first training step; it trains on, the same trajectory
    pending_dir = tmp_path / "pending"
    os.makedirs(pending_dir / "checkpoints")
    state = torch.load(tmp_path / "fsdp" / "checkpoints" / "step_00000002.pt", weights_only=True)
    torch.save(dict(state, eval_pending=True), pending_dir / "checkpoints" / "step_00000002.pt")
    pending = run_distributed(_fsdp_run, 2, str(pending_dir), synthetic_root, True, 4, 2)[0]
    assert pending == pytest.approx(fsdp[2:], rel=1e-5)
    with open(pending_dir / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("val/itc_i2t_acc")] == [2]


def _first_update_skipped_run(rank, world, out_dir, root, fsdp, save_every, nan_first=True):
    real, calls = objectives.total_loss, {"n": 0}

    def first_is_nan_on_rank_1(ret):  # every rank skips the step (the check is a collective)
        calls["n"] += 1
        return real(ret) * float("nan") if calls["n"] == 1 and rank == 1 and nan_first else real(ret)

    objectives.total_loss = first_is_nan_on_rank_1
    try:
        cfg = small_cfg(out_dir, root, max_steps=3, per_device_batch_size=4, tasks=["itc", "mlm"], fsdp=fsdp,
                        save_every=save_every, keep_last=5)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            result = losses(train(cfg))
        if rank == 0 and nan_first:  # the notice names the rank whose loss was not finite, its values, the step
            notice = [line for line in printed.getvalue().splitlines() if ": non-finite loss (" in line]
            assert notice == [notice[0]] and notice[0].startswith("step 1: non-finite loss (rank 1: {"), notice
            assert "rank 0" not in notice[0], notice
        return result
    finally:
        objectives.total_loss = real


def test_a_checkpoint_before_the_first_update_leaves_the_fsdp_run_alone(tmp_path, synthetic_root):
    """Under FSDP2 the optimizer state is saved and loaded through torch's state-dict helpers, which first give an
    optimizer without state one by stepping it with zero gradients. A checkpoint written while every step so far
    was skipped as non-finite (a periodic save, a signal, the save before a --max-bad-steps stop) thus made the run's
    first real update a second one: later losses differed from the same run without the save (and from DDP), and a
    DDP checkpoint of that moment resumed under FSDP2 differently. Saved as it is (no state), and loaded so."""
    from vlmo_fast.train.distributed import fsdp2_unavailable

    if fsdp2_unavailable() is not None:
        pytest.skip(fsdp2_unavailable())
    ddp = run_distributed(_first_update_skipped_run, 2, str(tmp_path / "ddp"), synthetic_root, False, 1)[0]
    fsdp_saving = run_distributed(_first_update_skipped_run, 2, str(tmp_path / "fsdp"), synthetic_root, True, 1)[0]
    fsdp_plain = run_distributed(_first_update_skipped_run, 2, str(tmp_path / "plain"), synthetic_root, True, 1000)[0]
    assert fsdp_plain == pytest.approx(ddp, rel=1e-5)
    assert fsdp_saving == pytest.approx(ddp, rel=1e-5)
    saved = torch.load(tmp_path / "fsdp" / "checkpoints" / "step_00000001.pt", weights_only=True)["optimizer"]
    assert saved["state"] == {}
    # the DDP checkpoint of that moment, resumed under FSDP2, continues as DDP did
    resumed_dir = tmp_path / "ddp_to_fsdp"
    os.makedirs(resumed_dir / "checkpoints")
    shutil.copy(tmp_path / "ddp" / "checkpoints" / "step_00000001.pt", resumed_dir / "checkpoints")
    resumed = run_distributed(_first_update_skipped_run, 2, str(resumed_dir), synthetic_root, True, 1000, False)[0]
    assert resumed == pytest.approx(ddp[1:], rel=1e-5)


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"text_ids": torch.tensor([i])}


def _index_collate(items):
    return {"text_ids": torch.cat([it["text_ids"] for it in items])}


@pytest.mark.parametrize("n,world,bs,drop_last,sizes", [
    (10, 1, 4, False, [4, 4, 2]),  # official: the final partial batch is kept and counted
    (10, 1, 4, True, [4, 4]),
    (9, 1, 4, False, [4, 4]),  # a final global batch of one sample has no ITM negative: dropped
    (11, 2, 4, False, [4, 2]),  # 2 ranks: padded to 6 samples each, a final batch of 2 on both
    (9, 2, 4, False, [4, 1]),  # a final batch of one per rank is a global batch of two: kept
    (11, 2, 4, True, [4]),
])
def test_train_stream_epoch_follows_the_official_loader(n, world, bs, drop_last, sizes):
    from torch.utils.data import DistributedSampler

    from vlmo_fast.train.data_setup import TrainStream
    from vlmo_fast.train.distributed import DistInfo

    def pos(stream):  # (the state also holds the samples consumed; checked in the cross-layout test)
        return {k: stream.state()[k] for k in ("epoch", "batch")}

    seen, rows, next_epoch = [], [], []
    for rank in range(world):
        info = DistInfo(rank, world, rank, torch.device("cpu"))
        stream = TrainStream(_Indices(n), _index_collate, bs, 0, 3, info, drop_last=drop_last)
        assert stream.batches_per_epoch == len(sizes)
        batches = [next(stream)["text_ids"] for _ in range(len(sizes))]
        assert [len(b) for b in batches] == sizes and pos(stream) == {"epoch": 0, "batch": len(sizes)}
        next_epoch.append(next(stream)["text_ids"].tolist())
        assert len(next_epoch[-1]) == bs and pos(stream) == {"epoch": 1, "batch": 1}  # next epoch
        rows.append(torch.cat(batches).tolist())
        seen += rows[-1]
        # in the official order: DistributedSampler's (seed + epoch permutation, padded, strided by rank)
        official = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3,
                                           drop_last=drop_last))
        assert rows[-1] == official[:len(rows[-1])]
    if not drop_last and sum(sizes) * world >= n:  # every sample of the epoch is seen (ranks padded by repeats)
        assert sorted(set(seen)) == list(range(n))
    else:
        assert len(set(seen)) == len(seen)
    # resuming mid-epoch continues with the same batches, the partial one included
    info = DistInfo(0, world, 0, torch.device("cpu"))
    stream = TrainStream(_Indices(n), _index_collate, bs, 0, 3, info, drop_last=drop_last)
    stream.restore({"epoch": 0, "batch": 1})
    rest = [next(stream)["text_ids"].tolist() for _ in range(len(sizes) - 1)]
    assert sum(rest, []) == rows[0][bs:]  # nothing left when the epoch had one batch
    # then the next epoch, as without the interruption (straight away when the restored batch ended the epoch)
    assert pos(stream) == {"epoch": 0, "batch": len(sizes)}
    assert next(stream)["text_ids"].tolist() == next_epoch[0] and pos(stream) == {"epoch": 1, "batch": 1}


@pytest.mark.parametrize("n,saved,resumed,batches", [
    (48, (2, 4), (1, 4), 2), (48, (1, 8), (2, 4), 2), (48, (2, 4), (4, 3), 2), (48, (1, 4), (1, 8), 2),
    (48, (1, 3), (2, 2), 1),  # 3 samples consumed: not a multiple of 2 processes
    (10, (1, 5), (4, 2), 2),  # saved at the epoch's end, resumed where the padding would begin
    (11, (2, 3), (3, 2), 1),
])
def test_a_resume_on_another_layout_neither_repeats_nor_skips_samples(n, saved, resumed, batches):
    """The data position is the epoch's samples consumed over all ranks: a run saved with (processes, batch per
    process) and resumed with another layout continues with the samples the saved run had not seen (it used to
    restart at batches x the new batch size: 8 samples replayed from 2 x 4 to 1 x 4 with accumulation), repeating
    fewer than one per process, and every rank gets batches of the same size in the same epoch (the gathers)."""
    from vlmo_fast.train.data_setup import TrainStream
    from vlmo_fast.train.distributed import DistInfo

    def streams(world, bs):
        return [TrainStream(_Indices(n), _index_collate, bs, 0, 3, DistInfo(r, world, r, torch.device("cpu")))
                for r in range(world)]

    (w0, b0), (w1, b1) = saved, resumed
    first = streams(w0, b0)
    consumed = [i for _ in range(batches) for s in first for i in next(s)["text_ids"].tolist()]
    state = first[0].state()
    assert state["samples"] == batches * w0 * b0
    moved = streams(w1, b1)
    for s in moved:
        s.restore(state)
    epoch = moved[0].epoch
    rest = []
    while True:  # one step of every rank at a time, to the epoch's end
        steps = [next(s) for s in moved]
        if any(s.epoch != epoch for s in moved):
            assert all(s.epoch == epoch + 1 for s in moved)  # the ranks cross into the next epoch together
            break
        sizes = {len(b["text_ids"]) for b in steps}
        assert len(sizes) == 1, sizes  # the same batch size on every rank
        rest += [i for b in steps for i in b["text_ids"].tolist()]
    if epoch == 0:
        assert set(consumed) | set(rest) == set(range(n))  # nothing skipped
        assert len(set(consumed) & set(rest)) < w1  # fewer than one sample per process seen again
    else:  # the saved run had read the whole epoch: the next one, from its start
        assert sorted(set(rest)) == list(range(n))


class _SomeUnreadable(torch.utils.data.Dataset):
    """Index i is unreadable (None, as a dataset with on_error="drop" returns) unless i % 3 == 0."""

    def __len__(self):
        return 30

    def __getitem__(self, i):
        return {"text_ids": torch.tensor([i])} if i % 3 == 0 else None


def _dropping_collate(items):
    good = [it for it in items if it is not None]
    out = {"bad_samples": len(items) - len(good)}
    if good:
        out["text_ids"] = torch.cat([it["text_ids"] for it in good])
    return out


def test_train_stream_skips_batches_too_small_and_keeps_their_bad_count():
    """Batches of one readable sample (no ITM negative in a one-process run: multinomial failed) or none are
    skipped, and their unreadable samples are counted with the next batch (an all-bad batch's were lost)."""
    from vlmo_fast.train.data_setup import TrainStream
    from vlmo_fast.train.distributed import DistInfo

    stream = TrainStream(_SomeUnreadable(), _dropping_collate, 3, 0, 3, DistInfo(0, 1, 0, torch.device("cpu")),
                         min_size=2)
    bad = 0
    while stream.epoch == 0:
        batch = next(stream)
        assert len(batch["text_ids"]) >= 2 and all(i % 3 == 0 for i in batch["text_ids"].tolist())
        bad += batch["bad_samples"]
    # the last batch is epoch 1's first, kept: it carries what epoch 0's skipped batches left, so epoch 0's 20
    # unreadable samples are counted once each, plus that batch's own
    assert stream.batch == 1 and bad == 20 + (3 - len(batch["text_ids"]))


class _Unreadable(_SomeUnreadable):
    def __getitem__(self, i):
        return None


class _OneReadable(_SomeUnreadable):
    def __getitem__(self, i):
        return {"text_ids": torch.tensor([i])} if i == 0 else None


class _TwoReadable(_SomeUnreadable):
    def __getitem__(self, i):
        return {"text_ids": torch.tensor([i])} if i < 2 else None


@pytest.mark.parametrize("min_size", [1, 2])
def test_train_stream_with_no_readable_sample_stops_with_an_error(min_size):
    """It searched epoch after epoch forever (a finetune on NLVR2 labels the reader refused spun until killed, and
    SIGTERM could not stop it: the flag is read after a step). A resumed epoch without a batch is not enough: only a
    whole one, from its start."""
    from vlmo_fast.train.data_setup import TrainStream
    from vlmo_fast.train.distributed import DistInfo

    stream = TrainStream(_Unreadable(), _dropping_collate, 3, 0, 3, DistInfo(0, 1, 0, torch.device("cpu")),
                         min_size=min_size)
    with pytest.raises(ValueError, match="the training set gave no batch in a whole epoch on rank 0: none of its 30 "
                                         "samples could be read"):
        next(stream)
    if min_size == 2:  # one readable sample: no batch of two, ever
        stream = TrainStream(_OneReadable(), _dropping_collate, 3, 0, 3, DistInfo(0, 1, 0, torch.device("cpu")),
                             min_size=2)
        with pytest.raises(ValueError, match="1 of its 30 samples could be read, and a batch needs 2"):
            next(stream)
        # two readable samples: an epoch whose order puts them in one batch may come (the search goes on), for up
        # to 3 epochs (seed 0 puts them together in epoch 1, seed 4 in none of the first three)
        stream = TrainStream(_TwoReadable(), _dropping_collate, 3, 0, 0, DistInfo(0, 1, 0, torch.device("cpu")),
                             min_size=2)
        assert sorted(next(stream)["text_ids"].tolist()) == [0, 1] and stream.epoch > 0
        stream = TrainStream(_TwoReadable(), _dropping_collate, 3, 0, 4, DistInfo(0, 1, 0, torch.device("cpu")),
                             min_size=2)
        with pytest.raises(ValueError, match="no batch in 3 whole epochs on rank 0: 2 of its 30 samples could be "
                                             "read, and a batch needs 2"):
            next(stream)
    stream = TrainStream(_SomeUnreadable(), _dropping_collate, 3, 0, 3, DistInfo(0, 1, 0, torch.device("cpu")))
    stream.restore({"epoch": 0, "batch": 10, "samples": 30})  # resumed where epoch 0 has no batch left
    assert next(stream)["text_ids"].tolist()[0] % 3 == 0 and stream.epoch == 1


class _NothingReadable(_SomeUnreadable):
    def __getitem__(self, i):
        raise vdata.UnreadableData("coco/train: 100 random samples in a row could not be read (see the samples logged "
                                   "above)")


@pytest.mark.parametrize("workers", [0, 1])
def test_resampling_that_finds_nothing_readable_ends_in_one_line(workers):
    """Several processes resample unreadable samples (full batches for the all-gathers); one that found nothing in
    100 tries returned None (a smaller batch: the gathers aborted), then raised a ValueError whose traceback, with
    workers, came wrapped in the worker's."""
    from vlmo_fast.train.config import _INPUT_ERROR
    from vlmo_fast.train.data_setup import TrainStream
    from vlmo_fast.train.distributed import DistInfo

    stream = TrainStream(_NothingReadable(), _dropping_collate, 3, workers, 3, DistInfo(0, 1, 0, torch.device("cpu")))
    with pytest.raises(ValueError) as err:
        next(stream)
    assert str(err.value) == "coco/train: 100 random samples in a row could not be read (see the samples logged above)"
    assert getattr(err.value, _INPUT_ERROR)


def test_itm_in_one_process_with_one_sample_per_micro_batch_is_refused_at_start(tmp_path, synthetic_root):
    """Every one-sample batch was skipped (ITM draws its negatives from the micro-batch): a whole epoch was decoded,
    then the run stopped with an error about unreadable samples; on tar shards the ITM sampling failed."""
    shards = vdata.write_synthetic_shards(str(tmp_path / "shards"), n=4, image_size=32, seed=0)
    for datasets in (None, [os.path.dirname(shards[0])]):
        kw = {} if datasets is None else {"datasets": datasets}
        with pytest.raises(ValueError, match=r"itm in one process needs per_device_batch_size >= 2 \(its negatives "
                                             r"come from the micro-batch\), got 1"):
            train(small_cfg(tmp_path / "run", synthetic_root, batch_size=2, per_device_batch_size=1, **kw))


def test_max_epochs_counts_the_partial_batch(tmp_path):
    """max_steps of an epoch-based run is len(train loader) * max_epochs // accumulation, as official."""
    from vlmo_fast.train.data_setup import train_stream
    from vlmo_fast.train.distributed import DistInfo

    root = str(tmp_path / "data")
    vdata.write_synthetic(root, n_train=12, n_val=4, n_test=4, image_size=64, seed=3)
    cfg = small_cfg(tmp_path / "run", root, max_steps=None, max_epochs=1, per_device_batch_size=4)
    model_config = vf.preset(cfg.arch, image_size=cfg.image_size, max_text_len=cfg.max_text_len)
    n = len(train_stream(cfg, model_config, DistInfo(0, 1, 0, torch.device("cpu"))).sampler)
    bs = next(b for b in range(4, 12) if n % b > 1)
    cfg = small_cfg(tmp_path / "run", root, max_steps=None, max_epochs=1, batch_size=bs, per_device_batch_size=bs)
    summary = train(cfg)
    assert summary["steps"] == -(-n // bs) == n // bs + 1 and summary["stop_reason"] == "max_steps"


def test_an_epoch_run_resumed_with_another_layout_says_its_length_changed(tmp_path):
    """An epoch-based run's step count comes from its batches per epoch, and an epoch's last partial batch is kept
    whole or split by the accumulation: resumed with another per-device batch (or world size), the same options
    give another max_steps, and the learning-rate schedule follows it. The log said only 'per_device_batch_size
    8 -> 4'; it names the new length now."""
    from vlmo_fast.train.data_setup import train_stream
    from vlmo_fast.train.distributed import DistInfo

    root = str(tmp_path / "data")
    vdata.write_synthetic(root, n_train=4, n_val=4, n_test=4, image_size=64, seed=3)
    cfg = small_cfg(tmp_path / "run", root, max_steps=None, max_epochs=1, per_device_batch_size=4)
    model_config = vf.preset(cfg.arch, image_size=cfg.image_size, max_text_len=cfg.max_text_len)
    n = len(train_stream(cfg, model_config, DistInfo(0, 1, 0, torch.device("cpu"))).sampler)
    bs = next(b for b in range(4, 16, 2) if 0 < n % b <= b // 2)  # whole: ceil(n/b) steps; split: one fewer
    whole, split = -(-n // bs), -(-n // (bs // 2)) // 2
    assert whole == split + 1
    first = train(small_cfg(tmp_path / "run", root, max_steps=None, max_epochs=1, batch_size=bs,
                            per_device_batch_size=bs, save_every=1, keep_last=100))
    assert first["steps"] == whole
    resumed_dir = tmp_path / "resumed"
    os.makedirs(resumed_dir / "checkpoints")
    shutil.copy(tmp_path / "run" / "checkpoints" / "step_00000001.pt", resumed_dir / "checkpoints")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        summary = train(small_cfg(resumed_dir, root, max_steps=None, max_epochs=1, batch_size=bs,
                                  per_device_batch_size=bs // 2, save_every=1, keep_last=100, max_bad_steps=7))
    assert summary["steps"] == split
    assert (f"max_steps (from max_epochs 1 with this layout) {whole} -> {split}: the learning-rate schedule follows "
            "the new length") in printed.getvalue()  # (also when another max_* option changed)
    assert f"per_device_batch_size {bs} -> {bs // 2}" in printed.getvalue()


def test_the_signal_notice_names_its_rank_when_there_are_several(capsys):
    """torchrun passes a SIGTERM on to every rank, and each printed the same notice."""
    from vlmo_fast.train.distributed import DistInfo

    for info, prefix in ((DistInfo(1, 2, 1, torch.device("cpu")), "rank 1: "), (None, "")):
        flag = {}
        previous = train_loop._install_signal_handlers(flag, info)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            train_loop._restore_signal_handlers(previous)
        assert flag == {"signal": signal.SIGTERM}
        assert capsys.readouterr().out == (f"{prefix}signal {int(signal.SIGTERM)}: stopping at the end of this step "
                                           "or evaluation, with a checkpoint\n")


def test_a_hangup_stops_the_run_like_a_term_unless_it_is_ignored(capsys):
    """The terminal of an ssh session closing sends SIGHUP (torchrun passes it on): it killed the workers without a
    checkpoint. It is handled as SIGTERM, except where the caller ignores it (nohup), which stays so."""
    previous_hup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        flag = {}
        previous = train_loop._install_signal_handlers(flag)
        try:
            os.kill(os.getpid(), signal.SIGHUP)
        finally:
            train_loop._restore_signal_handlers(previous)
        assert flag == {"signal": signal.SIGHUP} and "stopping at the end of this step" in capsys.readouterr().out
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        previous = train_loop._install_signal_handlers({})
        try:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        finally:
            train_loop._restore_signal_handlers(previous)
    finally:
        signal.signal(signal.SIGHUP, previous_hup)


def test_a_hangup_from_a_closed_terminal_leaves_the_run_able_to_write(tmp_path):
    """After the terminal closes, a write to it fails (EIO): the notice, then the logger's lines, raised in the run
    and ended it without a checkpoint. On SIGHUP the run points its terminal output at /dev/null (as nohup does)."""
    import pty
    import subprocess

    result = tmp_path / "result.txt"
    script = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
        "from vlmo_fast.train import loop\n"
        "flag = {}\n"
        "loop._install_signal_handlers(flag)\n"
        "print('ready', flush=True)\n"
        "for _ in range(600):\n"
        "    time.sleep(0.05)\n"
        "    if flag: break\n"
        "try:\n"
        "    print('a line after the hang-up', flush=True); sys.stderr.write('and on stderr\\n'); sys.stderr.flush()\n"
        "    got = 'wrote'\n"
        "except OSError as exc:\n"
        "    got = repr(exc)\n"
        f"open({str(result)!r}, 'w').write(f'{{flag}} {{got}}')\n")
    master, slave = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                             start_new_session=True)
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 120
    while b"ready" not in seen:  # (a child that hangs before it is ready fails the test, not the session)
        assert select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0], seen
        seen += os.read(master, 100)
    os.close(master)  # the terminal goes away
    child.send_signal(signal.SIGHUP)
    assert child.wait(timeout=60) == 0
    assert result.read_text() == f"{{'signal': {int(signal.SIGHUP)}}} wrote"


def _signal_to_rank1_in_evaluation_run(rank, world, out_dir, root):
    real = train_loop.encode

    def signalling(model, loader, *args, **kwargs):
        if rank == 1:  # only rank 1 gets the signal, during the evaluation every FSDP rank runs
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, loader, *args, **kwargs)

    train_loop.encode = signalling
    summary = train(small_cfg(out_dir, root, max_steps=6, eval_every=2, eval_batches=0, fsdp=True,
                              per_device_batch_size=4))
    return summary["stop_reason"], summary["steps"], summary["last_checkpoint"]


def test_an_fsdp_evaluation_a_signal_to_another_rank_stops_stays_pending(tmp_path, synthetic_root):
    """Under FSDP a signal to rank 1 stops every rank's evaluation, but the checkpoint took rank 0's own flag, which
    was unset: the evaluation was recorded as done and never ran again."""
    from vlmo_fast.train.distributed import fsdp2_unavailable

    if fsdp2_unavailable() is not None:
        pytest.skip(fsdp2_unavailable())
    results = run_distributed(_signal_to_rank1_in_evaluation_run, 2, str(tmp_path / "run"), synthetic_root)
    assert [r[:2] for r in results] == [(f"signal {int(signal.SIGTERM)}", 2)] * 2
    assert torch.load(results[0][2], weights_only=True, mmap=True)["eval_pending"] is True


def _best_run(rank, world, out_dir, root, fsdp):
    cfg = small_cfg(out_dir, root, max_steps=2, per_device_batch_size=4, tasks=["irtr"], fsdp=fsdp,
                    eval_every=1, eval_batches=0, final_eval=True)
    summary = train(cfg)
    return summary["best"], summary["metrics"].get("val/the_metric")


@pytest.mark.parametrize("fsdp", [False, True])
def test_the_best_checkpoint_in_two_processes(tmp_path, synthetic_root, fsdp):
    """Rank 0 evaluates and decides; every rank takes part in the best state's gathering (FSDP's full state is a
    collective), and best.pt holds the full model of the chosen step."""
    from vlmo_fast.train.distributed import fsdp2_unavailable

    if fsdp and fsdp2_unavailable() is not None:
        pytest.skip(fsdp2_unavailable())
    out = tmp_path / "run"
    (best, final_metric), (other_best, other_metric) = run_distributed(_best_run, 2, str(out), synthetic_root, fsdp)
    assert other_best is None and other_metric is None  # only rank 0 evaluates
    assert best["step"] in (1, 2) and final_metric is not None and best["the_metric"] >= final_metric
    state = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert state["step"] == best["step"] and state["the_metric"] == pytest.approx(best["the_metric"])
    model = train_loop.build_model(TrainConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])  # the full, unsharded state
    if best["step"] == 2:
        final = torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=True)["model"]
        assert all(torch.equal(state["model"][k], final[k]) for k in final)


def _evaluated_run(rank, world, out_dir, root, fsdp):
    cfg = small_cfg(out_dir, root, max_steps=2, per_device_batch_size=4, tasks=["itc", "mlm"], fsdp=fsdp,
                    gather_with_grad=True, drop_path_rate=0.0, eval_every=1, eval_batches=2, final_eval=True)
    return train(cfg)["metrics"]


def test_fsdp_runs_evaluate_like_ddp(tmp_path, synthetic_root):
    """A sharded model's forward is a collective: the evaluation (periodic and final) runs on every rank (before,
    rank 0 alone waited forever in its first forward) and reports the metrics DDP's reports."""
    from vlmo_fast.train.distributed import fsdp2_unavailable

    if fsdp2_unavailable() is not None:
        pytest.skip(fsdp2_unavailable())
    ddp = run_distributed(_evaluated_run, 2, str(tmp_path / "ddp"), synthetic_root, False)
    fsdp = run_distributed(_evaluated_run, 2, str(tmp_path / "fsdp"), synthetic_root, True)
    assert ddp[1] == {} and fsdp[1] == {}
    assert {"val/itc_i2t_acc", "val/tr_r1"} <= set(ddp[0]) and set(fsdp[0]) == set(ddp[0])
    assert all(fsdp[0][k] == pytest.approx(ddp[0][k], abs=1e-6) for k in ddp[0])


# ---- multi-process faults and resumes (found by running torchrun jobs) ------------------------------------------


def _at_second_loss(action):
    """objectives.total_loss, running ``action`` first at its second call (in a spawned process: no monkeypatch)."""
    real, calls = objectives.total_loss, []

    def hooked(out):
        calls.append(1)
        if len(calls) == 2:
            action()
        return real(out)

    objectives.total_loss = hooked


def _fail():
    raise RuntimeError("injected failure on rank 1")


def _failing_rank(rank, world, out_dir, root):
    signal.alarm(90)  # a hang ends the process (and fails the test) instead of the test session
    if rank == 1:
        _at_second_loss(_fail)
    try:
        train(small_cfg(out_dir, root, max_steps=4, per_device_batch_size=4, tasks=["itc"]))
    except Exception as exc:
        if rank == 0:  # its collective's error ("connection closed by peer"): rank 1's error alone fails the spawn,
            return f"rank 0: {type(exc).__name__}"  # whichever rank the parent happens to look at first
        raise
    return "finished"


def test_an_error_on_one_rank_ends_the_job_with_its_message(tmp_path, synthetic_root):
    """The failing rank leaves the process group without waiting at a barrier for ranks that wait for it in the
    next collective (the job hung until the group's 30-minute timeout, its error unprinted)."""
    with pytest.raises(Exception, match="injected failure on rank 1"):
        run_distributed(_failing_rank, 2, str(tmp_path / "run"), synthetic_root)


def _replicated_names(rank, world, root):
    from vlmo_fast.train.distributed import init_distributed, sync_replicated_grads, wrap_model

    info = init_distributed("cpu")
    model = train_loop.build_model(small_cfg("unused", root, tasks=["itc"]))
    wrapped = wrap_model(model, info, fsdp=True)
    name_of = {id(p): n for n, p in model.named_parameters()}
    order = [name_of[id(p)] for p in wrapped._vlmo_replicated]
    for k, p in enumerate(wrapped._vlmo_replicated):
        p.grad = torch.full_like(p, 10.0 ** k * (rank + 1))
    sync_replicated_grads(wrapped)
    return order, {name_of[id(p)]: float(p.grad) for p in wrapped._vlmo_replicated}


def test_fsdp_averages_each_replicated_scalar_with_itself(tmp_path, synthetic_root):
    """The 0-d logit scales stay replicated under FSDP2 and are averaged in name order, the same on every rank (an
    order by id(), a memory address, averaged one rank's logit_scale with the other's logit_vl_scale)."""
    from vlmo_fast.train.distributed import fsdp2_unavailable

    if fsdp2_unavailable() is not None:
        pytest.skip(fsdp2_unavailable())
    (order0, grads0), (order1, grads1) = run_distributed(_replicated_names, 2, synthetic_root)
    assert order0 == order1 == ["logit_scale", "logit_vl_scale"]
    assert grads0 == grads1 == {"logit_scale": 1.5, "logit_vl_scale": 15.0}


def test_evaluation_leaves_the_training_trajectory_alone(tmp_path, synthetic_root):
    """A periodic evaluation draws nothing from the global RNG (its loaders have their own generator): the losses
    are those of a run without it (DropPath draws from the global RNG), so ranks that evaluate and ranks that do not
    stay in step, and a resumed run, whose ranks restore rank 0's RNG, continues the same trajectory."""
    plain = losses(train(small_cfg(tmp_path / "plain", synthetic_root, max_steps=4)))
    evaluated = losses(train(small_cfg(tmp_path / "eval", synthetic_root, max_steps=4, eval_every=1,
                                       eval_batches=2)))
    assert evaluated == plain


def test_a_resume_with_more_steps_follows_the_longer_schedule(tmp_path, synthetic_root):
    """A finished run resumed with a larger --max-steps takes the new schedule's lr from its first update (it took
    the old schedule's last lr, 0) and the run's own hyperparameters (another --weight-decay was ignored)."""
    whole = train(small_cfg(tmp_path / "whole", synthetic_root, max_steps=4, warmup_steps=1))
    train(small_cfg(tmp_path / "split", synthetic_root, max_steps=2, warmup_steps=1))
    resumed = train(small_cfg(tmp_path / "split", synthetic_root, max_steps=4, warmup_steps=1))
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in whole["history"][2:]]
    assert losses(resumed) == pytest.approx(losses(whole)[2:], rel=1e-6)
    changed = train(small_cfg(tmp_path / "split", synthetic_root, max_steps=6, warmup_steps=1, weight_decay=0.5,
                              learning_rate=1e-3, save_every=1))
    assert changed["history"][0]["lr"] == pytest.approx(1e-3 * lr_factor(4, 1, 6))  # the lr of step 5
    groups = torch.load(tmp_path / "split" / "checkpoints" / "step_00000005.pt", weights_only=True)["optimizer"]
    assert {g["weight_decay"] for g in groups["param_groups"]} == {0.0, 0.5}
    assert {g["initial_lr"] for g in groups["param_groups"]} == {1e-3}


def _ddp_then_fsdp(rank, world, out_dir, root, fsdp, steps):
    cfg = small_cfg(out_dir, root, max_steps=steps, per_device_batch_size=4, tasks=["itc", "mlm"], fsdp=fsdp,
                    gather_with_grad=True, save_every=2, keep_last=5, drop_path_rate=0.0)
    return losses(train(cfg))


def test_a_ddp_checkpoint_resumes_under_fsdp(tmp_path, synthetic_root):
    """A DDP run's optimizer state (parameters by position) loads into an FSDP2 run (parameters by name): the run
    continues DDP's trajectory (it failed with a KeyError)."""
    from vlmo_fast.train.distributed import fsdp2_unavailable

    if fsdp2_unavailable() is not None:
        pytest.skip(fsdp2_unavailable())
    ddp = run_distributed(_ddp_then_fsdp, 2, str(tmp_path / "ddp"), synthetic_root, False, 4)[0]
    resumed_dir = tmp_path / "resumed"
    os.makedirs(resumed_dir / "checkpoints")
    shutil.copy(tmp_path / "ddp" / "checkpoints" / "step_00000002.pt", resumed_dir / "checkpoints")
    resumed = run_distributed(_ddp_then_fsdp, 2, str(resumed_dir), synthetic_root, True, 4)[0]
    assert resumed == pytest.approx(ddp[2:], rel=1e-5)


def _signalled_rank(rank, world, out_dir, root):
    signal.alarm(90)
    if rank == 1:
        _at_second_loss(lambda: os.kill(os.getpid(), signal.SIGTERM))
    summary = train(small_cfg(out_dir, root, max_steps=6, per_device_batch_size=4, tasks=["itc"]))
    return summary["stop_reason"], summary["steps"]


def test_a_signal_to_one_rank_stops_every_rank_with_its_number(tmp_path, synthetic_root):
    """Each rank stops at the same step with the signal's number (exit status 128 + N on each; rank 0 said 'signal
    on another rank' and exited 1, so torchrun blamed it)."""
    results = run_distributed(_signalled_rank, 2, str(tmp_path / "run"), synthetic_root)
    assert results == [(f"signal {int(signal.SIGTERM)}", 2)] * 2
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "step_00000002.pt")


def test_the_logged_lr_is_the_steps_own(tmp_path, synthetic_root):
    """The logged lr was read after the scheduler moved on: each row showed the next step's (every run's last row
    showed 0). An epoch-based run whose warmup outlasts it warns, as a step-based one does."""
    summary = train(small_cfg(tmp_path / "a", synthetic_root, max_steps=4, warmup_steps=2, learning_rate=2e-4))
    assert [h["lr"] for h in summary["history"]] == pytest.approx([0.0, 1e-4, 2e-4, 1e-4])
    with pytest.warns(UserWarning, match=r"warmup_steps \(101\) exceeds the 100 steps of 1 epoch\(s\)"):
        train(small_cfg(tmp_path / "b", synthetic_root, max_steps=None, max_epochs=1, warmup_steps=101,
                        log_every=100))  # (one sample per caption: 800 / 8)


def test_a_training_step_reads_the_device_once(tmp_path, synthetic_root, monkeypatch):
    """On a GPU each read of a device value stalls the host until the queue drains. A pretraining step (MLM + ITC +
    ITM with hard negatives) reads it once: the text ids are range-checked on the host before their copy (the model
    then does not read back its device copies, nor the hard negatives' rows of them), and the non-finite check and
    the signal poll share one read and, with several processes, one collective. Logging reads its values at once."""
    from vlmo_fast.model import vlmo

    checked, reads = [], {"flags": 0, "signal": 0, "means": 0}
    real_check = vlmo._check_ids
    monkeypatch.setattr(vlmo, "_check_ids", lambda ids, vocab: (checked.append(ids.device.type), real_check(ids,
                                                                                                            vocab)))
    real_flags, real_max, real_mean = train_loop.largest_over_ranks, train_loop.max_over_ranks, \
        train_loop.mean_over_ranks

    def count(key, fn):
        def counted(*args):
            reads[key] += 1
            return fn(*args)
        return counted

    monkeypatch.setattr(train_loop, "largest_over_ranks", count("flags", real_flags))
    monkeypatch.setattr(train_loop, "max_over_ranks", count("signal", real_max))
    monkeypatch.setattr(train_loop, "mean_over_ranks", count("means", real_mean))
    counts = []
    for steps in (4, 8):  # the difference is what the steps read (the run's start and end read a few values too)
        checked.clear()
        reads.update(flags=0, signal=0, means=0)
        summary = train(small_cfg(tmp_path / f"reads{steps}", synthetic_root, max_steps=steps, log_every=2))
        assert summary["stop_reason"] == "max_steps"
        counts.append((len(checked), dict(reads)))
    (checks4, reads4), (checks8, reads8) = counts
    # per step: text_ids and text_ids_mlm checked once each where the collate made them (the hard negatives' ids
    # are rows of checked ids: before, a third check per step read them back)
    assert checks8 - checks4 == 2 * 4, counts
    # per step one read for the non-finite check and the signal together; per log row (2 in 4 steps) one
    assert {k: reads8[k] - reads4[k] for k in reads4} == {"flags": 4, "signal": 0, "means": 2}, counts


def test_ids_moved_to_the_device_are_not_read_back():
    from vlmo_fast.evaluation import to_device
    from vlmo_fast.model import vlmo

    ids = torch.randint(0, 100, (2, 5))
    out = to_device({"text_ids": ids, "text_masks": torch.ones(2, 5)}, torch.device("meta"), vocab_size=100)
    assert out["text_ids"].device.type == "meta"  # no values there: a re-check would fail
    vlmo._CHECKED_IDS.get(out["text_ids"], (100,), lambda: pytest.fail("the model would read the ids back"))
    with pytest.raises(ValueError, match=r"text_ids must lie in \[0, 50\), got range"):
        to_device({"text_ids": ids + 60}, torch.device("meta"), vocab_size=50)


def test_a_signal_during_the_steps_device_read_stops_the_run_at_that_step(tmp_path, synthetic_root, monkeypatch):
    """On a GPU the host waits for most of a step in its one device read (the non-finite check): a SIGTERM that
    arrives then stops the run at that step, with no further update (the flag is read after the wait)."""

    class SignalledWhileRead(torch.Tensor):
        def __bool__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            return super().__bool__()

    real, calls = torch.isfinite, {"n": 0}

    def isfinite(x):
        out = real(x)
        if not sys._getframe(1).f_code.co_filename.endswith(os.path.join("train", "loop.py")):
            return out  # (the objectives' own checks)
        calls["n"] += 1
        return out.as_subclass(SignalledWhileRead) if calls["n"] == 2 else out  # step 2's loss (no accumulation)

    monkeypatch.setattr(torch, "isfinite", isfinite)
    summary = train(small_cfg(tmp_path / "sig", synthetic_root, max_steps=6))
    monkeypatch.undo()
    assert summary["stop_reason"] == f"signal {int(signal.SIGTERM)}" and summary["steps"] == 2, summary


def test_per_sample_seeding_touches_only_the_cpu_generator_and_never_repeats(monkeypatch):
    """A sample's and a batch's seeds go to the CPU generator alone, the state the fork restores:
    torch.manual_seed also reseeded the GPU's generator (dropout, DropPath and ITM negatives on a GPU) at every item
    of a loader without workers. The seeds of (epoch, index) never coincide with another's, also past a million
    samples (an affine mix repeated (e, i + M) as (e + 1, i))."""
    from vlmo_fast.train.data_setup import SeededCollate, SeededSamples, _sample_seed

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: reseeded.append(s))
    data = SeededSamples([{"x": 1}, {"x": 2}], seed=3)
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    reseeded.clear()
    items = [data[(0, 0)], data[(1, 1)]]
    SeededCollate(lambda its: its)(items)
    assert torch.equal(torch.rand(3), before) and reseeded == []  # the main stream untouched, no GPU reseed
    m = 1000003
    seeds = {_sample_seed(0, e, i) for e in range(3) for i in (0, 1, m, m + 1, 2 * m)}
    assert len(seeds) == 15 and all(0 <= s < 2**62 for s in seeds)


def test_a_resume_refuses_a_new_load_path(tmp_path, synthetic_root):
    """Resuming a run loads its weights over a new --load-path: a fine-tuning run started again in the same folder
    from another checkpoint continued (or, finished, reported "already complete" for) the old one, saying only
    "changed options: load_path". The same file spelled another way, or no --load-path, continues the run."""
    from vlmo_fast.train.loop import load_path_clash, resume_changes

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    saved = TrainConfig(tasks=["irtr"], datasets=["coco"], load_path=str(a), max_steps=5).to_dict()
    cfg = lambda **kw: TrainConfig(tasks=["irtr"], datasets=["coco"], max_steps=9, **kw)  # noqa: E731
    assert re.search(r"--load-path .*b\.pt: that run started from .*a\.pt.*another --out-dir",
                     load_path_clash(cfg(load_path=str(b)), saved, "ckpt.pt"))
    for same in (dict(load_path=str(a)), dict(load_path=str(tmp_path / "." / "a.pt")), {}):
        assert load_path_clash(cfg(**same), saved, "ckpt.pt") is None
        assert resume_changes(cfg(**same), saved, "ckpt.pt") == ["max_steps 5 -> 9"]  # not a "changed option"
    assert "started from its initialisation" in load_path_clash(cfg(load_path=str(a)), dict(saved, load_path=None),
                                                                "c")
    # through a run: refused before anything is trained or written
    root = tmp_path / "run"
    train(small_cfg(root, synthetic_root, max_steps=1, warmup_steps=0))
    vf.save_checkpoint(vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=32, max_text_len=12)), str(b) + ".pt")
    with pytest.raises(ValueError, match="that run started from its initialisation"):
        train(small_cfg(root, synthetic_root, max_steps=2, warmup_steps=0, load_path=str(b) + ".pt"))


def test_fsdp_in_one_process_says_it_shards_nothing(tmp_path, synthetic_root):
    with pytest.warns(UserWarning, match="fsdp: one process .* nothing is sharded"):
        summary = train(small_cfg(tmp_path / "run", synthetic_root, max_steps=1, warmup_steps=0, fsdp=True))
    assert summary["steps"] == 1


def test_a_position_saved_with_older_per_sample_seeds_says_the_draws_differ(synthetic_root):
    """The map-style stream's per-sample seeds changed rule (hashed, no longer an affine mix): a checkpoint of the
    older rule resumes at its place, with a note that the augmentation and masking draws are not the saved run's."""
    from vlmo_fast.train.data_setup import TrainStream
    from vlmo_fast.train.distributed import DistInfo

    ds = vdata.build_dataset(synthetic_root, ["coco"], "train", image_size=32, max_text_len=12)
    make = lambda: TrainStream(ds, vdata.build_collate(), 4, 0, 0, DistInfo(0, 1, 0, torch.device("cpu")))  # noqa
    saved = make()
    next(saved)
    state = saved.state()
    now = make()
    now.restore(state)
    assert now.resume_note is None and now.consumed == 4
    older = make()
    older.restore({k: v for k, v in state.items() if k != "seeds"})
    assert older.consumed == 4 and "other augmentation and MLM-masking draws" in older.resume_note
