"""Scale + relative-position bias + key-padding mask + softmax: the middle of the unfused attention path.

    p[b, h, i, :] = softmax_j(scale · s[b, h, i, j] + bias[h, i, j] + (0 if keep[b, j] else -inf))

computed in float32 whatever the input dtype (spec §4: the official bias add and softmax run in fp32). A row whose
keys are all masked gives zeros, not NaN.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backend as _backend
from ._checks import FLOAT_DTYPES, check_bias_index, check_scale, check_shape, check_tensor, key_padding_keep
from ._memo import TensorMemo, tracing
from .relpos_gather import gather_bias


def check_bias_args(
    batch: int,
    heads: int,
    n_q: int,
    n_k: int,
    device: torch.device,
    bias: Optional[torch.Tensor],
    bias_table: Optional[torch.Tensor],
    bias_index: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Validate the bias forms and the key padding mask shared by softmax and attention."""
    if bias is not None and (bias_table is not None or bias_index is not None):
        raise ValueError("give either bias (dense) or bias_table + bias_index (gathered), not both")
    if (bias_table is None) != (bias_index is None):
        raise ValueError("bias_table and bias_index must be given together")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, device=device)
        if bias.dim() == 4 and bias.shape[0] == 1:
            bias = bias[0]
        check_shape("bias", bias, (heads, n_q, n_k), "(H, N, N), broadcast over the batch")
    if bias_table is not None:
        if n_q != n_k:
            raise ValueError(f"bias_table/bias_index need square attention, got {n_q} queries and {n_k} keys")
        check_tensor("bias_table", bias_table, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        if bias_table.shape[1] != heads:
            raise ValueError(
                f"bias_table must have shape (R, H={heads}) (a column slice of the (R, H*L) table), "
                f"got {tuple(bias_table.shape)}"
            )
        check_bias_index(bias_index, bias_table.shape[0], n_q, device)
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_keep(key_padding_mask, batch, n_k, device)
    return bias, bias_table, bias_index, keep


def softmax_torch(
    scores: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    inplace: bool = False,
) -> torch.Tensor:
    """The reference math with fewer passes: in-place where the caller owns ``scores`` (it is not needed by autograd)."""
    s = scores
    if scale != 1.0:
        s = s.mul_(scale) if inplace else s * scale
        inplace = True
    if bias is not None:
        if inplace and s.dtype == torch.promote_types(s.dtype, bias.dtype):
            s = s.add_(bias)
        else:
            s = s + bias
            inplace = True
    dead = None
    if keep is not None:
        hide, dead = _mask_parts(keep)
        s = s.masked_fill_(hide, float("-inf")) if inplace else s.masked_fill(hide, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32))
    if dead is not None:  # batch rows with no key at all give zeros
        p = p.masked_fill(dead[:, None, None, None], 0.0)
    return p.to(out_dtype)


_MASK_PARTS = TensorMemo()


def _mask_parts(keep: torch.Tensor):
    """(keys to hide as (B, 1, 1, N), batch rows without any key as (B,) or None) for a (B, N) keep mask.

    Every layer of a forward pass sees the same mask, so the parts are computed once per mask tensor (remembered by
    identity and version, like the checked indices). ``dead`` is None when no row is fully masked, which spares a
    pass over the probabilities; deciding that reads the values, so on GPU (where it would be a sync) the rows are
    always zeroed instead."""
    return _MASK_PARTS.get(keep, (), lambda: _compute_mask_parts(keep))


def _compute_mask_parts(keep: torch.Tensor):
    dead = ~keep.any(dim=1)
    hide = ~(keep | dead[:, None])[:, None, None, :]
    if keep.device.type == "cpu" and not tracing() and not bool(dead.any()):
        dead = None
    return hide, dead


def masked_softmax(
    scores: torch.Tensor,
    *,
    scale: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    bias_table: Optional[torch.Tensor] = None,
    bias_index: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused scale + bias + key mask + softmax over the last dimension, float32 math.

    Args:
        scores: (B, H, Nq, Nk) attention logits, fp32/fp16/bf16 (fp64 on the PyTorch path).
        scale: multiplies ``scores`` before the bias is added.
        bias: dense (H, Nq, Nk) bias broadcast over the batch, or
        bias_table, bias_index: (R, H) table (may be a strided column slice) and (N, N) integer index;
            ``bias[h, i, j] = bias_table[bias_index[i, j], h]``.
        key_padding_mask: (B, Nk) bool/int, True/1 = keep. Rows with every key masked come out as zeros. (Mask
            keys here, not with -inf in the bias: an all -inf bias row gives zeros in the kernels but NaN on the
            PyTorch path, as in the official math.)
        out_dtype: dtype of the probabilities (default: ``scores.dtype``).
        backend: "auto" | "torch" | "triton" | "cuda" (see ``vlmo_fast.ops.backend``).
    Returns:
        (B, H, Nq, Nk) probabilities.
    """
    check_tensor("scores", scores, ndim=4, dtypes=FLOAT_DTYPES)
    b, h, nq, nk = scores.shape
    bias, bias_table, bias_index, keep = check_bias_args(
        b, h, nq, nk, scores.device, bias, bias_table, bias_index, key_padding_mask
    )
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating-point torch.dtype (or None: scores' dtype), got {out_dtype!r}")
    out_dtype = scores.dtype if out_dtype is None else out_dtype
    return softmax_checked(scores, check_scale(scale), bias, bias_table, bias_index, keep, out_dtype, backend)


def softmax_checked(
    scores: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    bias_table: Optional[torch.Tensor],
    bias_index: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    backend: str,
    inplace: bool = False,
) -> torch.Tensor:
    """Dispatch on validated arguments; ``inplace`` lets the PyTorch path reuse a ``scores`` the caller owns."""
    impl = _backend.select("masked_softmax", backend, scores, bias, bias_table, bias_index, keep, out_dtype)
    if impl is not None:
        return impl(scores, scale, bias, bias_table, bias_index, keep, out_dtype)
    if bias_table is not None:
        bias = gather_bias(bias_table, bias_index)
    return softmax_torch(scores, scale, bias, keep, out_dtype, inplace=inplace)
