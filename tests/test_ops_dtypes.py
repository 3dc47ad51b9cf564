"""Every backend of every op gives the PyTorch path's output dtype, with and without autocast, for fp32 and bf16 inputs
and parameters: a caller swapping backends (or "auto" picking another on another device) never sees a new dtype.

On CPU the Triton kernels run in the interpreter (conftest); on a GPU (gpu-marked) the CUDA autocast rules apply,
which differ from CPU's (LayerNorm is an fp32 op there)."""

import contextlib

import pytest
import torch

from vlmo_fast import ops
from vlmo_fast.ops import backend as ops_backend
from vlmo_fast.ops.native import _native_missing
from vlmo_fast.ops.triton_attention import triton_unsupported_on

D, HID, B, N = 16, 32, 2, 7
BACKENDS = ("torch", "triton", "cuda", "auto")


def expert(dtype, device):
    parts = (torch.ones(D), torch.zeros(D), 0.1 * torch.randn(HID, D), torch.zeros(HID), 0.1 * torch.randn(D, HID),
             torch.zeros(D))
    return ops.FFNExpert(*(t.to(device, dtype) for t in parts))


def op_on(name, device, pdt, backend="auto"):
    """The op ``name`` as a function of x (B, N, D) on ``device``, its parameters (in ``pdt``), index and masks made
    once, here: a padded key and a fully padded batch row where the op takes a key padding mask."""
    dev = torch.device(device)
    ones, zeros = torch.ones(D, dtype=pdt, device=dev), torch.zeros(D, dtype=pdt, device=dev)
    keep = torch.ones(B, N, dtype=torch.bool, device=dev)
    keep[0, -1], keep[1] = False, False
    if name == "multiway_ffn":
        experts = [expert(pdt, dev), expert(pdt, dev)]
        return lambda x: ops.multiway_ffn(x, experts, split=3, gamma=ones, backend=backend)
    if name == "norm_linear":
        weight, bias = torch.randn(HID, D, dtype=pdt, device=dev), torch.zeros(HID, dtype=pdt, device=dev)
        return lambda x: ops.norm_linear(x, ones, zeros, weight, bias, backend=backend)
    if name == "scaled_residual":
        return lambda x: ops.scaled_residual(x, 2 * x, ones, backend=backend)
    if name == "masked_softmax":
        bias = torch.randn(2, N, N, dtype=pdt, device=dev)
        return lambda x: ops.masked_softmax(x.flatten()[: 2 * N * N].reshape(1, 2, N, N), bias=bias,
                                            key_padding_mask=keep[:1], backend=backend)
    if name == "multiway_layernorm":
        return lambda x: ops.multiway_layernorm(x, [ones, ones], [zeros, zeros], split=3, backend=backend)
    if name == "rel_pos_attention":
        table, index = torch.randn(5, 1, dtype=pdt, device=dev), torch.randint(0, 5, (N, N), device=dev)

        def attention(x):
            q = x.reshape(B, 1, N, D)
            return ops.rel_pos_attention(q, q, q, bias_table=table, bias_index=index, key_padding_mask=keep,
                                         backend=backend)

        return attention
    assert name == "rel_pos_bias_gather"
    index = torch.randint(0, 5, (4, 4), device=dev)
    return lambda x: ops.rel_pos_bias_gather(x.flatten()[:10].reshape(5, 2).to(pdt), index, backend=backend)


def call(name, backend, x, pdt):
    """The op ``name`` on x (B, N, D) with its parameters in ``pdt``."""
    return op_on(name, x.device, pdt, backend)(x)


OPS = ("multiway_ffn", "norm_linear", "scaled_residual", "masked_softmax", "multiway_layernorm", "rel_pos_attention",
       "rel_pos_bias_gather")


REGISTERED = {"rel_pos_attention": "attention"}  # the op's name in the backend registry, where it differs


def kernels_here(name, device):
    """The kernel backends registered for op ``name`` that can run on ``device`` in this environment (Triton: CUDA, or
    CPU under the interpreter; the native kernels: when built)."""
    op = REGISTERED.get(name, name)
    runs = {"triton": triton_unsupported_on(device) is None, "cuda": _native_missing(torch.device(device)) is None}
    return {b for b in ops.available(op)[op][1:] if runs[b]}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", OPS)
def test_every_backend_gives_the_torch_paths_dtype(device, name):
    kernels_ran = set()
    for autocast in (None, torch.bfloat16):
        for xdt in (torch.float32, torch.bfloat16):
            for pdt in {torch.float32, xdt}:
                got = {}
                for backend in BACKENDS:
                    x = torch.randn(B, N, D, device=device).to(xdt)
                    ctx = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
                    ops_backend.clear_selected()
                    try:
                        with ctx:
                            got[backend] = call(name, backend, x, pdt).dtype
                    except ValueError as exc:  # a backend that cannot take these inputs says so
                        assert "cannot run these inputs" in str(exc), exc
                        continue
                    except TypeError as exc:  # a dtype mix the op refuses: refused on every backend
                        got[backend] = TypeError
                        assert backend == "torch" or got.get("torch") is TypeError, (backend, exc)
                        continue
                    kernels_ran.add(ops_backend.last_selected().get(REGISTERED.get(name, name), "torch"))
                where = f"autocast={autocast} x={xdt} params={pdt}"
                assert "torch" in got, where  # the PyTorch path takes every input
                assert all(dt == got["torch"] for dt in got.values()), (where, got)
    # every kernel of the op that can run here ran, so its dtypes were compared, not only the PyTorch path's
    assert kernels_here(name, device) <= kernels_ran, (kernels_here(name, device), kernels_ran)
