"""The native backend ("cuda"): the kernels of ``vlmo_fast._C``, CUDA on CUDA tensors and C++ on CPU tensors.

Each op is a ``torch.library.custom_op`` (with ``register_fake`` and ``register_autograd``, so ``torch.compile``
traces it as one node) whose implementation checks every tensor it hands to a kernel (device, dtype, shape,
contiguity or stride extent, index range) and then calls a launcher with raw pointers. The kernels are described in
``csrc/README.md``.

    vlmo_fast::masked_softmax              (scores, scale, bias?, table?, index?, keep?, out_dtype) -> (p, lse)
    vlmo_fast::masked_softmax_backward     (dp, scores, lse, scale, bias?, table?, index?, keep?, bias_grad)
                                           -> (ds, dbias)
    vlmo_fast::multiway_layernorm          (x, weight (E, D), bias (E, D), split, eps) -> (y, mean, rstd)
    vlmo_fast::multiway_layernorm_backward (dy, x, mean, rstd, weight, split) -> (dx, dweight, dbias)
    vlmo_fast::rel_pos_bias_gather         (table, index) -> (C, N, N)
    vlmo_fast::rel_pos_bias_gather_backward(grad, index, rows) -> (R, C) fp32

Eager calls take ``autograd.Function`` wrappers around the same validated kernel calls (half the per-call overhead
of the custom-op dispatch); under ``torch.compile`` the custom ops are traced. The backend registrations at the
bottom adapt the public ops' calls (``vlmo_fast.ops.backend``) to these. This module imports without
``vlmo_fast._C``; the backend then reports itself unsupported and the PyTorch paths run.
"""

import contextlib
import functools
import warnings
from typing import Optional, Sequence, Tuple

import torch

from .. import _native
from . import backend as _backend
from ._autograd import first_order_only
from ._checks import check_bias_index, int32_index
from ._memo import TensorMemo

_C = _native._C
_CUDA_COMPILED = _native.cuda_kernels_compiled()
# Largest row the register-resident CUDA LayerNorm takes (csrc/cuda/launchers.h).
_CUDA_LN_MAX_DIM = int(getattr(_C, "LAYERNORM_CUDA_MAX_DIM", 1024))

# Element type codes of csrc/cpu/cpu_common.h and csrc/cuda/cuda_common.cuh.
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ---- argument safety: nothing reaches a kernel that it could read past -----------------------------------------------


