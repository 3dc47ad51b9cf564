"""Per-sample stochastic depth with 1/keep rescaling, drawing random numbers exactly like timm's DropPath.

The same draw order and arithmetic as the official model (one ``torch.rand((B, 1, ..., 1))`` per call, in the dtype
of x) makes a run with the fast backend and one with the reference follow the same random stream.
"""

from __future__ import annotations

from typing import Optional

import torch


def drop_path_scale(x: torch.Tensor, drop_prob: float, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The (B, 1, ..., 1) 0/1 keep mask of one DropPath call on x (consumes the random stream like timm), drawn in
    x's dtype or ``dtype``: the dtype of the tensor the official DropPath gets, when that is not x."""
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return (keep_prob + torch.rand(shape, dtype=dtype or x.dtype, device=x.device)).floor_()


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """x / keep_prob * mask per sample in training with drop_prob > 0; identity otherwise (eval is deterministic)."""
    if drop_prob == 0.0 or not training:
        return x
    return x.div(1.0 - drop_prob) * drop_path_scale(x, drop_prob)
