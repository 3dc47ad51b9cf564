"""The official optimizer setup (spec §6.3, Q14) and the text-only stage's freezing (spec §5.1).

- AdamW, betas (0.9, 0.98), eps 1e-8, decoupled weight decay; fused on CUDA.
- Four groups by substring match on the parameter name: decay / no-decay, each for the body and for the heads
  (``vqa_classifier``, ``nlvr2_classifier``, at lr · lr_mult). "No decay" is any name containing one of
  ``NO_DECAY`` — so the relative-position table (its name contains "bias") and q_bias/v_bias get none, while
  ``norm2_text.weight`` (which does not contain "norm2.weight") does get decay, exactly as the official code.
- Linear warmup from 0, then linear (polynomial power 1) decay to ``end_lr`` at ``max_steps``; cosine as an option.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List

import torch
import torch.nn as nn

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias", "norm1.weight",
            "norm2.bias", "norm2.weight")
HEADS = ("vqa_classifier", "nlvr2_classifier")
# the text-only (language) stage trains only these (run.py of the official code)
TEXTMLM_TRAINABLE = ("text_embeddings", "token_type_embeddings", "mlp_text", "norm2_text", "mlm_score",
                     "relative_position_bias_table", "transformer.norm")


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_mult: float = 1.0) -> List[Dict]:
    """The official four parameter groups (empty groups are dropped)."""
    groups = {(decay, head): [] for decay in (True, False) for head in (False, True)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not any(nd in name for nd in NO_DECAY)
        head = any(h in name for h in HEADS)
        groups[(decay, head)].append(p)
    out = []
    for (decay, head), params in groups.items():
        if params:
            out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                        "lr": lr * (lr_mult if head else 1.0), "name": f"{'decay' if decay else 'no_decay'}"
                                                                        f"{'/head' if head else ''}"})
    return out


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01, lr_mult: float = 1.0,
                    betas=(0.9, 0.98), eps: float = 1e-8) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, lr_mult)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    device = groups[0]["params"][0].device
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str = "linear", end_factor: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based, as LambdaLR counts)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if step >= max_steps:
        return end_factor
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "linear":
        return (1.0 - end_factor) * (1.0 - progress) + end_factor
    raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, schedule: str = "linear",
                    end_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    base = optimizer.param_groups[0]["lr"]
    end_factor = end_lr / base if base else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, max_steps, schedule, end_factor))


def resolve_warmup(warmup, max_steps: int) -> int:
    """A float warmup is a fraction of max_steps (official: int(max_steps * warmup)); an int is a step count."""
    if isinstance(warmup, float):
        return int(max_steps * warmup)
    return int(warmup)


def freeze_for_textmlm(model: nn.Module) -> List[str]:
    """Freeze everything but the text parts, as the official language stage does; returns the trainable names."""
    trainable = []
    for name, p in model.named_parameters():
        keep = any(k in name for k in TEXTMLM_TRAINABLE)
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


def trainable_names(model: nn.Module) -> Iterable[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
