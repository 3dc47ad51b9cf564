"""The numerics rule's yardstick, shared by the kernel tests.

A result in fp16/bf16 is compared with a float64 reference: its error can be no smaller than the reference's own
rounding to that precision, whatever the kernel does. FlashAttention's tests add that (twice over) to the bound; the
rule here adds it once: ``err(kernel) <= 2 * err(eager) + rounding_error(ref, kernel dtype) + slack``. Without it a
single max over a few thousand elements fails on the seed where eager's largest error happens to sit below half an
ulp of the largest values (measured: bf16 attention dq at 2.17x eager's max error with 0.78x its RMS error; bf16 FFN
dγ at 2.19x eager's max error with 1.04x its RMS error, about 1% of seeds each).
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def rounding_error(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error of ``ref`` rounded to ``dtype``: 0.0 for fp32 and wider (their slack is the caller's)."""
    if dtype not in LOW_PRECISION or ref.numel() == 0:
        return 0.0
    ref = ref.detach().double()
    return (ref.to(dtype).double() - ref).abs().max().item()


def assert_twice_eager(name: str, got: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, slack: float = 0.0):
    """The numerics rule for one result: its max error against the float64 ``ref`` at most twice ``eager``'s (the
    same math run the official way, in the same precision), plus ``slack`` and the reference's own rounding to
    ``got``'s precision."""
    ref = ref.detach().double()
    err = (got.detach().double() - ref).abs().max().item() if ref.numel() else 0.0
    err_eager = (eager.detach().double() - ref).abs().max().item() if ref.numel() else 0.0
    tiny = float(slack) + rounding_error(ref, got.dtype)
    assert err <= 2 * err_eager + tiny, f"{name}: {err:.3e} vs eager {err_eager:.3e} (slack {tiny:.1e})"
