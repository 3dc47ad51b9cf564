"""Gather of a per-layer relative-position bias from the shared table: bias[c, i, j] = table[index[i, j], c]."""

from __future__ import annotations

import torch

from . import backend as _backend
from ._checks import FLOAT_DTYPES, check_bias_index, check_tensor


def gather_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """PyTorch path on validated inputs: the contiguous (C, N, N) bias.

    ``table`` may be a strided column slice of the full (R, H·L) table; autograd scatters the gradient back into
    the table rows (summing over every (i, j) that shares a row). The public ops accept int16/uint8 indices (the
    kernels read them as they are); advanced indexing takes only int32/int64 (uint8 would be a boolean mask).
    """
    if index.dtype not in (torch.int64, torch.int32):
        index = index.long()
    if torch.compiler.is_compiling():
        # the public checks cannot read values in a graph, and indexing would read a negative value from the end
        # of the table: sent past the end instead, it meets the compiled gather's bounds check (an error on CPU, a
        # device assert on CUDA) rather than reading a wrong row
        index = torch.where(index < 0, table.shape[0], index)
    return table.t()[:, index]


def rel_pos_bias_gather(table: torch.Tensor, index: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """The dense (C, N, N) bias for callers that need it materialised.

    Args:
        table: (R, C) float table, e.g. one layer's column slice ``table[:, l*H:(l+1)*H]``, or all H·L columns.
        index: (N, N) integer index into the rows of ``table``; values must lie in [0, R).
    """
    check_tensor("table", table, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("index", index)
    n = index.shape[0] if index.dim() == 2 else -1
    check_bias_index(index, table.shape[0], n, table.device, name="index", shape_note="(N, N), square")
    impl = _backend.select("rel_pos_bias_gather", backend, table, index)
    if impl is not None:
        return impl(table, index)
    return gather_bias(table, index)
