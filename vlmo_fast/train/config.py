"""Training configuration: one dataclass, the official named configs as presets (spec §6.1, §6.2), TOML files, CLI.

Precedence: defaults < ``--preset`` < ``--config file.toml`` < command-line flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from ..config import LOSS_NAMES, PRESETS, check_itm_has_itc, dataclass_from_dict, preset as model_preset
from .distributed import elastic_restarts

_STEP200K = dict(max_steps=200000, warmup_steps=2500)
FINETUNE_TASKS = ("irtr", "vqa", "nlvr2")  # ``vlmo-fast finetune TASK``; every other objective is pretraining
SYNTHETIC_DATASETS = ("coco",)  # what vlmo_fast.data.write_synthetic writes: coco-style images and captions only


@dataclass
class TrainConfig:
    """Every option of ``vlmo-fast pretrain`` / ``finetune``. Field names follow the official config where it has one."""

    # model
    arch: str = "vlmo_tiny_patch16"  # a vlmo_fast preset: vlmo_base_patch16, vlmo_large_patch16, ...
    tasks: List[str] = field(default_factory=lambda: ["mlm", "itc", "itm"])
    image_size: Optional[int] = None  # default: the preset's (224 for the official models)
    max_text_len: Optional[int] = None  # default: the preset's (40; 196 for the text-only stage)
    drop_path_rate: Optional[float] = None  # None: 0.1 (official default) for real data, 0 for the synthetic set
    vqa_label_size: Optional[int] = None  # VQA answer classes (official vqav2_label_size); default: 3129
    backend: str = "auto"  # op implementations: auto | torch | triton | cuda
    model_impl: str = "vlmo_fast"  # vlmo_fast | reference (the eager official math, for comparisons)
    load_path: Optional[str] = None  # an official or vlmo_fast checkpoint to start from (adapted as officially)
    # data
    data_root: Optional[str] = None  # None: the built-in synthetic dataset, generated under out_dir on first use
    datasets: List[str] = field(default_factory=lambda: ["coco"])
    augment: Optional[bool] = None  # official train transform; None: on for real data, off for the synthetic set
    whole_word_masking: bool = True
    mlm_prob: float = 0.15
    num_workers: int = 2
    drop_last: bool = False  # drop each epoch's final partial batch (official: kept; ranks padded to equal size)
    # batch and schedule
    batch_size: int = 32  # global batch; gradient accumulation makes up the difference (official batch_size)
    per_device_batch_size: int = 32  # official per_gpu_batchsize
    learning_rate: float = 2e-4  # the official base pretraining value
    optimizer: str = "official"  # official (the official AdamW update rule) | torch (torch.optim.AdamW, fused)
    weight_decay: float = 0.01
    lr_mult: float = 1.0  # heads (vqa_classifier, nlvr2_classifier) train at learning_rate * lr_mult
    end_lr: float = 0.0
    schedule: str = "linear"  # linear (official) | cosine
    max_steps: Optional[int] = 300  # optimizer steps; None: max_epochs over the data
    max_epochs: Optional[int] = None
    warmup_steps: Union[int, float] = 0.1  # int: steps; float: fraction of max_steps (official)
    grad_clip: Optional[float] = None  # max global grad norm (the official run clips nothing)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 (with GradScaler) | fp32
    activation_checkpointing: bool = False
    compile: bool = False
    # distributed (torchrun)
    fsdp: bool = False  # FSDP2 instead of DDP
    gather_with_grad: bool = False  # ITC/IRTR gathers with gradient (official: without)
    # checkpoints and logs
    out_dir: str = "runs/vlmo_fast"
    save_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3
    resume: str = "auto"  # auto: newest checkpoint in out_dir if any | none | a checkpoint path
    log_every: int = 10
    eval_every: int = 0  # steps between evaluations on the val split (0: only at the end)
    eval_batches: int = 8  # batches of the val split used by the periodic evaluation (0: all; chooses best.pt)
    final_eval: bool = True  # evaluate on the whole val split at the end (irtr: and test, when present)
    tensorboard: bool = True
    seed: int = 1
    deterministic: bool = False  # PyTorch's deterministic mode for the run (warn_only): bit-identical reruns
    max_bad_steps: int = 5  # consecutive non-finite losses tolerated; then save and stop
    data_timeout: float = 1800.0  # seconds a training batch may take from the data workers (0: no limit)
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        unknown = set(self.tasks) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"tasks: unknown {sorted(unknown)}; expected a subset of {list(LOSS_NAMES)}")
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        # combinations that would start (writing the data and logs) and fail in the first step
        check_itm_has_itc(self.tasks)
        if "textmlm" in self.tasks and len(set(self.tasks)) > 1:
            raise ValueError(f"tasks: textmlm is the text-only stage (text data, the vision side frozen) and trains "
                             f"alone, got {list(self.tasks)}")
        if not self.datasets:
            raise ValueError("datasets: at least one dataset is needed")
        if self.arch not in PRESETS:
            raise ValueError(f"arch: unknown {self.arch!r}; expected one of {list(PRESETS)}")
        if self.model_impl not in ("vlmo_fast", "reference"):
            raise ValueError(f"model_impl must be vlmo_fast or reference, got {self.model_impl!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.optimizer not in ("official", "torch"):
            raise ValueError(f"optimizer must be official or torch, got {self.optimizer!r}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be linear or cosine, got {self.schedule!r}")
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("set max_steps or max_epochs")
        # a zero or negative count would not fail later: the loop would run no step, or never log/save, and exit 0
        for name in ("batch_size", "per_device_batch_size", "max_steps", "max_epochs", "log_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, meaning in (("keep_last", "0 keeps every checkpoint"), ("eval_every", "0: only at the end"),
                              ("data_timeout", "0: no limit"),
                              ("eval_batches", "0: the whole val split"),
                              ("num_workers", "0: load in the main process")):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 ({meaning}), got {getattr(self, name)}")
        for f in dataclasses.fields(self):  # a NaN or an infinity passes every comparison below, or none
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        # each would train, and exit 0: a negative multiplier or end lr ascends the gradient, an end lr above the
        # peak makes the decay a climb, a clip norm <= 0 zeroes or flips every gradient
        if self.lr_mult < 0:
            raise ValueError(f"lr_mult must be >= 0, got {self.lr_mult}")
        if not 0 <= self.end_lr <= self.learning_rate:
            raise ValueError(f"end_lr must be in [0, learning_rate={self.learning_rate}], got {self.end_lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (none: no clipping), got {self.grad_clip}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.fsdp and self.precision == "fp16":  # it failed in the first step's unscale, inside torch
            raise ValueError("fsdp with precision fp16 is not supported: GradScaler's unscale cannot take FSDP's "
                             "sharded gradients with the replicated logit scales in one group; use bf16 (no scaler)")
        warmup = self.warmup_steps
        if isinstance(warmup, float) and not 0.0 <= warmup <= 1.0:
            raise ValueError(f"warmup_steps: a float is a fraction of max_steps, in [0, 1]; got {warmup}")
        if isinstance(warmup, int) and warmup < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup}")
        if isinstance(warmup, int) and self.max_steps is not None and warmup > self.max_steps:
            # the schedule never leaves warmup (nor reaches the peak learning rate): often a preset's warmup kept while
            # --max-steps shortens the run. A warning, not an error: short smoke runs of a preset are legitimate.
            warnings.warn(f"warmup_steps ({warmup}) exceeds max_steps ({self.max_steps}): the learning rate never "
                          f"reaches its peak; give fewer steps or a fraction of max_steps (e.g. --warmup-steps 0.1)",
                          stacklevel=3)
        check_device_name(self.device)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        return dataclass_from_dict(cls, values, "unknown training option(s)")


_HINTS: Dict[str, Any] = {}


def _type_name(kind) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is Union:
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(kind) is list:
        return f"list of {_type_name(args[0])}"
    return kind.__name__


def _checked(name: str, kind, value):
    """``value`` as field type ``kind`` (an int for a float field becomes a float; a comma-separated string for a
    list of names becomes the list), or a ValueError naming the field: values from TOML files and Python callers
    are not parsed by argparse, and a wrong type otherwise fails deep in the loop or, worse, is used as is."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is Union:
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if set(members) == {int, float}:  # warmup_steps: the type tells steps from a fraction
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
        elif len(members) == 1:
            return _checked(name, members[0], value)
    elif typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(x, args[0]) for x in value):
            return list(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, kind):
        return value
    raise ValueError(f"{name}: expected {_type_name(kind)}, got {type(value).__name__} {value!r}")


