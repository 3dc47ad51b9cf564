"""A self-contained demo: build a model, save and reload a checkpoint, run every forward path on the fast path and the
reference, and report the agreement and timings (the median of 5 calls after a warm-up call, the device synchronised
around each). Runs on CPU in seconds with the tiny preset.

    vlmo-fast demo [--arch vlmo_tiny_patch16] [--batch 3] [--device cpu]    (or python -m vlmo_fast.demo)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import List, Optional

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, loss_names, preset
from .model import VLMo
from .reference import ReferenceVLMo
from .tokenizer import BertTokenizer
from .train.config import check_device, resolve_device

PATHS = ("infer", "infer_text", "infer_image", "infer_text_ft", "infer_image_ft", "infer_text_mlm")
CAPTIONS = ["a red circle above a blue square", "two green triangles", "a yellow star on the left"]


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _median_ms(fn, device: torch.device, reps: int = 5) -> float:
    """fn's median wall time in ms over ``reps`` calls, after the call that warmed it up (the agreement check)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv: Optional[List[str]] = None, prog: str = "python -m vlmo_fast.demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vlmo_tiny_patch16", choices=PRESETS,
                        help="model preset (default: vlmo_tiny_patch16)")
    parser.add_argument("--batch", type=int, default=3, help="batch size (default: 3)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    try:
        check_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    torch.manual_seed(0)
    device = resolve_device(args.device)
    config = preset(args.arch, loss_names=loss_names(itm=1, itc=1, mlm=1))
    tok = BertTokenizer()
    enc = tok([CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)], max_length=config.max_text_len)
    s = config.image_size
    batch = {
        "text_ids": enc["input_ids"].to(device),
        "text_masks": enc["attention_mask"].to(device),
        "text_labels": torch.full_like(enc["input_ids"], -100).to(device),
        "image": [torch.randn(args.batch, 3, s, s, device=device)],
    }

    model = VLMo(config)
    with torch.no_grad():  # a non-zero table so the relative-position path is exercised
        if model.relative_position_bias_table is not None:
            model.relative_position_bias_table.normal_(std=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{args.arch}.safetensors")
        save_checkpoint(model, path)
        fast = VLMo(config).to(device).eval()
        report = load_checkpoint(fast, path)
        ref = ReferenceVLMo(config).to(device).eval()
        load_checkpoint(ref, path)
    print(f"model {args.arch}: {sum(p.numel() for p in fast.parameters()) / 1e6:.2f}M parameters, "
          f"checkpoint reloaded ({report})")
    print(f"{'path':<16} {'key':<16} {'shape':<16} {'max rel err':>12} {'fast ms':>9} {'ref ms':>9}")
    worst = 0.0
    with torch.no_grad():
        for name in PATHS:
            out = getattr(fast, name)(batch)
            expected = getattr(ref, name)(batch)
            fast_ms = _median_ms(lambda: getattr(fast, name)(batch), device)
            ref_ms = _median_ms(lambda: getattr(ref, name)(batch), device)
            for key in ("text_feats", "image_feats", "cls_feats", "cls_vlffn_feats"):
                if out.get(key) is None:
                    continue
                err = _max_rel_err(out[key], expected[key])
                worst = max(worst, err)
                print(f"{name:<16} {key:<16} {str(tuple(out[key].shape)):<16} {err:>12.2e} "
                      f"{fast_ms:>9.1f} {ref_ms:>9.1f}")
    ok = worst <= 1e-5
    print(f"worst relative error vs the official math: {worst:.2e} ({'ok' if ok else 'MISMATCH'})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
