"""Evaluation: dual-encoder retrieval recall as official (spec §5.7, Q20), and classification accuracies.

Retrieval: encode every image once and every caption once (``infer_image_ft`` / ``infer_text_ft`` features,
L2-normalised projected CLS), score by plain dot products, and report for each image whether any of its captions is
in its top K (TR@K) and for each caption whether its image is in its top K (IR@K), K in (1, 5, 10), with
``torch.topk`` as the official code. Scores are computed in blocks so large sets fit in memory.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

from .data.collate import is_empty_batch
from .model.vlmo import ids_to


@torch.no_grad()
def recall_at_k(image_feats: torch.Tensor, text_feats: torch.Tensor, text_image_ids: torch.Tensor,
                image_ids: Optional[torch.Tensor] = None, ks: Sequence[int] = (1, 5, 10),
                block: int = 4096) -> Dict[str, float]:
    """TR@K and IR@K (in [0, 1]) for (I, D) image and (T, D) text features; ``text_image_ids[t]`` is the image id of
    caption t and ``image_ids[i]`` the id of image i (default: 0..I-1)."""
    if image_feats.dim() != 2 or text_feats.dim() != 2 or image_feats.shape[1] != text_feats.shape[1]:
        raise ValueError(f"image_feats (I, D) and text_feats (T, D) must share D, got {tuple(image_feats.shape)} "
                         f"and {tuple(text_feats.shape)}")
    if text_image_ids.shape != (text_feats.shape[0],):
        raise ValueError(f"text_image_ids must have shape ({text_feats.shape[0]},), got {tuple(text_image_ids.shape)}")
    if image_ids is not None and image_ids.shape != (image_feats.shape[0],):
        raise ValueError(f"image_ids must have shape ({image_feats.shape[0]},), got {tuple(image_ids.shape)}")
    if image_feats.shape[0] == 0 or text_feats.shape[0] == 0:
        raise ValueError(f"recall needs at least one image and one caption, got {image_feats.shape[0]} and "
                         f"{text_feats.shape[0]}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    n_img, n_txt = image_feats.shape[0], text_feats.shape[0]
    image_ids = torch.arange(n_img, device=image_feats.device) if image_ids is None else image_ids.to(image_feats.device)
    text_image_ids = text_image_ids.to(image_feats.device)
    # As official: one image x text score matrix, torch.topk(K) for each K (not one topk sliced: with tied scores,
    # topk(5) and the first 5 of topk(10) can differ), along dim 1 for TR and dim 0 for IR. In blocks of rows (TR) and
    # of columns (IR) of that same matrix so large sets fit in memory.
    tr_hits = {k: 0 for k in ks}
    for s in range(0, n_img, block):
        scores = image_feats[s : s + block] @ text_feats.t()  # (b, T)
        for k in ks:
            top = scores.topk(min(k, n_txt), dim=1).indices  # caption indices
            tr_hits[k] += int((text_image_ids[top] == image_ids[s : s + block, None]).any(dim=1).sum())
        scores = top = None  # (not kept while the next block is computed)
    ir_hits = {k: 0 for k in ks}
    for s in range(0, n_txt, block):
        scores = image_feats @ text_feats[s : s + block].t()  # (I, b)
        for k in ks:
            top = scores.topk(min(k, n_img), dim=0).indices  # image indices
            ir_hits[k] += int((image_ids[top] == text_image_ids[None, s : s + block]).any(dim=0).sum())
        scores = top = None
    out = {f"tr_r{k}": tr_hits[k] / n_img for k in ks}
    out.update({f"ir_r{k}": ir_hits[k] / n_txt for k in ks})
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if labels.numel() else 0.0


def readable(batches: Iterable[dict], stats: Optional[dict] = None) -> Iterator[dict]:
    """The batches that hold a readable sample: the collate drops unreadable samples (counted in the batch's
    "bad_samples"), so a batch can be empty. With ``stats``, ``stats["bad_samples"]`` adds up the count."""
    for batch in batches:
        if stats is not None:
            stats["bad_samples"] = stats.get("bad_samples", 0) + int(batch.get("bad_samples", 0) or 0)
        if not is_empty_batch(batch):
            yield batch


@torch.no_grad()
def encode(model, batches: Iterable[dict], device: torch.device, kind: str, autocast_dtype=None,
           stats: Optional[dict] = None):
    """Features of every batch: ``kind`` is "image" (infer_image_ft) or "text" (infer_text_ft); returns (feats, ids)
    where ids are the batches' ``img_index`` entries (the image each sample belongs to).

    Unreadable samples are left out (the rows hold the readable ones, in order). With ``stats`` (a dict),
    ``stats["raw_index"]`` gets each row's dataset index and ``stats["bad_samples"]`` the samples left out."""
    feats, ids, raw = [], [], []
    fn = model.infer_image_ft if kind == "image" else model.infer_text_ft
    for batch in readable(batches, stats):
        batch = to_device(batch, device, _vocab_size(model))
        with autocast(device, autocast_dtype):
            f = fn(batch)["cls_feats"]
        feats.append(f.float())
        ids.append(torch.as_tensor(batch["img_index"]).reshape(-1))
        raw.append(torch.as_tensor(batch.get("raw_index", [-1] * len(ids[-1]))).reshape(-1))
    if not feats:
        raise ValueError(f"no readable {kind} to encode (every sample was unreadable, or there were none)")
    if stats is not None:
        stats["raw_index"] = torch.cat(raw)
    return torch.cat(feats), torch.cat(ids).to(device)


