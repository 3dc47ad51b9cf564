"""Float64 reference attention and the "eager in the same precision" baseline used by the numerics rule."""

import torch


def reference_attention(q, k, v, bias=None, keep=None, scale=None):
    """softmax(scale·q kᵀ + bias, masked keys -inf) v in float64; rows with every key masked give 0."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q * scale) @ k.transpose(-1, -2)
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep.bool()[:, None, None, :], float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return p @ v


def eager_attention(q, k, v, bias=None, keep=None, scale=None):
    """The official math in the inputs' precision: q·scale rounded to the input dtype, then q kᵀ, the bias add and
    the softmax in fp32, the probabilities rounded back to the input dtype for the product with v."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q * scale).float() @ k.float().transpose(-1, -2)
    if bias is not None:
        s = s + bias.float()
    if keep is not None:
        s = s.masked_fill(~keep.bool()[:, None, None, :], float("-inf"))
    p = torch.nan_to_num(torch.softmax(s.float(), -1), nan=0.0).to(v.dtype)
    return p @ v


def padding(b, n, full_row=None, device="cpu"):
    """keep mask on `device`: row 0 unpadded, row 1 half padded, row `full_row` entirely padded."""
    keep = torch.ones(b, n, dtype=torch.bool, device=device)
    if b > 1:
        keep[1, max(1, n // 2):] = False
    if full_row is not None:
        keep[full_row] = False
    return keep
