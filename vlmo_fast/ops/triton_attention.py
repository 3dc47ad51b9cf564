"""Flash-style attention with VLMo's relative-position bias, in Triton (spec §2, §4).

    out[b, h] = softmax(scale · q kᵀ + bias[h] + mask[b]) v,   bias[h, i, j] = table[index[i, j], h]  (or dense)

Never materialises the (B, H, N, N) scores; a (table, index) bias is gathered once per call into an (H, N, N) bias
the batch shares (TABLE_BIAS = "dense", measured faster on an H100) or, with TABLE_BIAS = "in-kernel", by each score
inside the kernel. The padding mask is applied to keys, and a row whose keys are all masked outputs zeros.

Kernels (one program per tile; scores in base-2 units, statistics in fp32):
  _fwd          grid (query blocks, B·H): online softmax over key blocks; writes out and each row's max and 1/sum.
  _bwd_delta    grid (query blocks, B·H): delta = rowsum(dO ∘ O).
  _bwd_dkdv     grid (key blocks, B·H): loops over query blocks, recomputes Pᵀ, accumulates dK and dV.
  _bwd_dq       grid (query blocks, H, G; G = B without a bias gradient): loops over the batch rows of group g
                and over key blocks, accumulates dQ per row and, when the bias needs a gradient, the batch sum of dS
                for its (query block, key block) tiles in a per-group partial buffer (G, H, NP, NP) that only this
                program touches (N padded to NP, a multiple of every tile size: whole tiles, no masks, vectorized
                read-modify-writes).
  _bucket_sum   grid (table rows): sums the partials, first summed over the groups, over the positions that share
                a table row (a CSR of the index, precomputed once per index tensor), in a fixed order.
There are no atomics anywhere: for a given tile configuration every sum runs in a fixed order, and the memory for the
bias gradient is G·H·N² floats, independent of the batch (no O(B·H·N²) tensor). The tile shapes do decide that order,
and the autotuner picks them by timing, so two processes (runs, ranks) can pick differently and differ in the last
bits. Under PyTorch's deterministic mode (``torch.use_deterministic_algorithms(True)``) the tuned kernels run fixed
configurations instead (DETERMINISTIC_CONFIGS), and the dQ kernel's batch grouping ignores the SM count: bit-identical
results from run to run and rank to rank on GPUs of the same architecture with the same software, as Inductor does
for its own Triton kernels in that mode.

Registered as the custom ops ``vlmo_fast::rel_pos_attn_fwd`` / ``vlmo_fast::rel_pos_attn_bwd`` with autograd and fake
implementations, so ``torch.compile`` traces the model without graph breaks.
"""

import contextlib
import functools
import inspect
import os
import re
import threading
from typing import List, Optional, Tuple

import torch

from . import backend as _backend
from ._autograd import first_order_only
from ._checks import HALF_DTYPES, compute_dtype, int32_index
from .attention import unpack_qkv
from ._memo import TensorMemo

try:
    import triton
    import triton.language as tl

    _TRITON_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - triton ships with CUDA torch and is a test dependency
    triton = None
    _TRITON_ERROR = str(exc)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
# The dQ kernel's bias-gradient partials are (NP, NP) per group and head, NP = N rounded up to this, a multiple of
# every BLOCK_M and BLOCK_N of its configurations: whole tiles, so no masks and vectorized accesses (fewer registers:
# see tests/triton_aot.py). The cost is memory for short sequences: 1.17x at N = 237, but 10x at the text-only
# N = 40 (128² instead of 40² floats per group and head, e.g. 35 MB instead of 3.4 MB at 44 groups x 12 heads,
# zero-filled once per backward).
_PART_PAD = 128


