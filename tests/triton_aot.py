"""Compile every Triton kernel ahead of time for NVIDIA GPUs, without a GPU: Triton lowers to PTX and runs ptxas for
the target, so syntax, typing, layout, shared-memory and register problems that the CPU interpreter cannot see show
up here.

    python tests/triton_aot.py [--arch 90 80] [--quick]

Two sets of configurations:
  - the model's launches (always): one VLMo training step's attention (base, base_plus, a dense bias) and Multiway
    FFN kernels at N = 237, captured from the real host code (the launches are recorded, not run) and compiled for
    every autotune configuration with the specialization the JIT gives those very arguments (ints equal to 1 become
    constants, pointers and multiples of 16 get divisibility hints), which is what the GPU compiles. For these,
    ptxas's register report is checked too: a configuration that spills registers fails.
  - every bias form, dtype and head dim 128 at the first configuration, from generic signatures (unless --quick):
    compile coverage only.

Run in its own process with TRITON_INTERPRET unset (the interpreter replaces compilation when it is set).
Prints one line per kernel configuration and exits non-zero if any failed.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from vlmo_fast.model import relpos  # noqa: E402
from vlmo_fast.ops import triton_attention as ta  # noqa: E402
from vlmo_fast.ops import triton_ffn as tf  # noqa: E402

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (H100/H200, A100)
# The strict sm_90 no-spill rule was measured with this Triton (the version CI pins through torch). Register allocation
# changes between Triton releases: with 3.6 (the GPU machine's image) and 3.8, 1-3 of the 16 VLMo-base and dense-bias
# configurations spill 16-500 B on sm_90. Every other launch (any other Triton, sm_80, base_plus) must still have a
# configuration that spills at most SPILL_SLACK bytes (the autotuner times all of them): a word or two is noise, and
# 3.6 gives the LayerNorm backward's fused-residual launch (one configuration) 255 registers and a 4-byte spill.
STRICT_TRITON = "3.9."
STRICT = triton.__version__.startswith(STRICT_TRITON)
SPILL_SLACK = 8

# types of the pointer arguments by kernel argument name; every other non-constexpr argument is an int32, except
# the float scalars listed below
POINTERS = {
    "Q": "act", "K": "act", "V": "act", "O": "act", "OLO": "act", "DO": "act", "DQ": "act", "DK": "act",
    "DV": "act",
    "LSE": "*fp32", "DELTA": "*fp32", "DPART": "*fp32", "DSUM": "*fp32", "BIAS": "*fp32", "TABLE": "*fp32",
    "INDEX": "*i32", "KEEP": "*u8", "ORDER": "*i32", "OFFSETS": "*i32", "DTABLE": "*fp32",
    "X": "*fp32", "Y": "act", "MEAN": "*fp32", "RSTD": "*fp32", "W0": "*fp32", "B0": "*fp32", "W1": "*fp32",
    "B1": "*fp32", "DH": "act", "GO": "*fp32", "DX": "*fp32", "DWP": "*fp32", "DBP": "*fp32", "OUT": "*fp32",
    "GAMMA": "*fp32", "SCALE": "*fp32", "DY": "act", "DGP": "*fp32", "Y1": "act", "G1": "*fp32", "S1": "*fp32",
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


def cases():
    """Generic-signature configurations (label, jit function, signature, constexprs, [(block constexprs, num_warps,
    num_stages)]): every bias form and activation dtype and head dim 128 for each attention kernel, the FFN kernels
    in fp32. Compile coverage only: without the real arguments' specialization their register use is not what the
    GPU gets. Each is compiled at the first of its autotune configurations that fits the target's shared memory (the
    autotuner skips those that do not: fp32 tiles of 128 x 64 with 3 stages exceed an A100's), and again at the
    fixed configuration of PyTorch's deterministic mode (triton_attention.DETERMINISTIC_CONFIGS), which has to fit:
    nothing else runs in its place."""
    out = []
    bf16, fp16, fp32 = "*bf16", "*fp16", "*fp32"
    tuned = {"fwd": ta._fwd_tuned, "dkdv": ta._dkdv_tuned, "dq": ta._dq_tuned}
    for name, tuner in tuned.items():
        extra = {"NEED_DBIAS": True} if name == "dq" else {"STORE_LO": True} if name == "fwd" else {}
        configs = [(c.kwargs, c.num_warps, c.num_stages) for c in tuner.configs]
        m, n, warps, stages = ta.DETERMINISTIC_CONFIGS[name]
        pinned = [({"BLOCK_M": m, "BLOCK_N": n}, warps, stages)]
        for mode in (0, 1, 2):
            for act, ieee in ((bf16, False), (fp16, False), (fp32, True)):
                for d in (64, 128):
                    const = dict(BIAS_MODE=mode, HAS_MASK=mode != 0, UPCAST=False, IEEE=ieee, BLOCK_D=d,
                                 **configs[0][0], **extra)
                    sig = signature(tuner.fn, act, const)
                    if d == 64:
                        out.append((f"{name} mode{mode} {act}", tuner.fn, sig, const, configs))
                    out.append((f"{name} mode{mode} {act} D={d} deterministic", tuner.fn, sig, const, pinned))
        const = dict(BIAS_MODE=3, HAS_MASK=True, UPCAST=False, IEEE=False, BLOCK_D=128, **configs[0][0], **extra)
        out.append((f"{name} D=128", tuner.fn, signature(tuner.fn, bf16, const), const, configs))
        for act, ieee in ((bf16, False), (fp32, True)):
            const = dict(BIAS_MODE=3, HAS_MASK=True, UPCAST=False, IEEE=ieee, BLOCK_D=128, **configs[0][0], **extra)
            out.append((f"{name} mode3 {act} D=128 deterministic", tuner.fn, signature(tuner.fn, act, const), const,
                        pinned))
    d = 1024
    stream = dict(HAS_RES=True, HAS_G1=True, HAS_S1=True)  # the attention half's residual taken in (_stream)
    for label, fn, const in (
            ("ln_fwd", tf._ln_fwd, dict(ROWS=4, BLOCK_D=d, RNE=False, **stream)),
            ("ln_bwd", tf._ln_bwd, dict(HAS_GO=True, ROWS=4, BLOCK_D=d, RNE=False, **stream)),
            ("residual", tf._residual, dict(HAS_GAMMA=True, HAS_SCALE=True, ROWS=4, BLOCK_D=d, RNE=False, **stream)),
            ("residual_bwd", tf._residual_bwd, dict(HAS_GAMMA=True, HAS_SCALE=True, ROWS=4, BLOCK_D=d, RNE=False))):
        out.append((f"{label} {fp32}", fn, signature(fn, fp32, const), const, [({}, 4, 1)]))
    return out


# ---- the model's launches, captured from the host code --------------------------------------------------------------


class _Recorder:
    """Stands in for a kernel (plain or autotuned): ``kernel[grid](*args, **kw)`` records the launch, runs nothing."""

    def __init__(self, label, kernel, log):
        self.label, self.log = label, log
        tuned = isinstance(kernel, Autotuner)
        self.fn = kernel.fn if tuned else kernel  # the JITFunction
        self.configs = kernel.configs if tuned else [None]
        self.prune = getattr(kernel, "early_config_prune", None) if tuned else None

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append((self, args, kw, self.launch_configs(args, kw)))

    def launch_configs(self, args, kw):
        """The configurations the autotuner would time for this launch (after its early pruning)."""
        if self.prune is None:
            return self.configs
        return self.prune(self.configs, dict(zip(self.fn.arg_names, args)), **kw)


def _capture(module, names, run, log):
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(n.strip("_").replace("_tuned", ""), saved[n], log))
        run()
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def _attention_step(b, h, n, d, dense=False):
    """Forward and backward (with the bias gradient) of the model's attention: q, k, v views of the packed qkv."""
    q, k, v = torch.zeros(b, n, 3, h, d, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4).unbind(0)
    keep = torch.ones(b, n, dtype=torch.bool)
    bias = table = index = None
    if dense:
        bias = torch.zeros(h, n, n)
    else:  # the layer's column slice of the shared table, the official fusion index (computed in-kernel)
        table = torch.zeros(relpos.num_table_rows(14), 12 * h)[:, h : 2 * h]
        index = relpos.fusion_relative_position_index(n - 197, 14)
    out, lse, out_lo = ta._forward(q, k, v, bias, table, index, keep, d**-0.5, True)
    ta._backward(torch.empty_like(out), q, k, v, out, lse, bias, table, index, keep, d**-0.5, True, out_lo)


