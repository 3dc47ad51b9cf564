"""Per-sample stochastic depth with 1/keep rescaling, drawing random numbers exactly like timm's DropPath.

The same draw order and arithmetic as the official model (one ``torch.rand((B, 1, ..., 1))`` per call, in the dtype
of x) makes a run with the fast backend and one with the reference follow the same random stream.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_drop_prob


def drop_path_scale(x: torch.Tensor, drop_prob: float, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The (B, 1, ..., 1) 0/1 keep mask of one DropPath call on x (consumes the random stream like timm), drawn in
    x's dtype or ``dtype``: the dtype of the tensor the official DropPath gets, when that is not x."""
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return (keep_prob + torch.rand(shape, dtype=dtype or x.dtype, device=x.device)).floor_()


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: each sample of x (the first dimension) zeroed with probability ``drop_prob`` in training and
    the kept ones divided by 1 - drop_prob; identity in eval (deterministic) or with drop_prob 0.

    Args:
        x: (B, ...) floating-point tensor, at least 1-D.
        drop_prob: in [0, 1]; 1 drops every sample (zeros, as timm's drop_path: no 0/0 rescaling).
        training: whether to drop.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating-point dtype, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must be at least 1-D (samples along the first dimension), got a 0-D tensor")
    return drop_path_checked(x, check_drop_prob("drop_prob", drop_prob, allow_one=True), bool(training))


def drop_path_checked(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """``drop_path`` on validated arguments (the ops that validated theirs call this)."""
    if drop_prob == 0.0 or not training:
        return x
    mask = drop_path_scale(x, drop_prob)  # drawn even at drop_prob 1: the random stream advances as in timm
    if drop_prob == 1.0:
        return x * mask
    return x.div(1.0 - drop_prob) * mask