def _part_size(n: int) -> int:
    """NP for sequence length n."""
    return -(-n // _PART_PAD) * _PART_PAD


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _tile(PTR, b, h, rows, offs_d, s_b, s_h, s_n, s_d, N, D, UPCAST: tl.constexpr):
        """A (rows, BLOCK_D) tile of a (B, H, N, D) tensor with any strides; zeros outside; fp32 under UPCAST
        (bf16 arithmetic is wrong in the CPU interpreter)."""
        t = tl.load(PTR + b * s_b + h * s_h + rows[:, None] * s_n + offs_d[None, :] * s_d,
                    mask=(rows[:, None] < N) & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def cast_for(x, PTR, EMULATE_RNE: tl.constexpr):
        """x converted to PTR's element type, rounding to nearest even. On a GPU that is what ``.to`` does; the CPU
        interpreter truncates fp32→bf16 instead, so under EMULATE_RNE (interpreter only) the rounding is done on the
        bits first (NaN kept; values past the largest bf16 round to inf as on the GPU)."""
        if EMULATE_RNE:
            if PTR.dtype.element_ty == tl.bfloat16:
                x = _bf16_rne(x)
        return x.to(PTR.dtype.element_ty)

    @triton.jit
    def _bf16_rne(x):
        """x rounded to bf16 precision, nearest even, on its fp32 bits and kept in fp32 (NaN kept; values past the
        largest bf16 go to inf, as a GPU's conversion does)."""
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)

    @triton.jit
    def _operand(x, like, UPCAST: tl.constexpr):
        """fp32 x (P, dS) as ``like``'s dtype for a product with it: rounded to fp16/bf16 as the GPU's tensor-core
        products take it. Under UPCAST (the interpreter's bf16, whose operands are held in fp32) x is rounded to
        bf16 precision on its bits, nearest even, and kept in fp32, so CPU checks see the GPU's rounding."""
        if UPCAST:
            return _bf16_rne(x)
        return x.to(like.dtype)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a @ b with fp32 accumulation; IEEE fp32 products (no TF32) for fp32 inputs."""
        if IEEE:
            out = tl.dot(a, b, input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def _vlmo_index(qi, kj, LT, W, L0):
        """The official VLMo relative-position index (spec §2) computed from positions: text [0, LT), then the image
        CLS and W·W patches. LT = 0 gives the image index, LT = N the text index, anything between the fusion one.
        qi, kj: query and key positions as broadcastable 2-D tensors ((M, 1) and (1, N), or transposed)."""
        W2 = 2 * W - 1
        D_IMG = W2 * W2 + 3
        R = D_IMG + 2 * L0 + 2
        pi = qi - LT - 1  # patch number (row-major) of image query rows
        pj = kj - LT - 1
        img = (pi // W - pj // W + W - 1) * W2 + (pi % W - pj % W + W - 1)  # query minus key
        txt = kj - qi + L0 + D_IMG  # key minus query
        ti = qi < LT
        tj = kj < LT
        xi = qi == 0
        xj = kj == 0
        ci = qi == LT
        cj = kj == LT
        tt = tl.where(xi & xj, R - 1, tl.where(xi, R - 3, tl.where(xj, R - 2, txt)))
        ii = tl.where(ci & cj, D_IMG - 1, tl.where(ci, D_IMG - 3, tl.where(cj, D_IMG - 2, img)))
        return tl.where(ti, tl.where(tj, tt, D_IMG), tl.where(tj, D_IMG + 1, ii))

    @triton.jit
    def _logits(s, qi, kj, N, h, scale_log2,
                BIAS, sb_h, sb_m, sb_n, NB,  # dense bias (H, N, N), rows padded to NB
                TABLE, st_r, st_h,  # (H, R) per-head contiguous copy of the table slice
                INDEX, si_m, si_n,  # (N, N) int32 index (BIAS_MODE 2)
                LT, W, L0,  # the index's structure (BIAS_MODE 3)
                KEEP_ROW, sk_n,  # (N,) uint8 keep flags of this batch row
                BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr, KEYS_FIRST: tl.constexpr):
        """Logits in base-2 units from the raw products s = q·k: (scale·s + bias)·log2(e), -inf on masked or
        out-of-range keys. qi, kj: the query and key positions of s's elements as broadcastable 2-D tensors, (M, 1)
        and (1, N) for a (queries, keys) tile; (1, M) and (N, 1) for a transposed (keys, queries) one, KEYS_FIRST,
        which takes a dense bias transposed too (_keys_first).

        BIAS_MODE 0: none; 1: dense; 2: gathered through a loaded index; 3: gathered through the official VLMo index
        computed from the positions (no index traffic)."""
        s = s * scale_log2
        in_range = (qi < N) & (kj < N)
        if BIAS_MODE == 1:
            # the columns N..NB of the padded rows exist (and are finite): a mask on NB, a multiple of 16, keeps the
            # loads 16-byte vectors (one on N = 237 would split them); those keys are masked below
            if KEYS_FIRST:
                # the bias is given transposed, (H, keys, queries): the tile's second axis is then the contiguous
                # one in memory, as in the MMA layout the products leave s in (Triton gives the load that layout;
                # along the first axis it became one 4-byte load per element)
                bias = tl.load(BIAS + h * sb_h + kj * sb_m + qi * sb_n, mask=(kj < N) & (qi < NB), other=0.0)
            else:
                bias = tl.load(BIAS + h * sb_h + qi * sb_m + kj * sb_n, mask=(qi < N) & (kj < NB), other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        if BIAS_MODE == 2:
            idx = tl.load(INDEX + qi * si_m + kj * si_n, mask=in_range, other=0)
            bias = tl.load(TABLE + h * st_h + idx * st_r, mask=in_range, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        if BIAS_MODE == 3:
            idx = _vlmo_index(qi, kj, LT, W, L0)
            bias = tl.load(TABLE + h * st_h + idx * st_r, mask=in_range, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        key_ok = kj < N
        if HAS_MASK:
            key_ok = key_ok & (tl.load(KEEP_ROW + kj * sk_n, mask=kj < N, other=0) != 0)
        return tl.where(key_ok, s, float("-inf"))

    @triton.jit
    def _scores(q, k, offs_m, offs_n, N, h, scale_log2,
                BIAS, sb_h, sb_m, sb_n, NB, TABLE, st_r, st_h, INDEX, si_m, si_n, LT, W, L0, KEEP_ROW, sk_n,
                BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
        """(BLOCK_M, BLOCK_N) logits of the query rows offs_m against the keys offs_n (see _logits)."""
        return _logits(_dot(q, tl.trans(k), IEEE), offs_m[:, None], offs_n[None, :], N, h, scale_log2,
                       BIAS, sb_h, sb_m, sb_n, NB, TABLE, st_r, st_h, INDEX, si_m, si_n, LT, W, L0, KEEP_ROW, sk_n,
                       BIAS_MODE, HAS_MASK, False)

    @triton.jit
    def _fwd(Q, K, V, O, OLO, LSE, BIAS, TABLE, INDEX, KEEP,
             sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_n, so_d,
             sb_h, sb_m, sb_n, NB, st_r, st_h, si_m, si_n, LT, W, L0, skp_b, skp_n,
             H, N, D, scale_log2,
             BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
             STORE_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)  # h·(head stride) passes 2^31 at large N (a dense bias: H·N·NB floats)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        q = _tile(Q, b, h, offs_m, offs_d, sq_b, sq_h, sq_n, sq_d, N, D, UPCAST)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc_lo = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # (STORE_LO only: else never updated, and removed)
        keep_row = KEEP + b * skp_b
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _tile(K, b, h, offs_n, offs_d, sk_b, sk_h, sk_n, sk_d, N, D, UPCAST)
            v = _tile(V, b, h, offs_n, offs_d, sv_b, sv_h, sv_n, sv_d, N, D, UPCAST)
            s = _scores(q, k, offs_m, offs_n, N, h, scale_log2, BIAS, sb_h, sb_m, sb_n, NB, TABLE, st_r, st_h,
                        INDEX, si_m, si_n, LT, W, L0, keep_row, skp_n, BIAS_MODE, HAS_MASK, IEEE)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN from -inf - -inf
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            pr = _operand(p, v, UPCAST)
            acc = acc * alpha[:, None] + _dot(pr, v, IEEE)
            if STORE_LO:  # what rounding P for the product lost, through a product of its own: (P - P̃) V
                acc_lo = acc_lo * alpha[:, None] + _dot(_operand(p - pr.to(tl.float32), v, UPCAST), v, IEEE)
            m_i = m_new
        dead = l_i == 0.0
        out = acc / tl.where(dead, 1.0, l_i)[:, None]
        o_offs = b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d
        rounded = cast_for(out, O, UPCAST)
        tl.store(O + o_offs, rounded, mask=(offs_m[:, None] < N) & d_ok)
        if STORE_LO:
            # what O lost to its rounding and to the rounding of P for the product: O + OLO = (P V)/l of the fp32 P
            # to ~2^-20 of it, so that the backward's row sums dO·(O + OLO) are those of the P it recomputes (the
            # bias gradient sums dS = P (dP - rowsum) over whole rows: a row-wide error there does not average out)
            lo = out - rounded.to(tl.float32) + acc_lo / tl.where(dead, 1.0, l_i)[:, None]
            tl.store(OLO + o_offs, cast_for(lo, OLO, UPCAST), mask=(offs_m[:, None] < N) & d_ok)
        # the row statistics for the backward's P = exp2(s - m) / l: m and 1/l, not one log-sum-exp m + log2 l,
        # whose fp32 rounding (an ulp of |m|, 8e-6 at m = 87) gave the dominant entries of P an absolute error that
        # far exceeded the eager softmax's (exp(0) = 1 there) in fp32 gradients at large logits
        pairs = (pid_bh.to(tl.int64) * N + offs_m)[:, None] * 2 + tl.arange(0, 2)[None, :]  # (B, H, N, 2) pairs
        inv_l = tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, l_i))  # (no 1/0 computed for a dead row)
        tl.store(LSE + pairs, tl.join(tl.where(dead, float("inf"), m_i), inv_l), mask=(offs_m < N)[:, None])

    @triton.jit
    def _bwd_delta(O, OLO, DO, DELTA, so_b, so_h, so_n, so_d, sdo_b, sdo_h, sdo_n, sdo_d, H, N, D,
                   HAS_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)  # h·(head stride) passes 2^31 at large N (a dense bias: H·N·NB floats)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_m[:, None] < N) & (offs_d[None, :] < D)
        o_offs = b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d
        o = tl.load(O + o_offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_LO:
            o += tl.load(OLO + o_offs, mask=ok, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_n + offs_d[None, :] * sdo_d, mask=ok, other=0.0)
        delta = tl.sum(o * do.to(tl.float32), 1)
        tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)

    @triton.jit
    def _row_stats(LSE, DELTA, stats, offs_m, N):
        """(row max m, 1 / row sum l, delta) of the query rows offs_m of one (batch row, head), for
        P = exp2(s - m) / l; stats = its offset in the (B, H, N) statistics (LSE holds (m, 1/l) pairs: one 8-byte
        load a row)."""
        ok = offs_m < N
        pair = tl.load(LSE + (stats + offs_m)[:, None] * 2 + tl.arange(0, 2)[None, :], mask=ok[:, None], other=0.0)
        m, inv_l = tl.split(pair)
        delta = tl.load(DELTA + stats + offs_m, mask=ok, other=0.0)
        return tl.where(ok, m, float("inf")), inv_l, delta

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, TABLE, INDEX, KEEP,
                  sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                  sdo_b, sdo_h, sdo_n, sdo_d, sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d,
                  sb_h, sb_m, sb_n, NB, st_r, st_h, si_m, si_n, LT, W, L0, skp_b, skp_n,
                  H, N, D, scale, scale_log2,
                  BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)  # h·(head stride) passes 2^31 at large N (a dense bias: H·N·NB floats)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        kv_ok = (offs_n[:, None] < N) & d_ok
        k = _tile(K, b, h, offs_n, offs_d, sk_b, sk_h, sk_n, sk_d, N, D, UPCAST)
        v = _tile(V, b, h, offs_n, offs_d, sv_b, sv_h, sv_n, sv_d, N, D, UPCAST)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # the padding mask of this program's keys, read once (the same for every query block)
        key_ok = offs_n < N
        if HAS_MASK:
            key_ok = key_ok & (tl.load(KEEP + b * skp_b + offs_n * skp_n, mask=offs_n < N, other=0) != 0)
        stats = pid_bh.to(tl.int64) * N
        # the tiles are transposed, (keys, queries): every product then has this program's BLOCK_N keys as its M
        # dimension (Hopper's warpgroup MMA needs M >= 64 per 4 warps) and takes Pᵀ and dSᵀ straight from registers
        # as its A operand, with no transpose of them through shared memory
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _tile(Q, b, h, offs_m, offs_d, sq_b, sq_h, sq_n, sq_d, N, D, UPCAST)
            do = _tile(DO, b, h, offs_m, offs_d, sdo_b, sdo_h, sdo_n, sdo_d, N, D, UPCAST)
            m, inv_l, delta = _row_stats(LSE, DELTA, stats, offs_m, N)
            st = _logits(_dot(k, tl.trans(q), IEEE), offs_m[None, :], offs_n[:, None], N, h, scale_log2,
                         BIAS, sb_h, sb_m, sb_n, NB, TABLE, st_r, st_h, INDEX, si_m, si_n, LT, W, L0, KEEP, skp_n,
                         BIAS_MODE, False, True)
            st = tl.where(key_ok[:, None], st, float("-inf"))
            pt = tl.math.exp2(st - m[None, :]) * inv_l[None, :]
            dv += _dot(_operand(pt, do, UPCAST), do, IEEE)
            dst = pt * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
            dk += _dot(_operand(dst, q, UPCAST), q, IEEE)
        tl.store(DK + b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :] * sdk_d,
                 cast_for(dk * scale, DK, UPCAST), mask=kv_ok)
        tl.store(DV + b * sdv_b + h * sdv_h + offs_n[:, None] * sdv_n + offs_d[None, :] * sdv_d,
                 cast_for(dv, DV, UPCAST), mask=kv_ok)

    @triton.jit
    def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, DPART, BIAS, TABLE, INDEX, KEEP,
                sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                sdo_b, sdo_h, sdo_n, sdo_d, sdq_b, sdq_h, sdq_n, sdq_d,
                sb_h, sb_m, sb_n, NB, st_r, st_h, si_m, si_n, LT, W, L0, skp_b, skp_n,
                B, H, N, D, rows_per_group, NP, scale, scale_log2,
                BIAS_MODE: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DBIAS: tl.constexpr, UPCAST: tl.constexpr,
                IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        g = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        q_ok = (offs_m[:, None] < N) & d_ok
        b_start = g * rows_per_group
        b_end = tl.minimum(b_start + rows_per_group, B)
        part = DPART + (g.to(tl.int64) * H + h) * NP * NP  # (NP, NP) partial dS sum of this group and head
        if BLOCK_N == 256:  # WHOLE_ROW: N <= 256 (the autotuner prunes these tiles otherwise)
            # one key tile holds the whole row, so the batch sum of dS stays in registers and reaches the partials
            # once, as a plain store: no read-modify-write per batch row, no barrier
            offs_n = tl.arange(0, BLOCK_N)
            dsum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            # the bias tile (times log2 e; -inf past N) is the same for every batch row: read (or gathered) once
            bias = _logits(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), offs_m[:, None], offs_n[None, :], N, h, 1.0,
                           BIAS, sb_h, sb_m, sb_n, NB, TABLE, st_r, st_h, INDEX, si_m, si_n, LT, W, L0, KEEP, skp_n,
                           BIAS_MODE, False, False)
            for b32 in range(b_start, b_end):
                b = b32 + tl.zeros([], tl.int64)
                q = _tile(Q, b, h, offs_m, offs_d, sq_b, sq_h, sq_n, sq_d, N, D, UPCAST)
                do = _tile(DO, b, h, offs_m, offs_d, sdo_b, sdo_h, sdo_n, sdo_d, N, D, UPCAST)
                m, inv_l, delta = _row_stats(LSE, DELTA, (b * H + h) * N, offs_m, N)
                k = _tile(K, b, h, offs_n, offs_d, sk_b, sk_h, sk_n, sk_d, N, D, UPCAST)
                v = _tile(V, b, h, offs_n, offs_d, sv_b, sv_h, sv_n, sv_d, N, D, UPCAST)
                # the same sum, in the same order, as _scores with the bias: (scale·q kᵀ)·log2 e + bias·log2 e
                s = _scores(q, k, offs_m, offs_n, N, h, scale_log2, BIAS, sb_h, sb_m, sb_n, NB, TABLE, st_r, st_h,
                            INDEX, si_m, si_n, LT, W, L0, KEEP + b * skp_b, skp_n, 0, HAS_MASK, IEEE) + bias
                p = tl.math.exp2(s - m[:, None]) * inv_l[:, None]
                ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
                dq = _dot(_operand(ds, k, UPCAST), k, IEEE)
                tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_n + offs_d[None, :] * sdq_d,
                         cast_for(dq * scale, DQ, UPCAST), mask=q_ok)
                if NEED_DBIAS:
                    dsum += ds
            if NEED_DBIAS:  # columns past NP (N <= 128 pads to 128 only) hold ds = 0 and are not stored
                tl.store(part + offs_m[:, None] * NP + offs_n[None, :], dsum, mask=offs_n[None, :] < NP)
        else:
            for b32 in range(b_start, b_end):
                b = b32 + tl.zeros([], tl.int64)  # 64-bit offsets (b32 is a Python int in the interpreter)
                q = _tile(Q, b, h, offs_m, offs_d, sq_b, sq_h, sq_n, sq_d, N, D, UPCAST)
                do = _tile(DO, b, h, offs_m, offs_d, sdo_b, sdo_h, sdo_n, sdo_d, N, D, UPCAST)
                m, inv_l, delta = _row_stats(LSE, DELTA, (b * H + h) * N, offs_m, N)
                keep_row = KEEP + b * skp_b
                dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                for start_n in range(0, N, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    k = _tile(K, b, h, offs_n, offs_d, sk_b, sk_h, sk_n, sk_d, N, D, UPCAST)
                    v = _tile(V, b, h, offs_n, offs_d, sv_b, sv_h, sv_n, sv_d, N, D, UPCAST)
                    s = _scores(q, k, offs_m, offs_n, N, h, scale_log2, BIAS, sb_h, sb_m, sb_n, NB, TABLE, st_r,
                                st_h, INDEX, si_m, si_n, LT, W, L0, keep_row, skp_n, BIAS_MODE, HAS_MASK, IEEE)
                    p = tl.math.exp2(s - m[:, None]) * inv_l[:, None]
                    ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
                    dq += _dot(_operand(ds, k, UPCAST), k, IEEE)
                    if NEED_DBIAS:
                        # only this program touches these elements: the batch rows add in a fixed order. The tile
                        # lies inside the padded (NP, NP) buffer; past row/column N, ds is 0 (p = 0 there).
                        ptrs = part + offs_m[:, None] * NP + offs_n[None, :]
                        tl.store(ptrs, tl.load(ptrs) + ds)
                tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_n + offs_d[None, :] * sdq_d,
                         cast_for(dq * scale, DQ, UPCAST), mask=q_ok)
                if NEED_DBIAS:
                    # the next batch row reads the partials back; Triton may give those loads another thread
                    # layout than these stores, so the program's threads sync here (its global writes then visible
                    # to all)
                    tl.debug_barrier()

    @triton.jit
    def _bucket_sum(DSUM, ORDER, OFFSETS, DTABLE, H, NPP, sdt_r, sdt_h,
                    BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
        """d_table[r, h] = Σ_{positions (i, j) with index[i, j] == r} dsum[h, i, j], in a fixed order (the CSR holds
        the positions i·NP + j in the (NP, NP) batch sums of dS of each head; NPP = NP²)."""
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
            vals = tl.load(DSUM + offs_h[None, :].to(tl.int64) * NPP + pos[:, None], mask=ok[:, None] & h_ok[None, :],
                           other=0.0)
            acc += tl.sum(vals, 0)
        tl.store(DTABLE + r * sdt_r + offs_h * sdt_h, acc, mask=h_ok)


# ---- tuning -------------------------------------------------------------------------------------------------------


def _config_list(shapes):
    """Autotuned configurations; a single one under the interpreter (no timing there)."""
    if interpreting():
        shapes = [(64, 64, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in shapes]


# (BLOCK_M, BLOCK_N, warps, stages) candidates of the three autotuned kernels: every one compiles for sm_90
# (H100/H200) without register spills for the model's launches (bf16, D = 64, the table's dense bias, padding
# mask), and each kernel has some that do not spill on sm_80 (A100, whose mma path needs more registers; the 32 x 32
# forward is there for base_plus's padded D = 34):
# tests/triton_aot.py checks both with the specialization the JIT gives the real arguments, and the interpreter tests
# run each one. The autotuner picks among them on the device. The dQ tiles 16 x 256 are whole rows (WHOLE_ROW,
# N <= 256): the batch sum of dS stays in registers instead of a read-modify-write of the partials per batch row and
# key tile, and with 2 stages the next batch row's q, dO, K and V tiles load during this one's math (untimed on a GPU
# so far: the autotuner decides). The dK/dV tiles are (keys, queries): with BLOCK_N >= 64 keys all four products are
# warpgroup MMAs on sm_90 (the first H100 run's pick, 32 x 64 in the (queries, keys) form, compiled 32 of its 36 MMA
# instructions to the older mma.sync, at 218 registers against 170 now with Triton 3.6).
FWD_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)]
DKDV_CONFIGS = [(64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 4, 3), (64, 64, 8, 3), (32, 64, 4, 2),
                (32, 64, 4, 3), (64, 32, 8, 3)]
DQ_CONFIGS = [(128, 64, 8, 1), (64, 64, 4, 1), (128, 32, 8, 1), (64, 32, 8, 2), (32, 64, 8, 2),
              (16, 256, 8, 1), (16, 256, 8, 2)]


def _bench_on_the_device(kernel_call, quantiles):
    """The driver's benchmarker, looked up when the autotuner first times a kernel."""
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def _autotune(configs, key, reset_to_zero=None, prune=None):
    """``triton.autotune``, without touching the GPU driver at import. The autotuner of Triton 3.2-3.3 (torch 2.6-2.7)
    asks the driver for its benchmarker in its constructor, so with those versions importing vlmo_fast raised
    "0 active drivers" on any machine without a GPU (CUDA builds of torch bring Triton along). Later versions look
    the benchmarker up at the first tuning; for 3.2-3.3 a lazy one is handed over (directly to the constructor, as
    3.2's decorator drops its do_bench argument). ``prune(configs, named_args, **kwargs)`` drops the candidates
    that cannot run a launch (Triton's early_config_prune)."""
    from triton.runtime.autotuner import Autotuner

    by = {"early_config_prune": prune} if prune is not None else None
    lazy = isinstance(inspect.getattr_static(Autotuner, "do_bench", None), (property, functools.cached_property))
    if lazy or "do_bench" not in inspect.signature(Autotuner).parameters:
        return triton.autotune(configs, key=key, reset_to_zero=reset_to_zero, prune_configs_by=by)
    return lambda fn: Autotuner(fn, fn.arg_names, configs, key, reset_to_zero, None, prune_configs_by=by,
                                do_bench=_bench_on_the_device)


# PyTorch's deterministic mode runs the three tuned kernels at these (BLOCK_M, BLOCK_N, warps, stages), never timed
# or chosen. Each is one of the candidates above that compiles without register spills for the model's launches
# (VLMo-base, base_plus, a dense bias) on sm_90 and sm_80 with Triton 3.6 (the GPU image's) and 3.9 (CI's), but
# for 4 bytes in one of those 24 cases (the forward, base_plus, sm_80, 3.9); all fit the shared memory for every
# dtype, bias form and head dim <= 128 on both (tests/triton_aot.py), and take any N (no whole-row tile). The
# forward's and the dK/dV kernel's are the first H100 run's autotuner picks for the model's case (a dense bias and
# padding, bf16, N = 237; results/gpu_suite_20261205T194632_h100/attention_forms.txt, before later kernel changes);
# that run's dQ pick, 64 x 64, spills on sm_80 and for base_plus.
DETERMINISTIC_CONFIGS = {"fwd": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (32, 64, 8, 2)}
# None: the fixed configurations exactly when PyTorch's deterministic mode is on; True / False: always / never (the
# benchmark's vlmo_fast[deterministic] rows time them against the autotuner's choice).
PIN_CONFIGS: Optional[bool] = None
# Whether a half-precision forward whose bias trains keeps O's low part (see attention_triton). False only to measure
# its cost (benchmarks/run.py's vlmo_fast[no low part] row): without it the bias gradient breaks the 2x rule.
KEEP_LOW_PART = True


def configs_pinned() -> bool:
    """Whether the tuned kernels run DETERMINISTIC_CONFIGS (see PIN_CONFIGS)."""
    return torch.are_deterministic_algorithms_enabled() if PIN_CONFIGS is None else PIN_CONFIGS


def _launch(tuned, name: str, grid, *args, **kwargs) -> None:
    """``tuned[grid](*args, **kwargs)``: the autotuner's choice, or, when configs_pinned(), the kernel itself at
    DETERMINISTIC_CONFIGS[name] (the autotuner neither times nor picks anything)."""
    if not configs_pinned():
        tuned[grid](*args, **kwargs)
        return
    m, n, warps, stages = DETERMINISTIC_CONFIGS[name]
    tuned.fn[grid](*args, BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages, **kwargs)


# The dQ tiles BLOCK_N == WHOLE_ROW hold a whole row of keys (the batch sum of dS then stays in registers): only for
# N <= WHOLE_ROW, which the autotuner's pruning enforces (_whole_rows_fit).
WHOLE_ROW = 256  # _bwd_dq tests BLOCK_N == 256 (a constexpr comparison needs the literal)


def _whole_rows_fit(configs, named_args, **kwargs):
    """The dQ candidates that can run a launch: whole-row tiles only where a row fits in one, and only for rows of at
    most 128 bytes per key (fp16/bf16 at D <= 64): their K and V tiles are 256 keys long, and at D = 128 or in fp32
    they (with 2 stages) ask for more shared memory than an H100 has, so the autotuner would only compile and discard
    them. And only for head dims that are multiples of 16: at D = 34 (base_plus) or 40, ptxas gives them 32 registers
    and 4.3-4.5 KB of spills per thread on sm_90 (Triton 3.6 and 3.9; tests/triton_aot.py), where D = 32, 48 and 64
    compile spill-free at 166-212 registers."""
    d = named_args["D"]
    row_bytes = named_args["Q"].element_size() * max(16, triton.next_power_of_2(d))
    whole = named_args["N"] <= WHOLE_ROW and row_bytes <= 128 and d % 16 == 0
    return [c for c in configs if c.kwargs["BLOCK_N"] != WHOLE_ROW or whole]


if triton is not None:
    _TUNE_KEY = ["N", "D", "BIAS_MODE", "HAS_MASK"]
    _fwd_tuned = _autotune(_config_list(FWD_CONFIGS), key=_TUNE_KEY + ["STORE_LO"])(_fwd)
    _dkdv_tuned = _autotune(_config_list(DKDV_CONFIGS), key=_TUNE_KEY)(_bwd_dkdv)
    _dq_tuned = _autotune(_config_list(DQ_CONFIGS), key=_TUNE_KEY + ["NEED_DBIAS"], reset_to_zero=["DPART"],
                          prune=_whole_rows_fit)(_bwd_dq)
    # whole tiles of the padded bias-gradient partials (see _PART_PAD); a whole-row tile stores only its columns
    # inside them
    assert all(_PART_PAD % m == 0 and (_PART_PAD % n == 0 or n == WHOLE_ROW) for m, n, _, _ in DQ_CONFIGS)


# ---- host side ---------------------------------------------------------------------------------------------------

_INDEX_DATA = TensorMemo(capture="reuse")  # per index tensor and table size: int32 copy, CSR, structure


def _structure(index: torch.Tensor, rows: int) -> Optional[Tuple[int, int, int]]:
    """(LT, W, L0) when ``index`` is one of the official VLMo index matrices for a table of ``rows`` rows (then the
    kernels compute it from positions instead of loading it), else None."""
    from ..model import relpos

    n = index.shape[0]
    for w in range(1, 64):
        d_img = relpos.num_image_distances(w)
        if (rows - d_img - 2) % 2 or rows - d_img - 2 < 2:
            continue
        l0 = (rows - d_img - 2) // 2
        candidates = []
        if n == w * w + 1:
            candidates.append((0, relpos.image_relative_position_index(w)))
        if 1 <= n - (w * w + 1) <= l0:
            lt = n - (w * w + 1)
            candidates.append((lt, relpos.fusion_relative_position_index(lt, w, l0)))
        if 2 <= n <= l0:
            candidates.append((n, relpos.text_relative_position_index(n, w, l0)))
        for lt, expected in candidates:
            if torch.equal(index.cpu().long(), expected):
                return lt, w, l0
    return None


def _index_data(index: torch.Tensor, rows: int):
    """(int32 contiguous index, CSR order, CSR row offsets, structure, row-padded int32 index) for an index tensor and
    a table size, computed once and reused until the tensor is modified in place. The CSR (positions sorted by table
    row, as offsets i·NP + j into the dQ kernel's padded partials) drives the deterministic reduction of the table
    gradient; the padded index gathers the table straight into the row-padded dense bias (_bias_args)."""
    return _INDEX_DATA.get(index, (rows,), lambda: _compute_index_data(index, rows))


def _compute_index_data(index: torch.Tensor, rows: int):
    # everything comes from one int32 copy, checked after copying: the kernels and the table gradient's buckets
    # never see a value out of [0, rows), even when the caller's tensor is changed behind its version counter, and
    # under torch.compile (where the public check cannot read values) a bad index is this clear error
    index_i32 = int32_index(index, rows)
    index = index_i32
    flat = index.reshape(-1).long()
    n = index.shape[0]
    order = torch.argsort(flat, stable=True)
    order = (order // n * _part_size(n) + order % n).to(torch.int32)
    counts = torch.bincount(flat, minlength=rows)
    offsets = torch.zeros(rows + 1, dtype=torch.int32, device=index.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    padded = torch.zeros(n, _bias_row(n), dtype=torch.int32, device=index.device)  # pad columns read row 0
    padded[:, :n] = index_i32
    return index_i32, order, offsets, _structure(index, rows), padded


# Floats per row of the dense bias the kernels read, a multiple of this: a row stride of N = 237 floats leaves every
# row but the first off 16-byte alignment, so each (BLOCK_M, BLOCK_N) bias tile loads one float at a time; with
# rows of a multiple of 16 floats (the JIT then knows the stride's divisibility) they load as 16-byte vectors, like
# q, k and v. (The first H100 run: the forward with a dense bias ran at 98 TFLOP/s against 182 with the mask alone.)
_BIAS_ROW_PAD = 16


def _bias_row(n: int) -> int:
    return -(-n // _BIAS_ROW_PAD) * _BIAS_ROW_PAD


def _dense_bias(bias: torch.Tensor) -> torch.Tensor:
    """A caller's dense (H, N, N) bias as fp32 with rows padded to _bias_row(N) floats, zeros in the padding (a view
    into the padded buffer: the kernels read the padding, see _scores)."""
    h, nq, nk = bias.shape
    out = torch.zeros(h, nq, _bias_row(nk), device=bias.device, dtype=torch.float32)[:, :, :nk]
    return out.copy_(bias)


def _bias_args(bias, table, index, structured: bool = True):
    """Kernel arguments for the bias: (mode, dense bias + strides, (H, R) table + strides, index + strides,
    (LT, W, L0)), dummies for the unused forms. A table is gathered into a dense (H, N, N) bias first unless
    TABLE_BIAS says "in-kernel" (see there)."""
    none = (None, (0, 0, 0, 0), None, (0, 0), None, (0, 0), (0, 1, 0))
    if bias is not None:
        bias = _dense_bias(bias)
        return (1, bias, (*bias.stride(), _bias_row(bias.shape[2]))) + none[2:]
    if table is None:
        return (0,) + none
    # the int32 copies (cached per index; any accepted integer dtype, uint8 included, indexes as positions)
    index_i32, _, _, struct, padded = _index_data(index, table.shape[0])
    if TABLE_BIAS == "dense":
        # (H, N, N) with padded rows, shared by the batch: the values a gather would read
        dense = table.t().float()[:, padded][:, :, : index.shape[1]]
        return (1, dense, (*dense.stride(), padded.shape[1])) + none[2:]
    # one contiguous row of R floats per head: the in-kernel gathers stay within a few cache lines
    table_t = table.t().contiguous()
    if struct is not None and structured:
        return 3, None, none[1], table_t, (1, table_t.stride(0)), None, (0, 0), struct
    return 2, None, none[1], table_t, (1, table_t.stride(0)), index_i32, index_i32.stride(), (0, 1, 0)


def _flags(q: torch.Tensor) -> Tuple[bool, bool]:
    """(UPCAST, IEEE): bf16 arithmetic is wrong in the CPU interpreter, so bf16 operands are upcast there, P and dS
    rounded to bf16 precision all the same (``_operand``); fp16 is not upcast (the interpreter rounds P and dS to
    fp16 and accumulates their products in fp32, as the GPU does): CPU checks see the GPU's rounding. fp32 inputs use
    IEEE fp32 dots (no TF32) so fp32 results match the fp32 reference."""
    upcast = interpreting() and q.dtype == torch.bfloat16
    return upcast, q.dtype == torch.float32


def _keep_args(keep: Optional[torch.Tensor], ref: torch.Tensor):
    if keep is None:
        return False, torch.empty(1, dtype=torch.uint8, device=ref.device), (0, 0)
    k = keep.view(torch.uint8) if keep.dtype == torch.bool else keep.to(torch.uint8)
    return True, k, k.stride()


def _common(q, bias, table, index, keep, structured):
    """Everything the three attention kernels share: pointers (dummies where unused), strides and flags."""
    mode, bias_t, sb, table_t, st, index_t, si, struct = _bias_args(bias, table, index, structured)
    has_mask, keep_t, skp = _keep_args(keep, q)
    upcast, ieee = _flags(q)
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    ptrs = (bias_t if bias_t is not None else dummy, table_t if table_t is not None else dummy,
            index_t if index_t is not None else torch.empty(1, dtype=torch.int32, device=q.device), keep_t)
    strides = (*sb, *st, *si, *struct, *skp)
    flags = dict(BIAS_MODE=mode, HAS_MASK=has_mask, UPCAST=upcast, IEEE=ieee,
                 BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])))
    return ptrs, strides, flags


def _keys_first(ptrs, strides, flags):
    """The kernel arguments of _common for the dK/dV kernel, whose tiles are (keys, queries): a dense bias is handed
    over transposed, (H, keys, queries) with rows padded to _bias_row(N) floats, so that its tiles load as 16-byte
    vectors there too (see _logits). H·N² floats, made per backward (2.7 MB at N = 237)."""
    if flags["BIAS_MODE"] != 1:
        return ptrs, strides
    bias = ptrs[0]
    h, n, _ = bias.shape
    biast = torch.zeros(h, n, _bias_row(n), device=bias.device, dtype=torch.float32)[:, :, :n]
    biast.copy_(bias.transpose(1, 2))
    return (biast,) + tuple(ptrs[1:]), (*biast.stride(), _bias_row(n)) + tuple(strides[4:])


# The structured (index computed in-kernel) path can be switched off to compare against the loaded-index path.
STRUCTURED_INDEX = True
# How a (table, index) bias reaches the kernels. "dense": gathered once per call into an (H, N, N) fp32 tensor that
# the whole batch shares (2.7 MB at N = 237, 42 MB at N = 941; made again in the backward, never kept), then read
# as a dense bias. "in-kernel": each score gathers table[index[i, j], h] itself (index loaded, or computed from the
# official geometry). Measured on an H100 (benchmarks/results/gpu_suite_20261205T194632_h100/attention_forms.txt,
# B=128, N=237, bf16, with padding): forward 98 TFLOP/s with a dense bias vs 40-49 gathering in the kernel,
# forward+backward 67 vs 28-29. The table gradient is reduced the same way either way (deterministic buckets over
# the index), and the results are the same bits.
TABLE_BIAS = "dense"


# Held around every Triton launch of these ops. Triton's autotuner keeps the arguments of the call it runs on the
# kernel object (Autotuner.nargs, None again when the call ends), and a kernel's first launch can find it compiled
# before its binary is loaded: a launch from another thread meanwhile (inference served from several threads) failed
# with a TypeError (triton-lang/triton#11494). With the lock a thread waits while another tunes a new shape.
_LAUNCH_LOCK = threading.RLock()


@contextlib.contextmanager
def launch_device(t: torch.Tensor):
    """The context of a Triton launch for ``t``: ``t``'s device made current when it is not (Triton launches on the
    current CUDA device, not on its arguments': tensors on cuda:1 while cuda:0 is current), and the launch lock."""
    with _LAUNCH_LOCK:
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                yield
        else:
            yield


def launch_index(t: torch.Tensor) -> int:
    """The CUDA device index a launch for ``t`` runs on (launch_device makes it current)."""
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _on_input_device(fn):
    @functools.wraps(fn)
    def run(t, *args):
        with launch_device(t):
            return fn(t, *args)

    return run


@_on_input_device
def _forward(q, k, v, bias, table, index, keep, scale, store_lo=False):
    """(out, lse, out_lo): out_lo holds what rounding the output to q's dtype lost (an empty tensor unless
    ``store_lo``), for the backward's row sums (see attention_triton)."""
    b, h, n, d = q.shape
    # (B, N, H, D) storage: the caller's transpose(1, 2).reshape(B, N, H·D) is then free
    out = torch.empty(b, n, h, d, device=q.device, dtype=q.dtype).permute(0, 2, 1, 3)
    lse = torch.empty(b, h, n, 2, device=q.device, dtype=torch.float32)  # (row max m, 1/l) pairs (see _fwd)
    out_lo = torch.empty_like(out) if store_lo else q.new_empty(0)
    if n == 0 or b == 0:
        return out, lse, out_lo
    ptrs, strides, flags = _common(q, bias, table, index, keep, STRUCTURED_INDEX)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)  # noqa: E731
    _launch(_fwd_tuned, "fwd", grid, q, k, v, out, out_lo if store_lo else out, lse, *ptrs, *q.stride(), *k.stride(),
            *v.stride(), *out.stride(), *strides, h, n, d, scale * LOG2E, STORE_LO=store_lo, **flags)
    return out, lse, out_lo


