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
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import data as vdata
from ..checkpoint import (CheckpointError, is_safetensors, load_checkpoint, read_metadata, read_state_dict,
                          require_file, torch_load, trained_image_size, unwrap_state_dict, verify_checksums)
from ..config import PRESETS, preset
from ..evaluation import (build_id2answer, encode, evaluate_nlvr2, evaluate_vqa, recall_at_k, rerank_recall,
                          vqa_submission)
from .config import FINETUNE_TASKS, HelpFormatter, Parser, TrainConfig, build_parser, \
    check_environment, command_config, load_toml, presets_for, resolve_device, user_errors
from ..fileio import atomic_write_json, check_writable_file
from .data_setup import eval_loader
from .state import TRAINING_KEYS
from .loop import build_model, exit_status, resolve_precision, train

TASKS = FINETUNE_TASKS
# a task's own out_dir: with the pretraining one, resume=auto would continue a default pretraining run in
# runs/vlmo_fast instead of starting from --load-path
TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "irtr": dict(tasks=["irtr"], datasets=["coco"], out_dir="runs/vlmo_fast_irtr"),
    "vqa": dict(tasks=["vqa"], datasets=["vqa"], lr_mult=20, out_dir="runs/vlmo_fast_vqa"),
    "nlvr2": dict(tasks=["nlvr2"], datasets=["nlvr2"], out_dir="runs/vlmo_fast_nlvr2"),
}
TASK_HELP = {
    "irtr": "image-text retrieval (coco or f30k; the built-in synthetic set works without --data-root)",
    "vqa": "VQAv2 answer classification (needs --data-root with the official vqav2 arrow files: vlmo-fast prepare vqa)",
    "nlvr2": "NLVR2 true/false over an image pair (needs --data-root with the official nlvr2 arrow files)",
}


def _task(argv: List[str], command: str, what: str) -> str:
    """The task, first argument of ``finetune``/``evaluate``; ``--help`` in its place lists the tasks."""
    p = Parser(prog=f"vlmo-fast {command}", usage=f"vlmo-fast {command} TASK [options]",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               description=f"{what}\n\ntasks:\n" + "".join(f"  {t:<7}{TASK_HELP[t]}\n" for t in TASKS),
               epilog=f"Each task has its options: vlmo-fast {command} TASK --help")
    p.add_argument("task", choices=TASKS, metavar="TASK", help=", ".join(TASKS))
    return p.parse_args(argv[:1]).task


def _check_task(task: str):
    """finetune TASK trains exactly TASK: another task given by --tasks, the --config file or its preset would
    otherwise run instead, silently."""

    def check(cfg: TrainConfig, args: argparse.Namespace) -> None:
        if cfg.tasks == [task]:
            return
        if hasattr(args, "tasks"):
            source = "--tasks"
        elif args.config and "tasks" in load_toml(args.config):
            source = f"--config {args.config}"
        elif args.preset:  # argparse takes only this task's presets: kept for safety
            source = f"--preset {args.preset}"
        else:
            source = f"the preset in {args.config}"
        other = cfg.tasks[0] if len(cfg.tasks) == 1 and cfg.tasks[0] in TASKS else None
        hint = f"vlmo-fast finetune {other}" if other else "vlmo-fast pretrain"
        raise ValueError(f"{source} sets tasks {','.join(cfg.tasks)}, which conflicts with `vlmo-fast finetune "
                         f"{task}`: drop it, or run `{hint}`")

    return check


def finetune_main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    task = _task(argv, "finetune", "Fine-tune VLMo for a task, from an official or vlmo_fast checkpoint "
                                   "(--load-path); --preset picks an official recipe.")
    presets = presets_for(task)
    parser = build_parser(f"vlmo-fast finetune {task}", f"Fine-tune VLMo for {task}: {TASK_HELP[task]}. Start from "
                          "an official or vlmo_fast checkpoint with --load-path; --preset picks an official recipe.",
                          defaults=TASK_DEFAULTS[task], presets=presets, argv=argv[1:])
    cfg = command_config(parser, argv[1:], base=TASK_DEFAULTS[task], presets=presets, check=_check_task(task))
    with user_errors(parser, marked_only=True):  # unreadable data or checkpoints: one line, not a traceback
        summary = train(cfg)
    return exit_status(summary)


