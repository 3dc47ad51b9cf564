"""Fine-tuning and evaluation: recall@K against a brute-force float64 computation, VQA score and submission, NLVR2
accuracy by split, the evaluate/finetune commands, and fine-tuned retrieval beating its starting point."""

import csv
import itertools
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import vlmo_fast as vf
from vlmo_fast import data as vdata
from vlmo_fast.config import loss_names
from vlmo_fast.evaluation import build_id2answer, encode, evaluate_nlvr2, evaluate_vqa, recall_at_k, rerank_recall, \
    vqa_score, vqa_submission
from vlmo_fast.train.data_setup import eval_loader
from vlmo_fast.train import TrainConfig, train
from vlmo_fast.train import loop as train_loop
from vlmo_fast.train.finetune import evaluate_main, finetune_main


def brute_force_recall(img, txt, txt_img, ks=(1, 5, 10)):
    """Definition in float64 without ties: a query hits at K when a positive has fewer than K candidates scoring
    strictly higher than it."""
    scores = img.double() @ txt.double().t()
    out = {}
    for k in ks:
        hits = 0
        for i in range(scores.shape[0]):
            best = min(int((scores[i] > scores[i, t]).sum()) for t in range(scores.shape[1]) if txt_img[t] == i)
            hits += best < k
        out[f"tr_r{k}"] = hits / scores.shape[0]
        hits = 0
        for t in range(scores.shape[1]):
            hits += int((scores[:, t] > scores[txt_img[t], t]).sum()) < k
        out[f"ir_r{k}"] = hits / scores.shape[1]
    return out


def test_recall_matches_brute_force():
    img = torch.nn.functional.normalize(torch.randn(23, 16), dim=-1)
    txt_img = torch.arange(23).repeat_interleave(3)
    txt = torch.nn.functional.normalize(img[txt_img] + 0.9 * torch.randn(69, 16), dim=-1)
    got = recall_at_k(img, txt, txt_img, block=5)  # small blocks: the blocked path is exercised
    want = brute_force_recall(img, txt, txt_img)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got["r_mean"] == pytest.approx(sum(want.values()) / 6)
    # ties are broken by torch.topk(K) for each K on the one image x text matrix, as the official code does
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        img = torch.randint(0, 2, (30, 4), generator=gen).float()  # many exactly tied scores
        txt = torch.randint(0, 2, (150, 4), generator=gen).float()
        ids = torch.arange(30).repeat_interleave(5)
        scores = img @ txt.t()
        want = {}
        for k in (1, 5, 10):
            want[f"tr_r{k}"] = float((ids[scores.topk(k, dim=1).indices] == torch.arange(30)[:, None]).any(1).float().mean())
            want[f"ir_r{k}"] = float((scores.topk(k, dim=0).indices == ids[None, :]).any(0).float().mean())
        got = recall_at_k(img, txt, ids, block=7)
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (seed, key)
    with pytest.raises(ValueError, match="text_image_ids"):
        recall_at_k(img, txt, txt_img[:-1])
    # image_ids of shape (I, 1) broadcast against the captions' ids: recalls above 1
    with pytest.raises(ValueError, match=r"image_ids must have shape \(30,\), got \(30, 1\)"):
        recall_at_k(img, txt, ids, image_ids=torch.arange(30)[:, None])
    with pytest.raises(ValueError, match="at least one image and one caption"):
        recall_at_k(img[:0], txt, ids, image_ids=torch.arange(0))
    with pytest.raises(ValueError, match="block must be a positive int"):
        recall_at_k(img, txt, ids, block=0)


class _OracleITM(torch.nn.Module):
    """An ITM head that knows the truth: the match logit is 10 for an image and one of its captions, else -10 (it
    outweighs any dual-encoder score of unit features, which the official re-rank adds to it)."""

    def infer(self, batch):
        return {"cls_feats": torch.stack([batch["image"][0][:, 0, 0, 0], batch["text_ids"][:, 0].float()], 1)}

    def itm_score(self, cls):
        match = (cls[:, 0] == cls[:, 1]).float() * 20 - 10
        return torch.stack([-match, match], 1)


class _TableITM(torch.nn.Module):
    """ITM match logits from a table: logit[image, caption] (the image's pixels carry its row, the caption's first
    token its column)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def infer(self, batch):
        return {"cls_feats": torch.stack([batch["image"][0][:, 0, 0, 0], batch["text_ids"][:, 0].float()], 1)}

    def itm_score(self, cls):
        logit = self.table[cls[:, 0].long(), cls[:, 1].long()]
        return torch.stack([-logit, logit], 1)


@pytest.mark.parametrize("k", [1, 4, 12])
def test_itm_reranking_scores_as_the_official_code(k):
    """The official compute_irtr_recall_with_rerank ranks by ITM logit + dual-encoder score in each query's top
    k_test and by dual-encoder score - 100 elsewhere (it sorted the top k by the logit alone: with logits of the
    features' scale, the two orders differ). Brute force over the full score matrices, logits of both scales."""
    gen = torch.Generator().manual_seed(k)
    img = torch.nn.functional.normalize(torch.randn(9, 8, generator=gen), dim=-1)
    ids = torch.arange(9).repeat_interleave(3)[:25]
    txt = torch.nn.functional.normalize(img[ids] + 1.2 * torch.randn(25, 8, generator=gen), dim=-1)
    images = [{"image": torch.full((3, 2, 2), float(i))} for i in range(9)]
    texts = [{"text_ids": torch.tensor([t, 5]), "text_masks": torch.ones(2, dtype=torch.long)} for t in range(25)]
    for scale in (0.3, 3.0):
        table = scale * torch.randn(9, 25, generator=gen)
        got = rerank_recall(_TableITM(table), img, txt, ids, torch.arange(9), images, texts, k=k, batch_size=5)
        sims = img @ txt.t()
        i2t = sims - 100.0
        top = sims.topk(k, dim=1).indices
        i2t.scatter_(1, top, (table + sims).gather(1, top))
        t2i = sims.t() - 100.0
        top = sims.t().topk(min(k, 9), dim=1).indices
        t2i.scatter_(1, top, (table.t() + sims.t()).gather(1, top))
        for K in (1, 5, 10):
            tr = (ids[i2t.topk(K, dim=1).indices] == torch.arange(9)[:, None]).any(1).float().mean()
            ir = (t2i.topk(min(K, 9), dim=1).indices == ids[:, None]).any(1).float().mean()
            assert got[f"tr_r{K}"] == pytest.approx(float(tr)), (scale, K)
            assert got[f"ir_r{K}"] == pytest.approx(float(ir)), (scale, K)


@pytest.mark.parametrize("k", [3, 10, 40])
def test_itm_reranking_recall(k):
    """With a perfect ITM head every positive in the dual encoder's top k moves to rank 1, and candidates after the
    top k keep their dual-encoder order: re-ranked R@K equals the dual encoder's R@max(K, k)."""
    gen = torch.Generator().manual_seed(k)
    img = torch.nn.functional.normalize(torch.randn(20, 8, generator=gen), dim=-1)
    ids = torch.arange(20).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[ids] + 1.5 * torch.randn(40, 8, generator=gen), dim=-1)
    reads = {"image": [0] * 20, "text": [0] * 40}

    class Counted(list):  # how often each item is read: an image is decoded once (it was k times per caption)
        def __init__(self, items, kind):
            super().__init__(items)
            self.kind = kind

        def __getitem__(self, i):
            reads[self.kind][i] += 1
            return list.__getitem__(self, i)

    images = Counted([{"image": torch.full((3, 2, 2), float(i))} for i in range(20)], "image")
    texts = Counted([{"text_ids": torch.tensor([int(ids[t]), 5]), "text_masks": torch.ones(2, dtype=torch.long)}
                     for t in range(40)], "text")
    got = rerank_recall(_OracleITM(), img, txt, ids, torch.arange(20), images, texts, k=k, batch_size=7)
    assert max(reads["image"]) == 1 and max(reads["text"]) == 1
    for K in (1, 5, 10):
        dual = recall_at_k(img, txt, ids, ks=(max(K, k),))
        assert got[f"tr_r{K}"] == pytest.approx(dual[f"tr_r{max(K, k)}"]), K
        assert got[f"ir_r{K}"] == pytest.approx(dual[f"ir_r{max(K, k)}"]), K
    with pytest.raises(ValueError, match="k must be"):
        rerank_recall(_OracleITM(), img, txt, ids, torch.arange(20), images, texts, k=0)


