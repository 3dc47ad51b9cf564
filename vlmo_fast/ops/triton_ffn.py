"""The Multiway FFN and the LayerScale residual, fused around cuBLAS GEMMs with Triton kernels (spec §3.2, Q16).

    x ← x + DropPath(γ2 · fc2(GELU(fc1(LN_e(x)))))      expert e: text rows (n < split), image rows (n ≥ split)
    x ← x + DropPath(γ1 · y)                             the attention half's epilogue (y = proj(attn))

The official block slices the fused sequence at ``max_text_len``, runs each expert's LayerNorm and MLP on its half,
applies γ and DropPath, and concatenates: LayerNorm, the autocast copy, γ, DropPath's divide and multiply, the
residual add and the cat are each a pass through memory. Here:

  _ln_fwd        one launch normalises every row with its expert's weights and writes the compute-dtype activations
                 grouped by expert (text rows of all samples, then image rows), so each expert's GEMMs run on one
                 contiguous block (and the row mean/rstd: the backward runs it again for them and for its
                 output, instead of keeping either).
  GEMMs          fc1 (+bias), GELU, fc2 (+bias) per expert on its block: cuBLAS through torch.
  _residual      out[r] = x[r] + γ · s[b, e] · y[g(r)]: LayerScale, per-sample DropPath scale, residual add and the
                 un-grouping in one pass, straight into the output rows (no cat).
  _residual_bwd  dy[g(r)] = go[r] · γ · s[b, e] and a two-stage (per-program partials, then a sum) dγ reduction.
  _ln_bwd        dx[r] = go[r] + LN⁻¹(dh[g(r)]) with two-stage per-expert dweight/dbias reductions.

In the model's block the FFN op also takes the attention half's residual: the stream x = x0 + DropPath(γ1 · y1) the
FFN works on (x0 the block input, y1 the attention projection's output) is never stored. _ln_fwd, _ln_bwd and
_residual each compute the rows they need from x0 and y1 as they read them (_stream), the same way every time.

Less memory than the official block: the fc1 output is kept and GELU recomputed in the backward instead of storing
its output too; the LayerNorm output is not kept but recomputed by the same kernel, bit for bit; the mid-block
stream is not kept (see above). The attention half's prologue ``qkv(norm1(x))`` does not keep its LayerNorm output
either (NormLinear). Each kernel is a ``torch.library`` custom op (with a fake implementation), composed by an
autograd Function, so ``torch.compile`` traces it.
"""

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import backend as _backend
from ._autograd import first_order_only
from ._checks import compute_dtype
from .triton_attention import interpreting, launch_device, triton, triton_unsupported

