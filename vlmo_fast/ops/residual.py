"""The LayerScale residual of a block half: ``x + DropPath(γ · y)`` (spec §3.2), per-sample DropPath with 1/keep
rescaling drawn like timm's (one ``torch.rand((B, 1, 1))`` per call)."""

from __future__ import annotations

from typing import Optional

import torch

from . import backend as _backend
from ._checks import FLOAT_DTYPES, check_drop_prob, check_shape, check_tensor
from .droppath import drop_path_checked as _drop_path


def scaled_residual(
    x: torch.Tensor,
    y: torch.Tensor,
    gamma: Optional[torch.Tensor] = None,
    *,
    drop_path: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """x + DropPath(gamma * y).

    Args:
        x: (B, N, D) residual stream.
        y: (B, N, D) branch output (e.g. the attention projection), any float dtype.
        gamma: (D,) LayerScale, or None (no layer scale: base_plus).
        drop_path: DropPath probability, applied per sample when ``training``.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("y", y, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape("y", y, tuple(x.shape), "the shape of x")
    if gamma is not None:
        check_tensor("gamma", gamma, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("gamma", gamma, (x.shape[-1],))
    return residual_checked(x, y, gamma, check_drop_prob("drop_path", drop_path), bool(training), backend)


def residual_checked(x, y, gamma, drop_path: float, training: bool, backend: str) -> torch.Tensor:
    """Dispatch on validated arguments (the model calls this directly)."""
    impl = _backend.select("scaled_residual", backend, x, y, gamma, drop_path, training)
    if impl is not None:
        return impl(x, y, gamma, drop_path, training)
    if gamma is not None:
        y = gamma * y
    return x + _drop_path(y, drop_path, training)