class _PixelModel(torch.nn.Module):
    """Features from the pixels' channel means and the token ids (no weights), and an oracle ITM head: image i has
    red level 20 i + 10 and its captions start with the number i (``number_of``: token id -> i)."""

    def __init__(self, number_of):
        super().__init__()
        self.number_of = number_of

    def infer_image_ft(self, batch):
        return {"cls_feats": torch.nn.functional.normalize(batch["image"][0].mean(dim=(2, 3)) + 2, dim=-1)}

    def infer_text_ft(self, batch):
        return {"cls_feats": torch.nn.functional.normalize(batch["text_ids"][:, 1:4].float(), dim=-1)}

    def infer(self, batch):
        red = (batch["image"][0][:, 0].mean(dim=(1, 2)) * 0.5 + 0.5) * 255
        number = torch.tensor([self.number_of[int(t)] for t in batch["text_ids"][:, 1]], dtype=torch.float32)
        return {"cls_feats": torch.stack([((red - 10) / 20).round(), number], 1)}

    def itm_score(self, cls):
        match = (cls[:, 0] == cls[:, 1]).float() * 20 - 10  # outweighs the dual-encoder score added to it
        return torch.stack([-match, match], 1)


def test_retrieval_evaluation_leaves_out_an_unreadable_image_and_its_captions(tmp_path, tok):
    """A truncated image in the split: it and its captions are left out and counted, and every other image keeps
    its own rows (re-ranking looked images up by feature row, so the rows after the dropped one were paired with the
    wrong image and the dropped one crashed); a batch whose samples are all unreadable is skipped. The result equals
    the evaluation of the split without that image."""
    from vlmo_fast.data.arrow import ArrowDataset
    from vlmo_fast.train.loop import _count_unreadable

    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(7, 16, 16, 3, generator=rng) * 255).to(torch.uint8)
    pixels[..., 0] = (20 * torch.arange(7) + 10).to(torch.uint8)[:, None, None]
    good = [vdata.encode_image(p.numpy()) for p in pixels]  # PNG: the red level is exact
    captions = [[f"{i} photo {w}" for w in ("red", "blue", "of", "a")] for i in range(7)]
    number_of = {int(tok(str(i), max_length=3)["input_ids"][0, 1]): i for i in range(7)}
    bad = good[2][: len(good[2]) // 2]
    vdata.make_caption_dataset(str(tmp_path / "with"), "f30k", "test", good[:2] + [bad] + good[3:], captions)
    vdata.make_caption_dataset(str(tmp_path / "without"), "f30k", "test", good[:2] + good[3:],
                               captions[:2] + captions[3:])
    collate = vdata.build_collate(mlm=False)
    results = {}
    for name in ("with", "without"):
        kw = dict(image_size=16, max_text_len=8, tokenizer=tok)
        images = ArrowDataset(str(tmp_path / name), ["f30k_caption_karpathy_test"], image_only=True, **kw)
        texts = ArrowDataset(str(tmp_path / name), ["f30k_caption_karpathy_test"], text_only=True, **kw)
        full = ArrowDataset(str(tmp_path / name), ["f30k_caption_karpathy_test"], **kw)
        img_stats, txt_stats = {}, {}
        # batches of 1: image 2's batch holds no readable sample
        img, img_ids = encode(_PixelModel(number_of), eval_loader(images, 1, collate, 0), torch.device("cpu"), "image",
                              stats=img_stats)
        txt, txt_ids = encode(_PixelModel(number_of), eval_loader(texts, 3, collate, 0), torch.device("cpu"), "text",
                              stats=txt_stats)
        keep = torch.isin(txt_ids, img_ids)
        recall = recall_at_k(img, txt[keep], txt_ids[keep], img_ids)
        rerank = rerank_recall(_PixelModel(number_of), img, txt[keep], txt_ids[keep], img_ids, images, full, k=40,
                               image_index=img_stats["raw_index"], text_index=txt_stats["raw_index"][keep])
        metrics = {}
        _count_unreadable(metrics, "val", img_stats)
        results[name] = (recall, rerank, metrics)
    assert results["with"][:2] == results["without"][:2]
    assert results["with"][1]["tr_r1"] == results["with"][1]["ir_r1"] == 1.0  # the oracle: every positive first
    assert results["with"][2] == {"val/unreadable_samples": 1} and results["without"][2] == {}
    only_bad = [{"bad_samples": 2}]
    with pytest.raises(ValueError, match="no readable image"):
        encode(_PixelModel(number_of), only_bad, torch.device("cpu"), "image")
    stats = {}
    assert evaluate_nlvr2(None, only_bad, torch.device("cpu"), stats=stats) == {} and stats == {"bad_samples": 2}
    stats = {}
    assert evaluate_vqa(None, only_bad, torch.device("cpu"), stats=stats)["predictions"] == []
    assert stats == {"bad_samples": 2}


def test_the_evaluate_command_leaves_out_an_unreadable_image(tmp_path):
    """`evaluate irtr --rerank-k` on a split with a truncated image reports what it reports for the split without
    that image, and says how many samples it left out (it crashed in re-ranking before)."""
    torch.manual_seed(0)
    cfg = vf.preset("vlmo_tiny_patch16", image_size=32, max_text_len=12)
    ckpt = str(tmp_path / "model.safetensors")
    vf.save_checkpoint(vf.VLMo(cfg), ckpt)
    gen = torch.Generator().manual_seed(1)
    good = [vdata.encode_image((torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy())
            for _ in range(7)]
    caps = [[f"{i} photo {w}" for w in ("red", "blue")] for i in range(7)]
    bad = good[2][: len(good[2]) // 2]
    vdata.make_caption_dataset(str(tmp_path / "with"), "f30k", "test", good[:2] + [bad] + good[3:], caps)
    vdata.make_caption_dataset(str(tmp_path / "without"), "f30k", "test", good[:2] + good[3:], caps[:2] + caps[3:])
    results = {}
    for name in ("with", "without"):
        out = tmp_path / f"{name}.json"
        evaluate_main(["irtr", "--load-path", ckpt, "--data-root", str(tmp_path / name), "--dataset", "f30k",
                       "--device", "cpu", "--num-workers", "0", "--batch-size", "2", "--rerank-k", "3",
                       "--out", str(out)])
        results[name] = json.loads(out.read_text())
    keys = ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rerank"]
    assert {k: results["with"][k] for k in keys} == {k: results["without"][k] for k in keys}
    assert results["with"]["unreadable_samples"] == 1 and "unreadable_samples" not in results["without"]


def test_vqa_score_and_submission(tmp_path):
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([[0.0, 0.6, 1.0], [0.3, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert vqa_score(logits, targets) == pytest.approx((0.6 + 0.3 + 0.0) / 3)
    table = pa.table({"answers": [[["yes", "no"]], [["two"]]], "answer_labels": [[[0, 1]], [[2]]]})
    id2answer = build_id2answer([table])
    assert id2answer == {0: "yes", 1: "no", 2: "two"}
    path = vqa_submission([(11, 2), (12, 0)], id2answer, str(tmp_path / "sub.json"))
    assert json.loads(Path(path).read_text()) == [{"question_id": 11, "answer": "two"},
                                                  {"question_id": 12, "answer": "yes"}]


class _FixedVQA(torch.nn.Module):
    """infer returns the batch's "logits" as the features; the classifier passes them through."""

    def __init__(self):
        super().__init__()
        self.vqa_classifier = torch.nn.Identity()

    def infer(self, batch):
        return {"cls_feats": batch["logits"]}


def test_evaluate_vqa_weights_batches_by_size_and_pairs_each_question_with_its_answer():
    """Two batches of 3 and 1 questions: the score is the mean over the 4 questions (1.3 + 0.9) / 4 = 0.55, not the
    mean of the batch means (0.67) nor the last batch's (0.9); each question id gets its own argmax label."""
    first = {"qid": [7, 3, 11], "logits": torch.tensor([[0.0, 0.1, 2.0, 0.0], [3.0, 0.5, 0.0, 0.0],
                                                         [0.0, 1.0, 0.0, 0.2]]),
             "vqa_labels": [[2], [1, 0], [3]], "vqa_scores": [[1.0], [0.6, 0.3], [1.0]]}  # scores 1.0, 0.3, 0
    second = {"qid": [5], "logits": torch.tensor([[0.0, 0.0, 0.1, 4.0]]), "vqa_labels": [[3]], "vqa_scores": [[0.9]]}
    out = evaluate_vqa(_FixedVQA(), [first, second], torch.device("cpu"))
    assert out["vqa_score"] == pytest.approx(0.55)
    assert out["predictions"] == [(7, 2), (3, 0), (11, 1), (5, 3)]
    # the test split carries no answers: predictions only
    unlabelled = {"qid": [9, 8], "logits": torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]),
                  "vqa_labels": [[], []], "vqa_scores": [[], []]}
    assert evaluate_vqa(_FixedVQA(), [unlabelled], torch.device("cpu")) == {"vqa_score": None,
                                                                           "predictions": [(9, 1), (8, 3)]}
    # a val split where some questions have no answer in the label set: each counts with 0 (the official VQAScore),
    # whatever batch it falls in (a batch of only such questions was left out of the mean: 0.55 with them in a
    # batch of their own, 0.367 mixed in; 0.367 both ways now)
    none = dict(unlabelled, qid=[21, 22])
    for batches in ([first, second, none], [first, dict(second, qid=[5, 21, 22],
                                                        logits=torch.cat([second["logits"], none["logits"]]),
                                                        vqa_labels=[[3], [], []], vqa_scores=[[0.9], [], []])]):
        assert evaluate_vqa(_FixedVQA(), batches, torch.device("cpu"))["vqa_score"] == pytest.approx(2.2 / 6)


class _FixedNLVR2(torch.nn.Module):
    """infer returns features whose classifier output is the given prediction."""

    def __init__(self, preds):
        super().__init__()
        self.preds = preds
        self.nlvr2_classifier = lambda feats: torch.nn.functional.one_hot(self.preds, 2).float()

    def infer(self, batch, image_token_type_idx=1):
        return {"cls_feats": torch.zeros(len(self.preds), 1)}


def test_nlvr2_accuracy_split_by_table():
    """Each row counts toward its own table's accuracy: 4 dev rows (3 right) and 3 test rows (2 right), interleaved,
    so a swap of the two, a pooled accuracy (5/7) or a split by position would all show."""
    model = _FixedNLVR2(torch.tensor([1, 0, 1, 1, 0, 0, 1]))
    batch = {"answers": [1, 0, 0, 1, 1, 0, 1],
             "table_name": ["nlvr2_dev", "nlvr2_test1", "nlvr2_dev", "nlvr2_dev", "nlvr2_test1", "nlvr2_dev",
                            "nlvr2_test1"]}
    acc = evaluate_nlvr2(model, [batch], torch.device("cpu"))
    assert acc == {"dev_acc": pytest.approx(3 / 4), "test_acc": pytest.approx(2 / 3)}


@pytest.fixture(scope="module")
def finetune_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_ft"))
    vdata.write_synthetic(root, n_train=1000, n_val=48, n_test=48, image_size=64, seed=11)
    return root


def test_finetuned_retrieval_beats_its_starting_point(tmp_path, finetune_root):
    """Start from a fresh model's checkpoint, fine-tune the contrastive retrieval objective on the synthetic set,
    and evaluate before and after with the official dual-encoder recall."""
    torch.manual_seed(0)
    model = vf.VLMo(vf.preset("vlmo_tiny_patch16", loss_names=loss_names(irtr=1)))
    start = str(tmp_path / "start.safetensors")
    vf.save_checkpoint(model, start)
    common = ["--data-root", finetune_root, "--arch", "vlmo_tiny_patch16", "--split", "val", "--precision", "fp32",
              "--device", "cpu"]
    evaluate_main(["irtr", "--load-path", start, "--out", str(tmp_path / "before.json")] + common)
    before = json.loads((tmp_path / "before.json").read_text())
    code = finetune_main(["irtr", "--load-path", start, "--out-dir", str(tmp_path / "ft"), "--max-steps", "200",
                          "--data-root", finetune_root, "--per-device-batch-size", "32", "--batch-size", "32",
                          "--num-workers", "0", "--tensorboard", "false", "--final-eval", "false", "--augment", "false",
                          "--drop-path-rate", "0", "--log-every", "50"])
    assert code == 0
    after_ckpt = str(tmp_path / "ft" / "checkpoints" / "step_00000200.pt")
    evaluate_main(["irtr", "--load-path", after_ckpt, "--out", str(tmp_path / "after.json")] + common)
    after = json.loads((tmp_path / "after.json").read_text())
    chance = sum(k / 48 for k in (1, 5, 10)) / 3  # image->text and text->image recall of random features
    assert after["r_mean"] > before["r_mean"] + 0.1 and after["r_mean"] > 2 * chance, (before, after)


def test_evaluation_loaders_keep_the_order_with_workers(finetune_root):
    """Images decoded by worker processes arrive in dataset order: the same ids and the same features, batch by
    batch, as decoding in the main process."""
    model = vf.VLMo(vf.preset("vlmo_tiny_patch16", loss_names=loss_names(irtr=1))).eval()
    images = vdata.build_dataset(finetune_root, ["coco"], "val", image_only=True, image_size=model.config.image_size,
                                 max_text_len=model.config.max_text_len, train=False)
    collate = vdata.build_collate(mlm=False)
    out = [encode(model, eval_loader(images, 5, collate, n), torch.device("cpu"), "image") for n in (0, 2)]
    assert torch.equal(out[0][1], torch.arange(len(images))) and torch.equal(out[1][1], out[0][1])
    assert torch.equal(out[1][0], out[0][0])
    first = list(itertools.islice(eval_loader(images, 5, collate, 2), 2))  # stopped early: workers shut down
    assert [b["img_index"] for b in first] == [list(range(5)), list(range(5, 10))]


def test_finetune_and_evaluate_refuse_unknown_tasks():
    with pytest.raises(SystemExit):
        finetune_main(["retrieval"])
    with pytest.raises(SystemExit):
        evaluate_main([])


def _png(seed):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return vdata.encode_image(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))


def _write_vqa(root):
    answers = ["yes", "no", "two"]
    for k, (split, name, n) in enumerate((("train", "vqav2_train", 6), ("train", "vqav2_trainable_val", 2),
                                          ("val", "vqav2_rest_val", 3), ("test", "vqav2_test", 3))):
        rows = []
        for i in range(n):
            qids = [1000 * k + 10 * i + j for j in range(2)]
            row = {"image": _png(i + 31 * len(name)), "questions": [f"is there a shape {j}?" for j in range(2)],
                   "image_id": i, "question_id": qids, "split": split}
            if split != "test":
                row["answers"] = [[answers[(i + j) % 3]] for j in range(2)]
                row["answer_labels"] = [[(i + j) % 3] for j in range(2)]
                row["answer_scores"] = [[1.0] for _ in range(2)]
            rows.append(row)
        vdata.write_arrow(os.path.join(root, f"{name}.arrow"), rows)


def _write_nlvr2(root):
    for name, n in (("nlvr2_train", 6), ("nlvr2_dev", 3), ("nlvr2_test1", 3)):
        rows = [{"image_0": _png(i), "image_1": _png(i + 100), "questions": ["the left image has more shapes"],
                 "answers": ["True" if i % 2 else "False"], "identifier": f"{name}-{i}"} for i in range(n)]
        vdata.write_arrow(os.path.join(root, f"{name}.arrow"), rows)


def test_vqa_and_nlvr2_finetune_and_evaluate_end_to_end(tmp_path, capsys):
    """The VQA and NLVR2 pipelines run through the commands on tiny official-format arrow files: training steps,
    the VQA score on val and a test submission with the answer strings, NLVR2 dev/test accuracies."""
    root = str(tmp_path / "data")
    os.makedirs(root)
    _write_vqa(root)
    _write_nlvr2(root)
    common = ["--data-root", root, "--arch", "vlmo_tiny_patch16", "--per-device-batch-size", "4", "--batch-size", "4",
              "--max-steps", "2", "--num-workers", "0", "--tensorboard", "false", "--log-every", "1"]
    assert finetune_main(["vqa", "--out-dir", str(tmp_path / "vqa")] + common) == 0
    assert "no --load-path: fine-tuning starts from randomly initialised weights" in capsys.readouterr().out
    summary = json.loads((tmp_path / "vqa" / "summary.json").read_text())
    assert 0.0 <= summary["metrics"]["val/vqa_score"] <= 1.0
    sub = tmp_path / "submission.json"
    evaluate_main(["vqa", "--load-path", str(tmp_path / "vqa" / "checkpoints" / "step_00000002.pt"), "--data-root",
                   root, "--arch", "vlmo_tiny_patch16", "--split", "test", "--out", str(sub), "--device", "cpu",
                   "--precision", "fp32"])
    rows = json.loads(sub.read_text())
    # every test question, once; answers are the strings of the predicted labels ("unknown", as official, for a
    # label no train/val question carries: after two steps the argmax over 3129 classes need not be one used here)
    assert sorted(r["question_id"] for r in rows) == [3000 + 10 * i + j for i in range(3) for j in range(2)]
    assert {r["answer"] for r in rows} <= {"yes", "no", "two", "unknown"}
    assert finetune_main(["nlvr2", "--out-dir", str(tmp_path / "nlvr2")] + common) == 0
    out = tmp_path / "nlvr2.json"
    evaluate_main(["nlvr2", "--load-path", str(tmp_path / "nlvr2" / "checkpoints" / "step_00000002.pt"),
                   "--data-root", root, "--arch", "vlmo_tiny_patch16", "--out", str(out), "--device", "cpu"])
    acc = json.loads(out.read_text())
    assert set(acc) >= {"dev_acc", "test_acc"} and 0.0 <= acc["dev_acc"] <= 1.0


def _one_line_error(capsys, command, argv) -> str:
    """What ``command(argv)`` printed when it ended as a configuration error: exit status 2, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        command(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err


def test_a_set_with_no_readable_sample_is_an_error_not_an_endless_run(tmp_path, capsys):
    """finetune on a training set none of whose samples could be read searched epochs forever (SIGTERM could not stop
    it); evaluate of such a part exited 0 with no accuracy in its report."""
    root = str(tmp_path / "data")
    os.makedirs(root)
    _write_nlvr2(root)
    for name in ("nlvr2_train", "nlvr2_dev"):
        path = os.path.join(root, f"{name}.arrow")
        table = vdata.read_arrow(path)
        vdata.write_arrow(path, table.set_column(table.schema.get_field_index("image_0"), "image_0",
                                                 pa.array([b"not an image"] * table.num_rows, pa.binary())))
    common = ["--data-root", root, "--arch", "vlmo_tiny_patch16", "--per-device-batch-size", "2", "--batch-size", "2",
              "--max-steps", "2", "--num-workers", "0", "--tensorboard", "false"]
    err = _one_line_error(capsys, finetune_main, ["nlvr2", "--out-dir", str(tmp_path / "run")] + common)
    assert "error: the training set gave no batch in a whole epoch on rank 0: none of its 6 samples could be read" in err
    model = vf.VLMo(vf.preset("vlmo_tiny_patch16", loss_names=loss_names(nlvr2=1)))
    ckpt = str(tmp_path / "model.pt")
    vf.save_checkpoint(model, ckpt)
    err = _one_line_error(capsys, evaluate_main, ["nlvr2", "--load-path", ckpt, "--data-root", root, "--arch",
                                                  "vlmo_tiny_patch16", "--device", "cpu", "--num-workers", "0"])
    assert "error: nlvr2_dev: no readable sample to evaluate (3 unreadable" in err


def test_vqa_labels_beyond_the_classifier_fail_at_start_and_a_larger_vocabulary_trains(tmp_path, capsys):
    """A label >= 3129 (a vocabulary `prepare vqa` wrote from other data) failed with a traceback at the first step
    that drew it, and no option changed the classifier's size."""
    root = str(tmp_path / "data")
    os.makedirs(root)
    _write_vqa(root)
    for name in ("vqav2_train", "vqav2_rest_val"):
        path = os.path.join(root, f"{name}.arrow")
        rows = vdata.read_arrow(path).to_pylist()
        rows[-1]["answer_labels"] = [[3500], [3]]
        vdata.write_arrow(path, rows)
    common = ["--data-root", root, "--arch", "vlmo_tiny_patch16", "--per-device-batch-size", "4", "--batch-size", "4",
              "--max-steps", "1", "--num-workers", "0", "--tensorboard", "false"]
    err = _one_line_error(capsys, finetune_main, ["vqa", "--out-dir", str(tmp_path / "small")] + common)
    assert "vqav2_train.arrow: VQA answer label 3500 is outside the model's 3129 classes (give --vqa-label-size" in err
    assert finetune_main(["vqa", "--out-dir", str(tmp_path / "big"), "--vqa-label-size", "3501"] + common) == 0
    ckpt = str(tmp_path / "big" / "checkpoints" / "step_00000001.pt")
    out = tmp_path / "val.json"
    evaluate_main(["vqa", "--load-path", ckpt, "--data-root", root, "--arch", "vlmo_tiny_patch16", "--out", str(out),
                   "--split", "val", "--device", "cpu", "--num-workers", "0"])  # its classes: from the checkpoint
    assert json.loads(out.read_text())["questions"] == 6
    vf.save_checkpoint(vf.VLMo(vf.preset("vlmo_tiny_patch16", loss_names=loss_names(vqa=1))), tmp_path / "plain.pt")
    with pytest.raises(SystemExit):  # a checkpoint of 3129 classes
        evaluate_main(["vqa", "--load-path", str(tmp_path / "plain.pt"), "--data-root", root, "--arch",
                       "vlmo_tiny_patch16", "--split", "val", "--device", "cpu", "--num-workers", "0"])
    assert "vqav2_rest_val.arrow: VQA answer label 3500 is outside the model's 3129 classes" in capsys.readouterr().err


def test_a_vqa_submission_missing_unreadable_questions_is_written_and_fails(tmp_path, capsys):
    """The evaluation server refuses an incomplete file: a test image that could not be read left its questions out
    of the submission and the command exited 0."""
    root = str(tmp_path / "data")
    os.makedirs(root)
    _write_vqa(root)
    path = os.path.join(root, "vqav2_test.arrow")
    rows = vdata.read_arrow(path).to_pylist()
    rows[1]["image"] = b"not an image"
    vdata.write_arrow(path, rows)
    ckpt = str(tmp_path / "model.pt")
    vf.save_checkpoint(vf.VLMo(vf.preset("vlmo_tiny_patch16", loss_names=loss_names(vqa=1))), ckpt)
    sub = tmp_path / "submission.json"
    assert evaluate_main(["vqa", "--load-path", ckpt, "--data-root", root, "--arch", "vlmo_tiny_patch16", "--split",
                          "test", "--out", str(sub), "--device", "cpu", "--num-workers", "0"]) == 1
    assert "lacks the 2 questions whose images could not be read" in capsys.readouterr().err
    assert sorted(r["question_id"] for r in json.loads(sub.read_text())) == [3000, 3001, 3020, 3021]


@pytest.fixture(scope="module")
def vqa_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vqa"))
    _write_vqa(root)
    return root


def _first_step_grads(monkeypatch, cfg):
    """Run ``cfg`` through train() and return ({name: gradient the first update applied}, summary, saved param
    groups by name); the gradients are read by a step pre-hook on the optimizer the loop builds (after clipping)."""
    grads = {}
    real = train_loop.build_optimizer

    def recording(model, *args, **kwargs):
        opt = real(model, *args, **kwargs)
        names = {id(p): n for n, p in model.named_parameters()}

        def hook(optimizer, args, kwargs):
            if not grads:
                grads.update({names[id(p)]: p.grad.detach().clone() for g in optimizer.param_groups
                              for p in g["params"] if p.grad is not None})

        opt.register_step_pre_hook(hook)
        return opt

    monkeypatch.setattr(train_loop, "build_optimizer", recording)
    summary = train(cfg)
    groups = torch.load(summary["last_checkpoint"], weights_only=True)["optimizer"]["param_groups"]
    return grads, summary, {g["name"]: g for g in groups}


def test_vqa_run_wires_lr_mult_weight_decay_accumulation_and_clipping(tmp_path, vqa_root, monkeypatch):
    """A VQA fine-tuning run (its loss is a mean over the questions, so accumulation must not change it): the heads'
    groups at lr x lr_mult and every decay group at the configured weight decay (spec §6.3); a global batch of 8 as
    2 accumulated micro-batches of 4 applies the gradient of one batch of 8; --grad-clip scales the gradient to the
    given norm."""
    def cfg(name, **kw):
        values = dict(arch="vlmo_tiny_patch16", image_size=32, max_text_len=12, tasks=["vqa"], datasets=["vqa"],
                      data_root=vqa_root, out_dir=str(tmp_path / name), batch_size=8, per_device_batch_size=8,
                      max_steps=1, warmup_steps=0, learning_rate=1e-4, lr_mult=20, weight_decay=0.02, num_workers=0,
                      log_every=1, tensorboard=False, final_eval=False, drop_path_rate=0.0, seed=5, device="cpu")
        values.update(kw)
        return TrainConfig(**values)

    whole, run, groups = _first_step_grads(monkeypatch, cfg("whole"))
    assert {k: g["weight_decay"] for k, g in groups.items()} == {"decay": 0.02, "no_decay": 0.0, "decay/head": 0.02,
                                                                 "no_decay/head": 0.0}
    assert {k: g["initial_lr"] for k, g in groups.items()} == pytest.approx(
        {"decay": 1e-4, "no_decay": 1e-4, "decay/head": 20e-4, "no_decay/head": 20e-4})
    assert "vqa_classifier.0.weight" in whole and whole["vqa_classifier.0.weight"].abs().sum() > 0
    accumulated, run2, _ = _first_step_grads(monkeypatch, cfg("accumulated", per_device_batch_size=4))
    assert run2["history"][0]["vqa_loss"] == pytest.approx(run["history"][0]["vqa_loss"], rel=1e-5)
    assert accumulated.keys() == whole.keys()
    for k, g in whole.items():
        torch.testing.assert_close(accumulated[k], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-12, msg=k)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in whole.values()]))
    clipped, _, _ = _first_step_grads(monkeypatch, cfg("clipped", grad_clip=float(norm) / 4))
    clipped_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped.values()]))
    assert float(clipped_norm) == pytest.approx(float(norm) / 4, rel=1e-4)
    for k, g in whole.items():
        torch.testing.assert_close(clipped[k], g / 4, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-12, msg=k)