def _check_types(cfg: TrainConfig) -> None:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainConfig))
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _checked(f.name, _HINTS[f.name], getattr(cfg, f.name)))


# The official named configs (spec §6.2), with the README's step200k for pretraining. The large pretraining config's
# model_arch bug (Q12: "vit_large_patch16_224") is fixed to vlmo_large_patch16.
_PRE = dict(datasets=["coco", "vg", "sbu", "gcc"], tasks=["mlm", "itc", "itm"], batch_size=1024, whole_word_masking=True,
            **_STEP200K)
_FT10 = dict(max_steps=None, max_epochs=10, warmup_steps=0.1)
PRESETS_TRAIN: Dict[str, Dict[str, Any]] = {
    "task_textmlm_base": dict(arch="vlmo_base_patch16", datasets=["wikibk"], tasks=["textmlm"], max_text_len=196,
                              batch_size=1024, learning_rate=2e-4, whole_word_masking=True, **_STEP200K),
    "task_textmlm_base_plus": dict(arch="vlmo_base_plus_patch16", datasets=["wikibk"], tasks=["textmlm"],
                                   max_text_len=196, batch_size=1024, learning_rate=2e-4, whole_word_masking=True,
                                   **_STEP200K),
    "task_mlm_itm_itc_base": dict(arch="vlmo_base_patch16", learning_rate=2e-4, **_PRE),
    "task_mlm_itm_itc_base_plus": dict(arch="vlmo_base_plus_patch16", learning_rate=1e-4, **_PRE),
    "task_mlm_itm_itc_large": dict(arch="vlmo_large_patch16", learning_rate=5e-5, **_PRE),
    "task_finetune_nlvr2_base": dict(arch="vlmo_base_patch16", datasets=["nlvr2"], tasks=["nlvr2"], batch_size=128,
                                     learning_rate=5e-5, drop_path_rate=0.1, **_FT10),
    "task_finetune_nlvr2_base_plus": dict(arch="vlmo_base_plus_patch16", datasets=["nlvr2"], tasks=["nlvr2"],
                                          batch_size=128, learning_rate=3e-5, drop_path_rate=0.2, **_FT10),
    "task_finetune_nlvr2_base_image384": dict(arch="vlmo_base_patch16", datasets=["nlvr2"], tasks=["nlvr2"],
                                              image_size=384, batch_size=128, learning_rate=5e-5,
                                              drop_path_rate=0.1, **_FT10),
    "task_finetune_nlvr2_base_plus_image384": dict(arch="vlmo_base_plus_patch16", datasets=["nlvr2"], tasks=["nlvr2"],
                                                   image_size=384, batch_size=128, learning_rate=3e-5,
                                                   drop_path_rate=0.2, **_FT10),
    "task_finetune_nlvr2_large": dict(arch="vlmo_large_patch16", datasets=["nlvr2"], tasks=["nlvr2"], batch_size=128,
                                      learning_rate=3e-5, drop_path_rate=0.15, **_FT10),
    "task_finetune_nlvr2_large_image384": dict(arch="vlmo_large_patch16", datasets=["nlvr2"], tasks=["nlvr2"],
                                               image_size=384, batch_size=128, learning_rate=3e-5,
                                               drop_path_rate=0.15, **_FT10),
    "task_finetune_vqa_base_image480": dict(arch="vlmo_base_patch16", datasets=["vqa"], tasks=["vqa"], image_size=480,
                                            batch_size=128, learning_rate=3e-5, drop_path_rate=0.15, lr_mult=20,
                                            **_FT10),
    "task_finetune_vqa_base_plus_image480": dict(arch="vlmo_base_plus_patch16", datasets=["vqa"], tasks=["vqa"],
                                                 image_size=480, batch_size=128, learning_rate=3e-5,
                                                 drop_path_rate=0.15, lr_mult=20, **_FT10),
    "task_finetune_vqa_large_image480": dict(arch="vlmo_large_patch16", datasets=["vqa"], tasks=["vqa"],
                                             image_size=480, batch_size=128, learning_rate=1.5e-5,
                                             drop_path_rate=0.15, lr_mult=20, **_FT10),
    "task_finetune_irtr_f30k_base": dict(arch="vlmo_base_patch16", datasets=["f30k"], tasks=["irtr"], batch_size=3072,
                                         learning_rate=3e-5, drop_path_rate=0.15, max_steps=1500, warmup_steps=150),
    "task_finetune_irtr_f30k_base_image384": dict(arch="vlmo_base_patch16", datasets=["f30k"], tasks=["irtr"],
                                                  image_size=384, batch_size=3072, learning_rate=3e-5,
                                                  drop_path_rate=0.15, max_steps=1500, warmup_steps=150),
    "task_finetune_irtr_f30k_base_plus_image384": dict(arch="vlmo_base_plus_patch16", datasets=["f30k"],
                                                       tasks=["irtr"], image_size=384, batch_size=3072,
                                                       learning_rate=3e-5, drop_path_rate=0.2, max_steps=1500,
                                                       warmup_steps=150),
    "task_finetune_irtr_f30k_large_image384": dict(arch="vlmo_large_patch16", datasets=["f30k"], tasks=["irtr"],
                                                   image_size=384, batch_size=3072, learning_rate=2e-5,
                                                   drop_path_rate=0.2, max_steps=1500, warmup_steps=150),
    "task_finetune_irtr_coco_base_image384": dict(arch="vlmo_base_patch16", datasets=["coco"], tasks=["irtr"],
                                                  image_size=384, batch_size=3072, learning_rate=3e-5,
                                                  drop_path_rate=0.2, max_steps=3000, warmup_steps=300),
    "task_finetune_irtr_coco_base_plus_image384": dict(arch="vlmo_base_plus_patch16", datasets=["coco"],
                                                       tasks=["irtr"], image_size=384, batch_size=3072,
                                                       learning_rate=3e-5, drop_path_rate=0.2, max_steps=3000,
                                                       warmup_steps=300),
    "task_finetune_irtr_coco_large_image384": dict(arch="vlmo_large_patch16", datasets=["coco"], tasks=["irtr"],
                                                   image_size=384, batch_size=3072, learning_rate=2e-5,
                                                   drop_path_rate=0.2, max_steps=3000, warmup_steps=300),
}


