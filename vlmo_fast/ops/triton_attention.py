"""Flash-style attention with VLMo's relative-position bias, in Triton (spec §2, §4).

    out[b, h] = softmax(scale · q kᵀ + bias[h] + mask[b]) v,   bias[h, i, j] = table[index[i, j], h]  (or dense)

Never materialises the (B, H, N, N) scores or the per-layer bias: the bias is gathered from the table inside the
kernel, the padding mask is applied to keys, and a row whose keys are all masked outputs zeros.

Kernels (one program per tile; scores in base-2 units, statistics in fp32):
  _fwd          grid (query blocks, B·H): online softmax over key blocks; writes out and the row log-sum-exp.
  _bwd_delta    grid (query blocks, B·H): delta = rowsum(dO ∘ O).
  _bwd_dkdv     grid (key blocks, B·H): loops over query blocks, recomputes P, accumulates dK and dV.
  _bwd_dq       grid (query blocks, H, G): loops over the batch rows of group g and over key blocks, accumulates
                dQ per row and, when the bias needs a gradient, the batch sum of dS for its (query block, key
                block) tiles in a per-group partial buffer (G, H, N, N) that only this program touches.
  _bucket_sum   grid (table rows): sums the partials over the positions that share a table row (a CSR of the
                index, precomputed once per index tensor) and the groups, in a fixed order.
There are no atomics anywhere, so gradients are deterministic (bit-identical run to run) by construction; the memory
for the bias gradient is G·H·N² floats, independent of the batch (no O(B·H·N²) tensor).

Registered as the custom ops ``vlmo_fast::rel_pos_attn_fwd`` / ``vlmo_fast::rel_pos_attn_bwd`` with autograd and fake
implementations, so ``torch.compile`` traces the model without graph breaks.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from . import backend as _backend

try:
    import triton
    import triton.language as tl

    _TRITON_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - triton ships with CUDA torch and is a test dependency
    triton = None
    _TRITON_ERROR = str(exc)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _scores(q, k, offs_m, offs_n, N, h, scale_log2,
                BIAS, sb_h, sb_m, sb_n,  # dense bias (H, N, N)
                TABLE, st_r, st_h,  # (R, H) table, any strides
                INDEX, si_m, si_n,  # (N, N) int32 index
                KEEP_ROW, sk_n,  # (N,) uint8 keep flags of this batch row
                BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
        """(BLOCK_M, BLOCK_N) logits in base-2 units: (scale·q kᵀ + bias)·log2(e), -inf on masked/out-of-range keys."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        in_range = (offs_m[:, None] < N) & (offs_n[None, :] < N)
        if BIAS_MODE == 1:
            bias = tl.load(BIAS + h * sb_h + offs_m[:, None] * sb_m + offs_n[None, :] * sb_n, mask=in_range, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        if BIAS_MODE == 2:
            idx = tl.load(INDEX + offs_m[:, None] * si_m + offs_n[None, :] * si_n, mask=in_range, other=0)
            bias = tl.load(TABLE + idx.to(tl.int64) * st_r + h * st_h, mask=in_range, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        key_ok = offs_n < N
        if HAS_MASK:
            key_ok = key_ok & (tl.load(KEEP_ROW + offs_n * sk_n, mask=offs_n < N, other=0) != 0)
        return tl.where(key_ok[None, :], s, float("-inf"))

    @triton.jit
    def _fwd(Q, K, V, O, LSE, BIAS, TABLE, INDEX, KEEP,
             sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_n, so_d,
             sb_h, sb_m, sb_n, st_r, st_h, si_m, si_n, skp_b, skp_n,
             H, N, D, scale_log2,
             BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d,
                    mask=(offs_m[:, None] < N) & d_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        keep_row = KEEP + b * skp_b
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_ok = (offs_n[:, None] < N) & d_ok
            k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kv_ok, other=0.0)
            v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=kv_ok, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = _scores(q, k, offs_m, offs_n, N, h, scale_log2, BIAS, sb_h, sb_m, sb_n, TABLE, st_r, st_h,
                        INDEX, si_m, si_n, keep_row, skp_n, BIAS_MODE, HAS_MASK, IEEE)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN from -inf - -inf
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        dead = l_i == 0.0
        out = acc / tl.where(dead, 1.0, l_i)[:, None]
        tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d,
                 out.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & d_ok)
        lse = tl.where(dead, float("inf"), m_i + tl.math.log2(tl.where(dead, 1.0, l_i)))
        tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)

    @triton.jit
    def _bwd_delta(O, DO, DELTA, so_b, so_h, so_n, so_d, sdo_b, sdo_h, sdo_n, sdo_d, H, N, D,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_m[:, None] < N) & (offs_d[None, :] < D)
        o = tl.load(O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d, mask=ok, other=0.0)
        do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_n + offs_d[None, :] * sdo_d, mask=ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, TABLE, INDEX, KEEP,
                  sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                  sdo_b, sdo_h, sdo_n, sdo_d, sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d,
                  sb_h, sb_m, sb_n, st_r, st_h, si_m, si_n, skp_b, skp_n,
                  H, N, D, scale, scale_log2,
                  BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        kv_ok = (offs_n[:, None] < N) & d_ok
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kv_ok, other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        keep_row = KEEP + b * skp_b
        stats = pid_bh.to(tl.int64) * N
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_ok = (offs_m[:, None] < N) & d_ok
            q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d, mask=q_ok, other=0.0)
            do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_n + offs_d[None, :] * sdo_d, mask=q_ok,
                         other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + stats + offs_m, mask=offs_m < N, other=float("inf"))
            delta = tl.load(DELTA + stats + offs_m, mask=offs_m < N, other=0.0)
            s = _scores(q, k, offs_m, offs_n, N, h, scale_log2, BIAS, sb_h, sb_m, sb_n, TABLE, st_r, st_h,
                        INDEX, si_m, si_n, keep_row, skp_n, BIAS_MODE, HAS_MASK, IEEE)
            p = tl.math.exp2(s - lse[:, None])
            if IEEE:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if IEEE:
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
            else:
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        tl.store(DK + b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :] * sdk_d,
                 (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + b * sdv_b + h * sdv_h + offs_n[:, None] * sdv_n + offs_d[None, :] * sdv_d,
                 dv.to(DV.dtype.element_ty), mask=kv_ok)

    @triton.jit
    def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, DPART, BIAS, TABLE, INDEX, KEEP,
                sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                sdo_b, sdo_h, sdo_n, sdo_d, sdq_b, sdq_h, sdq_n, sdq_d,
                sb_h, sb_m, sb_n, st_r, st_h, si_m, si_n, skp_b, skp_n,
                B, H, N, D, rows_per_group, scale, scale_log2,
                BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DBIAS: tl.constexpr, UPCAST: tl.constexpr,
                IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        g = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        q_ok = (offs_m[:, None] < N) & d_ok
        b_start = g * rows_per_group
        b_end = tl.minimum(b_start + rows_per_group, B)
        part = DPART + (g.to(tl.int64) * H + h) * N * N  # (N, N) partial dS sum of this group and head
        for b32 in range(b_start, b_end):
            b = b32 + tl.zeros([], tl.int64)  # 64-bit offsets (b32 is a Python int in the interpreter)
            q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d, mask=q_ok, other=0.0)
            do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_n + offs_d[None, :] * sdo_d, mask=q_ok,
                         other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            stats = (b * H + h) * N
            lse = tl.load(LSE + stats + offs_m, mask=offs_m < N, other=float("inf"))
            delta = tl.load(DELTA + stats + offs_m, mask=offs_m < N, other=0.0)
            keep_row = KEEP + b * skp_b
            dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for start_n in range(0, N, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                kv_ok = (offs_n[:, None] < N) & d_ok
                k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kv_ok,
                            other=0.0)
                v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=kv_ok,
                            other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = _scores(q, k, offs_m, offs_n, N, h, scale_log2, BIAS, sb_h, sb_m, sb_n, TABLE, st_r, st_h,
                            INDEX, si_m, si_n, keep_row, skp_n, BIAS_MODE, HAS_MASK, IEEE)
                p = tl.math.exp2(s - lse[:, None])
                if IEEE:
                    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                else:
                    dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                if IEEE:
                    dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
                else:
                    dq += tl.dot(ds.to(k.dtype), k)
                if NEED_DBIAS:
                    tile_ok = (offs_m[:, None] < N) & (offs_n[None, :] < N)
                    ptrs = part + offs_m[:, None] * N + offs_n[None, :]
                    # only this program touches these elements: the batch rows add in a fixed order
                    tl.store(ptrs, tl.load(ptrs, mask=tile_ok, other=0.0) + ds, mask=tile_ok)
            tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_n + offs_d[None, :] * sdq_d,
                     (dq * scale).to(DQ.dtype.element_ty), mask=q_ok)

    @triton.jit
    def _bucket_sum(DPART, ORDER, OFFSETS, DTABLE, G, H, NN, sdt_r, sdt_h,
                    BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
        """d_table[r, h] = Σ_g Σ_{positions p with index p == r} dpart[g, h, p], in a fixed order."""
        r = tl.program_id(0)
        start = tl.load(OFFSETS + r)
        end = tl.load(OFFSETS + r + 1)
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        acc = tl.zeros([BLOCK_H], tl.float32)
        for c in range(start, end, BLOCK):
            offs = c + tl.arange(0, BLOCK)
            ok = offs < end
            pos = tl.load(ORDER + offs, mask=ok, other=0).to(tl.int64)
            for g in range(0, G):
                vals = tl.load(DPART + (g * H + offs_h[None, :]).to(tl.int64) * NN + pos[:, None],
                               mask=ok[:, None] & h_ok[None, :], other=0.0)
                acc += tl.sum(vals, 0)
        tl.store(DTABLE + r * sdt_r + offs_h * sdt_h, acc, mask=h_ok)


# ---- host side ---------------------------------------------------------------------------------------------------

_INDEX_CACHE: Dict[int, tuple] = {}


def _index_data(index: torch.Tensor, rows: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 contiguous index and the CSR of its values (positions sorted by table row, row offsets), computed once
    per index tensor (and table size) and reused until the tensor is modified in place."""
    key = (index._version, rows, index.device)
    hit = _INDEX_CACHE.get(id(index))
    if hit is not None and hit[0]() is index and hit[1] == key:
        return hit[2]
    flat = index.reshape(-1).long()
    order = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.bincount(flat, minlength=rows)
    offsets = torch.zeros(rows + 1, dtype=torch.int32, device=index.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    data = (index.to(torch.int32).contiguous(), order, offsets)
    if len(_INDEX_CACHE) > 64:
        _INDEX_CACHE.clear()
    try:
        _INDEX_CACHE[id(index)] = (weakref.ref(index), key, data)
    except TypeError:
        pass
    return data


def _blocks(d: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)."""
    block_d = max(16, triton.next_power_of_2(d))
    if interpreting():
        return 64, 64, block_d, 4, 1
    if block_d <= 64:
        return 64, 64, block_d, 4, 3
    return 64, 32, block_d, 4, 2


def _bias_args(bias, table, index_i32):
    """(mode, bias ptr + strides, table ptr + strides, index ptr + strides) with dummies for the unused forms."""
    if bias is not None:
        return 1, bias, bias.stride(), None, (0, 0), None, (0, 0)
    if table is not None:
        return 2, None, (0, 0, 0), table, table.stride(), index_i32, index_i32.stride()
    return 0, None, (0, 0, 0), None, (0, 0), None, (0, 0)


def _flags(q: torch.Tensor) -> Tuple[bool, bool]:
    """(UPCAST, IEEE): bf16 arithmetic is wrong in the CPU interpreter, so operands are upcast there; fp32 inputs
    use IEEE fp32 dots (no TF32) so fp32 results match the fp32 reference."""
    upcast = interpreting() and q.dtype in (torch.bfloat16, torch.float16)
    return upcast, q.dtype == torch.float32


def _dummy(ref: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=ref.device)


def _keep_args(keep: Optional[torch.Tensor], ref: torch.Tensor):
    if keep is None:
        return False, torch.empty(1, dtype=torch.uint8, device=ref.device), (0, 0)
    k = keep.view(torch.uint8) if keep.dtype == torch.bool else keep.to(torch.uint8)
    return True, k, k.stride()


def _forward(q, k, v, bias, table, index, keep, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape
    # (B, N, H, D) storage: the caller's transpose(1, 2).reshape(B, N, H·D) is then free
    out = torch.empty(b, n, h, d, device=q.device, dtype=q.dtype).permute(0, 2, 1, 3)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    if n == 0 or b == 0:
        return out, lse
    index_i32 = _index_data(index, table.shape[0])[0] if table is not None else None
    mode, bias_t, sb, table_t, st, index_t, si = _bias_args(bias, table, index_i32)
    has_mask, keep_t, skp = _keep_args(keep, q)
    upcast, ieee = _flags(q)
    bm, bn, bd, warps, stages = _blocks(d)
    dummy = _dummy(q)
    grid = (triton.cdiv(n, bm), b * h)
    _fwd[grid](
        q, k, v, out, lse, bias_t if bias_t is not None else dummy, table_t if table_t is not None else dummy,
        index_t if index_t is not None else dummy, keep_t,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *sb, *st, *si, *skp,
        h, n, d, scale * LOG2E,
        BIAS_MODE=mode, HAS_MASK=has_mask, UPCAST=upcast, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def _group_count(b: int, h: int, n: int, block_m: int) -> int:
    """Batch groups for the dQ/dbias kernel: enough programs to fill the GPU (about 4 per SM), at most B."""
    if interpreting():
        return min(b, 2)
    programs = triton.cdiv(n, block_m) * h
    target = 4 * 132
    return max(1, min(b, triton.cdiv(target, programs)))


def _backward(do, q, k, v, out, lse, bias, table, index, keep, scale, need_dbias):
    b, h, n, d = q.shape
    dq = torch.empty(b, n, h, d, device=q.device, dtype=q.dtype).permute(0, 2, 1, 3)
    dk = torch.empty(b, n, h, d, device=q.device, dtype=k.dtype).permute(0, 2, 1, 3)
    dv = torch.empty(b, n, h, d, device=q.device, dtype=v.dtype).permute(0, 2, 1, 3)
    dbias = None
    if n == 0 or b == 0:
        if need_dbias:
            dbias = torch.zeros_like(bias) if bias is not None else torch.zeros_like(table)
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias
    index_i32, order, offsets = _index_data(index, table.shape[0]) if table is not None else (None, None, None)
    mode, bias_t, sb, table_t, st, index_t, si = _bias_args(bias, table, index_i32)
    has_mask, keep_t, skp = _keep_args(keep, q)
    upcast, ieee = _flags(q)
    bm, bn, bd, warps, stages = _blocks(d)
    dummy = _dummy(q)
    bias_t = bias_t if bias_t is not None else dummy
    table_t = table_t if table_t is not None else dummy
    index_t = index_t if index_t is not None else dummy
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    _bwd_delta[(triton.cdiv(n, bm), b * h)](
        out, do, delta, *out.stride(), *do.stride(), h, n, d, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps)
    common = (*sb, *st, *si, *skp)
    _bwd_dkdv[(triton.cdiv(n, bn), b * h)](
        q, k, v, do, lse, delta, dk, dv, bias_t, table_t, index_t, keep_t,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *common,
        h, n, d, scale, scale * LOG2E,
        BIAS_MODE=mode, HAS_MASK=has_mask, UPCAST=upcast, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        num_warps=warps, num_stages=stages,
    )
    need_dbias = need_dbias and mode != 0
    groups = _group_count(b, h, n, bm)
    rows_per_group = triton.cdiv(b, groups)
    groups = triton.cdiv(b, rows_per_group)
    dpart = torch.zeros(groups, h, n, n, device=q.device, dtype=torch.float32) if need_dbias else dummy
    _bwd_dq[(triton.cdiv(n, bm), h, groups)](
        q, k, v, do, lse, delta, dq, dpart, bias_t, table_t, index_t, keep_t,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *common,
        b, h, n, d, rows_per_group, scale, scale * LOG2E,
        BIAS_MODE=mode, HAS_MASK=has_mask, NEED_DBIAS=need_dbias, UPCAST=upcast, IEEE=ieee,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    if need_dbias:
        if mode == 1:
            dbias = dpart.sum(0).to(bias.dtype)
        else:
            rows = table.shape[0]
            dtable = torch.empty(rows, h, device=q.device, dtype=torch.float32)
            _bucket_sum[(rows,)](dpart, order, offsets, dtable, groups, h, n * n, *dtable.stride(),
                                 BLOCK=128, BLOCK_H=max(16, triton.next_power_of_2(h)), num_warps=4)
            dbias = dtable.to(table.dtype)
    return dq, dk, dv, dbias


# ---- custom ops (torch.compile traces them) and autograd --------------------------------------------------------

if triton is not None:

    @torch.library.custom_op("vlmo_fast::rel_pos_attn_fwd", mutates_args=())
    def rel_pos_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                         table: Optional[torch.Tensor], index: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                         scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return _forward(q, k, v, bias, table, index, keep, scale)

    @rel_pos_attn_fwd.register_fake
    def _(q, k, v, bias, table, index, keep, scale):
        b, h, n, d = q.shape
        return q.new_empty(b, n, h, d).permute(0, 2, 1, 3), q.new_empty(b, h, n, dtype=torch.float32)

    @torch.library.custom_op("vlmo_fast::rel_pos_attn_bwd", mutates_args=())
    def rel_pos_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, bias: Optional[torch.Tensor], table: Optional[torch.Tensor],
                         index: Optional[torch.Tensor], keep: Optional[torch.Tensor], scale: float,
                         need_dbias: bool) -> List[torch.Tensor]:
        dq, dk, dv, dbias = _backward(do, q, k, v, out, lse, bias, table, index, keep, scale, need_dbias)
        return [dq, dk, dv] + ([dbias] if dbias is not None else [])

    @rel_pos_attn_bwd.register_fake
    def _(do, q, k, v, out, lse, bias, table, index, keep, scale, need_dbias):
        b, h, n, d = q.shape
        grads = [q.new_empty(b, n, h, d).permute(0, 2, 1, 3) for _ in range(3)]
        if need_dbias and (bias is not None or table is not None):
            grads.append(torch.empty_like(bias if bias is not None else table, memory_format=torch.contiguous_format))
        return grads

    def _setup_context(ctx, inputs, output):
        q, k, v, bias, table, index, keep, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, bias, table, index, keep)
        ctx.scale = scale

    def _attn_backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, bias, table, index, keep = ctx.saved_tensors
        need = (bias is not None and ctx.needs_input_grad[3]) or (table is not None and ctx.needs_input_grad[4])
        grads = rel_pos_attn_bwd(grad_out, q, k, v, out, lse, bias, table, index, keep, ctx.scale, need)
        dbias = grads[3] if len(grads) > 3 else None
        return (grads[0], grads[1], grads[2], dbias if bias is not None else None,
                dbias if table is not None else None, None, None, None)

    rel_pos_attn_fwd.register_autograd(_attn_backward, setup_context=_setup_context)


def attention_triton(q, k, v, scale, bias, bias_table, bias_index, keep) -> torch.Tensor:
    """Backend entry point (arguments validated by ``vlmo_fast.ops.rel_pos_attention``)."""
    return rel_pos_attn_fwd(q, k, v, bias, bias_table, bias_index, keep, scale)[0]


def unsupported(q, k, v, bias, bias_table, bias_index, keep) -> Optional[str]:
    if triton is None:
        return f"triton is not installed ({_TRITON_ERROR})"
    if q.device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
    if q.device.type not in ("cuda", "cpu"):
        return f"device {q.device.type} is not supported"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} is not supported (fp32, fp16, bf16)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.shape[0] * q.shape[1] >= 65536:
        return "B*H must be < 65536"
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in (q, k, v)) and q.device.type == "cuda":
        return "q, k, v need a unit stride along the head dimension"
    return None


_backend.register("attention", "triton", attention_triton, unsupported, priority=10, auto_devices=("cuda",))
