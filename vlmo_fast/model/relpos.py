"""The single relative-position table of VLMo and its three index matrices (spec §2).

Rows of the table ``relative_position_bias_table`` (R, H·L), with W patches per side, M = (2W-1)², D_img = M + 3
and L0 = max_text_len_of_initckpt:

    0 .. M-1              image patch -> patch, 2-D offset (query minus key)
    M, M+1, M+2           image CLS -> any image key, any image query -> image CLS, CLS -> CLS
    D_img, D_img+1        text query -> image key, image query -> text key (one bucket each)
    D_img+2 .. R-4        text token -> token distance (key minus query: the opposite sign to the image)
    R-3, R-2, R-1         text CLS -> any text key, any text query -> text CLS, CLS -> CLS

Columns [l·H, (l+1)·H) belong to layer l.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def num_image_distances(window: int) -> int:
    """D_img = (2W-1)² + 3, the official `num_relative_distance`."""
    return (2 * window - 1) ** 2 + 3


def num_table_rows(window: int, max_text_len_of_initckpt: int = 196) -> int:
    """R, the official `all_num_relative_distance`: 1126 at 224 px, 2606 at 384, 3878 at 480."""
    return num_image_distances(window) + 2 * max_text_len_of_initckpt + 2


def image_relative_position_index(window: int) -> torch.Tensor:
    """(1+P, 1+P) int64 index for image-only attention (CLS first, patches row-major)."""
    ws = torch.arange(window)
    hh, ww = torch.meshgrid(ws, ws, indexing="ij")
    h, w = hh.flatten(), ww.flatten()
    # query minus key, shifted to start at 0
    dh = h[:, None] - h[None, :] + window - 1
    dw = w[:, None] - w[None, :] + window - 1
    n = window * window + 1
    d_img = num_image_distances(window)
    index = torch.empty(n, n, dtype=torch.long)
    index[1:, 1:] = dh * (2 * window - 1) + dw
    index[0, :] = d_img - 3
    index[:, 0] = d_img - 2
    index[0, 0] = d_img - 1
    return index


def text_relative_position_index(max_text_len: int, window: int, max_text_len_of_initckpt: int = 196) -> torch.Tensor:
    """(Lt, Lt) int64 index for text-only attention; position 0 is the text CLS."""
    if max_text_len > max_text_len_of_initckpt:
        raise ValueError(
            f"max_text_len ({max_text_len}) must be <= max_text_len_of_initckpt ({max_text_len_of_initckpt})"
        )
    d_img = num_image_distances(window)
    rows = num_table_rows(window, max_text_len_of_initckpt)
    pos = torch.arange(max_text_len - 1)
    index = torch.empty(max_text_len, max_text_len, dtype=torch.long)
    # key minus query (spec Q5), offset so that distance 0 lands on row D_img + L0
    index[1:, 1:] = pos[None, :] - pos[:, None] + max_text_len_of_initckpt + d_img
    index[0, :] = rows - 3
    index[:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


def fusion_relative_position_index(
    max_text_len: int, window: int, max_text_len_of_initckpt: int = 196
) -> torch.Tensor:
    """(Lt+1+P, Lt+1+P) int64 index for the fused sequence, text first: [[text, D_img], [D_img+1, image]]."""
    d_img = num_image_distances(window)
    lt, n_img = max_text_len, window * window + 1
    index = torch.empty(lt + n_img, lt + n_img, dtype=torch.long)
    index[:lt, :lt] = text_relative_position_index(max_text_len, window, max_text_len_of_initckpt)
    index[:lt, lt:] = d_img
    index[lt:, :lt] = d_img + 1
    index[lt:, lt:] = image_relative_position_index(window)
    return index


# ---- resizing the table to a new image grid (spec §2, "Resolution change at load time"; quirk Q10) -----------------


def _geometric_source_coords(src_size: int, dst_size: int) -> np.ndarray:
    """BEiT's source coordinates for a (2W-1)-wide grid stretched to dst_size: [-cum.., 0, ..cum] with a ratio q found
    by bisection so that 1 + q + ... + q^(src//2 - 1) ~ dst//2."""
    half = src_size // 2

    def geometric_sum(q: float) -> float:
        return (1.0 - q**half) / (1.0 - q)

    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if geometric_sum(q) > dst_size // 2:
            right = q
        else:
            left = q
    dis = []
    cur = 1.0
    for i in range(half):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0.0] + dis, dtype=np.float64)