# dQ programs per SM that the batch grouping aims at when the bias needs a gradient. Each group costs a zero-filled
# (H, NP, NP) fp32 partial (3 MB at N = 237 for VLMo-base) and its share of the final reduction, and each program
# loops over its group's batch rows: more programs hide more latency, more groups cost memory and reduction traffic.
# 4 (at 64-row tiles) is the setting of the first H100 run; benchmarks/profile/attention_forms.py times others.
DQ_PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _group_count(b: int, h: int, n: int, need_dbias: bool, sms: int = 132) -> int:
    """Batch groups of the dQ kernel. Without a bias gradient there are no partials to share: a program per batch
    row. With one, enough groups for about DQ_PROGRAMS_PER_SM programs per SM at 64-row tiles."""
    if not need_dbias:
        return b
    if interpreting():
        return min(b, 2)
    programs = triton.cdiv(n, 64) * h
    return max(1, min(b, triton.cdiv(DQ_PROGRAMS_PER_SM * sms, programs)))


@_on_input_device
def _backward(do, q, k, v, out, lse, bias, table, index, keep, scale, need_dbias, out_lo=None):
    """(dqkv, dbias): dq, dk and dv packed in one (B, N, 3, H, D) tensor (``unpack_qkv`` gives the three), the
    layout of the qkv projection's output that q, k and v are views of in the model: its backward then takes them
    as they are (``split_qkv``), where separate tensors would be stacked and copied into that layout."""
    b, h, n, d = q.shape
    dqkv = torch.empty(b, n, 3, h, d, device=q.device, dtype=q.dtype)
    dq, dk, dv = unpack_qkv(dqkv)
    need_dbias = need_dbias and (bias is not None or table is not None)
    if n == 0 or b == 0:
        like = bias if bias is not None else table  # contiguous, as the kernels' gradients (and the fake kernel)
        dbias = torch.zeros(like.shape, device=like.device, dtype=like.dtype) if need_dbias else None
        return dqkv.zero_(), dbias
    ptrs, strides, flags = _common(q, bias, table, index, keep, STRUCTURED_INDEX)
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    has_lo = out_lo is not None and out_lo.numel() > 0
    _bwd_delta[(triton.cdiv(n, 64), b * h)](out, out_lo if has_lo else out, do, delta, *out.stride(), *do.stride(),
                                            h, n, d, HAS_LO=has_lo, BLOCK_M=64, BLOCK_D=flags["BLOCK_D"],
                                            num_warps=4)
    grid_kv = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)  # noqa: E731
    ptrs_kf, strides_kf = _keys_first(ptrs, strides, flags)
    _launch(_dkdv_tuned, "dkdv", grid_kv, q, k, v, do, lse, delta, dk, dv, *ptrs_kf,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *strides_kf,
            h, n, d, scale, scale * LOG2E, **flags)
    # the grouping sets the order in which the bias gradient adds up the batch: under pinned configurations it does
    # not follow the card's SM count either (an H100 PCIe has 114, an SXM 132), so the bits are the architecture's
    sms = _sm_count(launch_index(q)) if q.is_cuda and not configs_pinned() else 132
    groups = _group_count(b, h, n, need_dbias, sms)
    rows_per_group = triton.cdiv(b, groups)
    groups = triton.cdiv(b, rows_per_group)
    np_ = _part_size(n)
    dpart = (torch.zeros(groups, h, np_, np_, device=q.device, dtype=torch.float32) if need_dbias
             else torch.empty(1, device=q.device, dtype=torch.float32))
    grid_q = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), h, groups)  # noqa: E731
    _launch(_dq_tuned, "dq", grid_q, q, k, v, do, lse, delta, dq, dpart, *ptrs,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *strides,
            b, h, n, d, rows_per_group, np_, scale, scale * LOG2E, NEED_DBIAS=need_dbias, **flags)
    dbias = None
    if need_dbias and bias is not None:
        dbias = dpart.sum(0)[:, :n, :n].contiguous().to(bias.dtype)
    elif need_dbias:
        _, order, offsets, _, _ = _index_data(index, table.shape[0])
        rows = table.shape[0]
        dtable = torch.empty(rows, h, device=q.device, dtype=torch.float32)
        # the groups summed first, in one streaming pass: the bucket sum's reads are scattered (a 4-byte value per
        # 32-byte sector), so it should read one (H, NP, NP) partial, not G of them
        _bucket_sum[(rows,)](dpart.sum(0) if groups > 1 else dpart, order, offsets, dtable, h, np_ * np_,
                             *dtable.stride(), BLOCK=128, BLOCK_H=max(16, triton.next_power_of_2(h)), num_warps=4)
        dbias = dtable.to(table.dtype)
    return dqkv, dbias


