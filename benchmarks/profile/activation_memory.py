"""What a training forward keeps for its backward, per sample, vlmo_fast (its Triton kernels) against the official
math, under bf16 autocast: one VLMo-base fusion layer (N = 237: 40 text + 197 image tokens), and one whole
pretraining step (MLM + ITC + ITM with hard negatives). These are the activations that grow with the batch, the part
of the step's peak memory the kernels change; counted with saved-tensor hooks, so the same on any device.

    python benchmarks/profile/activation_memory.py [--out FILE]   (CPU: Triton's interpreter, ~12 min; or a GPU)
    python benchmarks/profile/activation_memory.py --dry-run       (a tiny model: the script's plumbing only)"""
import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--dry-run", action="store_true", help="a tiny model")
parser.add_argument("--out", help="also write the lines to this file")
args = parser.parse_args()

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import vlmo_fast as vf  # noqa: E402
from vlmo_fast import objectives  # noqa: E402
from vlmo_fast.model import relpos  # noqa: E402
from vlmo_fast.model.multiway import Block as FastBlock  # noqa: E402
from vlmo_fast.reference import Block as OfficialBlock  # noqa: E402
from vlmo_fast.reference import ReferenceVLMo  # noqa: E402
from run import make_batch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profiling import printer, saved_bytes_per_sample  # noqa: E402

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if args.dry_run:
    cfg = vf.preset("vlmo_tiny_patch16", embed_dim=32, num_heads=2, image_size=32, max_text_len=8, depth=2,
                    vlffn_start_layer_index=1, drop_path_rate=0.1)
else:
    cfg = vf.preset("vlmo_base_patch16", drop_path_rate=0.1)
say = printer(args.out)
say(f"# activations kept for the backward, per sample, {cfg.model_arch}, bf16 autocast, {dev.type}"
    + (" (Triton interpreter)" if dev.type == "cpu" else ""))

lt, w = cfg.max_text_len, cfg.image_size // cfg.patch_size
n, heads = lt + w * w + 1, cfg.num_heads
index = relpos.fusion_relative_position_index(lt, w).to(dev)
table = torch.randn(relpos.num_table_rows(w), heads, device=dev, requires_grad=True)


def layer(block, official):
    def go(batch):
        x = torch.randn(batch, n, cfg.embed_dim, device=dev, requires_grad=True)
        keep = torch.ones(batch, n, dtype=torch.bool, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            if official:
                block(x, mask=keep.long(), modality_type="vl", relative_position_bias=table.t()[:, index])
            else:
                block(x, keep, "vl", (table, index))
    return go


def step(model):
    model.current_tasks = ["mlm", "itc", "itm"]

    def go(batch):
        torch.manual_seed(1)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            objectives.total_loss(model(make_batch(cfg, batch, dev)))
    return go


fast_block = FastBlock(cfg, drop_path=0.1, with_vlffn=False).to(dev).train()
fast_block.backend = "triton"
cases = [("fusion layer", layer(OfficialBlock(cfg, 0.1, False).to(dev).train(), True), layer(fast_block, False),
          (1, 2)),
         # hard negatives need two samples (the positive is excluded)
         ("pretraining step", step(ReferenceVLMo(cfg).to(dev).train()), step(vf.VLMo(cfg, backend="triton").to(dev).train()),
          (2, 3))]
for name, official, fast, batches in cases:
    start = time.perf_counter()
    theirs = saved_bytes_per_sample(official, batches)
    ours = saved_bytes_per_sample(fast, batches)
    say(f"{name:18s} official {theirs / 1e6:10.3f} MB   vlmo_fast {ours / 1e6:10.3f} MB   {ours / theirs:.3f}x"
        f"   ({time.perf_counter() - start:.0f} s)")
