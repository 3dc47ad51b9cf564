"""Objectives against float64 hand computations on tiny batches (spec §5)."""

import math

import pytest
import torch
import torch.nn.functional as F

import vlmo_fast as vf
from vlmo_fast import objectives as O
from vlmo_fast.config import loss_names

from dist_utils import run_distributed


def model_and_batch(tasks, b=4, **kw):
    cfg = vf.preset("vlmo_tiny_patch16", loss_names=loss_names(**{t: 1 for t in tasks}), drop_path_rate=0.0, **kw)
    model = vf.VLMo(cfg).double().eval()
    lt, s = cfg.max_text_len, cfg.image_size
    ids = torch.randint(1000, 2000, (b, lt))
    ids[:, 0] = 101
    masks = torch.ones(b, lt, dtype=torch.long)
    masks[1, 6:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2:4] = ids[:, 2:4]
    labels[1, 2] = -100
    mlm = ids.clone()
    mlm[:, 2:4] = 103
    batch = {"text_ids": ids, "text_masks": masks, "text_ids_mlm": mlm, "text_labels_mlm": labels,
             "text_labels": torch.full_like(ids, -100), "image": [torch.randn(b, 3, s, s, dtype=torch.float64)]}
    return model, batch


def test_mlm_is_quarter_mean_ce_over_masked_tokens():
    model, batch = model_and_batch(["mlm"])
    ret = O.compute_mlm(model, batch)
    logits = model.mlm_score(model.infer(batch, mask_text=True)["text_feats"])
    labels = batch["text_labels_mlm"]
    logp = torch.log_softmax(logits, -1)
    picked = [-logp[i, j, labels[i, j]] for i in range(labels.shape[0]) for j in range(labels.shape[1]) if labels[i, j] != -100]
    expected = 0.25 * torch.stack(picked).mean()
    assert torch.allclose(ret["mlm_loss"].double(), expected, atol=1e-6)
    assert ret["mlm_logits"].shape == (4, 12, 30522)
    # the language stage's text-only MLM: the text encoder's features, weight 1
    text_model = vf.VLMo(vf.preset("vlmo_tiny_patch16", loss_names=loss_names(textmlm=1), drop_path_rate=0.0))
    text_model = text_model.double().eval()
    text = O.compute_textonly_mlm(text_model, batch)
    logp = torch.log_softmax(text_model.mlm_score(text_model.infer_text_mlm(batch, mask_text=True)["text_feats"]), -1)
    masked = (labels != -100).nonzero().tolist()
    assert torch.allclose(text["mlm_loss"].double(), torch.stack([-logp[i, j, labels[i, j]] for i, j in masked]).mean(),
                          atol=1e-6)


def test_itc_by_hand():
    model, batch = model_and_batch(["itc"])
    with torch.no_grad():  # two different temperatures, each of which must reach its own pair of features
        model.logit_scale.fill_(math.log(5.0))
        model.logit_vl_scale.fill_(math.log(12.0))
    ret = O.compute_itc(model, batch)
    img, txt = model.infer_image(batch), model.infer_text(batch)

    def clip(i, t, s):
        logits = s * i @ t.t()
        n = logits.shape[0]
        ce = lambda l: -torch.log_softmax(l, 1)[torch.arange(n), torch.arange(n)].mean()  # noqa: E731
        return (ce(logits) + ce(logits.t())) / 2

    expected = 0.5 * (clip(img["cls_feats"], txt["cls_feats"], 5.0)
                      + clip(img["cls_vlffn_feats"], txt["cls_vlffn_feats"], 12.0))
    assert torch.allclose(ret["itc_loss"].double(), expected, atol=1e-6)
    assert ret["itc_logit_scale"].item() == pytest.approx(5.0)
    assert ret["itc_logit_vl_scale"].item() == pytest.approx(12.0)
    assert torch.allclose(ret["itc_vl_i2t_logits"], 12.0 * img["cls_vlffn_feats"] @ txt["cls_vlffn_feats"].t())
    assert torch.allclose(ret["itc_t2i_logits"], ret["itc_i2t_logits"].t())
    assert torch.equal(ret["itc_labels"], torch.arange(4))


