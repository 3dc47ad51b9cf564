"""Shared pieces of the native-kernel tests (tests/test_native_*.py).

The numerics rule (house style): compute the reference in float64 from the very inputs the kernel saw, run the eager
PyTorch implementation in the same precision as the kernel, and require
``err(kernel) <= 2 * err(eager) + atol`` for the output and every gradient, with a tiny atol (plus, for an fp16/bf16
result, the reference's own rounding to that precision: tests/numerics.py).
"""

from __future__ import annotations

import pytest
import torch

from numerics import assert_twice_eager


def check_result(got: torch.Tensor, ref: torch.Tensor) -> None:
    """The result has the reference's shape and finite values."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), "non-finite values in the kernel result"


def max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    check_result(got, ref)
    return (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0


def assert_rule(name: str, got: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    """err(kernel) <= 2 * err(eager) + atol, with atol relative to the reference's magnitude, plus the reference's
    own rounding to the kernel result's dtype (fp16/bf16)."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    check_result(got, ref)
    check_result(eager, ref)
    assert_twice_eager(name, got, eager, ref, atol * scale)


def devices():
    """Parameters of the ``device`` fixture (conftest.py; parametrize it with ``indirect=True``): the C++ CPU kernels;
    the CUDA kernels run by the CPU emulator of tests/cuda_emulator.py on CPU tensors ("cuda-emu", needs the CUDA
    headers); the CUDA kernels on a GPU (gpu-marked, skipped without one)."""
    return ["cpu", "cuda-emu", pytest.param("cuda", marks=pytest.mark.gpu)]


# The emulated GPU with 16 SMs (device 7; "cuda-emu" has 2): the occupancy-driven grid plans (softmax batch chunks,
# LayerNorm stage-1 blocks) differ, and every plan must give the float64 answer.
LARGER_EMULATED_GPU = "cuda-emu:7"


def padding(b: int, n: int, device="cpu") -> torch.Tensor:
    """(B, N) keep mask: batch row 1 pads its second half, batch row 2 is fully padded."""
    keep = torch.ones(b, n, dtype=torch.bool, device=device)
    if b > 1:
        keep[1, max(1, n // 2):] = False
    if b > 2:
        keep[2] = False
    return keep