def test_evaluate_refuses_what_would_give_a_meaningless_result(tmp_path, capsys, synthetic_root):
    """A head the checkpoint lacks would be evaluated at its random initialisation, and a VQA submission without the
    train/val files would answer every question with no string: both end in one error line instead."""
    def error_of(argv):
        with pytest.raises(SystemExit) as info:
            evaluate_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1, err
        return err[0]

    cfg = vf.preset("vlmo_tiny_patch16", image_size=32, max_text_len=12)
    retrieval = tmp_path / "irtr.safetensors"  # retrieval fine-tuning builds no ITM head (spec §1.3)
    vf.save_checkpoint(vf.VLMo(cfg.replace(loss_names=loss_names(irtr=1))), retrieval)
    common = ["--data-root", synthetic_root, "--device", "cpu", "--num-workers", "0"]
    err = error_of(["irtr", "--load-path", str(retrieval), "--rerank-k", "2"] + common)
    assert "has no itm_score weights" in err and "without --rerank-k" in err, err
    assert evaluate_main(["irtr", "--load-path", str(retrieval), "--split", "val"] + common) == 0  # recall alone
    capsys.readouterr()
    root = str(tmp_path / "vqa")
    os.makedirs(root)
    _write_vqa(root)
    pretrained = tmp_path / "pretrained.safetensors"  # the pretraining heads only: no vqa_classifier
    vf.save_checkpoint(vf.VLMo(cfg), pretrained)
    err = error_of(["vqa", "--load-path", str(pretrained), "--data-root", root, "--split", "val", "--device", "cpu"])
    assert "has no vqa_classifier weights" in err, err
    finetuned = tmp_path / "vqa.safetensors"
    vf.save_checkpoint(vf.VLMo(cfg.replace(loss_names=loss_names(vqa=1))), finetuned)
    os.remove(os.path.join(root, "vqav2_trainable_val.arrow"))
    import vlmo_fast.train.finetune as ft_module

    def no_test_pass(*args, **kwargs):  # the files are checked before the test set is run through the model
        raise AssertionError("the test pass ran before the check")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft_module, "evaluate_vqa", no_test_pass)
        err = error_of(["vqa", "--load-path", str(finetuned), "--data-root", root, "--split", "test", "--device",
                        "cpu", "--out", str(tmp_path / "sub.json")])
    assert "vqav2_trainable_val.arrow" in err and "answer strings" in err, err
    assert not (tmp_path / "sub.json").exists()


