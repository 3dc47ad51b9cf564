"""Objectives against float64 hand computations on tiny batches (spec §5)."""

import math

import pytest
import torch
import torch.nn.functional as F

import vlmo_fast as vf
from vlmo_fast import objectives as O
from vlmo_fast.config import loss_names


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