def load_toml(path: str) -> Dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # (the latter: a file that is not UTF-8)
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
        except RecursionError:
            raise ValueError(f"{path}: not a config file (tables or arrays nested too deeply to read)") from None
    if "train" not in data:
        return data
    outside = sorted(k for k in data if k != "train")
    if not isinstance(data["train"], dict) or outside:
        raise ValueError(f"{path}: options go either at the top level or in a [train] table, not both "
                         f"(outside [train]: {', '.join(outside) or 'train = ' + repr(data['train'])})")
    return data["train"]


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def parse_bool(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off, in any case."""
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true/false (or 1/0, yes/no, on/off), got {text!r}") from None


def parse_warmup(text: str) -> Union[int, float]:
    """An int (steps) or a float (a fraction of max_steps); argparse names a type function without an
    ArgumentTypeError in its message, so this one raises its own."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int (steps) or a float (a fraction of max_steps), got "
                                         f"{text!r}") from None


def _optional(kind: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        try:
            return kind(text)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected {what} or none, got {text!r}") from None

    return parse


def _names(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


HELP = {
    "arch": f"model preset: {', '.join(PRESETS)}",
    "tasks": "comma-separated objectives (mlm,itc,itm | textmlm | irtr | vqa | nlvr2)",
    "image_size": "image side in pixels",
    "max_text_len": "text length",
    "vqa_label_size": "VQA answer classes, the classifier's outputs: the answer vocabulary `prepare vqa` wrote "
                      "(default: 3129, the official vocabulary's)",
    "drop_path_rate": "stochastic depth rate, also the BERT embedding dropout as official (default: 0.1, or 0 for "
                      "the built-in synthetic set, which a tiny model learns much faster without it)",
    "backend": "op implementations: auto, torch, triton, cuda",
    "model_impl": "vlmo_fast, or reference (the eager official math, to compare against)",
    "load_path": "official or vlmo_fast checkpoint to initialise from (resized/adapted as the official loader)",
    "data_root": "folder of official arrow files (default: a built-in synthetic dataset: coco-style images and "
                 "captions, no vqa, nlvr2 or text-only data)",
    "datasets": "comma-separated dataset keys (coco,vg,sbu,gcc,f30k,wikibk,vqa,nlvr2) or webdataset tar globs",
    "augment": "official train augmentation (default: on for real data, off for the built-in synthetic set)",
    "whole_word_masking": "whole-word MLM masking (official) instead of per-token", "mlm_prob": "MLM probability",
    "num_workers": "DataLoader workers per process",
    "drop_last": "drop each epoch's final partial micro-batch (official: kept, and counted in an epoch's steps)",
    "batch_size": "global batch (accumulation fills the gap)",
    "per_device_batch_size": "micro-batch per process", "learning_rate": "peak learning rate",
    "optimizer": "official: AdamW with the official update rule (transformers' AdamW: eps added before the bias "
                 "correction, decay after the update; run in torch's fused kernel) | torch: torch.optim.AdamW (fused, "
                 "eps and decay placed as torch does)",
    "weight_decay": "AdamW decoupled weight decay", "lr_mult": "learning-rate multiplier of the task heads",
    "end_lr": "final learning rate", "schedule": "linear or cosine decay after warmup",
    "max_steps": "optimizer steps (none: use max_epochs)", "max_epochs": "epochs when max_steps is none",
    "warmup_steps": "warmup: an int is steps (at most max_steps), a float a fraction of max_steps",
    "grad_clip": "clip the global gradient norm (none: off)", "precision": "auto, bf16, fp16 (GradScaler) or fp32",
    "activation_checkpointing": "recompute each block in the backward", "compile": "torch.compile the model",
    "fsdp": "FSDP2 instead of DDP under torchrun", "gather_with_grad": "ITC gathers with gradient (official: off)",
    "out_dir": "checkpoints, logs and the synthetic data go here (several nodes: a folder every node shares)",
    "save_every": "steps between checkpoints",
    "keep_last": "newest checkpoints kept (0: all)", "resume": "auto (newest in out_dir), none, or a checkpoint path",
    "log_every": "steps between log lines (losses and accuracies: means over those steps)",
    "eval_every": "steps between evaluations (0: at the end)",
    "eval_batches": "val batches per periodic evaluation (0: the whole val split, whose evaluations choose "
                    "checkpoints/best.pt)",
    "final_eval": "evaluate on the whole val split at the end (retrieval: the test split too when its files exist)",
    "tensorboard": "write TensorBoard logs when available",
    "seed": "random seed",
    "deterministic": "bit-identical reruns on the same hardware and software: PyTorch's deterministic mode for the "
                     "run (torch.use_deterministic_algorithms, warning about any op without a deterministic "
                     "implementation), cuBLAS's fixed workspace, vlmo_fast's kernels at fixed tile configurations; "
                     "costs some speed",
    "max_bad_steps": "consecutive non-finite losses before stopping",
    "data_timeout": "seconds a training batch may take from the data workers (--num-workers > 0) before the run stops "
                    "with an error naming the stall, e.g. a read hung on a network file system (0: no limit)",
    "device": "auto, cpu, cuda or cuda:N",
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that prints (help, usage, errors) once per machine under torchrun: the processes other than
    each node's first (LOCAL_RANK > 0) parse the same arguments and exit alike, silently. Each node's first still
    prints, since an error about a node's own files may be that node's alone."""

    def _print_message(self, message, file=None):
        if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
            super()._print_message(message, file)


class HelpFormatter(argparse.HelpFormatter):
    """Appends an option's default to its help, except where that says nothing: a None default, or a help text
    that already explains the default in words (ArgumentDefaultsHelpFormatter printed "(default: None)" after
    "(default: the preset's)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is None or action.default is argparse.SUPPRESS \
                or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def presets_for(task: Optional[str]) -> List[str]:
    """The presets of ``vlmo-fast finetune <task>``, or (None) those of ``vlmo-fast pretrain``."""
    if task is None:
        return sorted(n for n, p in PRESETS_TRAIN.items() if not set(p["tasks"]) & set(FINETUNE_TASKS))
    return sorted(n for n, p in PRESETS_TRAIN.items() if p["tasks"] == [task])


def _preset_command(name: str) -> str:
    tasks = PRESETS_TRAIN[name]["tasks"]
    return f"vlmo-fast finetune {tasks[0]}" if tasks[0] in FINETUNE_TASKS else "vlmo-fast pretrain"


def check_preset(name: object, allowed: Sequence[str]) -> str:
    """``name`` if it is one of ``allowed``; else a ValueError saying which command takes it."""
    if isinstance(name, str) and name in allowed:
        return name
    if isinstance(name, str) and name in PRESETS_TRAIN:
        raise ValueError(f"preset {name} is a recipe for `{_preset_command(name)}`; this command takes "
                         f"{', '.join(allowed)}")
    raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(allowed)}")


def _preset_type(allowed: Sequence[str]) -> Callable[[str], str]:
    def preset(text: str) -> str:
        try:
            return check_preset(text, allowed)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return preset


def _shown(value: Any) -> str:
    if value is None:
        return "none"  # as the options spell it
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(value) if isinstance(value, list) else str(value)


def build_parser(prog: str, description: str, defaults: Optional[Mapping[str, Any]] = None,
                 presets: Optional[Sequence[str]] = None,
                 argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The options of TrainConfig. ``defaults``: the command's own defaults (e.g. a fine-tuning task's), shown in
    the help as the values the run will use, with those of a --preset in ``argv`` (the command line to parse) over
    them; ``presets``: the --preset names this command takes (default: all)."""
    allowed = sorted(PRESETS_TRAIN) if presets is None else list(presets)
    preset = _preset_named(argv or (), allowed)
    if preset is not None:
        defaults = {**(defaults or {}), **PRESETS_TRAIN[preset]}
    p = Parser(prog=prog, description=description, formatter_class=HelpFormatter,
               epilog="Boolean options take true/false, yes/no, on/off or 1/0; a bare flag means "
                      "true. Precedence: defaults < --preset < --config < the other options.")
    p.add_argument("--preset", type=_preset_type(allowed), default=None, metavar="NAME",
                   help=f"an official named config (spec §6.2) as the starting point: {', '.join(allowed)}")
    p.add_argument("--config", default=None, help="a TOML file with options (top level or a [train] table; "
                                                  "preset = \"NAME\" picks a preset there)")
    shown = {**TrainConfig().to_dict(), **(defaults or {})}
    for f in dataclasses.fields(TrainConfig):
        default = shown[f.name]
        flag = "--" + f.name.replace("_", "-")
        extra: Dict[str, Any] = {}
        if f.name in ("tasks", "datasets"):
            kind = _names
        elif f.name == "warmup_steps":
            kind = parse_warmup
        elif f.name == "augment" or isinstance(default, bool):
            kind = _optional(parse_bool, "true/false") if f.name == "augment" else parse_bool
            extra = dict(nargs="?", const=True, metavar="BOOL")
        elif f.name in ("image_size", "max_text_len", "max_steps", "max_epochs", "vqa_label_size"):
            kind = _optional(int, "an int")
        elif f.name in ("grad_clip", "drop_path_rate"):
            kind = _optional(float, "a number")
        elif f.name in ("load_path", "data_root"):
            kind = _optional(str, "a path")
        elif isinstance(default, float):
            kind = float
        elif isinstance(default, int):
            kind = int
        else:
            kind = str
        text = HELP.get(f.name, "")
        if default is None and f.name in ("image_size", "max_text_len"):
            arch = shown["arch"]
            text += (f" (default: the --arch preset's, {getattr(model_preset(arch), f.name)} for {arch})"
                     if arch in PRESETS else " (default: the --arch preset's)")
        elif default is not None and "default" not in text:
            text += f" (default: {_shown(default)})"
        elif preset is not None and f.name in PRESETS_TRAIN[preset]:  # the text gives the general default
            text += f" (--preset {preset}: {_shown(default)})"
        p.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=text, **extra)
    return p


def _preset_named(argv: Sequence[str], allowed: Sequence[str]) -> Optional[str]:
    """The --preset a command line names (the last, as argparse reads it), when it is one of ``allowed``."""
    name = None
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if len(flag) < len("--pres") or not "--preset".startswith(flag):  # (argparse takes --pres, --prese: unique)
            continue
        if eq:
            name = value
        elif i + 1 < len(argv):
            name = argv[i + 1]
    return name if name in allowed else None


def config_from_args(args: argparse.Namespace, base: Optional[Mapping[str, Any]] = None,
                     presets: Optional[Sequence[str]] = None) -> TrainConfig:
    """defaults < ``base`` (e.g. a task's defaults) < --preset (or ``preset`` in the file) < --config < flags.
    ``presets``: those this command takes (a file's ``preset`` is checked against them; --preset by argparse)."""
    values: Dict[str, Any] = dict(base or {})
    from_file = dict(load_toml(args.config)) if args.config else {}
    name = from_file.pop("preset", None)
    if name is not None and not args.preset:  # --preset on the command line replaces the file's
        try:
            check_preset(name, sorted(PRESETS_TRAIN) if presets is None else presets)
        except ValueError as exc:
            raise ValueError(f"{args.config}: {exc}") from None
    name = args.preset or name
    if name:
        values.update(PRESETS_TRAIN[name])
    values.update(from_file)
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return TrainConfig.from_dict(values)


def check_device_name(device: object) -> None:
    """auto, cpu, cuda or cuda:N."""
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def resolve_device(device: str):
    """The ``torch.device`` a (checked) device name means: auto is cuda when available, else cpu."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def check_backend_device(backend: str, device: str) -> None:
    """An explicit --backend that cannot run on the run's device fails at start, not at the first forward (auto and
    torch run anywhere)."""
    if backend not in ("triton", "cuda"):
        return
    dev = resolve_device(device)
    if backend == "triton":
        from ..ops.triton_attention import triton_unsupported_on

        why = triton_unsupported_on(dev.type)  # (no tensor: that would open a CUDA context on GPU 0 in every rank)
    else:
        from ..ops.native import _native_missing

        why = _native_missing(dev)
    if why is not None:
        raise ValueError(f"--backend {backend} cannot run on device {dev}: {why} (auto picks what runs)")


def check_device(device: str) -> None:
    """A well-formed device name, and no CUDA device this machine lacks, before any work: torch fails later, deep
    inside (an AttributeError on a CPU-only build). Made by the commands, not by TrainConfig: a config read back
    from a checkpoint may name a device of the machine that wrote it."""
    check_device_name(device)
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# what each fine-tuning task reads: the official task datasets (spec §6); their arrow files hold no caption column
# that another objective could read as one (vqa's text is the question, nlvr2's samples are image pairs)
_TASK_DATASETS = {"vqa": "vqa", "nlvr2": "nlvr2"}


def check_data_choice(cfg: TrainConfig) -> None:
    """What the datasets allow: vqa trains on the vqa dataset only, nlvr2 on nlvr2 only, and the other tasks on
    caption data (not those two): a mismatch failed at the first step with a KeyError, or (retrieval on VQA
    questions) trained silently. Tar shards have no length known in advance, so no epoch-based run (it trained 0
    steps and reported success)."""
    from .data_setup import _is_shards

    tasks, datasets = cfg.tasks, cfg.datasets
    if cfg.max_steps is None and any(_is_shards(d) for d in datasets):
        raise ValueError("max_epochs: tar shards have no length known in advance; give --max-steps")
    for task, own in _TASK_DATASETS.items():
        if task in tasks and list(datasets) != [own]:
            raise ValueError(f"datasets: task {task} trains on the {own} dataset only, got {','.join(datasets)}")
    others = [t for t in tasks if t not in _TASK_DATASETS]
    wrong = [d for d in datasets if d in _TASK_DATASETS.values()]
    if others and wrong:
        raise ValueError(f"datasets: {','.join(wrong)} is task data (for the {','.join(wrong)} task), not captions "
                         f"for {','.join(others)}")


def check_environment(cfg: TrainConfig) -> None:
    """What the commands check before any work, beyond the values themselves: the device, the input files, and
    whether the built-in synthetic set (used when data_root is unset) has the data asked for. It has coco-style
    images and captions only; without this a run first writes it and then fails on a missing arrow file."""
    from .data_setup import _is_shards

    check_data_choice(cfg)
    check_device(cfg.device)
    check_backend_device(cfg.backend, cfg.device)
    if not cfg.out_dir:
        raise ValueError("--out-dir must name a folder, got an empty string")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out-dir: {cfg.out_dir} exists and is not a folder")
    if cfg.data_root is None:
        need = [t for t in cfg.tasks if t in ("vqa", "nlvr2")]
        need += [d for d in cfg.datasets if not _is_shards(d) and d not in SYNTHETIC_DATASETS]
        if need:
            raise ValueError(f"--data-root is required for {', '.join(dict.fromkeys(need))} (the built-in synthetic "
                             f"set has images and captions only)")
    elif not os.path.isdir(cfg.data_root):
        raise FileNotFoundError(f"--data-root: no such folder: {cfg.data_root}")
    # (a torchrun restart resumes the job's newest checkpoint: PATH may be gone, e.g. deleted by --keep-last)
    resume = None if cfg.resume in ("auto", "none", "") or elastic_restarts() else cfg.resume
    for flag, path in (("--load-path", cfg.load_path), ("--resume", resume)):
        if path is None or os.path.isfile(path):
            continue
        if os.path.isdir(path):
            raise ValueError(f"{flag}: {path} is a folder; expected a checkpoint file")
        raise FileNotFoundError(f"{flag}: no such {'file' if flag == '--load-path' else 'checkpoint'}: {path}")


_INPUT_ERROR = "vlmo_fast_input_error"


@contextlib.contextmanager
def input_stage():
    """Where a run reads its inputs (data files, checkpoints, sizes): a ValueError (CheckpointError included) or
    FileNotFoundError raised inside is marked as the inputs' fault, for ``user_errors(..., marked_only=True)``. Its
    type is unchanged for API callers."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:
        raise input_error(exc)


def input_error(exc: Exception) -> Exception:
    """``exc`` marked as the inputs' fault, as ``input_stage`` marks what is raised inside it: for an error about the
    data found once the run is under way (a whole epoch without a readable sample)."""
    setattr(exc, _INPUT_ERROR, True)
    return exc


@contextlib.contextmanager
def one_line_warnings():
    """Warnings of a command print as one line, ``<Category>: message``, not with the file, line number and source
    line of the code that raised them (which tell a command-line user nothing)."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_args, **_kw: f"{category.__name__}: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous


@contextlib.contextmanager
def one_line_interrupt(prog: str):
    """Ctrl-C outside the training loop's own handling (which saves and exits 130): one line instead of a traceback
    of wherever the command was (an evaluation's forward, a file read). The KeyboardInterrupt goes on, with the
    traceback hook told to print nothing for it, so that Python still ends the process by SIGINT once its exit
    handlers ran: a shell script (a loop over ``vlmo-fast prepare`` runs) stops at Ctrl-C only when its command died
    by SIGINT, not when it exited 130."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if getattr(exc, "_vlmo_reported", False):  # (by a command inside this one: vlmo-fast pretrain)
            raise
        exc._vlmo_reported = True
        sys.stderr.write(f"{prog}: interrupted\n")
        previous = sys.excepthook
        if not getattr(previous, "_vlmo_quiet_interrupt", False):  # (once: a caller may catch it and go on)

            def quiet_interrupt(kind, value, tb):
                if not issubclass(kind, KeyboardInterrupt):
                    previous(kind, value, tb)
            quiet_interrupt._vlmo_quiet_interrupt = True
            sys.excepthook = quiet_interrupt
        raise


@contextlib.contextmanager
def user_errors(parser: argparse.ArgumentParser, marked_only: bool = False):
    """A configuration error (ValueError, FileNotFoundError, CheckpointError) raised inside is the user's input, not
    a bug: it ends the command as argparse's own errors do, one line ``<prog>: error: ...`` and exit status 2,
    instead of a traceback. ``marked_only``: only errors raised inside an ``input_stage`` (around a whole run, whose
    later errors keep their traceback)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:
        if marked_only and not getattr(exc, _INPUT_ERROR, False):
            raise
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def command_config(parser: argparse.ArgumentParser, argv: Sequence[str], base: Optional[Mapping[str, Any]] = None,
                   presets: Optional[Sequence[str]] = None,
                   check: Optional[Callable[[TrainConfig, argparse.Namespace], None]] = None) -> TrainConfig:
    """A command's config from ``argv``, checked; configuration errors end in one line (``user_errors``). Errors
    during training are not caught here."""
    args = parser.parse_args(list(argv))
    with user_errors(parser):
        cfg = config_from_args(args, base, presets)
        if check is not None:
            check(cfg, args)
        check_environment(cfg)
    return cfg