def test_final_retrieval_evaluation_also_reports_the_test_split(tmp_path, synthetic_root):
    """As the official validation of retrieval fine-tuning, the final evaluation encodes the test split too: its
    recalls are those `evaluate irtr --split test` gives for the final checkpoint. Without test files it reports
    val only."""
    common = ["--arch", "vlmo_tiny_patch16", "--image-size", "32", "--max-text-len", "12", "--max-steps", "1",
              "--per-device-batch-size", "8", "--batch-size", "8", "--num-workers", "0", "--tensorboard", "false",
              "--precision", "fp32", "--device", "cpu"]
    assert finetune_main(["irtr", "--data-root", synthetic_root, "--out-dir", str(tmp_path / "ft")] + common) == 0
    metrics = json.loads((tmp_path / "ft" / "summary.json").read_text())["metrics"]
    assert {"val/r_mean", "test/r_mean", "test/tr_r1", "test/ir_r10"} <= set(metrics)
    out = tmp_path / "test.json"
    evaluate_main(["irtr", "--load-path", str(tmp_path / "ft" / "checkpoints" / "step_00000001.pt"), "--data-root",
                   synthetic_root, "--split", "test", "--precision", "fp32", "--device", "cpu", "--num-workers", "0",
                   "--out", str(out)])
    separate = json.loads(out.read_text())
    assert all(metrics[f"test/{k}"] == pytest.approx(separate[k]) for k in ("tr_r1", "tr_r5", "ir_r1", "r_mean"))
    root = tmp_path / "no_test"
    shutil.copytree(synthetic_root, root)
    os.remove(root / "coco_caption_karpathy_test.arrow")
    assert finetune_main(["irtr", "--data-root", str(root), "--out-dir", str(tmp_path / "ft2")] + common) == 0
    metrics = json.loads((tmp_path / "ft2" / "summary.json").read_text())["metrics"]
    assert "val/r_mean" in metrics and not any(k.startswith("test/") for k in metrics)


