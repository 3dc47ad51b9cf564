"""Compile every Triton kernel ahead of time for NVIDIA GPUs, without a GPU: Triton lowers to PTX and runs ptxas for
the target, so syntax, typing, layout and shared-memory problems that the CPU interpreter cannot see show up here.

    python tests/triton_aot.py [--arch 90 80]

Run in its own process with TRITON_INTERPRET unset (the interpreter replaces compilation when it is set).
Prints one line per kernel configuration and exits non-zero on the first failure.
"""

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from vlmo_fast.ops import triton_attention as ta  # noqa: E402
from vlmo_fast.ops import triton_ffn as tf  # noqa: E402

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (H100/H200, A100)

# types of the pointer arguments by kernel argument name; every other non-constexpr argument is an int32, except
# the float scalars listed below
POINTERS = {
    "Q": "act", "K": "act", "V": "act", "O": "act", "DO": "act", "DQ": "act", "DK": "act", "DV": "act",
    "LSE": "*fp32", "DELTA": "*fp32", "DPART": "*fp32", "BIAS": "*fp32", "TABLE": "*fp32", "INDEX": "*i32",
    "KEEP": "*u8", "ORDER": "*i32", "OFFSETS": "*i32", "DTABLE": "*fp32",
    "X": "*fp32", "Y": "act", "MEAN": "*fp32", "RSTD": "*fp32", "W0": "*fp32", "B0": "*fp32", "W1": "*fp32",
    "B1": "*fp32", "DH": "act", "GO": "*fp32", "DX": "*fp32", "DWP": "*fp32", "DBP": "*fp32", "OUT": "*fp32",
    "GAMMA": "*fp32", "SCALE": "*fp32", "DY": "act", "DGP": "*fp32",
}
FLOATS = {"scale", "scale_log2", "eps"}


def signature(fn, act: str, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = act if POINTERS[name] == "act" else POINTERS[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def cases(quick: bool = False):
    """(label, jit function, activation pointer type, constexprs, num_warps, num_stages); ``quick``: the model's
    configurations only (bf16, official index in-kernel, every autotune configuration), plus the FFN kernels."""
    out = []
    bf16, fp16, fp32 = "*bf16", "*fp16", "*fp32"
    # attention: every autotune configuration for the model's case (bf16, official index in-kernel, padding mask),
    # then every bias form and dtype at the first configuration
    tuned = {"fwd": (ta._fwd, ta._fwd_tuned.configs), "dkdv": (ta._bwd_dkdv, ta._dkdv_tuned.configs),
             "dq": (ta._bwd_dq, ta._dq_tuned.configs)}
    for name, (fn, configs) in tuned.items():
        extra = {"NEED_DBIAS": True} if name == "dq" else {}
        for c in configs:
            const = dict(BIAS_MODE=3, HAS_MASK=True, UPCAST=False, IEEE=False, BLOCK_D=64, **c.kwargs, **extra)
            out.append((f"{name} {c.kwargs} w{c.num_warps} s{c.num_stages}", fn, bf16, const, c.num_warps,
                        c.num_stages))
        c = configs[0]
        if quick:
            continue
        for mode in (0, 1, 2):
            for act, ieee in ((bf16, False), (fp16, False), (fp32, True)):
                const = dict(BIAS_MODE=mode, HAS_MASK=mode != 0, UPCAST=False, IEEE=ieee, BLOCK_D=64, **c.kwargs,
                             **extra)
                out.append((f"{name} mode{mode} {act}", fn, act, const, c.num_warps, c.num_stages))
        # head dim 128 (the largest taken) at the first configuration
        const = dict(BIAS_MODE=3, HAS_MASK=True, UPCAST=False, IEEE=False, BLOCK_D=128, **c.kwargs, **extra)
        out.append((f"{name} D=128", fn, bf16, const, c.num_warps, c.num_stages))
    out.append(("delta", ta._bwd_delta, bf16, dict(BLOCK_M=64, BLOCK_D=64), 4, 1))
    out.append(("bucket_sum", ta._bucket_sum, bf16, dict(BLOCK=128, BLOCK_H=16), 4, 1))
    # the FFN / residual kernels at VLMo-base width (768 -> 1024-wide tiles) and large (1024)
    for d in (1024,):
        for act in (bf16,) if quick else (bf16, fp32):
            out.append((f"ln_fwd {act}", tf._ln_fwd, act, dict(ROWS=4, BLOCK_D=d, RNE=False), 4, 1))
            out.append((f"ln_bwd {act}", tf._ln_bwd, act, dict(HAS_GO=True, ROWS=4, BLOCK_D=d, RNE=False), 4, 1))
            out.append((f"residual {act}", tf._residual, act,
                        dict(HAS_GAMMA=True, HAS_SCALE=True, ROWS=4, BLOCK_D=d, RNE=False), 4, 1))
            out.append((f"residual_bwd {act}", tf._residual_bwd, act,
                        dict(HAS_GAMMA=True, HAS_SCALE=True, ROWS=4, BLOCK_D=d, RNE=False), 4, 1))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="only the configurations the model uses")
    args = parser.parse_args(argv)
    failures = 0
    for arch in args.arch:
        for label, fn, act, const, warps, stages in cases(args.quick):
            t0 = time.time()
            try:
                src = triton.compiler.ASTSource(fn=fn, signature=signature(fn, act, const), constexprs=const)
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                        options={"num_warps": warps, "num_stages": stages})
                shared = kernel.metadata.shared
                note = "" if shared <= SHARED_LIMIT[arch] else f"  needs {shared} B shared (> {SHARED_LIMIT[arch]})"
                print(f"sm_{arch} ok   {label:<60} {time.time() - t0:5.1f}s shared {shared}{note}", flush=True)
            except Exception as exc:  # report every failing configuration, then fail
                failures += 1
                print(f"sm_{arch} FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