if triton is not None:
    import triton.language as tl

    from .triton_attention import cast_for

    @triton.jit
    def _row_info(rows, N, SPLIT, B):
        """For flat rows r = b·N + n: the batch index, whether the row is expert 0's (n < SPLIT), its index in the
        expert-grouped layout and its segment (0: expert 0, 1: expert 1) for the DropPath scale."""
        b = rows // N
        n = rows % N
        first = n < SPLIT
        grouped = tl.where(first, b * SPLIT + n, B * SPLIT + b * (N - SPLIT) + (n - SPLIT))
        return b, first, grouped

    @triton.jit
    def _branch(Y, y_offs, GAMMA, SCALE, s_offs, cols, ok, row_ok, col_ok,
                HAS_GAMMA: tl.constexpr, HAS_SCALE: tl.constexpr):
        """γ · s · y in fp32 for a tile of a residual branch: y at Y + y_offs, the rows' DropPath factors at
        SCALE + s_offs (multiplied in this order by every kernel that adds a branch)."""
        y = tl.load(Y + y_offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            y = y * tl.load(GAMMA + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            y = y * tl.load(SCALE + s_offs, mask=row_ok, other=0.0)[:, None]
        return y

    @triton.jit
    def _stream(X, Y1, G1, S1, rows, cols, ok, row_ok, col_ok, N, D,
                HAS_RES: tl.constexpr, HAS_G1: tl.constexpr, HAS_S1: tl.constexpr, RNE: tl.constexpr):
        """Rows ``rows`` of the residual stream the FFN works on, in fp32: x0 (X), or, with the attention half's
        output y1 (Y1, flat (B·N, D) rows), x0 + γ1 · s1[b] · y1 rounded to x0's dtype, exactly what _residual
        stores for it. Every kernel that needs the stream computes it here, so none needs it kept in memory."""
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:  # one DropPath factor per sample: the first of its (B, 2) pair
            y = _branch(Y1, offs, G1, S1, (rows // N) * 2, cols, ok, row_ok, col_ok, HAS_G1, HAS_S1)
            x = cast_for(x + y, X, RNE).to(tl.float32)
        return x

    @triton.jit
    def _ln_fwd(X, Y1, G1, S1, Y, MEAN, RSTD, W0, B0, W1, B1, R, N, SPLIT, B, D, eps,
                HAS_RES: tl.constexpr, HAS_G1: tl.constexpr, HAS_S1: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_D: tl.constexpr, RNE: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < R
        col_ok = cols < D
        ok = row_ok[:, None] & col_ok[None, :]
        x = _stream(X, Y1, G1, S1, rows, cols, ok, row_ok, col_ok, N, D, HAS_RES, HAS_G1, HAS_S1, RNE)
        # corrected two-pass: the centred residual sum repairs the rounded first mean, so a constant row gets
        # x - mean = 0 exactly (y = b, as eager) instead of a residue that rstd ~ 1/sqrt(eps) blows up
        mean0 = tl.sum(x, 1) / D
        mean = mean0 + tl.sum(tl.where(ok, x - mean0[:, None], 0.0), 1) / D
        # the variance from the final mean (a constant row's is exactly 0). The shortcut mean(c²) - dm², c centred on
        # the first mean, is contracted to an FMA on the GPU (enable_fp_fusion) and leaves a residue there: the CUDA
        # kernel's rstd was off by up to 0.3% for constant rows at eps = 1e-12 on the H100 (csrc/cuda)
        xc = tl.where(ok, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        _, first, grouped = _row_info(rows, N, SPLIT, B)
        w = tl.where(first[:, None], tl.load(W0 + cols, mask=col_ok, other=0.0)[None, :],
                     tl.load(W1 + cols, mask=col_ok, other=0.0)[None, :]).to(tl.float32)
        bb = tl.where(first[:, None], tl.load(B0 + cols, mask=col_ok, other=0.0)[None, :],
                      tl.load(B1 + cols, mask=col_ok, other=0.0)[None, :]).to(tl.float32)
        y = xc * rstd[:, None] * w + bb
        tl.store(Y + grouped[:, None].to(tl.int64) * D + cols[None, :], cast_for(y, Y, RNE), mask=ok)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _ln_bwd(X, Y1, G1, S1, DH, GO, MEAN, RSTD, W0, W1, DX, DWP, DBP, R, N, SPLIT, B, D, rows_per_program,
                HAS_RES: tl.constexpr, HAS_G1: tl.constexpr, HAS_S1: tl.constexpr,
                HAS_GO: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, RNE: tl.constexpr):
        """dx = go + rstd·(dxhat - mean(dxhat) - xhat·mean(dxhat·xhat)), dxhat = dh·w_e; per-program partial dw, db
        for each expert in DWP/DBP (P, 2, D)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        w0 = tl.load(W0 + cols, mask=col_ok, other=0.0).to(tl.float32)
        w1 = tl.load(W1 + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw0 = tl.zeros([BLOCK_D], tl.float32)
        dw1 = tl.zeros([BLOCK_D], tl.float32)
        db0 = tl.zeros([BLOCK_D], tl.float32)
        db1 = tl.zeros([BLOCK_D], tl.float32)
        start = pid * rows_per_program
        for r0 in range(start, start + rows_per_program, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_ok = (rows < R) & (rows < start + rows_per_program)
            ok = row_ok[:, None] & col_ok[None, :]
            _, first, grouped = _row_info(rows, N, SPLIT, B)
            x = _stream(X, Y1, G1, S1, rows, cols, ok, row_ok, col_ok, N, D, HAS_RES, HAS_G1, HAS_S1, RNE)
            dh = tl.load(DH + grouped[:, None].to(tl.int64) * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
            w = tl.where(first[:, None], w0[None, :], w1[None, :])
            dxhat = dh * w
            c1 = tl.sum(dxhat * xhat, 1) / D
            c2 = tl.sum(dxhat, 1) / D
            dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_GO:
                dx += tl.load(GO + rows[:, None].to(tl.int64) * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            tl.store(DX + rows[:, None].to(tl.int64) * D + cols[None, :], cast_for(dx, DX, RNE), mask=ok)
            e0 = first[:, None] & ok
            e1 = (~first[:, None]) & ok
            dw0 += tl.sum(tl.where(e0, dh * xhat, 0.0), 0)
            dw1 += tl.sum(tl.where(e1, dh * xhat, 0.0), 0)
            db0 += tl.sum(tl.where(e0, dh, 0.0), 0)
            db1 += tl.sum(tl.where(e1, dh, 0.0), 0)
        base = pid.to(tl.int64) * 2 * D
        tl.store(DWP + base + cols, dw0, mask=col_ok)
        tl.store(DWP + base + D + cols, dw1, mask=col_ok)
        tl.store(DBP + base + cols, db0, mask=col_ok)
        tl.store(DBP + base + D + cols, db1, mask=col_ok)

    @triton.jit
    def _residual(X, Y1, G1, S1, Y, OUT, GAMMA, SCALE, R, N, SPLIT, B, D,
                  HAS_RES: tl.constexpr, HAS_G1: tl.constexpr, HAS_S1: tl.constexpr,
                  HAS_GAMMA: tl.constexpr, HAS_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                  RNE: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < R
        col_ok = cols < D
        ok = row_ok[:, None] & col_ok[None, :]
        b, first, grouped = _row_info(rows, N, SPLIT, B)
        y = _branch(Y, grouped[:, None].to(tl.int64) * D + cols[None, :], GAMMA, SCALE, b * 2 + tl.where(first, 0, 1),
                    cols, ok, row_ok, col_ok, HAS_GAMMA, HAS_SCALE)
        x = _stream(X, Y1, G1, S1, rows, cols, ok, row_ok, col_ok, N, D, HAS_RES, HAS_G1, HAS_S1, RNE)
        tl.store(OUT + rows[:, None].to(tl.int64) * D + cols[None, :], cast_for(x + y, OUT, RNE), mask=ok)

    @triton.jit
    def _residual_bwd(GO, Y, GAMMA, SCALE, DY, DGP, R, N, SPLIT, B, D, rows_per_program,
                      HAS_GAMMA: tl.constexpr, HAS_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                  RNE: tl.constexpr):
        """dy[g(r)] = go[r]·γ·s; per-program partial dγ = Σ go·s·y in DGP (P, D)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        gamma = tl.load(GAMMA + cols, mask=col_ok, other=0.0).to(tl.float32)  # a dummy without HAS_GAMMA
        dg = tl.zeros([BLOCK_D], tl.float32)
        start = pid * rows_per_program
        for r0 in range(start, start + rows_per_program, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_ok = (rows < R) & (rows < start + rows_per_program)
            ok = row_ok[:, None] & col_ok[None, :]
            b, first, grouped = _row_info(rows, N, SPLIT, B)
            go = tl.load(GO + rows[:, None].to(tl.int64) * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_SCALE:
                go = go * tl.load(SCALE + b * 2 + tl.where(first, 0, 1), mask=row_ok, other=0.0)[:, None]
            if HAS_GAMMA:
                y = tl.load(Y + grouped[:, None].to(tl.int64) * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                dg += tl.sum(go * y, 0)
                go = go * gamma[None, :]
            tl.store(DY + grouped[:, None].to(tl.int64) * D + cols[None, :], cast_for(go, DY, RNE), mask=ok)
        if HAS_GAMMA:
            tl.store(DGP + pid.to(tl.int64) * D + cols, dg, mask=col_ok)


# ---- launchers ---------------------------------------------------------------------------------------------------


def _tile(d: int) -> Tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(16, 4096 // block_d)) if not interpreting() else 4
    return rows, block_d


def _dense(*tensors: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The kernels address rows as row·D + col and vectors by col: every tensor they get is contiguous (a strided
    view, e.g. a transposed x or a sliced γ, is copied; a contiguous one passes as it is)."""
    return [t if t is None else t.contiguous() for t in tensors]


def _programs(r: int, rows: int) -> Tuple[int, int]:
    """(programs, rows per program) for the reductions: about 4 programs per SM, whole ROWS tiles each."""
    target = 8 if interpreting() else 4 * 132
    per = max(rows, triton.cdiv(triton.cdiv(r, target), rows) * rows)
    return triton.cdiv(r, per), per


if triton is not None:

    def _custom_op(name: str):
        """``torch.library.custom_op(name)`` (as ``.op``) whose calls run the implementation itself unless
        torch.compile is tracing: the custom-op dispatch costs about 8 us a call on the host, a few ms per training
        step over a model's layers and passes (these ops are called inside the autograd Functions below, which
        compiled graphs trace through)."""

        def wrap(fn):
            op = torch.library.custom_op(name, mutates_args=())(fn)

            @functools.wraps(fn)
            def call(*args, **kwargs):
                return op(*args, **kwargs) if torch.compiler.is_compiling() else fn(*args, **kwargs)

            call.op = op
            return call

        return wrap

    def _stream_args(x, y1, g1, s1):
        """The kernels' (Y1, G1, S1) pointers (x for the absent ones: never read) and their flags (see _stream)."""
        return ((y1 if y1 is not None else x, g1 if g1 is not None else x, s1 if s1 is not None else x),
                dict(HAS_RES=y1 is not None, HAS_G1=g1 is not None, HAS_S1=s1 is not None))

    @_custom_op("vlmo_fast::multiway_ln_fwd")
    def multiway_ln_fwd(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                        split: int, eps: float, out_dtype: torch.dtype, y1: Optional[torch.Tensor] = None,
                        g1: Optional[torch.Tensor] = None,
                        s1: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> (expert-grouped (B·N, D) normalised rows, mean (B·N,), rstd (B·N,)); with y1 ((B·N, D)),
        the rows normalised are x + γ1 · s1 · y1 (see _stream)."""
        x, w0, b0, w1, b1, y1, g1, s1 = _dense(x, w0, b0, w1, b1, y1, g1, s1)
        b, n, d = x.shape
        r = b * n
        y = torch.empty(r, d, device=x.device, dtype=out_dtype)
        mean = torch.empty(r, device=x.device, dtype=torch.float32)
        rstd = torch.empty(r, device=x.device, dtype=torch.float32)
        if r:
            rows, block_d = _tile(d)
            ptrs, flags = _stream_args(x, y1, g1, s1)
            with launch_device(x):
                _ln_fwd[(triton.cdiv(r, rows),)](x, *ptrs, y, mean, rstd, w0, b0, w1, b1, r, n, split, b, d, eps,
                                                  ROWS=rows, BLOCK_D=block_d, RNE=interpreting(), num_warps=4,
                                                  **flags)
        return y, mean, rstd

    @multiway_ln_fwd.op.register_fake
    def _(x, w0, b0, w1, b1, split, eps, out_dtype, y1=None, g1=None, s1=None):
        r = x.shape[0] * x.shape[1]
        return (x.new_empty(r, x.shape[2], dtype=out_dtype), x.new_empty(r, dtype=torch.float32),
                x.new_empty(r, dtype=torch.float32))

    @_custom_op("vlmo_fast::multiway_ln_bwd")
    def multiway_ln_bwd(x: torch.Tensor, dh: torch.Tensor, go: Optional[torch.Tensor], mean: torch.Tensor,
                        rstd: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, split: int,
                        y1: Optional[torch.Tensor] = None, g1: Optional[torch.Tensor] = None,
                        s1: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dx (B, N, D) in x's dtype (go added when given), dweight (2, D), dbias (2, D)) in fp32; with y1, of
        the rows x + γ1 · s1 · y1 (as multiway_ln_fwd)."""
        x, dh, go, mean, rstd, w0, w1, y1, g1, s1 = _dense(x, dh, go, mean, rstd, w0, w1, y1, g1, s1)
        b, n, d = x.shape
        r = b * n
        dx = torch.empty_like(x)
        rows, block_d = _tile(d)
        programs, per = _programs(r, rows)
        dwp = torch.empty(max(programs, 1), 2, d, device=x.device, dtype=torch.float32)
        dbp = torch.empty_like(dwp)
        if r:
            ptrs, flags = _stream_args(x, y1, g1, s1)
            with launch_device(x):
                _ln_bwd[(programs,)](x, *ptrs, dh, go if go is not None else x, mean, rstd, w0, w1, dx, dwp, dbp,
                                     r, n, split, b, d, per, HAS_GO=go is not None, ROWS=rows, BLOCK_D=block_d,
                                     RNE=interpreting(), num_warps=4, **flags)
        else:
            dwp.zero_(), dbp.zero_()
        return dx, dwp.sum(0), dbp.sum(0)

    @multiway_ln_bwd.op.register_fake
    def _(x, dh, go, mean, rstd, w0, w1, split, y1=None, g1=None, s1=None):
        d = x.shape[2]
        return x.new_empty(x.shape), x.new_empty(2, d, dtype=torch.float32), x.new_empty(2, d, dtype=torch.float32)

    @_custom_op("vlmo_fast::scaled_residual_fwd")
    def scaled_residual_fwd(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor],
                            scale: Optional[torch.Tensor], split: int, y1: Optional[torch.Tensor] = None,
                            g1: Optional[torch.Tensor] = None, s1: Optional[torch.Tensor] = None) -> torch.Tensor:
        """out (B, N, D) = x + γ · s · y, with y expert-grouped (B·N, D) and s (B, 2) per row segment; with y1, x
        is x + γ1 · s1 · y1 first (as multiway_ln_fwd)."""
        x, y, gamma, scale, y1, g1, s1 = _dense(x, y, gamma, scale, y1, g1, s1)
        b, n, d = x.shape
        out = torch.empty_like(x)
        if b * n:
            rows, block_d = _tile(d)
            ptrs, flags = _stream_args(x, y1, g1, s1)
            with launch_device(x):
                _residual[(triton.cdiv(b * n, rows),)](
                    x, *ptrs, y, out, gamma if gamma is not None else x, scale if scale is not None else x,
                    b * n, n, split, b, d, HAS_GAMMA=gamma is not None, HAS_SCALE=scale is not None,
                    ROWS=rows, BLOCK_D=block_d, RNE=interpreting(), num_warps=4, **flags)
        return out

    @scaled_residual_fwd.op.register_fake
    def _(x, y, gamma, scale, split, y1=None, g1=None, s1=None):
        return x.new_empty(x.shape)

    @_custom_op("vlmo_fast::scaled_residual_bwd")
    def scaled_residual_bwd(go: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor],
                            scale: Optional[torch.Tensor], split: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (dy expert-grouped (B·N, D) in y's dtype, dγ (D,) fp32 (zeros without γ))."""
        go, y, gamma, scale = _dense(go, y, gamma, scale)
        b, n, d = go.shape
        r = b * n
        dy = torch.empty(r, d, device=go.device, dtype=y.dtype)
        rows, block_d = _tile(d)
        programs, per = _programs(r, rows)
        dgp = torch.zeros(max(programs, 1), d, device=go.device, dtype=torch.float32)
        if r:
            with launch_device(go):
                _residual_bwd[(programs,)](go, y, gamma if gamma is not None else go,
                                           scale if scale is not None else go, dy, dgp, r, n, split, b, d, per,
                                           HAS_GAMMA=gamma is not None, HAS_SCALE=scale is not None, ROWS=rows,
                                           BLOCK_D=block_d, RNE=interpreting(), num_warps=4)
        return dy, dgp.sum(0)

    @scaled_residual_bwd.op.register_fake
    def _(go, y, gamma, scale, split):
        r = go.shape[0] * go.shape[1]
        return go.new_empty(r, go.shape[2], dtype=y.dtype), go.new_empty(go.shape[2], dtype=torch.float32)


# ---- autograd -------------------------------------------------------------------------------------------------


class ScaledResidual(torch.autograd.Function):
    """out = x + γ · s[b] · y (``ops.scaled_residual``; the model's block takes its attention half's residual inside
    MultiwayFFN instead), y in the (B·N, D) flat layout."""

    @staticmethod
    def forward(ctx, x, y, gamma, scale):
        b, n, d = x.shape
        out = scaled_residual_fwd(x, y.reshape(b * n, d), gamma, scale, n)  # the op makes its inputs dense
        ctx.save_for_backward(y, gamma, scale)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, go):
        y, gamma, scale = ctx.saved_tensors
        b, n, d = go.shape
        dy, dgamma = scaled_residual_bwd(go, y.reshape(b * n, d), gamma, scale, n)  # the op makes them dense
        return go, dy.view_as(y), (dgamma.to(gamma.dtype) if gamma is not None else None), None


class MultiwayFFN(torch.autograd.Function):
    """x + s · γ · fc2(GELU(fc1(LN_e(x)))) for one or two experts, where x = x0 + s1 · γ1 · y1 when the attention
    half's output y1 is given (else x0); see the module docstring. x is never stored: the kernels that read it
    (LayerNorm forward and backward, the residual) compute it from x0 and y1 (_stream)."""

    @staticmethod
    def forward(ctx, x0, y1, gamma1, scale1, split, gamma, scale, eps, *params):
        experts = [params[i : i + 6] for i in range(0, len(params), 6)]
        b, n, d = x0.shape
        cdt = compute_dtype(x0)
        x0 = x0.contiguous()
        y1 = y1.reshape(b * n, d) if y1 is not None else None  # flat rows (the ops make them dense)
        (w0, b0), (w1, b1) = experts[0][:2], experts[-1][:2]
        h, _, _ = multiway_ln_fwd(x0, w0, b0, w1, b1, split, eps, cdt, y1, gamma1, scale1)
        y = torch.empty(b * n, d, device=x0.device, dtype=cdt)
        bounds = [(0, b * split), (b * split, b * n)]
        zs = []
        for (lo, hi), (_, _, fc1_w, fc1_b, fc2_w, fc2_b) in zip(bounds, experts if len(experts) == 2 else
                                                                 [experts[0], experts[0]]):
            if hi == lo:
                zs.append(h.new_empty(0, fc1_w.shape[0]))
                continue
            z = torch.addmm(fc1_b.to(cdt), h[lo:hi], fc1_w.to(cdt).t())
            torch.addmm(fc2_b.to(cdt), F.gelu(z), fc2_w.to(cdt).t(), out=y[lo:hi])
            zs.append(z)
        out = scaled_residual_fwd(x0, y, gamma, scale, split, y1, gamma1, scale1)
        # h is not kept either: the backward normalises again (the same kernel, the same bits)
        ctx.save_for_backward(x0, y1, gamma1, scale1, y, gamma, scale, *zs, *params)
        ctx.split, ctx.n_experts, ctx.cdt, ctx.eps = split, len(experts), cdt, eps
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, go):
        x0, y1, gamma1, scale1, y, gamma, scale, z0, z1, *params = ctx.saved_tensors
        experts = [params[i : i + 6] for i in range(0, len(params), 6)]
        split, cdt = ctx.split, ctx.cdt
        b, n, d = x0.shape
        (w0, b0), (w1, b1) = experts[0][:2], experts[-1][:2]
        h, mean, rstd = multiway_ln_fwd(x0, w0, b0, w1, b1, split, ctx.eps, cdt, y1, gamma1, scale1)
        go = go.contiguous()  # once, for the two ops below (each would copy a strided one)
        dy, dgamma = scaled_residual_bwd(go, y, gamma, scale, split)
        dh = torch.empty_like(h)
        bounds = [(0, b * split), (b * split, b * n)]
        grads: List[List[Optional[torch.Tensor]]] = [[None] * 6 for _ in experts]
        for seg, ((lo, hi), z) in enumerate(zip(bounds, (z0, z1))):
            e = seg if len(experts) == 2 else 0
            _, _, fc1_w, fc1_b, fc2_w, fc2_b = experts[e]
            if hi == lo:
                continue
            dy_e, h_e = dy[lo:hi], h[lo:hi]
            a = F.gelu(z)  # recomputed instead of saved
            g = grads[e]
            acc = lambda i, t: t if g[i] is None else g[i] + t  # noqa: E731  (one expert serving both segments)
            g[4] = acc(4, (dy_e.t() @ a).to(fc2_w.dtype))
            g[5] = acc(5, dy_e.sum(0, dtype=torch.float32).to(fc2_b.dtype))
            dz = torch.ops.aten.gelu_backward(dy_e @ fc2_w.to(cdt), z)
            g[2] = acc(2, (dz.t() @ h_e).to(fc1_w.dtype))
            g[3] = acc(3, dz.sum(0, dtype=torch.float32).to(fc1_b.dtype))
            torch.mm(dz, fc1_w.to(cdt), out=dh[lo:hi])
        dx, dw, db = multiway_ln_bwd(x0, dh, go, mean, rstd, w0, w1, split, y1, gamma1, scale1)
        if len(experts) == 2:
            grads[0][0], grads[0][1] = dw[0].to(w0.dtype), db[0].to(w0.dtype)
            grads[1][0], grads[1][1] = dw[1].to(w1.dtype), db[1].to(w1.dtype)
        else:
            grads[0][0], grads[0][1] = dw.sum(0).to(w0.dtype), db.sum(0).to(w0.dtype)
        for gs, ps in zip(grads, experts):  # an expert whose rows were all empty still gets (zero) gradients
            for i, p in enumerate(ps):
                if gs[i] is None:
                    gs[i] = torch.zeros_like(p)
        flat = [t for gs in grads for t in gs]
        dy1 = dgamma1 = None
        if y1 is not None:  # the first residual: dx reaches x0 as it is, and y1 and γ1 through the scaled sum
            dy1, dgamma1 = scaled_residual_bwd(dx, y1, gamma1, scale1, n)
            dy1 = dy1.view(b, n, d)
            dgamma1 = dgamma1.to(gamma1.dtype) if gamma1 is not None else None
        return (dx, dy1, dgamma1, None, None, dgamma.to(gamma.dtype) if gamma is not None else None, None, None,
                *flat)


class NormLinear(torch.autograd.Function):
    """F.linear(LN(x), weight, bias) (the attention half's qkv(norm1(x))): LN's output is not kept but recomputed in
    the backward by the same kernel, bit for bit; only x (which LN's backward needs anyway) is."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, weight, bias, eps):
        b, n, d = x.shape
        cdt = compute_dtype(x)
        x = x.contiguous()
        h, _, _ = multiway_ln_fwd(x, norm_w, norm_b, norm_w, norm_b, n, eps, cdt)  # one expert: every row
        w = weight.to(cdt)
        out = torch.addmm(bias.to(cdt), h, w.t()) if bias is not None else h @ w.t()
        ctx.save_for_backward(x, norm_w, norm_b, weight, bias)
        ctx.eps, ctx.cdt = eps, cdt
        return out.view(b, n, weight.shape[0])

    @staticmethod
    @first_order_only
    def backward(ctx, go):
        x, norm_w, norm_b, weight, bias = ctx.saved_tensors
        b, n, d = x.shape
        h, mean, rstd = multiway_ln_fwd(x, norm_w, norm_b, norm_w, norm_b, n, ctx.eps, ctx.cdt)
        go = go.reshape(b * n, weight.shape[0])
        dweight = (go.t() @ h).to(weight.dtype)
        dbias = go.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None else None
        dx, dw, db = multiway_ln_bwd(x, go @ weight.to(ctx.cdt), None, mean, rstd, norm_w, norm_w, n)
        return dx, dw[0].to(norm_w.dtype), db[0].to(norm_b.dtype), dweight, dbias, None


# ---- backend entry points ------------------------------------------------------------------------------------


def _drop_scales(x: torch.Tensor, dtype: torch.dtype, drop_prob: float, training: bool,
                 segments: int) -> Optional[torch.Tensor]:
    """(B, 2) fp32 DropPath factors mask/keep_prob, one draw per row segment in order (text, then image), consuming
    the random stream exactly like the official per-half ``DropPath`` calls: in ``dtype``, the dtype of the branch
    the official DropPath gets (γ·y), since a bf16 draw rounds differently from an fp32 one (about 1 mask in 200
    differs); None when inactive."""
    if drop_prob == 0.0 or not training:
        return None
    from .droppath import drop_path_scale

    keep = 1.0 - drop_prob
    draws = [drop_path_scale(x, drop_prob, dtype).reshape(-1).float() / keep for _ in range(segments)]
    if segments == 1:
        draws.append(draws[0])
    return torch.stack(draws, dim=1).contiguous()


def _branch_dtype(y_dtype: torch.dtype, gamma: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of γ · y, what the official DropPath draws its random numbers in."""
    return torch.promote_types(y_dtype, gamma.dtype) if gamma is not None else y_dtype


def ffn_triton(x, experts, split, gamma, drop_prob, training, eps, attn_out=None, attn_gamma=None):
    two = len(experts) == 2
    split_rows = split if two else x.shape[1]
    # the attention half's DropPath is drawn first, as in the block
    scale1 = (_drop_scales(x, _branch_dtype(attn_out.dtype, attn_gamma), drop_prob, training, 1)
              if attn_out is not None else None)
    # two experts draw two masks even when a half is empty (the official DropPath on a 0-length slice still draws);
    # the MLP's output is in the GEMMs' dtype
    scale = _drop_scales(x, _branch_dtype(compute_dtype(x), gamma), drop_prob, training, 2 if two else 1)
    params = [t for e in experts for t in e]
    return MultiwayFFN.apply(x, attn_out, attn_gamma, scale1, split_rows, gamma, scale, eps, *params)


def residual_triton(x, y, gamma, drop_prob, training):
    scale = _drop_scales(x, _branch_dtype(y.dtype, gamma), drop_prob, training, 1)
    return ScaledResidual.apply(x, y, gamma, scale)


def norm_linear_triton(x, norm_w, norm_b, weight, bias, eps):
    return NormLinear.apply(x, norm_w, norm_b, weight, bias, eps)


def _unsupported_common(x: torch.Tensor) -> Optional[str]:
    reason = triton_unsupported(x)
    if reason is None and x.shape[-1] > 8192:
        return "hidden size > 8192"
    return reason


def _wider_than_x(x: torch.Tensor, name: str, *others: Optional[torch.Tensor]) -> Optional[str]:
    """The kernels write x's dtype; the official ``x + γ·y`` promotes when γ (or y) is wider."""
    wide = x.dtype
    for t in others:
        if t is not None:
            wide = torch.promote_types(wide, t.dtype)
    if wide != x.dtype:
        return f"{name} is wider than x ({x.dtype}): the sum would be promoted to {wide}"
    return None


def ffn_unsupported(x, experts, split, gamma, drop_prob, training, attn_out=None, attn_gamma=None) -> Optional[str]:
    if any(t is None for e in experts for t in e):
        return "an expert without a LayerNorm affine weight/bias or a Linear bias (the kernels take all six)"
    return _wider_than_x(x, "gamma, attn_out or attn_gamma", gamma, attn_out, attn_gamma) or _unsupported_common(x)


def residual_unsupported(x, y, gamma, drop_prob, training) -> Optional[str]:
    return _wider_than_x(x, "y or gamma", y, gamma) or _unsupported_common(x)


def norm_linear_unsupported(x, norm_w, norm_b, weight, bias) -> Optional[str]:
    return _unsupported_common(x)


_backend.register("multiway_ffn", "triton", ffn_triton, ffn_unsupported, priority=10, auto_devices=("cuda",))
_backend.register("scaled_residual", "triton", residual_triton, residual_unsupported, priority=10,
                  auto_devices=("cuda",))
_backend.register("norm_linear", "triton", norm_linear_triton, norm_linear_unsupported, priority=10,
                  auto_devices=("cuda",))