# ---- custom ops (torch.compile traces them) and autograd --------------------------------------------------------

if triton is not None:

    @torch.library.custom_op("vlmo_fast::rel_pos_attn_fwd", mutates_args=())
    def rel_pos_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                         table: Optional[torch.Tensor], index: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                         scale: float, store_lo: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(q, k, v, bias, table, index, keep, scale, store_lo)

    @rel_pos_attn_fwd.register_fake
    def _(q, k, v, bias, table, index, keep, scale, store_lo):
        b, h, n, d = q.shape
        out = q.new_empty(b, n, h, d).permute(0, 2, 1, 3)
        stats = q.new_empty(b, h, n, 2, dtype=torch.float32)
        return out, stats, torch.empty_like(out) if store_lo else q.new_empty(0)

    @torch.library.custom_op("vlmo_fast::rel_pos_attn_bwd", mutates_args=())
    def rel_pos_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, bias: Optional[torch.Tensor], table: Optional[torch.Tensor],
                         index: Optional[torch.Tensor], keep: Optional[torch.Tensor], scale: float,
                         need_dbias: bool, out_lo: torch.Tensor) -> List[torch.Tensor]:
        dqkv, dbias = _backward(do, q, k, v, out, lse, bias, table, index, keep, scale, need_dbias, out_lo)
        return [dqkv] + ([dbias] if dbias is not None else [])

    @rel_pos_attn_bwd.register_fake
    def _(do, q, k, v, out, lse, bias, table, index, keep, scale, need_dbias, out_lo):
        b, h, n, d = q.shape
        grads = [q.new_empty(b, n, 3, h, d)]
        if need_dbias and (bias is not None or table is not None):
            grads.append(torch.empty_like(bias if bias is not None else table, memory_format=torch.contiguous_format))
        return grads

    def _setup_context(ctx, inputs, output):
        q, k, v, bias, table, index, keep, scale, store_lo = inputs
        out, lse, out_lo = output
        ctx.save_for_backward(q, k, v, out, lse, bias, table, index, keep, out_lo)
        ctx.scale = scale
        # lse and out_lo take no gradient: without this, autograd would allocate zeros of their size every backward
        ctx.set_materialize_grads(False)

    def _attn_grads(ctx, grad_out, backward):
        """The gradients of (q, k, v, bias, table, index, keep, scale, store_lo) from ``backward`` (the custom op
        or, in eager calls, ``_backward`` itself) on the tensors the forward saved."""
        q, k, v, out, lse, bias, table, index, keep, out_lo = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        need = (bias is not None and ctx.needs_input_grad[3]) or (table is not None and ctx.needs_input_grad[4])
        grads = backward(grad_out, q, k, v, out, lse, bias, table, index, keep, ctx.scale, need, out_lo)
        dbias = grads[1] if len(grads) > 1 else None
        return (*unpack_qkv(grads[0]), dbias if bias is not None else None,
                dbias if table is not None else None, None, None, None, None)

    def _attn_backward(ctx, grad_out, grad_lse, grad_lo):
        return _attn_grads(ctx, grad_out, rel_pos_attn_bwd)

    rel_pos_attn_fwd.register_autograd(_attn_backward, setup_context=_setup_context)

    class RelPosAttentionFunction(torch.autograd.Function):
        """Eager autograd around the same kernel calls as the custom ops, without the custom-op dispatch (about 8 us
        a call on the host: what a small-batch or inference step is made of)."""

        @staticmethod
        def forward(ctx, q, k, v, bias, table, index, keep, scale, store_lo):
            out, lse, out_lo = _forward(q, k, v, bias, table, index, keep, scale, store_lo)
            ctx.save_for_backward(q, k, v, out, lse, bias, table, index, keep, out_lo)
            ctx.scale = scale
            return out

        @staticmethod
        @first_order_only
        def backward(ctx, grad_out):
            return _attn_grads(ctx, grad_out, lambda *args: [g for g in _backward(*args) if g is not None])