# ---- the official model-selection value and the run's best checkpoint ------------------------------------------


def test_the_metric_sums_the_official_parts():
    """Retrieval: mean of the six val recalls + i2t and t2i val batch accuracies (spec §5.7); VQA: score; NLVR2: dev
    accuracy; summed over the run's tasks; None without a part or without a fine-tuning task."""
    from vlmo_fast.evaluation import the_metric

    recalls = {"val/ir_r1": 0.1, "val/ir_r5": 0.2, "val/ir_r10": 0.3, "val/tr_r1": 0.4, "val/tr_r5": 0.5,
               "val/tr_r10": 0.9, "test/ir_r1": 1.0}
    irtr = dict(recalls, **{"val/irtr_i2t_acc": 0.25, "val/irtr_t2i_acc": 0.125, "val/r_mean": 7.0})
    assert the_metric(irtr, ["irtr"]) == pytest.approx(2.4 / 6 + 0.375)
    assert the_metric({"val/vqa_score": 0.6}, ["vqa"]) == pytest.approx(0.6)
    assert the_metric({"val/dev_acc": 0.7, "val/test_acc": 0.1}, ["nlvr2"]) == pytest.approx(0.7)
    assert the_metric(dict(irtr, **{"val/vqa_score": 0.5}), ["irtr", "vqa"]) == pytest.approx(2.4 / 6 + 0.875)
    assert the_metric(recalls, ["irtr"]) is None  # no batch accuracies
    assert the_metric({"val/test_acc": 0.7}, ["nlvr2"]) is None
    assert the_metric({"val/itc_i2t_acc": 0.5}, ["mlm", "itc", "itm"]) is None