def _check(
    name: str,
    t: object,
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    shape: Optional[Tuple[int, ...]] = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Type, device, dtype, shape, and either contiguity or (for strided operands) the storage extent.

    Messages are built only on failure: these checks run on every call, so they have to be cheap.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous:
        # PyTorch keeps every view inside its storage, so a contiguous tensor spans exactly [ptr, ptr + numel)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    else:
        _check_extent(name, t)
    return t


def _check_extent(name: str, t: torch.Tensor) -> None:
    """Every element a strided kernel may address lies inside the tensor's storage."""
    if t.numel() == 0:
        return
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{name} must not have negative strides")
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    if (last + 1) * t.element_size() > t.untyped_storage().nbytes():
        raise ValueError(f"{name} addresses memory past its storage")


def _addr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


_INDEX32 = TensorMemo(capture="reuse")  # int32 contiguous copies of bias indices


def _index_int32(index: torch.Tensor, rows: int, n: int, device: torch.device) -> torch.Tensor:
    """The (n, n) bias index as a contiguous int32 copy (what the kernels read), range-checked against ``rows``.

    The kernels read only this copy, checked after it was made: a write to the caller's tensor that bypasses its
    version counter (``.numpy()``, ``.data``) can leave the copy stale, never out of range. It is cached per tensor
    (identity + version counter), so a model's fixed index costs one conversion and one check, not one per call.
    """
    check_bias_index(index, rows, n, device, values=False)  # the values: on the copy, below
    return _INDEX32.get(index, (rows,), lambda: int32_index(index, rows))


def _runs_cuda(device: torch.device) -> bool:
    """Whether tensors on ``device`` go to the CUDA kernels (else to the C++ CPU kernels). The one place that decides
    it: the tests' CUDA emulator (tests/cuda_emulator.py) overrides it to run the CUDA branch on CPU tensors."""
    return device.type == "cuda"


def arch_mismatch(capability: Tuple[int, int], archs: str) -> Optional[str]:
    """Why CUDA code compiled for ``archs`` (CMake's form, e.g. "80-real,90-real,90-virtual") cannot run on a device
    of compute ``capability``, or None: machine code for sm_XY runs on sm_XZ with Z >= Y; PTX for compute_XY is
    compiled by the driver for any device of capability XY or higher."""
    major, minor = capability
    for arch in (a.strip() for a in archs.replace(";", ",").split(",") if a.strip()):
        number, _, kind = arch.partition("-")
        if not number.isdigit():
            continue
        m, n = divmod(int(number), 10)
        if kind != "virtual" and m == major and n <= minor:
            return None
        if kind != "real" and (m, n) <= (major, minor):
            return None
    return (f"vlmo_fast._C's CUDA kernels were compiled for {archs}; this GPU is sm_{major}{minor} (rebuild with "
            f"VLMO_FAST_CUDA_ARCHS including {major}{minor})")


@functools.lru_cache(maxsize=None)
def _cuda_unusable(index: int) -> Optional[str]:
    """Why the compiled CUDA kernels cannot run on CUDA device ``index`` here, or None (asked once per device): the
    extension's static CUDA runtime needs a driver at least as new as it, and code for the device's architecture."""
    info = _C.build_info()
    status = info.get("cuda_device_status", "ok")
    if status != "ok":
        return f"vlmo_fast._C's CUDA runtime cannot use this machine's driver ({status})"
    return arch_mismatch(torch.cuda.get_device_capability(index), str(info.get("cuda_archs", "")))


def _native_missing(device: torch.device) -> Optional[str]:
    if _C is None:
        return f"the native extension vlmo_fast._C is not built ({_native._IMPORT_ERROR})"
    if _runs_cuda(device):
        if not _CUDA_COMPILED:
            return "vlmo_fast._C was built without its CUDA kernels (no nvcc at build time)"
        # (the tests' CUDA emulator runs the CUDA branch on CPU tensors, and names a CUDA device without one)
        if device.type == "cuda" and torch.cuda.is_available():
            return _cuda_unusable(torch.cuda.current_device() if device.index is None else device.index)
    elif device.type != "cpu":
        return f"no native kernels for device type {device.type!r} (cpu and cuda only)"
    return None


def _launch_args(device: torch.device) -> dict:
    err = _native_missing(device)
    if err is not None:
        raise RuntimeError(err)
    if _runs_cuda(device):
        index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda": the current one
        return {"device": index, "stream": torch.cuda.current_stream(index).cuda_stream}
    return {"num_threads": torch.get_num_threads()}


def _on_tensor_device(fn):
    """Run a native op with PyTorch's current device set to its first tensor argument's (CUDA). The launchers
    select the tensors' device with cudaSetDevice, which makes that device current for the thread in PyTorch's
    runtime too (the primary context is shared): without the guard, an op on cuda:1 left cuda:1 current, and
    later allocations on "cuda" landed there. The guard restores the previous device on exit."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)

    return run


def _launcher(name: str, device: torch.device):
    return getattr(_C, f"{name}_{'cuda' if _runs_cuda(device) else 'cpu'}")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_TYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


# ---- masked softmax -------------------------------------------------------------------------------------------------

# The CUDA kernels for rows of up to 256 keys (longer rows always take the row kernels; csrc/cuda/launchers.h).
SOFTMAX_CUDA_KERNELS = ("rows", "staged")


def cuda_softmax_kernel(kind: Optional[str] = None) -> str:
    """Which CUDA kernels take softmax rows of up to 256 keys, process-wide; returns the choice in force before the
    call and sets ``kind`` when given.

    "rows" (default): one warp per query row, loading its own elements (measured on an H100). "staged": a block per
    eight query rows streams each batch row's slice through shared memory in 16-byte vectors, two slices in flight
    (csrc/cuda/masked_softmax_staged.cu), for more bytes in flight; same results, not yet timed on a GPU (the
    benchmark's softmax rows compare the two)."""
    if kind is not None and kind not in SOFTMAX_CUDA_KERNELS:
        raise ValueError(f"kind must be one of {SOFTMAX_CUDA_KERNELS}, got {kind!r}")
    err = _native_missing(torch.device("cuda"))
    if err is not None:
        raise RuntimeError(err)
    before = SOFTMAX_CUDA_KERNELS[_C.masked_softmax_kernel_cuda()]
    if kind is not None:
        _C.set_masked_softmax_kernel_cuda(SOFTMAX_CUDA_KERNELS.index(kind))
    return before


@contextlib.contextmanager
def using_cuda_softmax_kernel(kind: str):
    """``cuda_softmax_kernel(kind)`` within the block, the previous choice after it."""
    before = cuda_softmax_kernel(kind)
    try:
        yield
    finally:
        cuda_softmax_kernel(before)


def _softmax_operands(scores, bias, table, index, keep):
    """Validate the softmax operands; returns ((B, H, Nq, Nk), the launcher's bias/mask arguments, the int32 index
    those arguments point into). The caller holds the index until the launch returns: it may be a fresh copy (no
    cache keeps one for an inference tensor), and the arguments are raw addresses."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ValueError("scores must be a 4-D tensor (B, H, Nq, Nk)")
    dev = scores.device
    _check("scores", scores, dev, _FLOATS)
    b, h, nq, nk = scores.shape
    if bias is not None and table is not None:
        raise ValueError("give either bias or bias_table, not both")
    if (table is None) != (index is None):
        raise ValueError("bias_table and bias_index must be given together")
    if bias is not None:
        _check("bias", bias, dev, (torch.float32,), (h, nq, nk))
    index32, rows, s0, s1 = None, 0, 0, 0
    if table is not None:
        if nq != nk:
            raise ValueError("bias_table needs square attention (Nq == Nk)")
        _check("bias_table", table, dev, (torch.float32,), contiguous=False)
        if table.dim() != 2 or table.shape[1] != h:
            raise ValueError(f"bias_table must have shape (R, H={h}), got {tuple(table.shape)}")
        if table.shape[0] == 0 and nq * nk:
            raise ValueError("bias_table must have at least one row (the bias index has entries)")
        _check("bias_index", index, dev, _INDEX_TYPES, (nq, nk), contiguous=False)
        rows, (s0, s1) = table.shape[0], table.stride()
        index32 = _index_int32(index, rows, nq, dev)
        _check("bias_index (int32)", index32, dev, (torch.int32,), (nq, nk))
    if keep is not None:
        _check("keep", keep, dev, (torch.bool,), (b, nk))
    kw = dict(bias=_addr(bias), table=_addr(table), table_s0=s0, table_s1=s1, table_rows=rows,
              index=_addr(index32), keep=_addr(keep))
    return (b, h, nq, nk), kw, index32


@_on_tensor_device
def _softmax_forward(scores, scale, bias, bias_table, bias_index, keep, out_dtype):
    shape, kw, index32 = _softmax_operands(scores, bias, bias_table, bias_index, keep)  # index32: kept to the launch
    if out_dtype not in _DTYPE_CODE:
        raise TypeError(f"out_dtype must be one of {list(_DTYPE_CODE)}, got {out_dtype}")
    dev = scores.device
    p = torch.empty(scores.shape, dtype=out_dtype, device=dev)
    if scores.numel() == 0:  # nothing to launch; a row without keys is fully masked (lse = +inf)
        return p, torch.full(shape[:3], float("inf"), device=dev)
    lse = torch.empty(shape[:3], dtype=torch.float32, device=dev)
    _launcher("masked_softmax_forward", dev)(
        scores=_addr(scores), scores_dtype=_DTYPE_CODE[scores.dtype], out=_addr(p), out_dtype=_DTYPE_CODE[out_dtype],
        lse=_addr(lse), batch=shape[0], heads=shape[1], n_q=shape[2], n_k=shape[3], scale=float(scale),
        **kw, **_launch_args(dev),
    )
    return p, lse


@_on_tensor_device
def _softmax_backward(dp, scores, lse, scale, bias, bias_table, bias_index, keep, bias_grad):
    shape, kw, index32 = _softmax_operands(scores, bias, bias_table, bias_index, keep)  # index32: kept to the launch
    dev = scores.device
    _check("dp", dp, dev, _FLOATS, scores.shape)
    _check("lse", lse, dev, (torch.float32,), shape[:3])
    ds = torch.empty_like(scores)
    empty = scores.numel() == 0  # nothing to launch: zero bias gradients
    alloc = torch.zeros if _runs_cuda(dev) or empty else torch.empty  # CUDA accumulates with atomics; CPU overwrites
    dbias = dtable = None
    if bias_grad and bias is not None:
        dbias = alloc(bias.shape, dtype=torch.float32, device=dev)
    elif bias_grad and bias_table is not None:
        dtable = alloc(bias_table.shape, dtype=torch.float32, device=dev)
    if not empty:
        _launcher("masked_softmax_backward", dev)(
            dp=_addr(dp), dp_dtype=_DTYPE_CODE[dp.dtype], scores=_addr(scores),
            scores_dtype=_DTYPE_CODE[scores.dtype], lse=_addr(lse), dscores=_addr(ds), batch=shape[0],
            heads=shape[1], n_q=shape[2], n_k=shape[3], scale=float(scale), dbias=_addr(dbias),
            dtable=_addr(dtable), **kw, **_launch_args(dev),
        )
    grad = dbias if dbias is not None else dtable
    return ds, grad if grad is not None else scores.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("vlmo_fast::masked_softmax", mutates_args=())
def masked_softmax_op(
    scores: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    bias_table: Optional[torch.Tensor],
    bias_index: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """p = softmax(scale·scores + bias + mask) in out_dtype and lse = log Σ exp (B, H, Nq) fp32, for the backward.

    scores (B, H, Nq, Nk) contiguous fp32/fp16/bf16; bias (H, Nq, Nk) fp32 contiguous, or bias_table (R, H) fp32
    (any non-negative strides) + bias_index (Nq, Nk) integer in [0, R); keep (B, Nk) bool contiguous, True = keep.
    """
    return _softmax_forward(scores, scale, bias, bias_table, bias_index, keep, out_dtype)


@masked_softmax_op.register_fake
def _(scores, scale, bias, bias_table, bias_index, keep, out_dtype):
    return scores.new_empty(scores.shape, dtype=out_dtype), scores.new_empty(scores.shape[:3], dtype=torch.float32)


@torch.library.custom_op("vlmo_fast::masked_softmax_backward", mutates_args=())
def masked_softmax_backward_op(
    dp: torch.Tensor,
    scores: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    bias_table: Optional[torch.Tensor],
    bias_index: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    bias_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dscores, dbias): dbias is (H, Nq, Nk) fp32 for a dense bias, (R, H) fp32 for a table, summed over the batch
    (and scattered into the table rows); an empty tensor when ``bias_grad`` is False or there is no bias."""
    return _softmax_backward(dp, scores, lse, scale, bias, bias_table, bias_index, keep, bias_grad)


@masked_softmax_backward_op.register_fake
def _(dp, scores, lse, scale, bias, bias_table, bias_index, keep, bias_grad):
    if bias_grad and bias is not None:
        shape = bias.shape
    elif bias_grad and bias_table is not None:
        shape = bias_table.shape
    else:
        shape = (0,)
    return torch.empty_like(scores), scores.new_empty(shape, dtype=torch.float32)


def _softmax_grads(ctx, dp, backward):
    scores, lse, bias, bias_table, bias_index, keep = ctx.saved_tensors
    want_bias = bias is not None and ctx.needs_input_grad[2]
    want_table = bias_table is not None and ctx.needs_input_grad[3]
    ds, dbias = backward(dp.contiguous(), scores, lse, ctx.scale, bias, bias_table, bias_index, keep,
                         want_bias or want_table)
    return (
        ds if ctx.needs_input_grad[0] else None,
        None,
        dbias.to(bias.dtype) if want_bias else None,
        dbias.to(bias_table.dtype) if want_table else None,
        None,
        None,
        None,
    )


def _softmax_setup(ctx, inputs, output):
    scores, scale, bias, bias_table, bias_index, keep, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(scores, output[1], bias, bias_table, bias_index, keep)
    ctx.scale = scale


masked_softmax_op.register_autograd(lambda ctx, dp, _dlse: _softmax_grads(ctx, dp, masked_softmax_backward_op),
                                    setup_context=_softmax_setup)


class MaskedSoftmaxFunction(torch.autograd.Function):
    """Eager autograd around the same kernels as the custom op, without the custom-op dispatch overhead."""

    @staticmethod
    def forward(ctx, scores, scale, bias, bias_table, bias_index, keep, out_dtype):
        p, lse = _softmax_forward(scores, scale, bias, bias_table, bias_index, keep, out_dtype)
        ctx.save_for_backward(scores, lse, bias, bias_table, bias_index, keep)
        ctx.scale = scale
        return p

    @staticmethod
    @first_order_only
    def backward(ctx, dp):
        return _softmax_grads(ctx, dp, _softmax_backward)


def masked_softmax_native(scores, scale, bias, bias_table, bias_index, keep, out_dtype):
    """The registered "cuda" implementation of ``masked_softmax`` (arguments validated by the public function).

    Eager calls go through ``MaskedSoftmaxFunction``; under ``torch.compile`` the custom op is traced instead.
    """
    scores = scores.contiguous()
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    if bias_table is not None and bias_table.dtype != torch.float32:
        bias_table = bias_table.to(torch.float32)
    if keep is not None:
        keep = keep.contiguous()
    # CUDA compiles the (input, output) dtype pairs (x, x) and (x, fp32); other outputs go through fp32.
    kernel_out = out_dtype
    if _runs_cuda(scores.device) and out_dtype not in (scores.dtype, torch.float32):
        kernel_out = torch.float32
    args = (scores, float(scale), bias, bias_table, bias_index, keep, kernel_out)
    if torch.compiler.is_compiling():
        p, _ = masked_softmax_op(*args)
    else:
        p = MaskedSoftmaxFunction.apply(*args)
    return p if kernel_out == out_dtype else p.to(out_dtype)


def _atomic_gradient(device: torch.device, *params: Optional[torch.Tensor]) -> Optional[str]:
    """Why the CUDA kernels should not serve a call whose bias or table takes a gradient while PyTorch's deterministic
    mode is on (``torch.use_deterministic_algorithms(True)``): they add that gradient with atomics, in no fixed order.
    None otherwise (the CPU kernels have no atomics). "auto" then takes the PyTorch path, deterministic in that
    mode."""
    if (_runs_cuda(device) and torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
            and torch.are_deterministic_algorithms_enabled()):
        return ("its CUDA kernels add the bias gradient with atomics (in no fixed order) and PyTorch's deterministic "
                "mode is on")
    return None


def _atomic_gradient_asked(op: str, device: torch.device, *params: Optional[torch.Tensor]) -> Optional[str]:
    """_atomic_gradient for an explicit backend="cuda" request, as PyTorch treats its own ops without a deterministic
    implementation: the reason (the request is refused) in that mode, or with ``warn_only`` a warning and None (the
    kernels run as asked)."""
    reason = _atomic_gradient(device, *params)
    if reason is not None and torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(f"{op}: backend='cuda' runs although {reason} (warn_only): its bias gradient is not "
                      "deterministic", stacklevel=2)
        return None
    return reason


def _softmax_unsupported(scores, bias, bias_table, bias_index, keep, out_dtype) -> Optional[str]:
    reason = _native_missing(scores.device) or _atomic_gradient_asked("masked_softmax", scores.device, bias, bias_table)
    if reason is not None:
        return reason
    for name, dt in (("scores", scores.dtype), ("out_dtype", out_dtype),
                     ("bias", None if bias is None else bias.dtype),
                     ("bias_table", None if bias_table is None else bias_table.dtype)):
        if dt is not None and dt not in _DTYPE_CODE:
            return f"{name} is {dt}; the native kernels take float32, float16 and bfloat16"
    return None


# ---- modality-split LayerNorm ---------------------------------------------------------------------------------------


def _layernorm_operands(x, weight, bias, split):
    """Validate x, the stacked expert parameters (bias may be None: the backward does not read it) and split."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError("x must be a 3-D tensor (B, N, D)")
    dev = x.device
    _check("x", x, dev, _FLOATS)
    b, n, d = x.shape
    if d == 0:
        raise ValueError("x: the normalized dimension D must be at least 1")
    _check("weight", weight, dev, (torch.float32,))
    if weight.dim() != 2 or weight.shape[0] not in (1, 2) or weight.shape[1] != d:
        raise ValueError(f"weight must have shape (E, D={d}) with E in (1, 2), got {tuple(weight.shape)}")
    experts = weight.shape[0]
    if bias is not None:
        _check("bias", bias, dev, (torch.float32,), weight.shape)
    if experts == 2 and not 0 <= split <= n:
        raise ValueError(f"split must lie in [0, N={n}] with two experts, got {split}")
    if experts == 1 and split != -1:
        raise ValueError(f"split must be -1 with one expert, got {split}")
    if _runs_cuda(dev) and d > _CUDA_LN_MAX_DIM:
        raise ValueError(f"x: D={d} exceeds the CUDA LayerNorm limit {_CUDA_LN_MAX_DIM}")
    return b, n, d, experts


@_on_tensor_device
def _layernorm_forward(x, weight, bias, split, eps):
    if bias is None:
        raise ValueError("bias must be given (stack zeros for an expert without one)")
    b, n, d, _ = _layernorm_operands(x, weight, bias, split)
    dev = x.device
    y = torch.empty_like(x)
    mean = torch.empty(b * n, dtype=torch.float32, device=dev)
    rstd = torch.empty(b * n, dtype=torch.float32, device=dev)
    if b * n == 0:  # no rows: nothing to launch
        return y, mean, rstd
    _launcher("multiway_layernorm_forward", dev)(
        x=_addr(x), dtype=_DTYPE_CODE[x.dtype], y=_addr(y), mean=_addr(mean), rstd=_addr(rstd), rows=b * n,
        seq_len=n, dim=d, split=split, weight=_addr(weight), bias=_addr(bias), eps=float(eps), **_launch_args(dev),
    )
    return y, mean, rstd


@_on_tensor_device
def _layernorm_backward(dy, x, mean, rstd, weight, split):
    b, n, d, experts = _layernorm_operands(x, weight, None, split)
    dev = x.device
    _check("dy", dy, dev, (x.dtype,), x.shape)
    _check("mean", mean, dev, (torch.float32,), (b * n,))
    _check("rstd", rstd, dev, (torch.float32,), (b * n,))
    dx = torch.empty_like(x)
    if b * n == 0:  # no rows: zero parameter gradients, nothing to launch
        zeros = torch.zeros((experts, d), dtype=torch.float32, device=dev)
        return dx, zeros, zeros.clone()
    dweight = torch.empty((experts, d), dtype=torch.float32, device=dev)
    dbias = torch.empty((experts, d), dtype=torch.float32, device=dev)
    extra = _launch_args(dev)
    if _runs_cuda(dev):
        size = _C.multiway_layernorm_backward_workspace_cuda(rows=b * n, seq_len=n, dim=d, split=split,
                                                             dtype=_DTYPE_CODE[x.dtype], device=extra["device"])
        if size < 0:
            raise RuntimeError("vlmo_fast._C: the CUDA LayerNorm backward could not size its workspace "
                               f"(device {extra['device']} not usable)")
        workspace = torch.empty(size, dtype=torch.float32, device=dev)
        extra["workspace"] = _addr(workspace)
    _launcher("multiway_layernorm_backward", dev)(
        dy=_addr(dy), x=_addr(x), dtype=_DTYPE_CODE[x.dtype], mean=_addr(mean), rstd=_addr(rstd), dx=_addr(dx),
        rows=b * n, seq_len=n, dim=d, split=split, weight=_addr(weight), dweight=_addr(dweight), dbias=_addr(dbias),
        num_experts=experts, **extra,
    )
    return dx, dweight, dbias


@torch.library.custom_op("vlmo_fast::multiway_layernorm", mutates_args=())
def multiway_layernorm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, split: int, eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): x (B, N, D) contiguous; weight, bias (E, D) fp32 stacked experts; rows at position < split
    use expert 0, the rest expert 1 (split = -1 with one expert). mean, rstd: (B·N,) fp32."""
    return _layernorm_forward(x, weight, bias, split, eps)


@multiway_layernorm_op.register_fake
def _(x, weight, bias, split, eps):
    rows = x.shape[0] * x.shape[1]
    return torch.empty_like(x), x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("vlmo_fast::multiway_layernorm_backward", mutates_args=())
def multiway_layernorm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, split: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dweight and dbias are (E, D) fp32, each expert summed over its own rows."""
    return _layernorm_backward(dy, x, mean, rstd, weight, split)


@multiway_layernorm_backward_op.register_fake
def _(dy, x, mean, rstd, weight, split):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _layernorm_setup(ctx, inputs, output):
    x, weight, _, split, _ = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.split = split


def _layernorm_grads(ctx, dy, backward):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = backward(dy.contiguous(), x, mean, rstd, weight, ctx.split)
    return dx, dweight, dbias, None, None


multiway_layernorm_op.register_autograd(
    lambda ctx, dy, _dmean, _drstd: _layernorm_grads(ctx, dy, multiway_layernorm_backward_op),
    setup_context=_layernorm_setup,
)


class MultiwayLayerNormFunction(torch.autograd.Function):
    """Eager autograd around the same kernels as the custom op, without the custom-op dispatch overhead."""

    @staticmethod
    def forward(ctx, x, weight, bias, split, eps):
        y, mean, rstd = _layernorm_forward(x, weight, bias, split, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.split = split
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        return _layernorm_grads(ctx, dy, _layernorm_backward)


def multiway_layernorm_native(x, weights, biases, split, eps):
    """The registered "cuda" implementation of ``multiway_layernorm``: stacks the experts' parameters (autograd sends
    each expert's slice of the gradient back to its own weight and bias, in its own dtype)."""
    d = x.shape[-1]

    def stacked(ts, fill):
        ts = [torch.full((d,), fill, device=x.device) if t is None else t.to(torch.float32) for t in ts]
        # one expert: a view of a contiguous weight (no copy); a strided one is copied, as the kernels need
        return ts[0].reshape(1, d).contiguous() if len(ts) == 1 else torch.stack(ts)

    args = (x.contiguous(), stacked(weights, 1.0), stacked(biases, 0.0), -1 if split is None else int(split),
            float(eps))
    if torch.compiler.is_compiling():
        return multiway_layernorm_op(*args)[0]
    return MultiwayLayerNormFunction.apply(*args)


def _layernorm_unsupported(x, weight, bias, split) -> Optional[str]:
    reason = _native_missing(x.device)
    if reason is not None:
        return reason
    for name, ts in (("x", [x]), ("weight", weight), ("bias", bias)):
        for t in ts:
            if t is not None and t.dtype not in _DTYPE_CODE:
                return f"{name} is {t.dtype}; the native kernels take float32, float16 and bfloat16"
    d = x.shape[-1]
    if d == 0:
        return "the normalized dimension is empty"
    if _runs_cuda(x.device) and d > _CUDA_LN_MAX_DIM:
        return f"D={d} exceeds the CUDA LayerNorm limit {_CUDA_LN_MAX_DIM}"
    return None


# ---- relative-position bias gather ---------------------------------------------------------------------------------


@_on_tensor_device
def _gather_forward(table, index):
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError("table must be a 2-D tensor (R, C)")
    dev = table.device
    _check("table", table, dev, _FLOATS, contiguous=False)
    if not isinstance(index, torch.Tensor) or index.dim() != 2:
        raise ValueError("index must be a 2-D tensor (N, N)")
    n = index.shape[0]
    if table.shape[0] == 0 and n:
        raise ValueError("table must have at least one row (the index has entries)")
    _check("index", index, dev, _INDEX_TYPES, (n, n), contiguous=False)
    index32 = _index_int32(index, table.shape[0], n, dev)
    _check("index (int32)", index32, dev, (torch.int32,), (n, n))
    rows, cols = table.shape
    out = torch.empty((cols, n, n), dtype=table.dtype, device=dev)
    _launcher("rel_pos_gather_forward", dev)(
        table=_addr(table), dtype=_DTYPE_CODE[table.dtype], s0=table.stride(0), s1=table.stride(1), rows=rows,
        cols=cols, index=_addr(index32), n=n, out=_addr(out), **_launch_args(dev),
    )
    return out


@_on_tensor_device
def _gather_backward(grad, index, rows):
    if not isinstance(grad, torch.Tensor) or grad.dim() != 3:
        raise ValueError("grad must be a 3-D tensor (C, N, N)")
    dev = grad.device
    cols, n = grad.shape[0], grad.shape[1]
    _check("grad", grad, dev, _FLOATS, (cols, n, n))
    if rows < 0 or (rows == 0 and n):
        raise ValueError(f"rows must be positive (>= 0 for an empty index), got {rows}")
    _check("index", index, dev, _INDEX_TYPES, (n, n), contiguous=False)
    index32 = _index_int32(index, rows, n, dev)
    _check("index (int32)", index32, dev, (torch.int32,), (n, n))
    dtable = (torch.zeros if _runs_cuda(dev) else torch.empty)((rows, cols), dtype=torch.float32, device=dev)
    _launcher("rel_pos_gather_backward", dev)(
        grad=_addr(grad), dtype=_DTYPE_CODE[grad.dtype], index=_addr(index32), n=n, rows=rows, cols=cols,
        dtable=_addr(dtable), **_launch_args(dev),
    )
    return dtable


@torch.library.custom_op("vlmo_fast::rel_pos_bias_gather", mutates_args=())
def rel_pos_bias_gather_op(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[c, i, j] = table[index[i, j], c]: table (R, C) fp32/fp16/bf16 with any non-negative strides, index (N, N)
    integer in [0, R); out (C, N, N) contiguous in the table's dtype."""
    return _gather_forward(table, index)


@rel_pos_bias_gather_op.register_fake
def _(table, index):
    return table.new_empty((table.shape[1], index.shape[0], index.shape[0]))


@torch.library.custom_op("vlmo_fast::rel_pos_bias_gather_backward", mutates_args=())
def rel_pos_bias_gather_backward_op(grad: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """dtable (rows, C) fp32: dtable[r, c] = Σ over (i, j) with index[i, j] == r of grad[c, i, j]."""
    return _gather_backward(grad, index, rows)


@rel_pos_bias_gather_backward_op.register_fake
def _(grad, index, rows):
    return grad.new_empty((rows, grad.shape[0]), dtype=torch.float32)


def _gather_setup(ctx, inputs, output):
    table, index = inputs
    ctx.save_for_backward(index)
    ctx.rows = table.shape[0]
    ctx.table_dtype = table.dtype


def _gather_grads(ctx, grad, backward):
    (index,) = ctx.saved_tensors
    return backward(grad.contiguous(), index, ctx.rows).to(ctx.table_dtype), None


rel_pos_bias_gather_op.register_autograd(
    lambda ctx, grad: _gather_grads(ctx, grad, rel_pos_bias_gather_backward_op), setup_context=_gather_setup
)


class RelPosBiasGatherFunction(torch.autograd.Function):
    """Eager autograd around the same kernels as the custom op, without the custom-op dispatch overhead."""

    @staticmethod
    def forward(ctx, table, index):
        out = _gather_forward(table, index)
        _gather_setup(ctx, (table, index), out)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        return _gather_grads(ctx, grad, _gather_backward)


def rel_pos_bias_gather_native(table, index):
    """The registered "cuda" implementation of ``rel_pos_bias_gather``."""
    if torch.compiler.is_compiling():
        return rel_pos_bias_gather_op(table, index)
    return RelPosBiasGatherFunction.apply(table, index)


def _gather_unsupported(table, index) -> Optional[str]:
    reason = _native_missing(table.device) or _atomic_gradient_asked("rel_pos_bias_gather", table.device, table)
    if reason is not None:
        return reason
    if table.dtype not in _DTYPE_CODE:
        return f"table is {table.dtype}; the native kernels take float32, float16 and bfloat16"
    return None


# ---- CPU policy for "auto" ------------------------------------------------------------------------------------------
# "auto" must never pick a CPU kernel slower than the PyTorch path it replaces. Measured on the 2-core CI machine
# (torch 2.13, 2 threads; see csrc/README.md). The fused softmax is 2-3x faster than the 4-5 op PyTorch path when
# timed alone, but inside a training block on CPU (between GEMMs) the gain is gone below ~256K score elements: at
# B=2, N=40 (text, 38K) a base block's forward+backward ran 2-6% slower with it, neutral at 154K-307K, 2% faster from
# 466K (B=1, N=197) up. The LayerNorm and the gather carry ~15-20 µs more fixed Python cost than one fused PyTorch
# op, so below these sizes PyTorch is as fast or faster. Explicit backend="cuda" requests run the kernels at any size.
CPU_AUTO_MIN_ELEMENTS = {
    "masked_softmax": 1 << 18,  # text-sized score tensors: no gain in context (see above)
    "multiway_layernorm_split": 1 << 15,  # two experts: PyTorch pays two LayerNorms + slices + cat
    "multiway_layernorm_single": 1 << 20,  # one expert: one PyTorch LayerNorm, as fast up to ~1M elements
    "rel_pos_bias_gather": 1 << 15,
}


def _softmax_auto_declines(scores, bias, bias_table, bias_index, keep, out_dtype) -> Optional[str]:
    if scores.device.type == "cpu" and scores.numel() < CPU_AUTO_MIN_ELEMENTS["masked_softmax"]:
        return f"on CPU below {CPU_AUTO_MIN_ELEMENTS['masked_softmax']} elements the PyTorch path is as fast"
    return _atomic_gradient(scores.device, bias, bias_table)


def _layernorm_auto_declines(x, weight, bias, split) -> Optional[str]:
    if x.device.type != "cpu":
        return None
    key = "multiway_layernorm_split" if len(weight) == 2 else "multiway_layernorm_single"
    if x.numel() < CPU_AUTO_MIN_ELEMENTS[key]:
        return f"on CPU below {CPU_AUTO_MIN_ELEMENTS[key]} elements PyTorch's LayerNorm is as fast"
    return None


def _gather_auto_declines(table, index) -> Optional[str]:
    limit = CPU_AUTO_MIN_ELEMENTS["rel_pos_bias_gather"]
    if table.device.type == "cpu" and table.shape[1] * index.numel() < limit:
        return f"on CPU below {limit} output elements PyTorch's gather is as fast"
    return _atomic_gradient(table.device, table)


_backend.register("masked_softmax", "cuda", masked_softmax_native, _softmax_unsupported, priority=20,
                  auto_unsupported=_softmax_auto_declines)
_backend.register("multiway_layernorm", "cuda", multiway_layernorm_native, _layernorm_unsupported, priority=20,
                  auto_unsupported=_layernorm_auto_declines)
_backend.register("rel_pos_bias_gather", "cuda", rel_pos_bias_gather_native, _gather_unsupported, priority=20,
                  auto_unsupported=_gather_auto_declines)
