"""Where a Multiway block's forward+backward spends its time on a GPU: the benchmark's block case (VLMo-base, fused
sequence N=237, B=128, bf16 autocast, padding, the table's bias), each kernel's time per iteration and share, from
torch.profiler. The block benchmark compares the whole against the official math and torch.compile; this says which
kernels to work on.

    python benchmarks/profile/block_kernels.py [--out FILE]   (on a GPU)
    python benchmarks/profile/block_kernels.py --dry-run      (CPU, Triton's interpreter, the tiny preset)"""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny sizes")
parser.add_argument("--out", help="also write the lines to this file")
parser.add_argument("--top", type=int, default=15, help="kernels listed")
args = parser.parse_args()
if args.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (benchmarks/run.py: its model pieces and helpers)
from profiling import kernel_times, printer  # noqa: E402

from vlmo_fast.model import relpos  # noqa: E402


say = printer(args.out)
sizes = bench.SIZES["tiny" if args.dry_run else "full"]
dev = torch.device("cpu" if args.dry_run else "cuda")
dtype = torch.float32 if args.dry_run else torch.bfloat16
config = bench.vf.preset(sizes["arch"]).replace(drop_path_rate=0.0)
b, h = sizes["block_batch"], config.num_heads
n = config.max_text_len + config.num_image_tokens
block = bench.FastBlock(config, drop_path=0.0, with_vlffn=False).to(dev)
index = relpos.fusion_relative_position_index(config.max_text_len, config.window_size).to(dev)
table = (torch.randn(relpos.num_table_rows(config.window_size), h, device=dev) * 0.5).requires_grad_()
keep = bench.padding_mask(b, n, config.max_text_len, dev)
x = torch.randn(b, n, config.embed_dim, device=dev, requires_grad=True)
leaves = [x, table] + list(block.parameters())


def step():
    with bench.autocast(dev, dtype):
        out = block(x, keep, "vl", (table, index))
    return torch.autograd.grad(out, leaves, torch.ones_like(out))


for _ in range(1 if args.dry_run else 3):  # autotuning and caches outside the profile
    step()
steps = 1 if args.dry_run else 5
total, rows = kernel_times(step, steps, on_cpu=args.dry_run)
say(f"Multiway block forward+backward, B={b} N={n} D={config.embed_dim} {str(dtype)[6:]}: {total:.0f} us per "
    f"iteration ({'CPU ops' if args.dry_run else 'CUDA kernels'}, mean of {steps})")
for us, calls, name in rows[: args.top]:
    say(f"  {us:9.1f} us {100 * us / total:5.1f}%  x{calls:<3} {name[:90]}")