def _vocab_size(model) -> Optional[int]:
    return getattr(getattr(model, "config", None), "vocab_size", None)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; no autocast where ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(batch: dict, device: torch.device, vocab_size: Optional[int] = None) -> dict:
    """The batch's tensors on ``device`` (non-blocking: from pinned memory the copies overlap the GPU's work). With
    ``vocab_size`` the text ids are range-checked on the host first (``vlmo.ids_to``), so the model does not read
    them back from the device."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and vocab_size is not None and k.startswith("text_ids"):
            out[k] = ids_to(v, device, vocab_size)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor) and k.startswith("image"):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


# ---- ITM re-ranking of the dual-encoder top K (the official code has it but never calls it, spec Q20) ---------------


@torch.no_grad()
def rerank_recall(model, image_feats: torch.Tensor, text_feats: torch.Tensor, text_image_ids: torch.Tensor,
                  image_ids: torch.Tensor, image_dataset, text_dataset, k: int = 32, device=None, autocast_dtype=None,
                  batch_size: int = 64, ks: Sequence[int] = (1, 5, 10), image_index: Optional[torch.Tensor] = None,
                  text_index: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Recall after re-ranking each query's top ``k`` dual-encoder candidates with the ITM head, scored as the official
    ``compute_irtr_recall_with_rerank``: a top-``k`` candidate by its match logit plus its dual-encoder score, every
    other by its dual-encoder score less 100 (so they follow, in dual-encoder order: R@K for K > k still counts a
    positive that the dual encoder ranks in its top K). Ties keep the dual-encoder order.

    Needs a model with ``itm_score`` (a pretraining checkpoint) and map-style datasets giving one item per image
    (``image``) and per caption (``text_ids``, ``text_masks``). ``image_index[i]`` / ``text_index[t]``: the dataset
    index of feature row i / t (``encode``'s ``stats["raw_index"]``; default the row itself)."""
    if not hasattr(model, "itm_score"):
        raise ValueError("ITM re-ranking needs a model with the ITM head (itm_score); retrieval fine-tuning has none")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = device or image_feats.device
    kmax = max(ks)
    image_index = (torch.arange(image_feats.shape[0]) if image_index is None else image_index).tolist()
    text_index = (torch.arange(text_feats.shape[0]) if text_index is None else text_index).tolist()
    if len(image_index) != image_feats.shape[0] or len(text_index) != text_feats.shape[0]:
        raise ValueError(f"image_index and text_index must have one entry per feature row ({image_feats.shape[0]}, "
                         f"{text_feats.shape[0]}), got {len(image_index)} and {len(text_index)}")

    # every query's dual-encoder top max(k, K) with its scores (rows: images for TR, captions for IR); its first k
    # are re-scored with the ITM logit of (image, caption)
    n_img, n_txt = image_feats.shape[0], text_feats.shape[0]
    i2t_sim, i2t = _top(image_feats, text_feats, min(max(k, kmax), n_txt))
    t2i_sim, t2i = _top(text_feats, image_feats, min(max(k, kmax), n_img))
    # a pair as one number, image * n_txt + caption: the distinct pairs, sorted, are in image order, so each image
    # is decoded once (it was once per pair: a caption's k candidates each decoded theirs), and a pair both
    # directions rank is scored once
    key_tr = torch.arange(n_img)[:, None] * n_txt + i2t[:, :k]
    key_ir = t2i[:, :k] * n_txt + torch.arange(n_txt)[:, None]
    keys = torch.unique(torch.cat([key_tr.flatten(), key_ir.flatten()]))
    scorer = _PairScorer(model, image_dataset, text_dataset, image_index, text_index, device, autocast_dtype,
                         batch_size)
    logits = scorer((keys // n_txt).tolist(), (keys % n_txt).tolist())

    def recalls(ranked: torch.Tensor, sims: torch.Tensor, keys_of_top: torch.Tensor,
                hit_of: Callable[[torch.Tensor], torch.Tensor]) -> Dict[int, int]:
        score = torch.cat([logits[torch.searchsorted(keys, keys_of_top)] + sims[:, :k], sims[:, k:] - 100.0], dim=1)
        order = score.sort(dim=1, descending=True, stable=True).indices
        hits = hit_of(ranked.gather(1, order)[:, :kmax])
        return {kk: int(hits[:, :kk].any(1).sum()) for kk in ks}

    ids_txt, ids_img = text_image_ids.cpu(), image_ids.cpu()
    tr = recalls(i2t, i2t_sim, key_tr, lambda ranked: ids_txt[ranked] == ids_img[:, None])
    ir = recalls(t2i, t2i_sim, key_ir, lambda ranked: ids_img[ranked] == ids_txt[:, None])
    out = {f"tr_r{kk}": tr[kk] / image_feats.shape[0] for kk in ks}
    out.update({f"ir_r{kk}": ir[kk] / text_feats.shape[0] for kk in ks})
    out["r_mean"] = sum(out.values()) / len(out)
    return out


class _PairScorer:
    """The ITM match logits of (image row, caption row) pairs given in image order: each image is decoded once (the
    last of a chunk is kept, its pairs may go on in the next chunk), each caption's tokens are read once."""

    def __init__(self, model, image_dataset, text_dataset, image_index: List[int], text_index: List[int],
                 device: torch.device, autocast_dtype, batch_size: int):
        self.model, self.image_dataset, self.text_dataset = model, image_dataset, text_dataset
        self.image_index, self.text_index = image_index, text_index
        self.device, self.autocast_dtype, self.batch_size = device, autocast_dtype, batch_size
        self.decoded: Dict[int, torch.Tensor] = {}  # the image of the last pair scored
        self.tokens: Dict[int, dict] = {}  # every caption's tokens, read once

    def __call__(self, rows_i: List[int], rows_t: List[int]) -> torch.Tensor:
        bs = self.batch_size
        return torch.cat([self.chunk(rows_i[s : s + bs], rows_t[s : s + bs]) for s in range(0, len(rows_i), bs)])

    def chunk(self, rows_i: List[int], rows_t: List[int]) -> torch.Tensor:
        images = {i: self.decoded[i] if i in self.decoded else _item(self.image_dataset, self.image_index[i])["image"]
                  for i in dict.fromkeys(rows_i)}
        self.decoded = {rows_i[-1]: images[rows_i[-1]]}
        for t in rows_t:
            if t not in self.tokens:
                item = _item(self.text_dataset, self.text_index[t])
                self.tokens[t] = {"text_ids": item["text_ids"], "text_masks": item["text_masks"]}
        batch = to_device({"text_ids": torch.stack([self.tokens[t]["text_ids"] for t in rows_t]),
                           "text_masks": torch.stack([self.tokens[t]["text_masks"] for t in rows_t]),
                           "image": [torch.stack([images[i] for i in rows_i])]}, self.device, _vocab_size(self.model))
        with autocast(self.device, self.autocast_dtype):
            return self.model.itm_score(self.model.infer(batch)["cls_feats"])[:, 1].float().cpu()


def _top(queries: torch.Tensor, gallery: torch.Tensor, m: int, block: int = 1024):
    """(Q, m) fp32 scores and indices (on the CPU) of each query's m best-scoring gallery rows, best first, in blocks
    of queries (a 25K x 5K score matrix would be 500 MB at once)."""
    parts = [(queries[s : s + block] @ gallery.t()).float().topk(m, dim=1) for s in range(0, queries.shape[0], block)]
    return torch.cat([p.values.cpu() for p in parts]), torch.cat([p.indices.cpu() for p in parts])


def _item(dataset, index: int) -> dict:
    item = dataset[index]
    if item is None:  # it was read when encoded: the file changed since
        raise ValueError(f"sample {index} of {dataset} became unreadable after it was encoded")
    return item


# ---- VQA and NLVR2 (spec §5.5, §5.6) ------------------------------------------------------------------------------


def vqa_score(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The official VQAScore: the soft target score of the argmax answer, averaged over questions."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    picked = targets.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    return float(picked.float().mean()) if picked.numel() else 0.0


@torch.no_grad()
def evaluate_vqa(model, batches: Iterable[dict], device: torch.device, autocast_dtype=None,
                 stats: Optional[dict] = None) -> Dict[str, object]:
    """VQA score over the questions and the argmax label per question id; unreadable samples are left out (counted
    in ``stats["bad_samples"]``). Every question counts, as in the official VQAScore, one without an answer in the
    label set with score 0; a split where no question has any (the test split) has no score (None)."""
    from .objectives import vqa_targets

    total, n, labelled, predictions = 0.0, 0, False, []
    for batch in readable(batches, stats):
        batch = to_device(batch, device, _vocab_size(model))
        with autocast(device, autocast_dtype):
            logits = model.vqa_classifier(model.infer(batch)["cls_feats"]).float()
        predictions += list(zip([int(q) for q in batch["qid"]], logits.argmax(1).tolist()))
        labels = batch.get("vqa_labels")
        if labels is not None:  # (whether a batch had any answer must not decide whether it counts)
            labelled |= any(len(x) for x in labels)
            targets = vqa_targets(labels, batch["vqa_scores"], logits.shape[1], logits.device)
            total += vqa_score(logits, targets) * logits.shape[0]
            n += logits.shape[0]
    return {"vqa_score": total / n if n and labelled else None, "predictions": predictions}


def build_id2answer(tables) -> Dict[int, str]:
    """label -> answer string from VQA arrow tables (their parallel "answers" / "answer_labels" columns)."""
    id2answer: Dict[int, str] = {}
    for table in tables:
        for answers, labels in zip(table.column("answers").to_pylist(), table.column("answer_labels").to_pylist()):
            for per_q_answers, per_q_labels in zip(answers or [], labels or []):
                for a, l in zip(per_q_answers or [], per_q_labels or []):
                    id2answer.setdefault(int(l), a)
    return id2answer


def vqa_submission(predictions, id2answer: Dict[int, str], path: str) -> str:
    """Write the test-set submission JSON ``[{"question_id": ..., "answer": ...}]`` atomically; a class without an
    answer string in ``id2answer`` is answered "unknown", as official."""
    from .fileio import atomic_write_json

    atomic_write_json(path, [{"question_id": qid, "answer": id2answer.get(label, "unknown")}
                             for qid, label in predictions])
    return path


@torch.no_grad()
def evaluate_nlvr2(model, batches: Iterable[dict], device: torch.device, autocast_dtype=None,
                   stats: Optional[dict] = None) -> Dict[str, float]:
    """NLVR2 accuracy, separately for dev and test rows (``table_name`` containing "dev" or not), as official;
    unreadable samples are left out (counted in ``stats["bad_samples"]``)."""
    correct = {"dev": 0, "test": 0}
    count = {"dev": 0, "test": 0}
    for batch in readable(batches, stats):
        batch = to_device(batch, device, _vocab_size(model))
        with autocast(device, autocast_dtype):
            c1 = model.infer(batch, image_token_type_idx=1)["cls_feats"]
            c2 = model.infer(batch, image_token_type_idx=2)["cls_feats"]
            pred = model.nlvr2_classifier(torch.cat([c1, c2], -1)).argmax(-1).cpu()
        labels = torch.as_tensor(batch["answers"]).long()
        for name, p, y in zip(batch["table_name"], pred.tolist(), labels.tolist()):
            part = "dev" if "dev" in name else "test"
            correct[part] += int(p == y)
            count[part] += 1
    return {f"{part}_acc": correct[part] / count[part] for part in count if count[part]}


RECALL_KEYS = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10")


def the_metric(metrics: Dict[str, float], tasks: Iterable[str]) -> Optional[float]:
    """The official model-selection value ``val/the_metric`` of a fine-tuning run's val metrics: the sum over its
    tasks of retrieval's mean of the six val recalls plus its i2t and t2i val batch accuracies (spec §5.7), VQA's
    score and NLVR2's dev accuracy. None when a task's part is missing (e.g. an evaluation without the val split) or
    the run has no fine-tuning task: pretraining's evaluation reports its accuracies alone."""
    tasks = set(tasks)
    parts = []
    if "irtr" in tasks:
        keys = [f"val/{k}" for k in RECALL_KEYS] + ["val/irtr_i2t_acc", "val/irtr_t2i_acc"]
        if any(k not in metrics for k in keys):
            return None
        parts.append(sum(metrics[k] for k in keys[:6]) / 6 + metrics["val/irtr_i2t_acc"] + metrics["val/irtr_t2i_acc"])
    for task, key in (("vqa", "val/vqa_score"), ("nlvr2", "val/dev_acc")):
        if task in tasks:
            if key not in metrics:
                return None
            parts.append(metrics[key])
    return sum(parts) if parts else None