def attention_triton(q, k, v, scale, bias, bias_table, bias_index, keep) -> torch.Tensor:
    """Backend entry point (arguments validated by ``vlmo_fast.ops.rel_pos_attention``).

    When the bias will get a gradient and q is fp16/bf16, the forward also keeps what the output lost to its own
    rounding and to the rounding of P for the P·V product (through one more product, of P's rounding residual with
    V): the backward's row sums delta = Σ_d dO·O then match the fp32 P it recomputes. From the rounded output (and
    P), their error enters every score gradient of the row alike and adds up in the bias gradient over whole rows:
    fp16, N = 941, twice the official math's error on an H100; with GPU-like rounding in the interpreter, up to 3.8x
    at N = 237, against at most 0.01x with the kept part. It costs one more output-sized tensor and, in that forward,
    a third product per tile.

    Under autocast, q, k and v are cast to its dtype first: the official math's two products (and the PyTorch path's)
    run in it there and give it, so fp32 inputs give the autocast dtype on every backend (their gradients come back
    in fp32 through the casts)."""
    dtype = compute_dtype(q)
    if q.dtype != dtype:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    store_lo = (q.dtype in HALF_DTYPES and torch.is_grad_enabled() and KEEP_LOW_PART
                and any(t is not None and t.requires_grad for t in (bias, bias_table)))
    if torch.compiler.is_compiling():  # traced as the custom ops; eager calls skip their dispatch
        return rel_pos_attn_fwd(q, k, v, bias, bias_table, bias_index, keep, scale, store_lo)[0]
    return RelPosAttentionFunction.apply(q, k, v, bias, bias_table, bias_index, keep, scale, store_lo)