def _count(text: str, least: int = 0) -> int:
    """An int >= ``least`` (argparse reports the message as an error of the option)."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an int >= {least}, got {text!r}")
    return value


def _positive(text: str) -> int:
    return _count(text, 1)


def _evaluate_parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"vlmo-fast evaluate {task}", formatter_class=HelpFormatter, description={
        "irtr": "Image-text retrieval recall (R@1/5/10 both ways) of a VLMo checkpoint: the dual encoder over "
                "every image and caption, optionally re-ranked by the ITM head.",
        "vqa": "The VQA score of a VLMo checkpoint on val, or a VQAv2 test submission (--split test).",
        "nlvr2": "The NLVR2 accuracy of a VLMo checkpoint on dev and test-P (nlvr2_dev, nlvr2_test1)."}[task])
    p.add_argument("--load-path", required=True, help="official or vlmo_fast checkpoint (a training checkpoint too)")
    if task == "irtr":
        p.add_argument("--data-root", default=None, help="folder of official arrow files (default: the built-in "
                                                         "synthetic set under --work-dir)")
        p.add_argument("--dataset", default="coco", choices=["coco", "f30k"], help="retrieval dataset")
        p.add_argument("--split", default="test", choices=["val", "test"], help="Karpathy split to evaluate")
    else:
        p.add_argument("--data-root", required=True, help=f"folder of the official {task} arrow files (there is "
                                                          f"no built-in synthetic {task} set)")
    if task == "vqa":
        p.add_argument("--split", default="test", choices=["val", "test"],
                       help="val: the VQA score; test: a submission file (answers unknown)")
    p.add_argument("--arch", default=None, choices=PRESETS, help="model preset (default: the checkpoint's when it "
                                                                 "records one, else vlmo_base_patch16)")
    p.add_argument("--image-size", type=_positive, default=None, help="image size (default: the checkpoint's when "
                                                                "recorded, else the size its position parameters "
                                                                "were trained at, e.g. 384 for a 2606-row table)")
    p.add_argument("--max-text-len", type=_positive, default=None, help="text length (default: the checkpoint's when "
                                                                  "recorded, else the preset's)")
    p.add_argument("--batch-size", type=_positive, default=32, help="evaluation batch size")
    p.add_argument("--num-workers", type=_count, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers decoding the images (0: in the main process; default: min(8, CPUs), "
                        "the official 8)")
    if task == "irtr":
        p.add_argument("--rerank-k", type=_count, default=0,
                       help="re-rank each query's top k by ITM logit + dual-encoder score, as the official "
                            "compute_irtr_recall_with_rerank (its k_test: 32; 0: off)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help={
        "irtr": "write the metrics (JSON) here", "nlvr2": "write the metrics (JSON) here",
        "vqa": "val: write the metrics (JSON) here; test: the submission JSON (default: vqa_submission.json)"}[task])
    if task == "irtr":
        p.add_argument("--work-dir", default="runs/vlmo_fast", help="where the synthetic set lives when --data-root "
                                                                    "is unset")
    return p


def read_checkpoint(path: str):
    """(model state, {arch, image_size, max_text_len} as recorded, is a training checkpoint) of a checkpoint file,
    read once. vlmo_fast records the model's settings in a training checkpoint ("config": TrainConfig fields) and
    in the safetensors files it writes ("vlmo_fast_config" metadata: VLMoConfig fields); other files record none."""
    require_file(path)
    if is_safetensors(path):
        cfg = read_metadata(path).get("vlmo_fast_config")
        recorded = {}
        if isinstance(cfg, dict):
            recorded = {"arch": cfg.get("model_arch"), "image_size": cfg.get("image_size"),
                        "max_text_len": cfg.get("max_text_len")}
        return read_state_dict(path), recorded, False
    verify_checksums(path)  # (reads the file once; a load reads no checksum)
    obj = torch_load(path, mmap=True)  # mapped: a training checkpoint's optimizer state is never held in memory
    config = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else None
    recorded = {}
    if isinstance(config, dict):  # a TrainConfig's fields ("arch"), or a VLMoConfig's ("model_arch") beside weights
        recorded = {"arch": config.get("arch", config.get("model_arch")), "image_size": config.get("image_size"),
                    "max_text_len": config.get("max_text_len")}
    training = isinstance(config, dict) and all(k in obj for k in TRAINING_KEYS)
    return unwrap_state_dict(obj, source=path), recorded, training


RECORDED_MAX = 2048  # the largest image size and text length taken from a checkpoint's record without being asked


def check_recorded(recorded: Dict[str, Any], path: str) -> Dict[str, Any]:
    """The model settings a checkpoint records ({arch, image_size, max_text_len}, each possibly None) that a model is
    about to be built from, or a CheckpointError naming the file: a value no vlmo_fast run would build from unasked
    (a wrong type, an unknown arch, a size past ``RECORDED_MAX``: 65536 px allocates tens of GB) is a damaged or
    hostile file's. The matching option (``--arch``, ``--image-size``, ``--max-text-len``) replaces it."""
    arch = recorded.get("arch")
    if arch is not None and arch not in PRESETS:
        raise CheckpointError(f"{path}: its recorded arch {arch!r} is none of {list(PRESETS)} (give --arch)")
    for key in ("image_size", "max_text_len"):
        value = recorded.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= RECORDED_MAX):
            raise CheckpointError(f"{path}: its recorded {key} {value!r} is not a size from 1 to {RECORDED_MAX} "
                                  f"(give --{key.replace('_', '-')} to build the model anyway)")
    return recorded