def _ffn_step(b, n, d):
    """Training forward and backward of a fusion-layer Multiway FFN and the attention half's residual (alone, and
    taken inside the FFN op as the model does), and of the qkv(norm1(x)) prologue, under bf16 autocast (fp32
    residual stream and parameters), with drop path."""
    from vlmo_fast import ops

    def expert():
        return ops.FFNExpert(torch.ones(d), torch.zeros(d), torch.zeros(4 * d, d), torch.zeros(4 * d),
                             torch.zeros(d, 4 * d), torch.zeros(d))

    x = torch.zeros(b, n, d, requires_grad=True)
    gamma = torch.full((d,), 0.1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tf.ffn_triton(x, (expert(), expert()), n - 197, gamma, 0.1, True, 1e-6)
        y = tf.residual_triton(y, torch.zeros(b, n, d, dtype=torch.bfloat16), gamma, 0.1, True)
        y = tf.ffn_triton(y, (expert(), expert()), n - 197, gamma, 0.1, True, 1e-6,
                          torch.zeros(b, n, d, dtype=torch.bfloat16), gamma)
        # base_plus (no layer scale) with DropPath off (eval, or a rate of 0)
        y = tf.ffn_triton(y, (expert(), expert()), n - 197, None, 0.0, False, 1e-6,
                          torch.zeros(b, n, d, dtype=torch.bfloat16), None)
        y = tf.norm_linear_triton(y, torch.ones(d), torch.zeros(d), torch.zeros(3 * d, d), torch.zeros(3 * d), 1e-6)
    y.backward(torch.zeros_like(y))


def model_launches():
    """[(label, jit function, args, kwargs, configs, strict)] of one VLMo training step's Triton kernels at N = 237.
    ``strict``: on sm_90 every autotune configuration must compile without register spills (VLMo-base and the
    dense-bias form); otherwise, and on other targets (sm_80's mma path needs more registers), at least one must
    (base_plus: D = 34 rows are not 16-byte aligned, so its loads are not vectorized and some tile shapes spill)."""
    log = []
    att = ("_fwd_tuned", "_bwd_delta", "_dkdv_tuned", "_dq_tuned", "_bucket_sum")
    ffn = ("_ln_fwd", "_ln_bwd", "_residual", "_residual_bwd")
    # a training batch (32): the batch enters the arguments (rows per dQ group), and a 1 there would be specialized
    # into a constant that real batches do not get
    steps = [("base", ta, att, lambda: _attention_step(32, 12, 237, 64), True),
             ("base_plus", ta, att, lambda: _attention_step(32, 16, 237, 34), False),
             ("dense bias", ta, att, lambda: _attention_step(32, 12, 237, 64, dense=True), True),
             ("base ffn", tf, ffn, lambda: _ffn_step(4, 237, 768), True)]
    out = []
    for tag, module, names, run, strict in steps:
        start = len(log)
        _capture(module, names, run, log)
        out += [(f"{rec.label} [{tag}]", rec.fn, args, kw, configs, strict) for rec, args, kw, configs in log[start:]]
    return out


def compile_launch(fn, args, kwargs, config, arch):
    """Compile ``fn`` for these arguments exactly as the JIT would on an sm_<arch> device (same binder, same
    specialization of the argument values), without launching it."""
    kwargs = dict(kwargs)
    if config is not None:
        kwargs.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(triton.compiler.ASTSource(fn, sig, constexprs, attrs), target=target,
                          options=options.__dict__)


def register_use(kernel, arch):
    """(registers per thread, bytes of spill stores) from ptxas's report on the kernel's PTX (Triton's own ptxas)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([get_ptxas(arch).path, f"-arch={sm}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spill = re.search(r"(\d+) bytes spill stores", done.stderr)
    if done.returncode != 0 or regs is None or spill is None:
        raise RuntimeError(f"ptxas report unreadable: {done.stderr[-500:]}")
    return int(regs.group(1)), int(spill.group(1))


# Most 4-byte global loads (plain, or asynchronous copies into shared memory) per thread that an attention kernel of
# the strict launches may have: its per-row statistics (lse, delta) take a few. Tiles of q, k, v and the dense bias
# must load as 16-byte vectors; a bias row stride or mask the JIT cannot prove 16-byte aligned turns the bias tile
# into one 4-byte load per element (96 per thread in the 128 x 64 forward).
NARROW_LOADS_MAX = 8
_NARROW = re.compile(r"cp\.async\.\w+\.shared\.global(?:\.[\w:]+)* \[[^\]]*\], \[[^\]]*\], (?:0x4|4)\b"
                     r"|ld\.global(?:\.(?!v[248]\b)[\w:]+)*\.b32\b")  # scalar loads (not .v2/.v4 vectors)


def narrow_loads(kernel) -> int:
    """4-byte global loads and 4-byte global-to-shared copies in the kernel's PTX."""
    return len(_NARROW.findall(kernel.asm["ptx"]))


def _line(arch, label, kernel, t0, regs=None, spill=None, spill_ok=False, narrow_ok=True):
    shared = kernel.metadata.shared
    problems = []
    if shared > SHARED_LIMIT[arch]:
        problems.append(f"needs {shared} B shared (> {SHARED_LIMIT[arch]})")
    if spill and not spill_ok:
        problems.append(f"spills {spill} B of registers")
    if not narrow_ok:
        problems.append(f"{narrow_loads(kernel)} 4-byte loads (> {NARROW_LOADS_MAX}): a tile is not vectorized")
    usage = "" if regs is None else f" regs {regs:3d} spill {spill}"
    status = "FAIL" if problems else "ok  "
    print(f"sm_{arch} {status} {label:<64} {time.time() - t0:5.1f}s shared {shared:6d}{usage}"
          + ("  " + "; ".join(problems) if problems else ""), flush=True)
    return not problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="only the model's launches")
    args = parser.parse_args(argv)
    failures = 0
    if not STRICT:
        print(f"triton {triton.__version__}: the strict sm_90 rule applies to {STRICT_TRITON}x only; "
              f"each launch needs a configuration spilling at most {SPILL_SLACK} B", flush=True)
    launches = model_launches()
    for arch in args.arch:
        for label, fn, fargs, kwargs, configs, strict in launches:
            spill_free = 0
            checked = strict and arch == 90 and STRICT  # no spill at all (else at most SPILL_SLACK bytes)
            for c in configs:
                name = label if c is None else f"{label} {c.kwargs} w{c.num_warps} s{c.num_stages}"
                t0 = time.time()
                try:
                    kernel = compile_launch(fn, fargs, kwargs, c, arch)
                    regs, spill = register_use(kernel, arch)
                    spill_free += spill <= (0 if checked else SPILL_SLACK)
                    vector_ok = not (checked and label.split()[0] in ("fwd", "dkdv", "dq")
                                     and narrow_loads(kernel) > NARROW_LOADS_MAX)
                    failures += not _line(arch, name, kernel, t0, regs, spill, spill_ok=not checked,
                                          narrow_ok=vector_ok)
                except Exception as exc:  # report every failing configuration, then fail
                    failures += 1
                    print(f"sm_{arch} FAIL {name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            if not spill_free:
                failures += 1
                print(f"sm_{arch} FAIL {label}: every configuration spills registers"
                      + ("" if checked else f" (more than {SPILL_SLACK} B)"), flush=True)
        if args.quick:
            continue
        for label, fn, sig, const, configs in cases():
            t0 = time.time()
            try:
                for i, (blocks, warps, stages) in enumerate(configs):
                    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={**const, **blocks})
                    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                            options={"num_warps": warps, "num_stages": stages})
                    if kernel.metadata.shared <= SHARED_LIMIT[arch] or i == len(configs) - 1:
                        break
                name = f"{label} (generic)" + (f" {blocks} w{warps} s{stages}" if i else "")
                failures += not _line(arch, name, kernel, t0)
            except Exception as exc:
                failures += 1
                print(f"sm_{arch} FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