FT = ["--arch", "vlmo_tiny_patch16", "--image-size", "32", "--max-text-len", "12", "--per-device-batch-size", "8",
      "--batch-size", "8", "--num-workers", "0", "--tensorboard", "false", "--precision", "fp32", "--device", "cpu"]


def test_retrieval_fine_tuning_reports_the_metric_and_keeps_the_best(tmp_path, synthetic_root):
    """A whole-val evaluation reports the official value from its own recalls and val batch accuracies, and the
    best one's state is checkpoints/best.pt, which evaluate reads."""
    out = tmp_path / "ft"
    assert finetune_main(["irtr", "--data-root", synthetic_root, "--out-dir", str(out), "--max-steps", "2",
                          "--eval-every", "1", "--eval-batches", "0"] + FT) == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    recalls = sum(metrics[f"val/{k}"] for k in ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10")) / 6
    assert metrics["val/the_metric"] == pytest.approx(recalls + metrics["val/irtr_i2t_acc"]
                                                      + metrics["val/irtr_t2i_acc"])
    with open(out / "log.csv", newline="") as f:
        evaluated = [(int(r["step"]), float(r["val/the_metric"])) for r in csv.DictReader(f) if r["val/the_metric"]]
    assert [s for s, _ in evaluated] == [1, 2]  # periodic at 1, final at 2 (none periodic at the last step)
    best_value = max(v for _, v in evaluated)
    best_step = min(s for s, v in evaluated if v == best_value)  # a tie keeps the earlier one
    assert summary["best"]["step"] == best_step and summary["best"]["the_metric"] == pytest.approx(best_value)
    state = torch.load(out / "checkpoints" / "best.pt", weights_only=True, mmap=True)
    assert state["step"] == best_step and state["the_metric"] == pytest.approx(best_value)
    assert evaluate_main(["irtr", "--load-path", str(out / "checkpoints" / "best.pt"), "--data-root", synthetic_root,
                          "--precision", "fp32", "--device", "cpu", "--num-workers", "0",
                          "--out", str(tmp_path / "e.json")]) == 0
    if best_step == 2:  # the final state: evaluate's recalls are the final evaluation's
        assert json.loads((tmp_path / "e.json").read_text())["tr_r1"] == pytest.approx(metrics["val/tr_r1"])


def test_val_batch_accuracies_are_counted_per_sample_on_the_val_split(tmp_path, synthetic_root, monkeypatch):
    """The contrastive val accuracies count correct samples over all val batches (a smaller last batch weighs
    less than a mean of batch accuracies would give it) and read the val split."""
    from vlmo_fast.train import data_setup, loop
    from vlmo_fast.train.config import TrainConfig

    cfg = TrainConfig(arch="vlmo_tiny_patch16", image_size=32, max_text_len=12, data_root=synthetic_root,
                      tasks=["irtr"], per_device_batch_size=7, batch_size=7, num_workers=0, device="cpu")
    model = loop.build_model(cfg).eval()
    batches = list(data_setup.val_batches(cfg, model.config))
    sizes = [len(b["text_ids"]) for b in batches]
    assert len(set(sizes)) > 1, sizes  # the synthetic val split ends with a partial batch
    labels = {}

    def fake_irtr(model, batch, local):  # right on the first two rows of every batch, wrong on the others
        assert local  # this rank's batch only: no all-gather in validation
        n = len(batch["text_ids"])
        logits = torch.zeros(n, n)
        logits[torch.arange(n), torch.arange(n).roll(1)] = 1.0
        logits[0, 0] = logits[1, 1] = 2.0
        labels[n] = True
        return {"irtr_labels": torch.arange(n), "irtr_i2t_logits": logits, "irtr_t2i_logits": logits.t()}

    info = loop.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    accs = loop._val_batch_accuracies(model, cfg, info, None, None, fake_irtr, "irtr")
    assert accs["val/irtr_i2t_acc"] == pytest.approx(2 * len(sizes) / sum(sizes))
    assert accs["val/irtr_t2i_acc"] == pytest.approx(2 * len(sizes) / sum(sizes))
    assert loop._val_batch_accuracies(model, cfg, info, None, 1, fake_irtr, "irtr")["val/irtr_i2t_acc"] == \
        pytest.approx(2 / sizes[0])
    # a batch whose every sample was unreadable is skipped (it reached the objective as {"bad_samples": n})
    monkeypatch.setattr(data_setup, "val_batches", lambda *a, **k: iter(batches[:1] + [{"bad_samples": 7}] +
                                                                        batches[1:]))
    assert loop._val_batch_accuracies(model, cfg, info, None, None, fake_irtr, "irtr") == accs


def test_best_checkpoint_follows_the_metric_across_evaluations_and_resumes(tmp_path, synthetic_root, monkeypatch,
                                                                          capsys):
    """best.pt holds the state of the highest val/the_metric among whole-val evaluations; a subset evaluation
    chooses nothing; a run resumed from before the best moves that best.pt aside and chooses anew; one resumed
    after it keeps comparing against it."""
    from vlmo_fast.train import loop

    values = []
    monkeypatch.setattr(loop, "evaluate", lambda model, cfg, info, amp, max_batches=None, final=False, stop=None:
                        {"val/the_metric": values.pop(0)} if values else {})
    out = tmp_path / "run"
    args = ["irtr", "--data-root", synthetic_root, "--out-dir", str(out), "--eval-every", "1", "--save-every", "1",
            "--keep-last", "0"] + FT
    best = out / "checkpoints" / "best.pt"

    def best_state():
        state = torch.load(best, weights_only=True, mmap=True)
        return int(state["step"]), float(state["the_metric"])

    values[:] = [0.5, 0.7, 0.6, 0.65]  # periodic at steps 1, 2, 3; final at 4
    assert finetune_main(args + ["--max-steps", "4", "--eval-batches", "0"]) == 0
    assert not values and best_state() == (2, 0.7)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["step"] == 2 and summary["best"]["the_metric"] == 0.7
    weights = torch.load(best, weights_only=True)["model"]
    step2 = torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], step2[k]) for k in step2)

    # resumed from step 1, before the best: best.pt belongs to the abandoned trajectory
    capsys.readouterr()
    values[:] = [0.2, 0.3, 0.1]  # periodic at 2, 3; final at 4
    assert finetune_main(args + ["--max-steps", "4", "--eval-batches", "0",
                                 "--resume", str(out / "checkpoints" / "step_00000001.pt")]) == 0
    assert not values and best_state() == (3, 0.3)
    aside = out / "checkpoints" / "superseded" / "best_step_00000002.pt"  # one file per step it was chosen at
    assert torch.load(aside, weights_only=True, mmap=True)["step"] == 2
    assert "(chosen at step 2, after step 1)" in capsys.readouterr().out

    # resumed after the best (at step 4 of a longer run): it keeps comparing against 0.3
    values[:] = [0.25, 0.28]  # periodic at 5; final at 6
    assert finetune_main(args + ["--max-steps", "6", "--eval-batches", "0"]) == 0
    assert not values and best_state() == (3, 0.3)
    values[:] = [0.9, 0.1]  # periodic at 7 on a few batches (chooses nothing); final at 8 (0.1 < 0.3)
    assert finetune_main(args + ["--max-steps", "8", "--eval-batches", "2"]) == 0
    assert not values and best_state() == (3, 0.3)
    assert json.loads((out / "summary.json").read_text())["best"] == {"step": 3, "the_metric": 0.3, "path": str(best)}