def vqa_classes(state) -> Optional[int]:
    """The VQA classifier's number of classes in a checkpoint's state dict (its last Linear's outputs), if it has one:
    a run fine-tuned with another --vqa-label-size is evaluated with its own."""
    weight = state.get("vqa_classifier.3.weight") if isinstance(state, dict) else None
    return int(weight.shape[0]) if getattr(weight, "ndim", 0) == 2 else None


def _model_to_evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser, task: str, rerank_k: int, split: str,
                       dataset_name: str, work_dir: str) -> Tuple[torch.nn.Module, TrainConfig, Any, torch.device]:
    """evaluate's model: (model, its TrainConfig, the checkpoint's load report, the device), built as the checkpoint
    records (an option wins) and loaded from it. The output, the data and the device are checked first, before the
    checkpoint is read; a checkpoint without the task's heads is refused (they would keep their random weights)."""
    with user_errors(parser):
        # the output, the data and the device first, before the checkpoint is read
        if task == "vqa" and split == "test":
            args.out = args.out or "vqa_submission.json"
        if args.out is not None:
            check_writable_file(args.out, "--out")
        check_environment(TrainConfig(tasks=[task], datasets=[dataset_name], data_root=args.data_root,
                                      device=args.device))
        state, recorded, _ = read_checkpoint(args.load_path)
        recorded = check_recorded({"arch": None if args.arch else recorded.get("arch"),
                                   "image_size": None if args.image_size is not None else recorded.get("image_size"),
                                   "max_text_len": (None if args.max_text_len is not None
                                                    else recorded.get("max_text_len"))}, args.load_path)
        # an explicit option wins, then what the checkpoint records, then (image size) what its position parameters
        # were trained at, then the preset's (base) defaults
        arch = args.arch or recorded.get("arch") or "vlmo_base_patch16"
        image_size = args.image_size if args.image_size is not None else recorded.get("image_size")
        if image_size is None:
            shape = preset(arch)
            image_size = trained_image_size(state, shape.patch_size, shape.max_text_len_of_initckpt)
        cfg = TrainConfig(arch=arch, tasks=["itc", "itm", "mlm"] if task == "irtr" and rerank_k else [task],
                          image_size=image_size,
                          max_text_len=(args.max_text_len if args.max_text_len is not None
                                        else recorded.get("max_text_len")),
                          precision=args.precision, data_root=args.data_root, out_dir=work_dir,
                          per_device_batch_size=args.batch_size, datasets=[dataset_name], device=args.device,
                          vqa_label_size=vqa_classes(state) if task == "vqa" else None)
        model = build_model(cfg)  # e.g. --image-size not a multiple of the patch: one line
    device = resolve_device(args.device)
    with user_errors(parser):  # a checkpoint that does not fit the model: one line
        try:
            report = load_checkpoint(model, state, strict=False)
        except CheckpointError as exc:
            if args.arch or recorded.get("arch"):
                raise
            raise CheckpointError(f"{exc} (the checkpoint records no model settings, so the {cfg.arch} preset's "
                                  f"were used: give --arch, --image-size and --max-text-len)") from None
        # a head the checkpoint lacks would keep its random initialisation and give a meaningless result
        heads = {"irtr": ("itc_text_proj.", "itc_image_proj."), "vqa": ("vqa_classifier.",),
                 "nlvr2": ("nlvr2_classifier.",)}[task] + (("itm_score.",) if rerank_k else ())
        lacking = sorted({h.rstrip(".") for h in heads for k in report.missing_keys if k.startswith(h)})
        if lacking:
            hint = (" (a retrieval fine-tuned checkpoint has no ITM head: evaluate it without --rerank-k)"
                    if lacking == ["itm_score"] else f" (not a checkpoint fine-tuned for {task}?)")
            raise CheckpointError(f"{args.load_path}: the checkpoint has no {', '.join(lacking)} weights, which "
                                  f"evaluate {task} needs{hint}")
    return model, cfg, report, device


