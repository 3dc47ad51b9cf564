"""Attention with VLMo's learnable relative-position bias and a key padding mask (spec §4).

    out[b, h] = softmax(scale · q[b, h] k[b, h]ᵀ + bias[h] + mask[b]) v[b, h]

This module holds the public entry point, its argument checks and the PyTorch path. Kernel backends (the Triton
flash-style kernel) register through ``vlmo_fast.ops.backend``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backend as _backend
from ._checks import FLOAT_DTYPES, check_scale, check_tensor
from ._memo import func_transforms_active
from .softmax import check_bias_args, softmax_checked


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    bias_table: Optional[torch.Tensor],
    bias_index: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    softmax_backend: str = "auto",
) -> torch.Tensor:
    """Unfused attention: matmul, fused scale/bias/mask softmax, matmul.

    As in the official code, q is scaled before the product, and the product is ``q.float() @ k.float()ᵀ``: under
    autocast it still runs in the autocast dtype (spec §4 "AMP detail", Q7), so the upcast is made only outside
    autocast, where fp16/bf16 inputs (a model held in half precision) get fp32 logits as officially. The bias add and
    the softmax are fp32; P is cast to v's dtype for the second product.
    """
    q = q * scale
    if q.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(q.device.type):
        q, k = q.float(), k.float()
    scores = torch.matmul(q, k.transpose(-1, -2))
    # The product is ours, so the softmax may work in place on it (autograd keeps q and k, not the product).
    p = softmax_checked(scores, 1.0, bias, bias_table, bias_index, keep, v.dtype, softmax_backend, inplace=True)
    return torch.matmul(p, v)  # rows with no key have p == 0, hence zeros


def unpack_qkv(packed: torch.Tensor):
    """q, k, v (or their gradients) as (B, H, N, D) views of a packed (B, N, 3, H, D) tensor: the qkv projection's
    layout, which the Triton attention backward also writes its gradients in."""
    return tuple(packed[:, :, i].permute(0, 2, 1, 3) for i in range(3))


class _SplitQKV(torch.autograd.Function):
    """(B, N, 3·H·D) packed projection -> q, k, v as (B, H, N, D) views of it; see split_qkv."""

    @staticmethod
    def forward(ctx, qkv, heads):
        b, n, c3 = qkv.shape
        ctx.shape = qkv.shape
        return unpack_qkv(qkv.view(b, n, 3, heads, c3 // (3 * heads)))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        packed = _packed_view(ctx.shape, dq, dk, dv)
        if packed is None:  # one copy into the packed layout
            packed = torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2).reshape(ctx.shape)
        return packed, None


def _packed_view(shape, dq, dk, dv) -> Optional[torch.Tensor]:
    """The (B, N, 3·H·D) gradient that dq, dk, dv already are, when they are the three views of one packed
    (B, N, 3, H, D) tensor (as the Triton attention backward writes them), else None."""
    if torch.compiler.is_compiling():  # no storage to look at in a trace
        return None
    b, n, c3 = shape
    step = c3 // 3
    strides = (n * c3, dq.shape[-1], c3, 1)
    if any(g.stride() != strides or g.dtype != dq.dtype or g.device != dq.device for g in (dq, dk, dv)):
        return None
    if not dq.untyped_storage().data_ptr() == dk.untyped_storage().data_ptr() == dv.untyped_storage().data_ptr():
        return None
    start = dq.storage_offset()
    if (dk.storage_offset(), dv.storage_offset()) != (start + step, start + 2 * step):
        return None
    return dq.as_strided(shape, (n * c3, c3, 1), start)


def split_qkv(qkv: torch.Tensor, heads: int):
    """q, k, v (B, H, N, D) as views of the packed qkv projection (B, N, 3·H·D), rows ordered [q; k; v] by head.

    Autograd's own split (reshape, permute, unbind) stacks the three gradients and copies them into the packed
    layout: two copies of the projection's gradient per layer. Here the backward takes them as they are when they
    already lie packed, as the Triton attention's backward writes them, and copies once otherwise. Under torch.func
    transforms (vmap, grad, ...), which the Function has no rule for, and where no gradient is taken (the Function's
    Python would cost for nothing), the plain views."""
    if func_transforms_active() or not (qkv.requires_grad and torch.is_grad_enabled()):
        b, n, c3 = qkv.shape
        return unpack_qkv(qkv.view(b, n, 3, heads, c3 // (3 * heads)))
    return _SplitQKV.apply(qkv, heads)


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias_table: Optional[torch.Tensor] = None,
    bias_index: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head attention with an optional relative-position bias and key padding mask.

    Args:
        q, k, v: (B, H, N, D) in fp32, fp16 or bf16 (fp64 on the PyTorch path); same dtype and device.
        bias_table: (R, H) bias table; may be a strided column slice of the official (R, H·L) table, so layer l
            passes ``table[:, l*H:(l+1)*H]`` without a copy. Requires ``bias_index``.
        bias_index: (N, N) integer index into the rows of ``bias_table``: ``bias[h, i, j] = bias_table[bias_index[i, j], h]``.
        bias: dense (H, N, N) bias broadcast over the batch (the form official VLMo code passes), instead of the table.
        key_padding_mask: (B, N) bool or integer, True/1 = keep. A batch row whose keys are all masked gives zeros.
            Mask keys here, not with -inf in the bias: a query row whose biases are all -inf gives zeros in the
            kernels but NaN on the PyTorch path, as in the official math.
        scale: softmax scale; default ``D ** -0.5``.
        backend: "auto" | "torch" | "triton" | "cuda".
    Returns:
        (B, H, N, D) in the dtype of v; under autocast in the autocast dtype, where both products run, as in the
        official math.

    Gradients flow to q, k, v, the dense bias, and the table (summed over the batch and scattered into its rows).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    b, h, n, d = q.shape
    if d == 0:
        raise ValueError("q, k, v: head dimension D must be at least 1")
    bias, bias_table, bias_index, keep = check_bias_args(
        b, h, n, n, q.device, bias, bias_table, bias_index, key_padding_mask
    )
    scale = d**-0.5 if scale is None else check_scale(scale)
    impl = _backend.select("attention", backend, q, k, v, bias, bias_table, bias_index, keep)
    if impl is not None:
        return impl(q, k, v, scale, bias, bias_table, bias_index, keep)
    return attention_torch(q, k, v, scale, bias, bias_table, bias_index, keep, backend)
