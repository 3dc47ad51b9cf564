"""The training objectives, exactly as official (spec §5): MLM, text-only MLM, ITC, ITM with global hard negatives,
retrieval fine-tuning, VQA and NLVR2. Each returns a dictionary with the official keys; the training loss is the
unweighted sum of every entry whose key contains "loss" (the weights are inside: 0.25 on MLM, ½ per ITC pair).

Distributed behaviour follows the official code: features are all-gathered without gradient and concatenated local
first, then the other ranks in rank order, so positives sit on the diagonal of the local rows; every rank computes
the full global loss. ``gather_with_grad=True`` sends gradients through the gather instead (an option). Without an
initialised process group, or with ``local=True``, everything is local.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import check_itm_has_itc
from .model.vlmo import mark_ids_checked
from .ops._checks import fp32_or_wider

PRETRAIN_ORDER = ("mlm", "textmlm", "itc", "irtr", "itm", "vqa", "nlvr2")


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _AllGatherWithGrad(torch.autograd.Function):
    """Every rank's ``t``; backward: each copy's gradient, summed over the ranks, back to the rank it came from (the
    gradient of the sum of every rank's loss). torch.distributed.nn.functional.all_gather did this; it is deprecated
    (torch 2.13 warns)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor):
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        summed = torch.stack(grads)
        dist.all_reduce(summed)
        return summed[ctx.rank]


def gather_local_first(t: torch.Tensor, with_grad: bool = False, local: bool = False) -> torch.Tensor:
    """All-gather ``t`` over the process group as ``cat([local, rank 0, ..., rank R-1 without self])``.

    Without gradient (official) the gathered copies are constants and only the local block carries gradient.
    ``local``: ``t`` itself, no gather (this process's batch only, e.g. an evaluation on one rank).
    """
    world, rank = (1, 0) if local else _world()
    if world == 1:
        return t
    if with_grad:
        parts = list(_AllGatherWithGrad.apply(t))
    else:
        parts = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(parts, t.detach().contiguous())
    parts[rank] = t
    return torch.cat([parts[rank]] + parts[:rank] + parts[rank + 1 :])


def _clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, with_grad: bool, local: bool):
    all_image = gather_local_first(image, with_grad, local)
    all_text = gather_local_first(text, with_grad, local)
    logits_i2t = scale * all_image @ all_text.t()
    # its own copy, not a view: the logits are returned by the model's forward, where FSDP2 warns of a view (an in-place
    # op on it would skip its backward hook); the copy is (global batch)^2 floats
    logits_t2i = logits_i2t.t().contiguous()
    target = torch.arange(logits_i2t.shape[0], device=logits_i2t.device)
    loss = (F.cross_entropy(fp32_or_wider(logits_i2t), target)
            + F.cross_entropy(fp32_or_wider(logits_t2i), target)) / 2
    return loss, logits_i2t, logits_t2i, target


def _mlm(model, infer: Dict[str, Any], weight: float) -> Dict[str, torch.Tensor]:
    """Cross-entropy of the MLM head over the masked tokens (labels -100 elsewhere), times ``weight``."""
    logits = model.mlm_score(infer["text_feats"])
    labels = infer["text_labels"]
    if labels is None:
        raise ValueError("batch is missing 'text_labels_mlm' (the MLM targets, -100 where unmasked)")
    loss = F.cross_entropy(fp32_or_wider(logits.reshape(-1, logits.shape[-1])), labels.reshape(-1), ignore_index=-100)
    return {"mlm_loss": loss * weight, "mlm_logits": logits, "mlm_labels": labels, "mlm_ids": infer["text_ids"]}


