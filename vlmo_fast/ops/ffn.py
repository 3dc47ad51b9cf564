"""The Multiway FFN half of a block: ``x + DropPath(γ2 · fc2(GELU(fc1(LN_e(x)))))`` with expert e chosen per row.

Below the VL-FFN start a fused sequence routes its text rows (before ``split``) to the text expert and its image rows
to the image expert (spec §3.2); the top layers and unimodal calls use one expert for all rows. DropPath draws a
separate per-sample mask for each row block, text first (spec Q16).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from . import backend as _backend
from ._checks import FLOAT_DTYPES, check_drop_prob, check_eps, check_shape, check_tensor
from .droppath import drop_path_checked as _drop_path
from .layernorm import check_experts, layer_norm, segments
from .residual import residual_checked


class FFNExpert(NamedTuple):
    """One expert's pre-norm and MLP parameters: LayerNorm (D,), fc1 (4D, D) + (4D,), fc2 (D, 4D) + (D,)."""

    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor


def multiway_ffn(
    x: torch.Tensor,
    experts: Sequence[FFNExpert],
    *,
    split: Optional[int] = None,
    gamma: Optional[torch.Tensor] = None,
    drop_path: float = 0.0,
    training: bool = False,
    eps: float = 1e-6,
    attn_out: Optional[torch.Tensor] = None,
    attn_gamma: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Residual Multiway FFN.

    Args:
        x: (B, N, D) residual stream.
        experts: one or two ``FFNExpert``; with two, rows [0, split) use expert 0 (text), [split, N) expert 1 (image).
        gamma: (D,) LayerScale γ2, or None (base_plus: no layer scale).
        drop_path: DropPath probability, applied per sample when ``training``.
        attn_out: (B, N, D) or None. When given, the block's first residual is taken here too: the FFN's input is
            ``x + DropPath(attn_gamma · attn_out)`` (its DropPath drawn before the FFN's), which the kernel backend
            never stores: its kernels compute the rows they read from x and attn_out, the same way each time.
        attn_gamma: (D,) LayerScale γ1 of that residual, or None.
    Returns:
        (B, N, D), the new residual stream.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    d = x.shape[-1]
    if not experts or not all(isinstance(e, FFNExpert) for e in experts):
        raise TypeError("experts must be a non-empty sequence of FFNExpert")
    check_experts("experts.norm_weight", x, [e.norm_weight for e in experts], (d,), split, role="norm")
    check_experts("experts.norm_bias", x, [e.norm_bias for e in experts], (d,), split, role="norm")
    first = experts[0].fc1_weight
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        raise ValueError(f"experts[0].fc1_weight must be a 2-D (hidden, D={d}) tensor, got "
                         f"{tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__}")
    hidden = first.shape[0]
    check_experts("experts.fc1_weight", x, [e.fc1_weight for e in experts], (hidden, d), split, role="linear")
    check_experts("experts.fc1_bias", x, [e.fc1_bias for e in experts], (hidden,), split, role="linear")
    check_experts("experts.fc2_weight", x, [e.fc2_weight for e in experts], (d, hidden), split, role="linear")
    check_experts("experts.fc2_bias", x, [e.fc2_bias for e in experts], (d,), split, role="linear")
    if gamma is not None:
        check_experts("gamma", x, [gamma], (d,), None, single=True)
    if attn_out is not None:
        check_tensor("attn_out", attn_out, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("attn_out", attn_out, tuple(x.shape), "the shape of x")
    if attn_gamma is not None:
        if attn_out is None:
            raise ValueError("attn_gamma is given without attn_out")
        check_experts("attn_gamma", x, [attn_gamma], (d,), None, single=True)
    for name, t in (("attn_out", attn_out), ("attn_gamma", attn_gamma)):
        # the sum x + γ1·y1 would be promoted to the wider dtype, which the FFN's weights then do not match
        if t is not None and torch.promote_types(x.dtype, t.dtype) != x.dtype:
            raise TypeError(f"{name} must not be wider than x ({x.dtype}), got {t.dtype}")
    drop_path = check_drop_prob("drop_path", drop_path)
    return ffn_checked(x, experts, None if split is None else int(split), gamma, drop_path, bool(training),
                       check_eps(eps), backend, attn_out, attn_gamma)


def ffn_checked(x, experts, split, gamma, drop_path: float, training: bool, eps: float, backend: str,
                attn_out=None, attn_gamma=None):
    """Dispatch on validated arguments (the model calls this directly: its shapes are consistent by construction)."""
    impl = _backend.select("multiway_ffn", backend, x, experts, split, gamma, drop_path, training, attn_out,
                           attn_gamma)
    if impl is not None:
        return impl(x, tuple(experts), split, gamma, drop_path, training, eps, attn_out, attn_gamma)
    if attn_out is not None:
        x = residual_checked(x, attn_out, attn_gamma, drop_path, training, backend)
    return ffn_torch(x, experts, split, gamma, drop_path, training, eps)


def ffn_torch(x, experts, split, gamma, drop_prob, training, eps):
    parts = []
    for e, lo, hi in segments(x.shape[1], len(experts), split):
        xs = x if len(experts) == 1 else x[:, lo:hi]
        w = experts[e]
        h = layer_norm(xs, w.norm_weight, w.norm_bias, eps)
        h = F.linear(F.gelu(F.linear(h, w.fc1_weight, w.fc1_bias)), w.fc2_weight, w.fc2_bias)
        if gamma is not None:
            h = gamma * h
        parts.append(xs + _drop_path(h, drop_prob, training))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
