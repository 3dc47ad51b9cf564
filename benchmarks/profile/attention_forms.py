"""Where the fused attention's time goes on a GPU: the same case (VLMo-base fusion, B=128, N=237, bf16) with no bias,
a dense bias, and the table (gathered into a dense bias first, the default; or gathered per score in the kernel, with
the index computed or loaded); forward and forward+backward, with the autotuner's choice. One line per case. Then,
for the default table form: the time of each kernel of a forward+backward (torch.profiler), the dQ kernel's batch
grouping (triton_attention.DQ_PROGRAMS_PER_SM) at a few settings, and the masked softmax's two CUDA kernel kinds.

    python benchmarks/profile/attention_forms.py [--quick]   (on a GPU; results/gpu_suite_20261205T194632_h100 has
                                                             the first part of a run)
    python benchmarks/profile/attention_forms.py --dry-run   (CPU, Triton's interpreter, tiny sizes: the script's
                                                             plumbing only, as benchmarks/gpu_suite.sh --dry-run)"""
import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="only the default table form's lines (no form survey)")
parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny sizes")
parser.add_argument("--out", help="also write the lines to this file")
args = parser.parse_args()
if args.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

sys.path.insert(0, ".")
from vlmo_fast import ops  # noqa: E402
from vlmo_fast.model import relpos  # noqa: E402
from vlmo_fast.ops import native  # noqa: E402
from vlmo_fast.ops import triton_attention as ta  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profiling import kernel_times, printer  # noqa: E402

if args.dry_run:
    b, h, n, d, lt, w, dev, dtype = 2, 2, 29, 16, 12, 4, "cpu", torch.float32
else:
    b, h, n, d, lt, w, dev, dtype = 128, 12, 237, 64, 40, 14, "cuda", torch.bfloat16
q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
index = relpos.fusion_relative_position_index(lt, w).to(dev)
table = (torch.randn(relpos.num_table_rows(w), h, device=dev) * 0.5).requires_grad_()
dense = torch.randn(h, n, n, device=dev, requires_grad=True)
keep = torch.ones(b, n, dtype=torch.bool, device=dev)
keep[:, lt - 10 : lt] = False
sms = 132 if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count


say = printer(args.out)


def bench(fn, warmup, rep):
    """ms per call: triton's do_bench on the GPU; one timed call in a dry run."""
    if not args.dry_run:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3

flops = 4 * b * h * n * n * d
g = torch.randn(b, h, n, d, device=dev, dtype=dtype)
table_kw = dict(bias_table=table, bias_index=index, key_padding_mask=keep)
cases = {"none": {}, "none+mask": dict(key_padding_mask=keep), "dense+mask": dict(bias=dense, key_padding_mask=keep),
         "table(dense gather)+mask": table_kw, "table(in-kernel index)+mask": table_kw,
         "table(loaded index)+mask": table_kw}
if args.quick:
    cases = {"table(dense gather)+mask": table_kw}


def callables(kw):
    leaves = [q, k, v] + [t for t in (kw.get("bias"), kw.get("bias_table")) if t is not None]
    fwd = lambda: ops.rel_pos_attention(q, k, v, backend="triton", **kw)  # noqa: E731

    def both():
        out = fwd()
        return torch.autograd.grad(out, leaves, g)

    return fwd, both


def timed(name, kw):
    fwd, both = callables(kw)
    with torch.no_grad():
        t_f = bench(fwd, 50, 200)
    t_b = bench(both, 50, 200)
    cfg = {kn: str(getattr(ta, kn).best_config) for kn in ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned")}
    say(f"{name:<30} fwd {t_f:.3f} ms {flops / t_f / 1e9:6.1f} TFLOP/s | fwd+bwd {t_b:.3f} ms "
          f"{3.5 * flops / t_b / 1e9:6.1f} TFLOP/s | {cfg}")
    return both


for name, kw in cases.items():
    ta.STRUCTURED_INDEX = "loaded" not in name
    ta.TABLE_BIAS = "in-kernel" if "in-kernel" in name or "loaded" in name else "dense"
    timed(name, kw)
ta.STRUCTURED_INDEX, ta.TABLE_BIAS = True, "dense"

# each kernel's share of a forward+backward of the default form
_, both = callables(table_kw)
both()
steps = 1 if args.dry_run else 10
_, rows = kernel_times(both, steps, on_cpu=args.dry_run)
say(f"\nkernels of one forward+backward, table(dense gather)+mask (mean of {steps}):")
for us, calls, name in rows[:12]:
    say(f"  {us:9.1f} us  x{calls:<3} {name[:90]}")

# the dQ kernel's batch grouping when the bias needs a gradient
say()
default = ta.DQ_PROGRAMS_PER_SM
for per_sm in (2, 4, 8, 16):
    ta.DQ_PROGRAMS_PER_SM = per_sm
    groups = ta._group_count(b, h, n, True, sms)
    t_b = bench(both, 20, 100)
    say(f"DQ_PROGRAMS_PER_SM={per_sm:<3} ({groups} groups)  fwd+bwd {t_b:.3f} ms "
          f"{3.5 * flops / t_b / 1e9:6.1f} TFLOP/s")
ta.DQ_PROGRAMS_PER_SM = default

# the masked softmax's CUDA kernel kinds at the benchmark's case (B·H = 1536, N = 237, bf16, dense bias, padding);
# in a dry run the kinds switch but the C++ CPU kernels run
say()
if native._native_missing(torch.device("cuda")):
    say("masked_softmax: no CUDA kernels compiled")
    sys.exit(0)
scores = torch.randn(b, h, n, n, device=dev, dtype=dtype, requires_grad=True)
elems = scores.numel() * scores.element_size()
gp = torch.randn_like(scores)
for kind in native.SOFTMAX_CUDA_KERNELS:
    with native.using_cuda_softmax_kernel(kind):
        sm = lambda: ops.masked_softmax(scores, scale=0.125, bias=dense, key_padding_mask=keep,  # noqa: E731
                                        backend="cuda")
        with torch.no_grad():
            t_f = bench(sm, 20, 100)
        t_b = bench(lambda: torch.autograd.grad(sm(), [scores, dense], gp), 20, 100)
    say(f"masked_softmax[{kind:<6}] fwd {t_f:.3f} ms {2 * elems / t_f / 1e6:6.0f} GB/s | fwd+bwd {t_b:.3f} ms "
          f"{5 * elems / t_b / 1e6:6.0f} GB/s")
