"""Modality-split LayerNorm: rows before ``split`` use expert 0's weight and bias, rows from ``split`` on expert 1's.

In a fused (text, image) sequence below the VL-FFN start, the text rows are normalised with ``norm2_text`` and the
image rows with ``norm2_imag``, split at ``max_text_len`` (spec §3.2). With one expert it is a plain LayerNorm.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import backend as _backend
from ._checks import FLOAT_DTYPES, HALF_DTYPES, check_eps, check_shape, check_tensor


def check_experts(name: str, x: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]], shape, split: Optional[int],
                  role: str = "", single: bool = False):
    """Shared checks for per-expert parameter lists: 1 or 2 experts, ``split`` iff 2, same device; with ``role``
    "norm" the dtype is x's, or float32 for a half-precision x (torch's mixed LayerNorm), with "linear" it is x's
    outside autocast (``F.linear``'s rule). ``single``: one tensor, not a list (named without an index)."""
    if len(tensors) not in (1, 2):
        raise ValueError(f"{name} must list 1 or 2 experts, got {len(tensors)}")
    if len(tensors) == 2:
        if split is None:
            raise ValueError("split is required with two experts (the row where expert 1 starts)")
        if isinstance(split, bool) or not isinstance(split, numbers.Integral) or not 0 <= split <= x.shape[1]:
            raise ValueError(f"split must be an int in [0, N={x.shape[1]}], got {split!r}")
    elif split is not None:
        raise ValueError("split must be None with a single expert")
    for i, t in enumerate(tensors):
        if t is None:
            continue
        label = name if single else f"{name}[{i}]"
        check_tensor(label, t, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape(label, t, shape)
        if role == "norm" and t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in HALF_DTYPES):
            wider = " or torch.float32" if x.dtype in HALF_DTYPES else ""
            raise TypeError(f"{label} must have x's dtype ({x.dtype}){wider}, got {t.dtype}")
        if role == "linear" and t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{label} must have x's dtype ({x.dtype}) outside autocast, got {t.dtype}")


def segments(n: int, num_experts: int, split: Optional[int]):
    """(expert, start, stop) row ranges."""
    if num_experts == 1:
        return [(0, 0, n)]
    return [(0, 0, split), (1, split, n)]


def multiway_layernorm(
    x: torch.Tensor,
    weight: Sequence[torch.Tensor],
    bias: Sequence[torch.Tensor],
    *,
    split: Optional[int] = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm over the last dim of x (B, N, D) with a per-row-block expert.

    Args:
        x: (B, N, D).
        weight, bias: sequences of one or two (D,) tensors: expert 0 (text), expert 1 (image).
        split: with two experts, rows [0, split) use expert 0 and rows [split, N) expert 1.

    Returns x's dtype, except under CUDA autocast, where a half-precision x gives fp32 as nn.LayerNorm does.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    d = x.shape[-1]
    if len(weight) != len(bias):
        raise ValueError(f"weight and bias must list the same number of experts, got {len(weight)} and {len(bias)}")
    check_experts("weight", x, weight, (d,), split, role="norm")
    check_experts("bias", x, bias, (d,), split, role="norm")
    split, eps = (None if split is None else int(split)), check_eps(eps)
    if x.dtype in HALF_DTYPES and x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # CUDA autocast runs layer_norm in fp32 (nn.LayerNorm returns fp32 there; CPU autocast leaves it alone):
        # every backend normalises and returns fp32, as the PyTorch path's F.layer_norm does
        x = x.float()
    impl = _backend.select("multiway_layernorm", backend, x, weight, bias, split)
    if impl is not None:
        return impl(x, tuple(weight), tuple(bias), split, eps)
    return layernorm_torch(x, weight, bias, split, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """F.layer_norm over the last dim, on every device for every dtype mix the ops accept: a half-precision x with
    fp32 weights outside autocast is normalised in fp32 and rounded once to x's dtype (torch's CPU kernel takes that
    mix, computing in fp32; its CUDA kernel refuses it, as an H100 showed)."""
    if x.dtype in HALF_DTYPES and weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
        return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layernorm_torch(x, weight, bias, split, eps):
    parts = [layer_norm(x[:, lo:hi], weight[e], bias[e], eps) for e, lo, hi in segments(x.shape[1], len(weight), split)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