def test_irtr_by_hand():
    """Retrieval fine-tuning (spec §5.7): the expert ITC on the _ft paths, both directions averaged, at logit_scale."""
    model, batch = model_and_batch(["irtr"])
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # spreads the near-equal similarities of a fresh model
    ret = O.compute_irtr(model, batch)
    img, txt = model.infer_image_ft(batch)["cls_feats"], model.infer_text_ft(batch)["cls_feats"]
    logits = 100.0 * img @ txt.t()
    n = logits.shape[0]
    i2t = -torch.log_softmax(logits, 1)[torch.arange(n), torch.arange(n)].mean()
    t2i = -torch.log_softmax(logits, 0)[torch.arange(n), torch.arange(n)].mean()
    assert abs(i2t - t2i) > 1e-5  # the two directions differ (by ~1e-2): dropping or doubling one would show
    assert torch.allclose(ret["irtr_loss"].double(), (i2t + t2i) / 2, atol=1e-6)
    assert torch.allclose(ret["irtr_i2t_logits"], logits) and torch.allclose(ret["irtr_t2i_logits"], logits.t())
    assert torch.equal(ret["irtr_labels"], torch.arange(4)) and ret["irtr_logit_scale"].item() == pytest.approx(100.0)


def test_hard_negative_sampling_never_draws_the_positive_and_follows_softmax():
    sim = torch.tensor([[5.0, 1.0, 0.0], [0.0, 9.0, 2.0], [3.0, 3.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([O.sample_hard_negatives(sim, g) for _ in range(1500)])
    for row in range(3):
        assert (draws[:, row] != row).all()
    w = torch.softmax(sim, 1)
    w.fill_diagonal_(0)
    w = w / w.sum(1, keepdim=True)
    freq0 = (draws[:, 0] == 1).float().mean()
    assert abs(freq0 - w[0, 1]) < 0.05
    # a fixed generator gives fixed draws
    assert torch.equal(O.sample_hard_negatives(sim, torch.Generator().manual_seed(3)),
                       O.sample_hard_negatives(sim, torch.Generator().manual_seed(3)))


def test_hard_negative_draws_are_the_official_ones():
    """The positives zeroed through a mask draw exactly what zeroing the diagonal in place drew, for local rows
    against a global batch (more columns than rows), from the same generator."""
    sim = torch.randn(5, 12) * 3

    def official(sim, g):
        w = torch.softmax(sim.float(), dim=1)
        w.fill_diagonal_(0)
        return torch.multinomial(w, 1, generator=g).squeeze(1)

    for seed in range(20):
        assert torch.equal(O.sample_hard_negatives(sim, torch.Generator().manual_seed(seed)),
                           official(sim, torch.Generator().manual_seed(seed)))


def _graphs_compiled(model, batches, prepare=lambda b: b):
    """Graphs Dynamo made (backend "eager": Inductor's guards, no code generation) for a training forward and
    backward of ``model`` over ``batches``."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    for batch in batches:
        O.total_loss(compiled(prepare(batch))).backward()
    found = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return found


def _tiny_float(tasks, **kw):
    cfg = vf.preset("vlmo_tiny_patch16", depth=2, vlffn_start_layer_index=1, image_size=32, drop_path_rate=0.0,
                    loss_names=loss_names(**{t: 1 for t in tasks}), **kw)
    model = vf.VLMo(cfg, backend="torch").train()
    model.current_tasks = list(tasks)
    return model


def _tiny_batch(b, lt, extra=None):
    ids = torch.randint(1000, 2000, (b, lt))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    return {"text_ids": ids, "text_masks": torch.ones(b, lt, dtype=torch.long), "text_ids_mlm": ids,
            "text_labels_mlm": labels, "text_labels": torch.full_like(ids, -100), "image": [torch.randn(b, 3, 32, 32)],
            **(extra or {})}


def test_a_compiled_training_forward_does_not_recompile_per_batch_size_or_label_list():
    """The pretraining forward under torch.compile: a batch of another size (an epoch's last one) gives one dynamic
    graph, not a graph per size (hard-negative sampling zeroed the positives with fill_diagonal_, which specialised
    on the size). VQA and NLVR2: their labels, Python lists in the batch, as tensors made before the forward
    (``prepare_targets``, as the loop does), so a new step's labels compile nothing."""
    model = _tiny_float(["mlm", "itc", "itm"])
    lt = model.config.max_text_len
    assert _graphs_compiled(model, [_tiny_batch(b, lt) for b in (4, 3, 2)]) <= 2
    vqa = _tiny_float(["vqa"], vqav2_label_size=50)
    steps = [_tiny_batch(3, lt, {"vqa_labels": [[i], [i + 1, 7], []], "vqa_scores": [[1.0], [0.3, 0.6], []]})
             for i in range(3)]
    prep = lambda b: O.prepare_targets(b, ["vqa"], 50, torch.device("cpu"))  # noqa: E731
    assert _graphs_compiled(vqa, steps, prep) == 1
    nlvr2 = _tiny_float(["nlvr2"])
    steps = [dict(_tiny_batch(3, lt, {"answers": answers}), image_0=[torch.randn(3, 3, 32, 32)],
                  image_1=[torch.randn(3, 3, 32, 32)]) for answers in ([0, 1, 1], [1, 0, 0], [1, 1, 0])]
    prep = lambda b: O.prepare_targets(b, ["nlvr2"], 50, torch.device("cpu"))  # noqa: E731
    assert _graphs_compiled(nlvr2, steps, prep) == 1


def test_targets_made_before_the_forward_give_the_same_losses():
    model, batch = model_and_batch(["vqa", "nlvr2"], b=2)
    batch.update(vqa_labels=[[3, 7], [1]], vqa_scores=[[1.0, 0.3], [0.6]], image_0=batch["image"],
                 image_1=[torch.randn_like(batch["image"][0])], answers=[1, 0])
    prepared = O.prepare_targets(batch, ["vqa", "nlvr2"], 3129, torch.device("cpu"))
    assert set(prepared) - set(batch) == {"vqa_targets", "nlvr2_labels"}
    for compute in (O.compute_vqa, O.compute_nlvr2):
        a, b = compute(model, batch), compute(model, prepared)
        for key in a:
            if "loss" in key:
                assert torch.equal(a[key], b[key]), key
    only_tensors = {k: v for k, v in prepared.items() if k not in ("vqa_labels", "vqa_scores", "answers")}
    assert torch.equal(O.compute_tasks(model, only_tensors, ["vqa"])["vqa_loss"],
                       O.compute_vqa(model, batch)["vqa_loss"])
    with pytest.raises(ValueError, match=r"vqa_targets'\] must be \(B, labels\) = \(2, 3129\), got \(2, 5\)"):
        O.compute_vqa(model, dict(prepared, vqa_targets=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="vqa_labels: label 3129 of question 1"):
        O.prepare_targets(dict(batch, vqa_labels=[[3], [3129]], vqa_scores=[[1.0], [0.3]]), ["vqa"], 3129,
                          torch.device("cpu"))


def test_hard_negative_sampling_survives_diverged_logits():
    """Rows with NaN/inf logits (a diverged step, skipped by the loop) sample uniformly off the diagonal instead of
    failing; finite rows draw exactly as before."""
    sim = torch.tensor([[5.0, 1.0, 0.0, 2.0], [float("nan"), 9.0, 2.0, 0.0], [3.0, float("inf"), 0.0, 1.0]])
    draws = torch.stack([O.sample_hard_negatives(sim, torch.Generator().manual_seed(s)) for s in range(200)])
    assert (draws[:, 1] != 1).all() and (draws[:, 2] != 2).all()
    assert set(draws[:, 1].tolist()) == {0, 2, 3} and set(draws[:, 2].tolist()) == {0, 1, 3}
    finite = torch.stack([O.sample_hard_negatives(sim[:1], torch.Generator().manual_seed(s)) for s in range(200)])
    assert torch.equal(draws[:, :1], finite)
    # all the mass on the positive (an extreme logit scale): the off-diagonal weights underflow to 0
    peaked = O.sample_hard_negatives(torch.tensor([[200.0, 0.0, 1.0], [0.0, 200.0, 2.0]]))
    assert peaked[0] != 0 and peaked[1] != 1


def test_itm_hardneg_uses_sampled_pairs():
    model, batch = model_and_batch(["itm", "itc"])
    itc = O.compute_itc(model, batch)
    g = torch.Generator().manual_seed(7)
    ret = O.compute_itm_hardneg(model, batch, itc["itc_i2t_logits"], itc["itc_t2i_logits"], generator=g)
    g = torch.Generator().manual_seed(7)
    neg_img = O.sample_hard_negatives(itc["itc_t2i_logits"], g)
    neg_txt = O.sample_hard_negatives(itc["itc_i2t_logits"], g)
    pos = model.infer(batch)["cls_feats"]
    ni = model.infer(dict(batch, image=[batch["image"][0][neg_img]]))["cls_feats"]
    nt = model.infer(dict(batch, text_ids=batch["text_ids"][neg_txt], text_masks=batch["text_masks"][neg_txt]))["cls_feats"]
    logits = model.itm_score(torch.cat([pos, ni, nt]))
    labels = torch.tensor([1] * 4 + [0] * 8)
    assert torch.equal(ret["itm_labels"], labels)
    assert torch.allclose(ret["itm_loss"].double(), F.cross_entropy(logits, labels), atol=1e-9)


def test_pretraining_forward_and_total_loss():
    model, batch = model_and_batch(["itm", "itc", "mlm"])
    model.current_tasks = ["mlm", "itc", "itm"]
    out = model(batch)
    assert {"mlm_loss", "itc_loss", "itm_loss"} <= set(out)
    total = O.total_loss(out)
    assert torch.allclose(total, out["mlm_loss"] + out["itc_loss"] + out["itm_loss"])
    total.backward()
    assert model.relative_position_bias_table.grad is not None
    with pytest.raises(ValueError, match="enable itc"):
        O.compute_tasks(model, batch, ["itm"])
    with pytest.raises(ValueError, match="unknown task"):
        O.compute_tasks(model, batch, ["mim"])


def test_vqa_loss_by_hand():
    model, batch = model_and_batch(["vqa"], b=2)
    batch.update(vqa_labels=[[3, 7], [1]], vqa_scores=[[1.0, 0.3], [0.6]])
    ret = O.compute_vqa(model, batch)
    logits = ret["vqa_logits"].double()
    t = torch.zeros(2, 3129, dtype=torch.float64)
    t[0, 3], t[0, 7], t[1, 1] = 1.0, 0.3, 0.6
    bce = -(t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits))
    assert torch.allclose(ret["vqa_loss"].double(), bce.sum(1).mean(), atol=1e-6)
    batch.update(vqa_labels=[[3], [3129]], vqa_scores=[[1.0], [0.3]])
    with pytest.raises(ValueError, match=r"vqa_labels: label 3129 of question 1 is outside \[0, 3129\)"):
        O.compute_vqa(model, batch)


def test_nlvr2_two_passes():
    model, batch = model_and_batch(["nlvr2"], b=2)
    batch.update(image_0=batch["image"], image_1=[torch.randn_like(batch["image"][0])], answers=[1, 0])
    ret = O.compute_nlvr2(model, batch)
    c1 = model.infer(batch, image_token_type_idx=1)["cls_feats"]
    c2 = model.infer(batch, image_token_type_idx=2)["cls_feats"]
    logits = model.nlvr2_classifier(torch.cat([c1, c2], -1))
    assert torch.allclose(ret["nlvr2_logits"], logits)
    assert torch.allclose(ret["nlvr2_loss"].double(), F.cross_entropy(logits, torch.tensor([1, 0])), atol=1e-9)


class _PairModel:
    """A stand-in for VLMo in ITM: ``infer`` returns, as the pooled features, (text id, image id) of each row
    (text_ids[:, 0] and the image's first pixel), and ``itm_score`` passes them through; the ITM logits thus show
    which text was paired with which image."""

    def infer(self, batch):
        image = batch["image"][0]
        return {"text_ids": batch["text_ids"], "text_masks": batch["text_masks"], "image": image,
                "cls_feats": torch.stack([batch["text_ids"][:, 0].double(), image[:, 0, 0, 0]], 1)}

    def itm_score(self, cls):
        return cls


class _ItcModel:
    """ITC's inputs: unit features per sample (fixed per rank), the logit scales at 1."""

    logit_scale = logit_vl_scale = torch.zeros(())

    def __init__(self, rank, bsz):
        self.feats = torch.nn.functional.normalize(torch.randn(bsz, 8, generator=torch.Generator().manual_seed(rank)),
                                                   dim=1)

    def infer_image(self, batch):
        return {"cls_feats": self.feats, "cls_vlffn_feats": self.feats}

    infer_text = infer_image


def _gather_and_itm_on_rank(rank, world):
    """Run in each of 2 gloo processes: the gather order and ITM's hard negatives with per-rank results."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    bsz = 3
    ids = torch.arange(rank * bsz, (rank + 1) * bsz)  # global sample ids: rank 0 holds 0-2, rank 1 holds 3-5
    out = {}
    t = ids.double().unsqueeze(1).repeat(1, 2).requires_grad_()
    gathered = O.gather_local_first(t)
    gathered.sum().backward()
    out["gather"] = gathered.detach()[:, 0].tolist()
    out["grad"] = t.grad[:, 0].tolist()  # the official gather: only the local block carries gradient
    t.grad = None
    gathered = O.gather_local_first(t, with_grad=True)
    out["gather_with_grad"] = gathered.detach()[:, 0].tolist()
    # each rank weighs position j of its gathered rows by (rank + 1)(j + 1): a block's gradient sums its own rank's
    # weights and the other rank's at the block's place there
    weights = (rank + 1) * torch.arange(1, 2 * bsz + 1, dtype=torch.float64)
    (gathered * weights[:, None]).sum().backward()
    out["grad_with_grad"] = t.grad[:, 0].tolist()
    batch = {"text_ids": (100 + ids).unsqueeze(1).repeat(1, 4), "text_masks": torch.ones(bsz, 4, dtype=torch.long),
             "image": [ids.double().view(bsz, 1, 1, 1).expand(bsz, 3, 2, 2).contiguous()]}
    model = _PairModel()

    def pairs(ret):  # [(text id, image id)] of the positive, negative-image and negative-text rows
        rows = [(int(a) - 100, int(b)) for a, b in ret["itm_logits"].tolist()]
        return rows[:bsz], rows[bsz: 2 * bsz], rows[2 * bsz:]

    # (a) targeted: the whole mass of local text b on column bsz + b (in the spec's order local first, then the
    # other rank: the other rank's sample b), of local image b on column (b + 1) % bsz (the local next one)
    t2i = torch.full((2 * bsz, 2 * bsz), -50.0)
    i2t = torch.full((2 * bsz, 2 * bsz), -50.0)
    for b in range(bsz):
        t2i[b, bsz + b] = 50.0
        i2t[b, (b + 1) % bsz] = 50.0
    out["targeted"] = pairs(O.compute_itm_hardneg(model, batch, i2t, t2i, torch.Generator().manual_seed(0)))
    # (b) similarities as ITC makes them (through the same gather), the positive far the most similar: over many
    # draws the negative is never the positive, and comes from either rank
    feats = torch.nn.functional.normalize(torch.randn(2 * bsz, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    all_feats = O.gather_local_first(feats[ids])
    i2t = 20.0 * all_feats @ all_feats.t()
    drawn = [pairs(O.compute_itm_hardneg(model, batch, i2t, i2t.t(), torch.Generator().manual_seed(s)))
             for s in range(60)]
    out["drawn"] = drawn
    # (c) local=True (an evaluation on one rank): no collective at all, the negatives from this rank's rows alone;
    # the same calls without it gather
    out["local_gather"] = O.gather_local_first(t, local=True) is t
    local_sim = torch.full((bsz, bsz), -50.0)
    for b in range(bsz):
        local_sim[b, (b + 1) % bsz] = 50.0
    gathers = []
    real_gather = dist.all_gather
    dist.all_gather = lambda *a, **k: gathers.append(1) or real_gather(*a, **k)
    try:
        out["local_itm"] = pairs(O.compute_itm_hardneg(model, batch, local_sim, local_sim,
                                                       torch.Generator().manual_seed(0), local=True))
        itc = _ItcModel(rank, bsz)
        out["local_itc"] = O.compute_itc(itc, batch, local=True)["itc_i2t_logits"].shape
        out["local_gathers"] = len(gathers)
        out["itc"] = O.compute_itc(itc, batch)["itc_i2t_logits"].shape
        O.compute_itm_hardneg(model, batch, local_sim, local_sim, torch.Generator().manual_seed(0))
        out["gathers"] = len(gathers)
    finally:
        dist.all_gather = real_gather
    dist.destroy_process_group()
    return out


def test_gather_and_itm_hard_negatives_in_two_processes():
    """Spec §5.3-5.4 with 2 ranks, each rank's own results (the training losses are means over ranks, so a wrong
    order on one rank would not show there): rank 1 gathers [its own, rank 0's]; ITM reads column j of the local
    rows as the j-th sample of that order, never draws the positive, and draws negatives from the other rank too."""
    results = run_distributed(_gather_and_itm_on_rank, 2)
    bsz = 3
    for rank, out in enumerate(results):
        own = list(range(rank * bsz, (rank + 1) * bsz))
        others = list(range((1 - rank) * bsz, (2 - rank) * bsz))
        assert out["gather"] == own + others and out["gather_with_grad"] == own + others
        assert out["grad"] == [1.0] * bsz
        other = 1 - rank  # on the other rank this rank's block comes after its own (rows bsz..2 bsz - 1)
        assert out["grad_with_grad"] == [(rank + 1) * (b + 1) + (other + 1) * (bsz + b + 1) for b in range(bsz)]
        pos, neg_image, neg_text = out["targeted"]
        assert pos == [(i, i) for i in own]
        assert neg_image == [(own[b], others[b]) for b in range(bsz)]  # text b with the other rank's image b
        assert neg_text == [(own[(b + 1) % bsz], own[b]) for b in range(bsz)]  # image b with local text b + 1
        assert out["local_gather"] and out["local_gathers"] == 0 and out["gathers"] == 4 + 3
        assert out["local_itc"] == (bsz, bsz) and out["itc"] == (2 * bsz, 2 * bsz)  # the global loss: every row
        pos, neg_image, neg_text = out["local_itm"]
        assert pos == [(i, i) for i in own]
        assert neg_image == [(own[b], own[(b + 1) % bsz]) for b in range(bsz)]
        assert neg_text == [(own[(b + 1) % bsz], own[b]) for b in range(bsz)]
        images = [i for _, ni, _ in out["drawn"] for _, i in ni]
        texts = [t for _, _, nt in out["drawn"] for t, _ in nt]
        for _, ni, nt in out["drawn"]:
            assert all(t != i for t, i in ni) and all(t != i for t, i in nt)  # never the positive pair
        assert set(images) & set(others) and set(texts) & set(others)  # negatives from the other rank
        assert set(images) & set(own) and set(texts) & set(own)


def test_missing_heads_and_batch_keys_are_named():
    """Tasks the model has no heads for, and batches without a task's keys, gave AttributeError/KeyError from deep
    inside; a string of tasks was read letter by letter."""
    model, batch = model_and_batch(["vqa"], b=2)
    with pytest.raises(ValueError, match=r"task 'irtr' needs the model's itc_text_proj, itc_image_proj, logit_scale"):
        O.compute_tasks(model, batch, ["irtr"])
    with pytest.raises(ValueError, match=r"this model has no itc_image_proj: it is built when loss_names turn on "
                                         r"itc or irtr \(this model's: \['vqa'\]\)"):
        model.image_embedding(batch["image"][0])
    with pytest.raises(ValueError, match="this model has no itc_text_proj"):
        model.infer_text_ft(batch)
    with pytest.raises(ValueError, match=r"task 'vqa' needs the batch key\(s\) \['vqa_labels', 'vqa_scores'\]"):
        O.compute_tasks(model, batch, ["vqa"])
    with pytest.raises(TypeError, match="got the string 'vqa'"):
        O.compute_tasks(model, batch, "vqa")
    batch.update(vqa_labels=[3, 7], vqa_scores=[1.0, 0.3])  # not one list per question
    with pytest.raises(ValueError, match="one of as many scores per question"):
        O.compute_tasks(model, batch, ["vqa"])
    model, batch = model_and_batch(["nlvr2"], b=2)
    batch.update(image_0=batch["image"], image_1=batch["image"], answers=["True", "False"])
    with pytest.raises(ValueError, match=r"batch\['answers'\] must hold 0/1 labels"):
        O.compute_tasks(model, batch, ["nlvr2"])
    batch.update(answers=[1, 0, 1])
    with pytest.raises(ValueError, match="one label per sample"):
        O.compute_tasks(model, batch, ["nlvr2"])