# The oldest Triton the whole test suite has passed with (torch 2.8's; 2.6's Triton 3.2 and 2.4's 3.0 fail in the
# interpreter): with an older one "auto" takes the torch path and "triton" says why, instead of running kernels
# nobody has checked there.
MIN_TRITON = (3, 4)


# (major, minor) of the installed Triton, read once: the support check runs on every op call, inside compiled
# regions too
TRITON_VERSION: Tuple[int, ...] = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2]) if triton else ()


def triton_unsupported(t: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot take tensors like ``t`` (None when they can): shared by every Triton op."""
    return triton_unsupported_on(t.device.type, t.dtype)


def triton_unsupported_on(device_type: str, dtype: torch.dtype = torch.float32) -> Optional[str]:
    """``triton_unsupported`` for tensors of this device type and dtype (none needed: a caller checking a
    configuration must not create a CUDA context)."""
    if triton is None:
        return f"triton is not installed ({_TRITON_ERROR})"
    if TRITON_VERSION < MIN_TRITON:
        return (f"Triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest these kernels "
                "are tested with")
    if device_type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
    if device_type not in ("cuda", "cpu"):
        return f"device {device_type} is not supported"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not supported (fp32, fp16, bf16)"
    return None


def unsupported(q, k, v, bias, bias_table, bias_index, keep) -> Optional[str]:
    reason = triton_unsupported(q)
    if reason is not None:
        return reason
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.shape[0] * q.shape[1] >= 65536:
        return "B*H must be < 65536"
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in (q, k, v)) and q.device.type == "cuda":
        return "q, k, v need a unit stride along the head dimension"
    return None


_backend.register("attention", "triton", attention_triton, unsupported, priority=10, auto_devices=("cuda",))