def cubic_spline_matrix(x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(len(targets), len(x)) matrix A with A @ y = the not-a-knot cubic spline through (x, y) evaluated at targets.

    Targets outside [x[0], x[-1]] are clamped to the ends. This is what FITPACK's interpolating bicubic spline
    (s = 0, the knots of `interp2d(kind='cubic')` and `RectBivariateSpline(kx=ky=3, s=0)`) does on each axis of a
    regular grid; it is applied on both axes of the table grid (a tensor-product spline is separable).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n < 4:
        raise ValueError(f"cubic_spline_matrix needs at least 4 source points, got {n}")
    h = np.diff(x)
    # Solve for the second derivatives m (n, n_basis) of each basis function e_k in one dense system.
    lhs = np.zeros((n, n))
    rhs = np.zeros((n, n))
    eye = np.eye(n)
    # not-a-knot: the third derivative is continuous at x[1] and at x[n-2]
    lhs[0, 0], lhs[0, 1], lhs[0, 2] = -h[1], h[0] + h[1], -h[0]
    lhs[-1, -3], lhs[-1, -2], lhs[-1, -1] = -h[-1], h[-2] + h[-1], -h[-2]
    for i in range(1, n - 1):
        lhs[i, i - 1] = h[i - 1]
        lhs[i, i] = 2.0 * (h[i - 1] + h[i])
        lhs[i, i + 1] = h[i]
        rhs[i] = 6.0 * ((eye[i + 1] - eye[i]) / h[i] - (eye[i] - eye[i - 1]) / h[i - 1])
    m = np.linalg.solve(lhs, rhs)
    t = np.clip(np.asarray(targets, dtype=np.float64), x[0], x[-1])
    seg = np.clip(np.searchsorted(x, t, side="right") - 1, 0, n - 2)
    x0, x1, hs = x[seg], x[seg + 1], h[seg]
    a, b = (x1 - t)[:, None], (t - x0)[:, None]
    hh = hs[:, None]
    out = m[seg] * a**3 / (6 * hh) + m[seg + 1] * b**3 / (6 * hh)
    out += (eye[seg] / hh - m[seg] * hh / 6) * a + (eye[seg + 1] / hh - m[seg + 1] * hh / 6) * b
    return out


def resize_table(table: torch.Tensor, dst_rows: int, dst_window: int) -> torch.Tensor:
    """Resize ``table`` (R_src, C) to a model whose table has ``dst_rows`` rows and ``dst_window`` patches per side."""
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D (R, H*L), got shape {tuple(table.shape)}")
    dst_size = 2 * dst_window - 1
    num_extra = dst_rows - dst_size**2
    src_patch_rows = table.shape[0] - num_extra
    src_size = int(round(math.sqrt(src_patch_rows))) if src_patch_rows > 0 else 0
    if num_extra < 0 or src_size * src_size != src_patch_rows or src_size < 4:
        raise ValueError(
            f"relative_position_bias_table with {table.shape[0]} rows does not fit a model table of {dst_rows} rows "
            f"(a {dst_window}x{dst_window} patch grid with {num_extra} non-patch rows)"
        )
    if src_size == dst_size:
        return table.clone()
    coords = _geometric_source_coords(src_size, dst_size)
    t = dst_size // 2
    targets = np.arange(-t, t + 0.1, 1.0)
    a = torch.from_numpy(cubic_spline_matrix(coords, targets))  # (dst, src)
    patch = table[: src_size * src_size].detach().to(torch.float64).reshape(src_size, src_size, -1)
    # value at (row y, col x) of the (2W-1)^2 grid: resample rows and columns with the same 1-D operator
    resized = torch.einsum("ya,abc,xb->yxc", a, patch, a).reshape(dst_size * dst_size, -1)
    extra = table[table.shape[0] - num_extra :].detach()
    return torch.cat([resized.to(table.dtype), extra], dim=0)
