"""Argument checks shared by the public ops: every error names the argument and what was expected."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from ._memo import TensorMemo, tracing

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """The official ``t.float()`` (logits, losses, attention scores in fp32), except that float64 stays float64: a
    float64 model, the tests' truth, would otherwise be rounded to fp32 there."""
    return t if t.dtype == torch.float64 else t.float()


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def check_scale(scale: object) -> float:
    """A finite real number (the logit scale), as a Python float."""
    real = isinstance(scale, numbers.Real) or (isinstance(scale, torch.Tensor) and scale.numel() == 1
                                               and not scale.is_complex())
    if isinstance(scale, bool) or not real:
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        raise TypeError("scale is a tensor that requires grad: the ops take it as a number and give it no gradient")
    value = float(scale)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def check_eps(eps: object) -> float:
    """LayerNorm's epsilon: a finite real number > 0, as a Python float."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    value = float(eps)
    if not 0.0 < value < float("inf"):
        raise ValueError(f"eps must be finite and > 0, got {value}")
    return value


def check_drop_prob(name: str, value: object, *, allow_one: bool = False) -> float:
    """A DropPath probability: a real number in [0, 1) (or [0, 1] with ``allow_one``), as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    p = float(value)
    if not (0.0 <= p <= 1.0 if allow_one else 0.0 <= p < 1.0):  # NaN fails both
        raise ValueError(f"{name} must be in [0, 1{']' if allow_one else ')'}, got {p}")
    return p


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


# bias indices that passed the range check (not run in a CUDA-graph capture: the kernels read checked copies made
# before it)
_CHECKED_INDEX = TensorMemo(256, per_stream=False, capture="skip")


def check_bias_index(
    index: torch.Tensor,
    num_rows: int,
    n: int,
    device: torch.device,
    values: bool = True,
    name: str = "bias_index",
    shape_note: str = "(N, N) for the sequence length of q",
) -> None:
    """An out-of-range bias index is an error here, never a wild read in a kernel.

    The range check needs the values (a device sync on GPU), so a tensor that passed is remembered (by identity,
    through a weak reference) with its version counter and the table size, and is not re-read until it is modified
    in place. Writes that bypass autograd's version counter (through ``.numpy()``, ``.data`` or DLPack views) are
    not seen: change an index through torch operations, or pass a new tensor. (The kernels never read the caller's
    tensor itself: they read int32 copies checked after copying, so such a write can make them stale, never out of
    range.) ``values=False``: type and shape only, for a caller that checks the copy it makes.
    """
    check_tensor(name, index, ndim=2, dtypes=INDEX_DTYPES, device=device)
    check_shape(name, index, (n, n), shape_note)
    # a value check would break a compiled graph (the kernels check their copies) and a meta tensor has no values
    if not values or tracing() or index.device.type == "meta":
        return
    table = "bias_table" if name == "bias_index" else "table"
    _CHECKED_INDEX.get(index, (num_rows,), lambda: check_index_range(index, num_rows, name, table))


def check_index_range(index: torch.Tensor, num_rows: int, name: str = "bias_index", table: str = "bias_table") -> None:
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= num_rows:
            raise ValueError(f"{name} values must lie in [0, {num_rows}) (the rows of {table}), got range [{lo}, {hi}]")


def int32_index(index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The contiguous int32 copy of a bias index that kernels read, its values checked in [0, num_rows).

    The check reads a wide copy before narrowing it (2^32 + 1 narrowed first would pass as row 1), and the copy, not
    the caller's tensor, so a later write to that tensor can make the kernels' copy stale, never out of range.
    """
    wide = index.to(torch.int64, copy=True)
    # narrowed before the check, whose host read waits for it: the copy is remembered, and a thread on another CUDA
    # stream may launch a kernel reading it as soon as it is returned
    narrow = wide.to(torch.int32).contiguous()
    check_index_range(wide, num_rows)
    return narrow


def key_padding_keep(key_padding_mask: torch.Tensor, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """Validate a (B, N) key padding mask (True/1 = keep) and return it as bool."""
    check_tensor("key_padding_mask", key_padding_mask, ndim=2, device=device)
    check_shape("key_padding_mask", key_padding_mask, (batch, n), "(B, N), True/1 = keep")
    if key_padding_mask.dtype == torch.bool:
        return key_padding_mask
    if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
        raise TypeError(f"key_padding_mask must be bool or integer (1 = keep), got {key_padding_mask.dtype}")
    return key_padding_mask != 0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype products (GEMMs) on x run in: the autocast dtype when autocast is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
