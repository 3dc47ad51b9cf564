"""A pre-norm projection: ``F.linear(LayerNorm(x), weight, bias)``, the attention half's ``qkv(norm1(x))`` (spec §3.2).

The official block keeps LayerNorm's output for the projection's weight gradient: an (B, N, D) activation per layer
(in the autocast dtype), next to x itself, which LayerNorm's own backward keeps. The kernel backend keeps only x
and recomputes the normalised rows in the backward with the same kernel (the same bits), for one extra read of x.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import backend as _backend
from ._checks import FLOAT_DTYPES, check_eps, check_tensor
from .layernorm import check_experts, layer_norm


def norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear(F.layer_norm(x, (D,), norm_weight, norm_bias, eps), weight, bias)``.

    Args:
        x: (B, N, D).
        norm_weight, norm_bias: (D,) LayerNorm affine parameters (x's dtype, or fp32 for a half-precision x).
        weight: (O, D); bias: (O,) or None (x's dtype outside autocast, as ``F.linear`` requires).
    Returns:
        (B, N, O) in the autocast dtype under autocast, else x's dtype.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    d = x.shape[-1]
    check_tensor("norm_weight", norm_weight, ndim=1)
    check_tensor("norm_bias", norm_bias, ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_experts("norm_weight", x, [norm_weight], (d,), None, role="norm", single=True)
    check_experts("norm_bias", x, [norm_bias], (d,), None, role="norm", single=True)
    check_experts("weight", x, [weight], (weight.shape[0], d), None, role="linear", single=True)
    check_experts("bias", x, [bias], (weight.shape[0],), None, role="linear", single=True)
    return norm_linear_checked(x, norm_weight, norm_bias, weight, bias, check_eps(eps), backend)


def norm_linear_checked(x, norm_weight, norm_bias, weight, bias, eps: float, backend: str) -> torch.Tensor:
    """Dispatch on validated arguments (the model calls this directly: its shapes are consistent by construction)."""
    impl = _backend.select("norm_linear", backend, x, norm_weight, norm_bias, weight, bias)
    if impl is not None:
        return impl(x, norm_weight, norm_bias, weight, bias, eps)
    return F.linear(layer_norm(x, norm_weight, norm_bias, eps), weight, bias)