@pytest.mark.parametrize("n,per_device,world", [(10, 2, 2), (11, 3, 2), (7, 4, 1), (13, 2, 3)])
def test_official_val_batches_are_the_distributed_samplers(n, per_device, world):
    """The batches of the contrastive val accuracies are the official validation's global batches: each rank's
    DistributedSampler (shuffled, seed 0, epoch 0) batch k, gathered over the ranks."""
    from torch.utils.data import DistributedSampler

    from vlmo_fast.train.data_setup import official_val_batches

    ranks = [list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=0))
             for r in range(world)]
    expected = [[i for idx in ranks for i in idx[k : k + per_device]] for k in range(0, len(ranks[0]), per_device)]
    assert official_val_batches(n, per_device, world) == expected


def test_val_accuracies_are_not_capped_by_caption_order(synthetic_root):
    """In order, the val split holds each image's captions side by side: a model scoring an image's captions alike
    (their first wins a tie) got about 1/5 of them right, however good it was. In the official shuffled batches
    an image's captions rarely meet."""
    from vlmo_fast.train import loop
    from vlmo_fast.train.config import TrainConfig

    cfg = TrainConfig(arch="vlmo_tiny_patch16", image_size=32, max_text_len=12, data_root=synthetic_root,
                      tasks=["irtr"], per_device_batch_size=8, batch_size=8, num_workers=0, device="cpu")
    model = loop.build_model(cfg).eval()

    info = loop.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def ties_within_an_image(model, batch, local):  # the same image's captions score alike: the first of them wins
        ids = torch.as_tensor(batch["img_index"])
        logits = (ids[:, None] == ids[None, :]).float()
        return {"irtr_labels": torch.arange(len(ids)), "irtr_i2t_logits": logits, "irtr_t2i_logits": logits.t()}

    assert loop._val_batch_accuracies(model, cfg, info, None, None, ties_within_an_image, "irtr")[
        "val/irtr_i2t_acc"] > 0.6
