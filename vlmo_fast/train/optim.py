"""The official optimizer setup (spec §6.3, Q14) and the text-only stage's freezing (spec §5.1).

- AdamW, betas (0.9, 0.98), eps 1e-8, decoupled weight decay, with the update rule of the official optimizer
  (transformers' AdamW: ``OfficialAdamW``, run in torch's fused kernel); ``torch.optim.AdamW``'s rule as an option.
- Four groups by substring match on the parameter name: decay / no-decay, each for the body and for the heads
  (``vqa_classifier``, ``nlvr2_classifier``, at lr · lr_mult). "No decay" is any name containing one of
  ``NO_DECAY`` — so the relative-position table (its name contains "bias") and q_bias/v_bias get none, while
  ``norm2_text.weight`` (which does not contain "norm2.weight") does get decay, exactly as the official code.
- Linear warmup from 0, then linear (polynomial power 1) decay to ``end_lr`` at ``max_steps``; cosine (also down to
  ``end_lr``) as an option.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from .distributed import torch_older_than

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


class OfficialAdamW(torch.optim.Optimizer):
    """AdamW with the update rule of the official code's optimizer (transformers 4.8.1 ``AdamW``, spec §6.3), per
    parameter with a gradient at step t:

        m ← β1·m + (1 − β1)·g,    v ← β2·v + (1 − β2)·g²
        p ← p − lr·√(1 − β2ᵗ)/(1 − β1ᵗ) · m / (√v + ε)
        p ← p − lr·wd·p                      (decoupled decay of the updated weights)

    torch.optim.AdamW differs twice: it adds ε after the bias correction, √(v/(1 − β2ᵗ)) + ε, so the official ε is
    1/√(1 − β2ᵗ) times larger early on (7× at step 1 with β2 = 0.98), which matters for parameters with gradients
    near ε; and it decays the weights before the update. A parameter without a gradient is left alone (no decay), as
    both do.

    The update runs over the parameters of a group that share a device, dtype and step count, by default in torch's
    fused AdamW kernel (one launch per bucket on CUDA, a vectorised loop on CPU) with its hyperparameters rewritten so
    that it computes the official rule: with c = 1 − lr·wd and s = lr·√(1 − β2ᵗ)/(1 − β1ᵗ), torch's fused step
    ``p·(1 − lr'·wd') − lr'·m/(√(v/bc2') + ε)`` with bias corrections switched off (bc' = 1, a step count of 2³⁰) and
    lr' = c·s, wd' = lr·wd/lr', is ``c·(p − s·m/(√v + ε))``, the official update followed by the official decay.
    ``fused=False`` (or a device or dtype without the kernel) runs the same rule as ``torch._foreach_*`` ops.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 fused: Optional[bool] = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None (where available), True or False, got {fused!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.fused = fused
        self._no_bias_correction: Dict[torch.device, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
            buckets = defaultdict(lambda: ([], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("OfficialAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = int(state["step"]) + 1  # an int, as transformers keeps it (a tensor from torch's)
                # the update is elementwise: FSDP2's DTensors are updated through their local shards, which also
                # keeps the fused call out of DTensor dispatch (its scalar-tensor path leaks a DTensorSpec per
                # parameter per step in torch 2.10 and 2.11 (reported), pytorch#188174)
                tensors = [_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                # torch's fused kernel walks param, grad and state as flat arrays: contiguous ones only (all of a
                # model's parameters and their gradients are; anything else takes the foreach ops)
                flat = all(t.is_contiguous() for t in tensors)
                bucket = buckets[(tensors[0].device, p.dtype, p.grad.dtype, flat, state["step"])]
                for lst, t in zip(bucket, tensors):
                    lst.append(t)
            for (device, dtype, grad_dtype, flat, t), tensors in buckets.items():
                step_size = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                if self._use_fused(device, dtype, grad_dtype, flat, beta1, beta2, lr * wd):
                    self._fused_update(*tensors, device, beta1, beta2, eps, step_size, lr * wd)
                else:
                    _foreach_update(*tensors, beta1, beta2, eps, step_size, lr * wd)
        return loss

    def _use_fused(self, device: torch.device, dtype: torch.dtype, grad_dtype: torch.dtype, flat: bool, beta1: float,
                   beta2: float, decay: float) -> bool:
        if self.fused is False:
            return False
        # the kernel's own bias correction is switched off by a huge step count: 1 - β**(2**30) must be exactly 1
        # in float32, and the decay factor 1 - lr·wd must not be 0 (lr' = 0 would make wd' undefined)
        ok = (device.type in _FUSED_DEVICES and dtype in _FUSED_DTYPES and grad_dtype == dtype and flat
              and max(beta1, beta2) <= 1.0 - 1e-6 and decay != 1.0)
        if self.fused and not ok:
            raise RuntimeError(f"OfficialAdamW(fused=True): no fused kernel for {device.type} {dtype} with "
                               f"{grad_dtype} gradients (or a gradient "
                               f"laid out unlike its parameter, betas within 1e-6 of 1, or lr·wd = 1); use fused=None "
                               f"to fall back")
        return ok

    def _fused_update(self, ps, gs, ms, vs, device, beta1, beta2, eps, step_size, decay) -> None:
        steps = self._no_bias_correction.get(device)
        if steps is None:
            steps = self._no_bias_correction[device] = torch.full((), 2.0 ** 30, dtype=torch.float32, device=device)
        lr_eff = (1.0 - decay) * step_size
        wd_eff = decay / lr_eff if lr_eff != 0.0 else 0.0
        torch._fused_adamw_(ps, gs, ms, vs, [], [steps] * len(ps), lr=lr_eff, beta1=beta1, beta2=beta2,
                            weight_decay=wd_eff, eps=eps, amsgrad=False, maximize=False)


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:
    try:  # torch < 2.5
        from torch.distributed._tensor import DTensor as _DTensor
    except ImportError:  # torch without distributed support
        _DTensor = None


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place updates reach the DTensor), any other tensor itself."""
    return t.to_local() if _DTensor is not None and isinstance(t, _DTensor) else t


_FUSED_DEVICES = ("cuda", "cpu")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _foreach_update(ps, gs, ms, vs, beta1: float, beta2: float, eps: float, step_size: float, decay: float) -> None:
    """The official rule as multi-tensor ops (transformers 4.8.1 AdamW's order of operations)."""
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(ps, ms, denom, value=-step_size)
    if decay > 0.0:
        torch._foreach_add_(ps, ps, alpha=-decay)


OPTIMIZERS = ("official", "torch")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01, lr_mult: float = 1.0,
                    betas=(0.9, 0.98), eps: float = 1e-8, kind: str = "official") -> torch.optim.Optimizer:
    """The official parameter groups with ``kind`` "official" (OfficialAdamW: the official update rule) or "torch"
    (torch.optim.AdamW, ε and the decay placed as torch does). Both run torch's fused AdamW kernel where the device
    has it, except torch's own optimizer on FSDP2 DTensors before torch 2.13 (see below)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    groups = param_groups(model, lr, weight_decay, lr_mult)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if kind == "official":
        return OfficialAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    fused = groups[0]["params"][0].device.type in _FUSED_DEVICES
    if fused and _DTensor is not None and torch_older_than(2, 13) and any(
            isinstance(p, _DTensor) for g in groups for p in g["params"]):
        # torch's fused AdamW on DTensors leaks a DTensorSpec per parameter per step (pytorch#188174: reported for
        # 2.10 and 2.11; 2.13 was checked flat here, 2.12 was not checked)
        fused = False
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str = "linear", end_factor: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based, as LambdaLR counts)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if step >= max_steps:
        return end_factor
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "cosine":  # from 1 down to end_factor (the official cosine when end_factor = 0)
        return end_factor + (1.0 - end_factor) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "linear":
        return (1.0 - end_factor) * (1.0 - progress) + end_factor
    raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, schedule: str = "linear",
                    end_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    base = optimizer.param_groups[0]["lr"]
    end_factor = end_lr / base if base else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, max_steps, schedule, end_factor))


def configured_hyperparameters(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Each group's hyperparameters as this run configures them (taken before a checkpoint is loaded)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def reapply_configuration(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                          configured: List[Dict[str, Any]]) -> None:
    """After loading a checkpoint's optimizer and scheduler states: the run's own hyperparameters, at the restored
    step of the run's own schedule. torch's load_state_dict brings back the saved groups' values, so a run resumed
    with a larger --max-steps made its first update at the old schedule's lr (0 at its end), and another
    --learning-rate or --weight-decay was ignored. With unchanged options every value is the one restored."""
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    scheduler.base_lrs = [values["initial_lr"] for values in configured]
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


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
