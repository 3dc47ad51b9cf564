"""Training configuration: one dataclass, the official named configs as presets (spec §6.1, §6.2), TOML files, CLI.

Precedence: defaults < ``--preset`` < ``--config file.toml`` < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from ..config import LOSS_NAMES, PRESETS, dataclass_from_dict

_STEP200K = dict(max_steps=200000, warmup_steps=2500)


@dataclass
class TrainConfig:
    """Every option of ``vlmo-fast pretrain`` / ``finetune``. Field names follow the official config where it has one."""

    # model
    arch: str = "vlmo_tiny_patch16"  # a vlmo_fast preset: vlmo_base_patch16, vlmo_large_patch16, ...
    tasks: List[str] = field(default_factory=lambda: ["mlm", "itc", "itm"])
    image_size: Optional[int] = None  # default: the preset's (224 for the official models)
    max_text_len: Optional[int] = None  # default: the preset's (40; 196 for the text-only stage)
    drop_path_rate: Optional[float] = None  # None: 0.1 (official default) for real data, 0 for the synthetic set
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
    # batch and schedule
    batch_size: int = 32  # global batch; gradient accumulation makes up the difference (official batch_size)
    per_device_batch_size: int = 32  # official per_gpu_batchsize
    learning_rate: float = 2e-4  # the official base pretraining value
    optimizer: str = "official"  # official (the official AdamW update rule) | torch (torch.optim.AdamW, fused on CUDA)
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
    eval_batches: int = 8  # batches of the val split used by the periodic evaluation
    final_eval: bool = True  # evaluate on the whole val split at the end
    tensorboard: bool = True
    seed: int = 1
    max_bad_steps: int = 5  # consecutive non-finite losses tolerated; then save and stop
    device: str = "auto"

    def __post_init__(self) -> None:
        unknown = set(self.tasks) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"tasks: unknown {sorted(unknown)}; expected a subset of {list(LOSS_NAMES)}")
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
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
        for name in ("batch_size", "per_device_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        return dataclass_from_dict(cls, values, "unknown training option(s)")


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
        data = tomllib.load(f)
    return data.get("train", data)


def _parse_value(kind, text: str):
    if kind is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return lowered in ("true", "1", "yes")
    return kind(text)


def _warmup(text: str) -> Union[int, float]:
    return float(text) if any(c in text for c in ".eE") else int(text)


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    return parse


HELP = {
    "arch": "model preset", "tasks": "comma-separated objectives (mlm,itc,itm | textmlm | irtr | vqa | nlvr2)",
    "image_size": "image side in pixels (default: the preset's)", "max_text_len": "text length (default: preset's)",
    "drop_path_rate": "stochastic depth rate, also the BERT embedding dropout as official (none: 0.1, or 0 for the "
                      "built-in synthetic set, which a tiny model learns much faster without it)",
    "backend": "op implementations: auto, torch, triton, cuda",
    "model_impl": "vlmo_fast, or reference (the eager official math, to compare against)",
    "load_path": "official or vlmo_fast checkpoint to initialise from (resized/adapted as the official loader)",
    "data_root": "folder of official arrow files (default: a built-in synthetic dataset)",
    "datasets": "comma-separated dataset keys (coco,vg,sbu,gcc,f30k,wikibk,vqa,nlvr2) or webdataset tar globs",
    "augment": "official train augmentation (none: on for real data, off for the built-in synthetic set)",
    "whole_word_masking": "whole-word MLM masking (official) instead of per-token", "mlm_prob": "MLM probability",
    "num_workers": "DataLoader workers per process", "batch_size": "global batch (accumulation fills the gap)",
    "per_device_batch_size": "micro-batch per process", "learning_rate": "peak learning rate",
    "optimizer": "official: AdamW with the official update rule (transformers' AdamW: eps added before the bias "
                 "correction, decay after the update; multi-tensor ops) | torch: torch.optim.AdamW (fused on CUDA, "
                 "eps and decay placed as torch does)",
    "weight_decay": "AdamW decoupled weight decay", "lr_mult": "learning-rate multiplier of the task heads",
    "end_lr": "final learning rate", "schedule": "linear or cosine decay after warmup",
    "max_steps": "optimizer steps (none: use max_epochs)", "max_epochs": "epochs when max_steps is none",
    "warmup_steps": "warmup: an int is steps, a float a fraction of max_steps",
    "grad_clip": "clip the global gradient norm (none: off)", "precision": "auto, bf16, fp16 (GradScaler) or fp32",
    "activation_checkpointing": "recompute each block in the backward", "compile": "torch.compile the model",
    "fsdp": "FSDP2 instead of DDP under torchrun", "gather_with_grad": "ITC gathers with gradient (official: off)",
    "out_dir": "checkpoints, logs and the synthetic data go here", "save_every": "steps between checkpoints",
    "keep_last": "checkpoints kept", "resume": "auto (newest in out_dir), none, or a checkpoint path",
    "log_every": "steps between log lines (losses and accuracies: means over those steps)",
    "eval_every": "steps between evaluations (0: at the end)",
    "eval_batches": "val batches per periodic evaluation", "final_eval": "evaluate on the whole val split at the end", "tensorboard": "write TensorBoard logs when available",
    "seed": "random seed", "max_bad_steps": "consecutive non-finite losses before stopping",
    "device": "auto, cpu or cuda",
}


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS_TRAIN), default=None,
                   help="an official named config (spec §6.2) as the starting point")
    p.add_argument("--config", default=None, help="a TOML file with options (top level or a [train] table)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("tasks", "datasets"):
            kind = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
        elif f.name == "warmup_steps":
            kind = _warmup
        elif isinstance(default, bool):
            kind = lambda s: _parse_value(bool, s)  # noqa: E731
        elif f.name in ("image_size", "max_text_len", "max_steps", "max_epochs"):
            kind = _optional(int)
        elif f.name in ("grad_clip", "drop_path_rate"):
            kind = _optional(float)
        elif f.name in ("load_path", "data_root"):
            kind = _optional(str)
        elif f.name == "augment":
            kind = _optional(lambda t: _parse_value(bool, t))
        elif isinstance(default, float):
            kind = float
        elif isinstance(default, int):
            kind = int
        else:
            kind = str
        shown = ",".join(default) if isinstance(default, list) else default
        p.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                       help=f"{HELP.get(f.name, '')} (default: {shown})")
    return p


def config_from_args(args: argparse.Namespace, base: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """defaults < ``base`` (e.g. a task's defaults) < --preset < --config < flags."""
    values: Dict[str, Any] = dict(base or {})
    if args.preset:
        values.update(PRESETS_TRAIN[args.preset])
    if args.config:
        values.update(load_toml(args.config))
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return TrainConfig.from_dict(values)
