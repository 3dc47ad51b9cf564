"""``vlmo-fast finetune <task>`` and ``vlmo-fast evaluate <task>`` for retrieval (irtr), VQAv2 and NLVR2 (spec §5.5-5.7).

Fine-tuning is the training loop with the task's objective and the official recipe (``--preset``, e.g.
``task_finetune_irtr_coco_base_image384``); a 224-px checkpoint given with ``--load-path`` is adapted to 384/480 px
as the official loader does. Evaluation encodes every image and caption once (retrieval: dual encoder, optional ITM
re-ranking of the top k), computes the VQA score or writes a test-set submission, or the NLVR2 dev/test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

import torch

from .. import data as vdata
from ..checkpoint import load_checkpoint
from ..evaluation import (build_id2answer, encode, evaluate_nlvr2, evaluate_vqa, recall_at_k, rerank_recall,
                          vqa_submission)
from .config import TrainConfig, build_parser, config_from_args
from .loop import build_model, resolve_precision, train

TASKS = ("irtr", "vqa", "nlvr2")
TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "irtr": dict(tasks=["irtr"], datasets=["coco"]),
    "vqa": dict(tasks=["vqa"], datasets=["vqa"], lr_mult=20),
    "nlvr2": dict(tasks=["nlvr2"], datasets=["nlvr2"]),
}


def _task(argv: List[str], command: str) -> str:
    if not argv or argv[0] not in TASKS:
        raise SystemExit(f"usage: vlmo-fast {command} {{{','.join(TASKS)}}} [options]  (--help after the task)")
    return argv[0]


def finetune_main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    task = _task(argv, "finetune")
    parser = build_parser(f"vlmo-fast finetune {task}", f"Fine-tune VLMo for {task}. Start from an official or "
                          "vlmo_fast checkpoint with --load-path; --preset picks an official recipe.")
    cfg = config_from_args(parser.parse_args(argv[1:]), base=TASK_DEFAULTS[task])
    summary = train(cfg)
    return 0 if summary["stop_reason"] == "max_steps" else 1


def _evaluate_parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"vlmo-fast evaluate {task}", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=f"Evaluate a VLMo checkpoint on {task}.")
    p.add_argument("--load-path", required=True, help="official or vlmo_fast checkpoint (a training checkpoint too)")
    p.add_argument("--data-root", default=None, help="folder of official arrow files (default: the synthetic set "
                                                     "under --work-dir, retrieval only)")
    p.add_argument("--dataset", default={"irtr": "coco", "vqa": "vqa", "nlvr2": "nlvr2"}[task],
                   help="dataset key (irtr: coco or f30k)")
    p.add_argument("--split", default="test", choices=["val", "test"], help="split to evaluate")
    p.add_argument("--arch", default="vlmo_base_patch16", help="model preset")
    p.add_argument("--image-size", type=int, default=None, help="image size (default: the preset's)")
    p.add_argument("--max-text-len", type=int, default=None, help="text length (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--rerank-k", type=int, default=0, help="irtr: re-rank the top k by the ITM head (0: off)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default=None, help="write the metrics (JSON) here; vqa test: the submission JSON")
    p.add_argument("--work-dir", default="runs/vlmo_fast", help="where the synthetic set lives when --data-root is unset")
    return p


def _model_state(path: str):
    """A model state from an official checkpoint or from a vlmo_fast training checkpoint (its "model" entry)."""
    from ..checkpoint import read_state_dict

    state = read_state_dict(path)
    if "model" in state and isinstance(state["model"], dict):
        return state["model"]
    return state


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    task = _task(argv, "evaluate")
    args = _evaluate_parser(task).parse_args(argv[1:])
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    tasks = ["itc", "itm", "mlm"] if task == "irtr" and args.rerank_k else [task]
    cfg = TrainConfig(arch=args.arch, tasks=tasks, image_size=args.image_size, max_text_len=args.max_text_len,
                      precision=args.precision, data_root=args.data_root, out_dir=args.work_dir,
                      per_device_batch_size=args.batch_size, datasets=[args.dataset])
    model = build_model(cfg)
    report = load_checkpoint(model, _model_state(args.load_path), strict=False)
    model.to(device).eval()
    amp = resolve_precision(cfg, device)
    root = args.data_root or os.path.join(args.work_dir, "synthetic")
    if args.data_root is None:
        if task != "irtr":
            raise SystemExit(f"--data-root is required for {task}")
        vdata.write_synthetic(root, image_size=64, seed=0)
    mc = model.config
    kw = dict(image_size=mc.image_size, max_text_len=mc.max_text_len, train=False)
    collate = vdata.build_collate(mlm=False)

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=collate, num_workers=2)

    if task == "irtr":
        images = vdata.build_dataset(root, [args.dataset], args.split, image_only=True, **kw)
        texts = vdata.build_dataset(root, [args.dataset], args.split, text_only=True, **kw)
        img_feats, img_ids = encode(model, loader(images), device, "image", amp)
        txt_feats, txt_ids = encode(model, loader(texts), device, "text", amp)
        metrics: Dict[str, Any] = recall_at_k(img_feats, txt_feats, txt_ids, img_ids)
        if args.rerank_k:
            full_texts = vdata.build_dataset(root, [args.dataset], args.split, **kw)
            metrics["rerank"] = rerank_recall(model, img_feats, txt_feats, txt_ids, img_ids, images, full_texts,
                                              k=args.rerank_k, device=device, autocast_dtype=amp)
    elif task == "vqa":
        ds = vdata.build_dataset(root, ["vqa"], args.split, **kw)
        result = evaluate_vqa(model, loader(ds), device, amp)
        metrics = {"vqa_score": result["vqa_score"], "questions": len(result["predictions"])}
        if args.split == "test":
            tables = [vdata.read_arrow(os.path.join(root, f"{n}.arrow"))
                      for n in vdata.dataset_files("vqa", "train") + vdata.dataset_files("vqa", "val")
                      if os.path.isfile(os.path.join(root, f"{n}.arrow"))]
            out = args.out or "vqa_submission.json"
            vqa_submission(result["predictions"], build_id2answer(tables), out)
            metrics["submission"] = out
    else:
        ds = vdata.build_dataset(root, ["nlvr2"], "val", **kw)  # dev + test1, told apart by table_name
        metrics = evaluate_nlvr2(model, loader(ds), device, amp)
    metrics["checkpoint"] = args.load_path
    metrics["load_report"] = str(report)
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.out and not (task == "vqa" and args.split == "test"):
        with open(args.out, "w") as f:
            f.write(text)
    return 0