def compute_mlm(model, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Masked LM on the fusion encoder, mean cross-entropy over masked tokens, weight 0.25 (spec §5.2)."""
    return _mlm(model, model.infer(batch, mask_text=True), 0.25)


def compute_textonly_mlm(model, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Text-only MLM of the language stage (spec §5.1), weight 1."""
    return _mlm(model, model.infer_text_mlm(batch, mask_text=True), 1.0)


def compute_itc(model, batch: Mapping[str, Any], gather_with_grad: bool = False,
                local: bool = False) -> Dict[str, torch.Tensor]:
    """Image-text contrastive loss on the expert and the VL-FFN features, averaged (spec §5.3)."""
    image = model.infer_image(batch)
    text = model.infer_text(batch)
    scale = model.logit_scale.exp()
    vl_scale = model.logit_vl_scale.exp()
    loss, i2t, t2i, target = _clip_loss(image["cls_feats"], text["cls_feats"], scale, gather_with_grad, local)
    vl_loss, vl_i2t, vl_t2i, _ = _clip_loss(image["cls_vlffn_feats"], text["cls_vlffn_feats"], vl_scale,
                                           gather_with_grad, local)
    return {
        "itc_loss": (loss + vl_loss) * 0.5,
        "itc_i2t_logits": i2t,
        "itc_t2i_logits": t2i,
        "itc_labels": target,
        "itc_logit_scale": scale,
        "itc_logit_vl_scale": vl_scale,
        "itc_vl_i2t_logits": vl_i2t,
        "itc_vl_t2i_logits": vl_t2i,
    }


def sample_hard_negatives(sim: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One index per local row b, drawn from softmax(sim[b]) with the local positive (column b) zeroed (Q17).

    A row that ``multinomial`` would refuse samples uniformly off the diagonal instead: one with a NaN/inf weight
    (diverged logits: the step's ITC loss is then non-finite too and the loop skips the step), or one whose whole
    mass underflowed onto the positive (an extreme logit scale), where the official code would fail. A diverging run
    thus reaches the skip rather than failing in ``multinomial`` (on CUDA a device-side assert that ends the
    process). Decided on the device, without a sync."""
    with torch.no_grad():
        # the positives as a mask (fill_diagonal_ makes torch.compile specialise on the batch size: a recompile
        # for every new size, e.g. an epoch's last batch)
        rows = torch.arange(sim.shape[0], device=sim.device)
        positive = rows[:, None] == torch.arange(sim.shape[1], device=sim.device)[None, :]
        weights = F.softmax(fp32_or_wider(sim), dim=1).masked_fill(positive, 0)
        usable = torch.isfinite(weights).all(dim=1, keepdim=True) & (weights.sum(dim=1, keepdim=True) > 0)
        weights = torch.where(usable, weights, torch.ones_like(weights)).masked_fill(positive, 0)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def compute_itm_hardneg(
    model,
    batch: Mapping[str, Any],
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    local: bool = False,
) -> Dict[str, torch.Tensor]:
    """Image-text matching with one hard negative image per text and one hard negative text per image, sampled
    from the temperature-scaled ITC logits of the local rows against the global batch (spec §5.4)."""
    bsz = batch["text_ids"].shape[0]
    pos = model.infer(batch)
    pos_cls = pos["cls_feats"]
    with torch.no_grad():
        all_ids = gather_local_first(pos["text_ids"], local=local)
        all_masks = gather_local_first(pos["text_masks"], local=local)
        all_images = gather_local_first(pos["image"], local=local)
    del pos  # its sequence features are not needed through the negatives' forwards, where memory peaks
    neg_image_idx = sample_hard_negatives(sim_t2i[:bsz], generator)  # for each local text, an image
    neg_text_idx = sample_hard_negatives(sim_i2t[:bsz], generator)  # for each local image, a text
    neg_images = {"image": [all_images[neg_image_idx]], "text_ids": batch["text_ids"],
                  "text_labels": batch.get("text_labels"), "text_masks": batch["text_masks"]}
    del all_images  # every rank's images (fp32): only the sampled rows go on
    neg_texts = {"image": batch["image"], "text_ids": all_ids[neg_text_idx],
                 "text_labels": batch.get("text_labels"), "text_masks": all_masks[neg_text_idx]}
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:  # rows of ids the model checked: not read back from the device (a sync)
        mark_ids_checked(neg_texts["text_ids"], vocab)
    cls = torch.cat([pos_cls, model.infer(neg_images)["cls_feats"], model.infer(neg_texts)["cls_feats"]])
    labels = torch.zeros(3 * bsz, dtype=torch.long, device=cls.device)  # made there: no blocking host copy
    labels[:bsz] = 1
    logits = model.itm_score(cls)
    return {"itm_loss": F.cross_entropy(fp32_or_wider(logits), labels), "itm_logits": logits, "itm_labels": labels}


def compute_irtr(model, batch: Mapping[str, Any], gather_with_grad: bool = False,
                 local: bool = False) -> Dict[str, torch.Tensor]:
    """Retrieval fine-tuning: the expert half of ITC on the ``_ft`` paths (spec §5.7)."""
    image = model.infer_image_ft(batch)
    text = model.infer_text_ft(batch)
    scale = model.logit_scale.exp()
    loss, i2t, t2i, target = _clip_loss(image["cls_feats"], text["cls_feats"], scale, gather_with_grad, local)
    return {"irtr_loss": loss, "irtr_i2t_logits": i2t, "irtr_t2i_logits": t2i, "irtr_labels": target,
            "irtr_logit_scale": scale}


def _is_list(x: Any) -> bool:
    return not isinstance(x, (str, bytes)) and hasattr(x, "__len__") and getattr(x, "ndim", 1) == 1


def vqa_targets(labels: Iterable[Iterable[int]], scores: Iterable[Iterable[float]], num_labels: int,
                device: torch.device) -> torch.Tensor:
    """Dense (B, num_labels) soft-score targets from per-question label and score lists (filled on the CPU, then
    moved in one copy: one small write per answer on a GPU would be one kernel launch each)."""
    labels, scores = list(labels), list(scores)
    if len(labels) != len(scores):
        raise ValueError(f"vqa_labels and vqa_scores: {len(labels)} and {len(scores)} questions")
    target = torch.zeros(len(labels), num_labels)
    for i, (ls, ss) in enumerate(zip(labels, scores)):
        if not (_is_list(ls) and _is_list(ss) and len(ls) == len(ss)):
            raise ValueError(f"vqa_labels and vqa_scores must hold a list of labels and one of as many scores per "
                             f"question (the official collate), got {ls!r} and {ss!r} for question {i}")
        for label, score in zip(ls, ss):
            if not 0 <= int(label) < num_labels:
                raise ValueError(f"vqa_labels: label {int(label)} of question {i} is outside [0, {num_labels})")
            target[i, int(label)] = float(score)
    return _to_device(target, device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the GPU (a copy from pageable memory would wait, mid-step)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def nlvr2_labels(answers: Any) -> torch.Tensor:
    """NLVR2's 0/1 answers (1: the statement is true) as a LongTensor."""
    try:
        return torch.as_tensor(answers, dtype=torch.long)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"batch['answers'] must hold 0/1 labels (1: the statement is true), got {answers!r}") from exc


def prepare_targets(batch: Mapping[str, Any], tasks: Iterable[str], vqa_label_size: int,
                    device: torch.device) -> Dict[str, Any]:
    """The batch with the targets that the collate gives as Python lists also as tensors on ``device``:
    ``vqa_targets`` (dense soft scores, from ``vqa_labels``/``vqa_scores``) for vqa, ``nlvr2_labels`` (from
    ``answers``) for nlvr2. Made before the model's forward, which then reads tensors only: a ``torch.compile``d
    forward reading the lists guards on their lengths and values, a recompile at almost every step (then, past
    the recompile limit, eager). The lists stay in the batch."""
    out = dict(batch)
    if "vqa" in tasks and "vqa_labels" in out and "vqa_targets" not in out:
        out["vqa_targets"] = vqa_targets(out["vqa_labels"], out["vqa_scores"], vqa_label_size, device)
    if "nlvr2" in tasks and "answers" in out and "nlvr2_labels" not in out:
        out["nlvr2_labels"] = _to_device(nlvr2_labels(out["answers"]), device)
    return out


def compute_vqa(model, batch: Mapping[str, Any]) -> Dict[str, Any]:
    """VQA: BCE-with-logits averaged over B x 3129, times 3129 (spec §5.5). The targets: ``batch["vqa_targets"]``
    when given (``prepare_targets``), else made from ``vqa_labels``/``vqa_scores`` (returned too, as official,
    when the batch has them)."""
    infer = model.infer(batch)
    logits = model.vqa_classifier(infer["cls_feats"])
    targets = batch.get("vqa_targets")
    if isinstance(targets, torch.Tensor):
        if targets.shape != logits.shape:
            raise ValueError(f"batch['vqa_targets'] must be (B, labels) = {tuple(logits.shape)}, got "
                             f"{tuple(targets.shape)}")
    else:
        targets = vqa_targets(batch["vqa_labels"], batch["vqa_scores"], logits.shape[1], logits.device)
    extra = {k: batch[k] for k in ("vqa_labels", "vqa_scores") if k in batch}
    wide = fp32_or_wider(logits)
    loss = F.binary_cross_entropy_with_logits(wide, targets.to(wide.dtype)) * targets.shape[1]
    return {"vqa_loss": loss, "vqa_logits": logits, "vqa_targets": targets, **extra}


def compute_nlvr2(model, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """NLVR2: two fusion passes (image_0 with type 1, image_1 with type 2), classifier on the concatenated cls."""
    cls1 = model.infer(batch, image_token_type_idx=1)["cls_feats"]
    cls2 = model.infer(batch, image_token_type_idx=2)["cls_feats"]
    logits = model.nlvr2_classifier(torch.cat([cls1, cls2], dim=-1))
    labels = batch.get("nlvr2_labels")  # (prepare_targets)
    if not isinstance(labels, torch.Tensor):
        labels = nlvr2_labels(batch["answers"])
    if labels.shape != cls1.shape[:1]:
        raise ValueError(f"batch['answers'] must hold one label per sample, shape ({cls1.shape[0]},); got "
                         f"{tuple(labels.shape)}")
    labels = _to_device(labels, logits.device)
    return {"nlvr2_loss": F.cross_entropy(fp32_or_wider(logits), labels), "nlvr2_logits": logits,
            "nlvr2_labels": labels}


# the heads each objective uses (spec §1.3: they exist when the config's loss_names turn on their tasks)
TASK_HEADS = {
    "mlm": ("mlm_score",),
    "textmlm": ("mlm_score",),
    "itc": ("itc_text_proj", "itc_image_proj", "itc_vl_text_proj", "itc_vl_image_proj", "logit_scale",
            "logit_vl_scale"),
    "irtr": ("itc_text_proj", "itc_image_proj", "logit_scale"),
    "itm": ("itm_score",),
    "vqa": ("vqa_classifier",),
    "nlvr2": ("nlvr2_classifier",),
}
# the batch keys each objective reads besides the text and image (the official collate's)
TASK_KEYS = {"mlm": ("text_ids_mlm", "text_labels_mlm"), "textmlm": ("text_ids_mlm", "text_labels_mlm"),
             "vqa": ("vqa_labels", "vqa_scores"), "nlvr2": ("answers",)}
# or these, as tensors (``prepare_targets``)
TENSOR_KEYS = {"vqa": ("vqa_targets",), "nlvr2": ("nlvr2_labels",)}


def compute_tasks(model, batch: Mapping[str, Any], tasks: Iterable[str], gather_with_grad: bool = False,
                  generator: Optional[torch.Generator] = None, local: bool = False) -> Dict[str, Any]:
    """Run ``tasks`` in the official order (mlm, textmlm, itc, irtr, itm, vqa, nlvr2); ITM uses the ITC logits.
    ``local``: on this process's batch only, without the all-gathers (e.g. an evaluation on one rank)."""
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names, got the string {tasks!r}")
    tasks = set(tasks)
    unknown = tasks - set(PRETRAIN_ORDER)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; expected a subset of {list(PRETRAIN_ORDER)}")
    check_itm_has_itc(tasks)
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict, got {type(batch).__name__}")
    for task in sorted(tasks, key=PRETRAIN_ORDER.index):
        missing = [h for h in TASK_HEADS[task] if not hasattr(model, h)]
        if missing:
            config = getattr(model, "config", None)
            on = [t for t, v in getattr(config, "loss_names", {}).items() if v > 0]
            raise ValueError(f"task {task!r} needs the model's {', '.join(missing)}, which a model has only when its "
                             f"config's loss_names turn {task} on (this model's: {on or 'none'})")
        missing = [k for k in TASK_KEYS.get(task, ()) if k not in batch]
        if missing and task in TENSOR_KEYS and all(k in batch for k in TENSOR_KEYS[task]):
            missing = []
        if missing:
            raise ValueError(f"task {task!r} needs the batch key(s) {missing} (present: {sorted(batch)})")
    ret: Dict[str, Any] = {}
    if "mlm" in tasks:
        ret.update(compute_mlm(model, batch))
    if "textmlm" in tasks:
        ret.update(compute_textonly_mlm(model, batch))
    if "itc" in tasks:
        ret.update(compute_itc(model, batch, gather_with_grad, local))
    if "irtr" in tasks:
        ret.update(compute_irtr(model, batch, gather_with_grad, local))
    if "itm" in tasks:
        ret.update(compute_itm_hardneg(model, batch, ret["itc_i2t_logits"], ret["itc_t2i_logits"], generator,
                                       local))
    if "vqa" in tasks:
        ret.update(compute_vqa(model, batch))
    if "nlvr2" in tasks:
        ret.update(compute_nlvr2(model, batch))
    return ret


def total_loss(ret: Mapping[str, Any]) -> torch.Tensor:
    """The official training loss: the unweighted sum of every entry whose key contains "loss"."""
    losses = [v for k, v in ret.items() if "loss" in k]
    if not losses:
        raise ValueError("no loss in the objectives' output")
    return torch.stack([fp32_or_wider(l) for l in losses]).sum()
