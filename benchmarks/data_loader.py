"""Data-only benchmark: how many samples per second the official training input pipeline delivers.

Pipeline measured (vlmo_fast.data): arrow read -> image decode -> official train transform (RandomResizedCrop,
flip, RandAugment(2, 7)) at ``--image-size`` -> tokenisation to ``--max-text-len`` -> collate with whole-word MLM
masking, through a DataLoader with N workers. No model, no GPU work: this is the ceiling the data layer puts on
training throughput. Without ``--data-root`` it generates, in a temporary folder, a COCO-like set of 640x480 JPEGs
with five captions each (``--images coco``, the default: decoding costs what a COCO image's does), or the built-in
synthetic set of 64 px PNGs (``--images synthetic``, decoding ~30x cheaper than real data).

    python benchmarks/data_loader.py --workers 0 2 --batches 20
    python benchmarks/data_loader.py --data-root /data/arrow --datasets coco vg --workers 8 16

Also reports a per-stage cost in the main process (ms per sample: decode, transform, tokenise; ms per batch:
collate). Prints a table and writes JSON (``--out``, default ``benchmarks/results/data_loader_<host>_<date>.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import torch

from vlmo_fast.data import build_collate, build_dataset, build_loader, measure_loader, write_synthetic
from vlmo_fast.data.sample import decode_image, encode_text
from vlmo_fast.data.transforms import TrainTransform
from vlmo_fast.fileio import atomic_write_json
from vlmo_fast.tokenizer import BertTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def stage_costs(ds, tokenizer, image_size: int, max_text_len: int, samples: int, batch_size: int) -> Dict[str, float]:
    """Main-process cost of each stage (the first dataset of a ConcatDataset)."""
    base = ds.datasets[0] if hasattr(ds, "datasets") else ds
    n = min(samples, len(base))
    tf = TrainTransform(image_size)
    raw = [base.cell("image", int(base.rows[j])) for j in range(n)]
    texts = [base.caption(j) for j in range(n)]
    t0 = time.perf_counter()
    images = [decode_image(b) for b in raw]
    t1 = time.perf_counter()
    for img in images:
        tf(img)
    t2 = time.perf_counter()
    for text in texts:
        encode_text(tokenizer, text, max_text_len)
    t3 = time.perf_counter()
    collate = build_collate(tokenizer)
    items = [ds[j] for j in range(min(batch_size, len(ds)))]
    reps = 5
    t4 = time.perf_counter()
    for _ in range(reps):
        collate(items)
    t5 = time.perf_counter()
    return {"decode_ms_per_sample": (t1 - t0) / n * 1e3, "transform_ms_per_sample": (t2 - t1) / n * 1e3,
            "tokenize_ms_per_sample": (t3 - t2) / n * 1e3, "collate_ms_per_batch": (t5 - t4) / reps * 1e3,
            "samples": n, "collate_batch_size": len(items)}


def parse_args(argv: List[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None,
                        help="arrow folder (default: generate a set in a temporary folder, see --images)")
    parser.add_argument("--datasets", nargs="+", default=["coco"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, os.cpu_count() or 1])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker setting")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches first (default: workers x 2 + 2: worker start-up and every batch the "
                             "workers prefetched while starting, which would otherwise arrive at once and inflate "
                             "the rate)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-text-len", type=int, default=40)
    parser.add_argument("--n-train", type=int, default=2000, help="images to generate without --data-root")
    parser.add_argument("--images", default="coco", choices=["coco", "synthetic"],
                        help="without --data-root: coco = COCO-like 640x480 JPEGs with 5 captions each (default; "
                             "decoding costs what COCO's does), synthetic = the built-in set's 64 px PNGs")
    parser.add_argument("--out", default=None, help="JSON file, or a folder to write the default file name into")
    args = parser.parse_args(argv)
    if args.data_root is not None and not os.path.isdir(args.data_root):
        parser.error(f"--data-root: no such folder: {args.data_root}")
    return args


def generate(args: argparse.Namespace, root: str) -> None:
    """The set to read without --data-root: COCO-like JPEGs or the built-in synthetic PNGs."""
    t = time.perf_counter()
    if args.images == "coco":
        harness.write_coco_like(root, "train", args.n_train, 5 * args.n_train)
    else:
        write_synthetic(root, n_train=args.n_train, n_val=8, n_test=8)
    print(f"generated {args.n_train} {args.images} images in {time.perf_counter() - t:.2f} s under {root}")


def measure(args: argparse.Namespace, root: str) -> Tuple[List[Dict[str, Any]], Dict[str, float]]:
    """One row per worker setting (samples/s through the loader), and the main-process stage costs."""
    tokenizer = BertTokenizer()
    ds = build_dataset(root, args.datasets, "train", image_size=args.image_size, max_text_len=args.max_text_len,
                       train=True, tokenizer=tokenizer)
    warmups = {w: args.warmup if args.warmup is not None else 2 * w + 2 for w in args.workers}
    needed = (args.batches + max(warmups.values())) * args.batch_size
    if len(ds) < needed:
        print(f"note: {len(ds)} samples < {needed} needed; the loader will run out early", file=sys.stderr)
    stages = stage_costs(ds, tokenizer, args.image_size, args.max_text_len, 200, args.batch_size)
    rows = []
    for workers in args.workers:
        loader = build_loader(ds, batch_size=args.batch_size, collate=build_collate(tokenizer), train=True,
                              num_workers=workers, seed=0, drop_last=True)
        sps = measure_loader(loader, args.batches, warmup=warmups[workers])
        del loader
        rows.append({"workers": workers, "samples_per_s": round(sps, 1),
                     "ms_per_batch": round(args.batch_size / sps * 1e3, 2), "batch_size": args.batch_size,
                     "image_size": args.image_size, "max_text_len": args.max_text_len,
                     "batches": args.batches, "warmup_batches": warmups[workers]})
    return rows, stages


def report(args: argparse.Namespace, rows: List[Dict[str, Any]], stages: Dict[str, float],
           load_before: float) -> Dict[str, Any]:
    """The result record (with the machine, its load and the commit), printed as a table."""
    result = {
        "benchmark": "data_loader",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": harness.device_name(torch.device("cpu")),  # the string run.py records for a CPU run
        "cpu_count": os.cpu_count(),
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": harness.git_commit(),
        "data": args.data_root or (f"COCO-like ({args.n_train} images, 640x480 JPEG q90, 5 captions each)"
                                   if args.images == "coco" else f"synthetic ({args.n_train} images, 64 px PNG)"),
        "datasets": args.datasets,
        "pipeline": "train: RandomResizedCrop(0.5-1) + flip + RandAugment(2,7) + normalize; whole-word MLM collate",
        "rows": rows,
        "stages": {k: round(v, 3) if isinstance(v, float) else v for k, v in stages.items()},
    }
    print(f"device: {result['device']} ({result['cpu_count']} cores, load {result['load_average_1m_before_after']}), "
          f"torch {torch.__version__}")
    print(f"{'workers':>7} {'samples/s':>10} {'ms/batch':>9}  (batch {args.batch_size}, {args.image_size} px)")
    for r in rows:
        print(f"{r['workers']:>7} {r['samples_per_s']:>10.1f} {r['ms_per_batch']:>9.2f}")
    print("main-process stage costs:", json.dumps(result["stages"]))
    return result


def write(result: Dict[str, Any], out: str = None) -> str:
    """``result`` as JSON at ``out``; a folder (e.g. the GPU suite's $OUT) or None (benchmarks/results): the default
    file name inside it."""
    if out is None or os.path.isdir(out):
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        out = os.path.join(folder, f"data_loader_{platform.node() or 'host'}_{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_json(out, result, indent=1)  # (a reader, or a kill, never finds half a file)
    print(f"wrote {out}")
    return out


def main(argv: List[str] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]  # other processes on the machine share the cores: recorded with the result
    if args.data_root is not None:
        rows, stages = measure(args, args.data_root)
    else:
        root = tempfile.mkdtemp(prefix="vlmo_data_bench_")
        try:
            generate(args, root)
            rows, stages = measure(args, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    write(report(args, rows, stages, load_before), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