class _Evaluation:
    """One ``vlmo-fast evaluate TASK`` pass over the data: ``run()`` gives the metrics, over the readable samples
    (``bad`` counts the others); ``unanswered`` counts the VQA test questions the submission lacks."""

    def __init__(self, args: argparse.Namespace, parser: argparse.ArgumentParser, task: str, model: torch.nn.Module,
                 cfg: TrainConfig, device: torch.device, split: str, dataset_name: str, work_dir: str):
        self.args, self.parser, self.task, self.model, self.device = args, parser, task, model, device
        self.split, self.dataset_name = split, dataset_name
        self.amp = resolve_precision(cfg, device)
        self.root = args.data_root or os.path.join(work_dir, "synthetic")
        if args.data_root is None:
            vdata.write_synthetic(self.root, image_size=64, seed=0)
        self.collate = vdata.build_collate(mlm=False)
        self.bad = 0
        self.unanswered = 0

    def run(self) -> Dict[str, Any]:
        return {"irtr": self.irtr, "vqa": self.vqa, "nlvr2": self.nlvr2}[self.task]()

    def loader(self, ds):
        return eval_loader(ds, self.args.batch_size, self.collate, self.args.num_workers)

    def dataset(self, names: List[str], split: str, **extra):
        mc = self.model.config
        with user_errors(self.parser):  # unreadable files or missing columns: one line
            return vdata.build_dataset(self.root, names, split, image_size=mc.image_size,
                                       max_text_len=mc.max_text_len, train=False, **extra)

    def nothing_readable(self, what: str) -> None:  # no metric to report: an error, not a report without it
        with user_errors(self.parser):
            raise ValueError(f"{what}: no readable sample to evaluate ({self.bad} unreadable; see the log above)")

    def irtr(self) -> Dict[str, Any]:
        name, split, rerank_k = self.dataset_name, self.split, getattr(self.args, "rerank_k", 0)
        images = self.dataset([name], split, image_only=True)
        texts = self.dataset([name], split, text_only=True)
        img_stats: Dict[str, Any] = {}
        txt_stats: Dict[str, Any] = {}
        img_feats, img_ids = encode(self.model, self.loader(images), self.device, "image", self.amp, img_stats)
        txt_feats, txt_ids = encode(self.model, self.loader(texts), self.device, "text", self.amp, txt_stats)
        self.bad = img_stats.get("bad_samples", 0) + txt_stats.get("bad_samples", 0)
        keep = torch.isin(txt_ids, img_ids)  # an unreadable image's captions are left out with it
        txt_feats, txt_ids, txt_index = txt_feats[keep], txt_ids[keep], txt_stats["raw_index"][keep.cpu()]
        if not len(img_ids) or not len(txt_ids):
            self.nothing_readable(f"{name} {split} " + ("images" if not len(img_ids) else "captions"))
        metrics: Dict[str, Any] = recall_at_k(img_feats, txt_feats, txt_ids, img_ids)
        if rerank_k:  # (the captions' tokens from the text-only set: no image decoded for them)
            metrics["rerank"] = rerank_recall(self.model, img_feats, txt_feats, txt_ids, img_ids, images, texts,
                                              k=rerank_k, device=self.device, autocast_dtype=self.amp,
                                              batch_size=self.args.batch_size, image_index=img_stats["raw_index"],
                                              text_index=txt_index)
        return metrics

    def vqa(self) -> Dict[str, Any]:
        test = self.split == "test"
        if test:  # checked before the test pass (448K questions at 480 px): its answers need them
            id2answer = self.vqa_answers()
        ds = self.dataset(["vqa"], self.split)
        with user_errors(self.parser):
            vdata.check_vqa_labels(ds, self.model.config.vqav2_label_size)
        stats: Dict[str, int] = {}
        result = evaluate_vqa(self.model, self.loader(ds), self.device, self.amp, stats)
        self.bad = stats.get("bad_samples", 0)
        metrics = {"vqa_score": result["vqa_score"], "questions": len(result["predictions"])}
        if not result["predictions"]:
            self.nothing_readable(f"vqa {self.split}")
        if test:
            vqa_submission(result["predictions"], id2answer, self.args.out)
            metrics["submission"] = self.args.out
            self.unanswered = len(ds) - len(result["predictions"])
        return metrics

    def vqa_answers(self) -> Dict[int, str]:
        """The answer of each class, as official, from the train and val files (their answers and labels)."""
        paths = [os.path.join(self.root, f"{n}.arrow")
                 for n in vdata.dataset_files("vqa", "train") + vdata.dataset_files("vqa", "val")]
        with user_errors(self.parser):
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"{', '.join(missing)}: needed for the answer strings of the classes "
                                        f"(the test file has no answers)")
            return build_id2answer([vdata.read_arrow(p) for p in paths])

    def nlvr2(self) -> Dict[str, Any]:
        ds = self.dataset(["nlvr2"], "val")  # dev + test1, told apart by table_name
        stats: Dict[str, int] = {}
        metrics = evaluate_nlvr2(self.model, self.loader(ds), self.device, self.amp, stats)
        self.bad = stats.get("bad_samples", 0)
        for part, file in (("dev", "nlvr2_dev"), ("test", "nlvr2_test1")):
            if f"{part}_acc" not in metrics:  # (both files exist: dataset() checked)
                self.nothing_readable(file)
        return metrics


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    task = _task(argv, "evaluate", "Evaluate a VLMo checkpoint: retrieval recall, the VQA score or a VQAv2 test "
                                   "submission, the NLVR2 accuracy.")
    parser = _evaluate_parser(task)
    args = parser.parse_args(argv[1:])
    rerank_k = getattr(args, "rerank_k", 0)
    split = getattr(args, "split", "val")
    dataset_name = getattr(args, "dataset", task)
    work_dir = getattr(args, "work_dir", "runs/vlmo_fast")
    model, cfg, report, device = _model_to_evaluate(args, parser, task, rerank_k, split, dataset_name, work_dir)
    model.to(device).eval()
    evaluation = _Evaluation(args, parser, task, model, cfg, device, split, dataset_name, work_dir)
    metrics = evaluation.run()
    if evaluation.bad:  # left out: the recalls, score or accuracies are over the readable samples
        metrics["unreadable_samples"] = evaluation.bad
    mc = model.config
    metrics["checkpoint"] = args.load_path
    metrics["model"] = {"arch": cfg.arch, "image_size": mc.image_size, "max_text_len": mc.max_text_len}
    metrics["load_report"] = str(report)
    print(json.dumps(metrics, indent=1))
    submission = task == "vqa" and split == "test"
    if args.out and not submission:
        atomic_write_json(args.out, metrics, indent=1)
    if evaluation.unanswered:
        # written all the same (to inspect), but the evaluation server takes complete files only
        print(f"{parser.prog}: error: the submission {args.out} lacks the {evaluation.unanswered} questions whose "
              f"images could not be read (see the log above): the VQA server refuses an incomplete file",
              file=sys.stderr)
        return 1
    return 0
