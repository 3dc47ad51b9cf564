"""Timing, ceilings, FLOP accounting and result writers for ``benchmarks/run.py``.

Every number in a result row comes from timing the callable registered under that row's implementation name, on
the same device in the same process as its baseline.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

SCHEMA_VERSION = 1

# MFU "vs datasheet" uses vlmo_fast.flops.datasheet_peak; MFU "vs measured" the run's own GEMM rate.
MIN_TIMED_CALLS = 10  # CUDA: do_bench's window is stretched so that even a long call is timed this many times


# ---- timing ------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 2, reps: int = 5) -> Timing:
    """Median wall time of ``fn``.

    CUDA: ``triton.testing.do_bench`` (warm-up, L2 flushed before every rep so each rep reads its inputs from HBM,
    median) when Triton is available, else CUDA events. CPU: ``warmup`` untimed calls, then ``reps`` timed
    calls, median of the wall-clock times.
    """
    if device.type == "cuda":
        try:
            import triton.testing

            fn()  # compiles and autotunes outside the estimate
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            est_ms = (time.perf_counter() - t0) * 1e3
            # do_bench times int(rep / its estimate) calls, the estimate including the L2 flush before each: a window
            # of MIN_TIMED_CALLS + 1 calls, so that a long call (a whole training step, where the flush is a small
            # part of the estimate) still gets a median and quantiles of about MIN_TIMED_CALLS samples, not one (the
            # count recorded is this estimate's)
            window = max(100.0, reps * 10.0, (MIN_TIMED_CALLS + 1) * est_ms)
            ms = triton.testing.do_bench(fn, warmup=max(25.0, est_ms), rep=window, quantiles=[0.5, 0.2, 0.8])
            return Timing(ms[0], ms[1], ms[2], max(1, int(window / max(est_ms, 1e-3))))
        except ImportError:
            pass
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return _summary(times)
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def time_fns(fns: Dict[str, Callable[[], Any]], device: torch.device, warmup: int = 2, reps: int = 5,
             burst_ms: float = 25.0, deadline: float = math.inf) -> Dict[str, Any]:
    """Each implementation's ``Timing``, or the exception it raised (recorded by the caller, never hidden), or None
    for one not timed because ``deadline`` (a ``time.time()``) had passed when its turn came (CUDA).

    CUDA: one after the other with ``time_fn`` (do_bench isolates each). CPU: ``reps`` rounds; in each round every
    implementation runs one burst of back-to-back calls lasting about ``burst_ms`` (one call when a call is longer).
    Taking turns makes a slow drift of a shared machine's speed (other tenants, clocks) fall on every implementation
    alike instead of on whichever ran last; within a burst the first call, which pays for the other implementation's
    cache and thread state, is not counted (unless it is the only one), so each is timed in its own steady state.
    """
    out: Dict[str, Any] = {}
    if device.type == "cuda":
        for name, fn in fns.items():
            if time.time() > deadline:
                out[name] = None
                continue
            try:
                out[name] = time_fn(fn, device, warmup=warmup, reps=reps)
            except Exception as exc:  # noqa: BLE001 - reported in the row
                out[name] = detached(exc)
            finally:
                torch.cuda.empty_cache()
        return out
    bursts: Dict[str, int] = {}
    for name, fn in fns.items():
        try:
            last = 0.0
            for _ in range(max(1, warmup)):
                t0 = time.perf_counter()
                fn()
                last = (time.perf_counter() - t0) * 1e3
            bursts[name] = max(1, min(50, math.ceil(burst_ms / max(last, 1e-3)))) if burst_ms > 0 else 1
        except Exception as exc:  # noqa: BLE001 - reported in the row
            out[name] = detached(exc)
    times: Dict[str, List[float]] = {name: [] for name in bursts}
    for _ in range(reps):
        for name in list(bursts):
            fn, n = fns[name], bursts[name]
            try:
                for i in range(n):
                    t0 = time.perf_counter()
                    fn()
                    if i > 0 or n == 1:
                        times[name].append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # noqa: BLE001
                out[name] = detached(exc)
                del bursts[name]
    for name in bursts:
        out[name] = _summary(times[name])
    return {name: out[name] for name in fns}


def detached(exc: BaseException) -> BaseException:
    """The exception without its traceback (and chained ones): a kept traceback keeps the failed call's frames, and
    with them its tensors, alive; after one out-of-memory error every later case would run out of memory too (as the
    first H100 run showed)."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc


def _summary(times: List[float]) -> Timing:
    s = sorted(times)
    q = lambda f: s[min(len(s) - 1, max(0, int(round(f * (len(s) - 1)))))]  # noqa: E731
    return Timing(statistics.median(s), q(0.2), q(0.8), len(s))


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak device memory allocated by one call beyond what was allocated before it, in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ---- ceilings ------------------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device, quick: bool = False,
                     dtypes: Sequence[torch.dtype] = ()) -> Dict[str, Any]:
    """The device's memory bandwidth (GB/s, bytes read + written: the better of a copy and an in-place add) and GEMM
    rate (TFLOP/s; bf16 on GPU, fp32 on CPU: "gemm_tflops"), and the GEMM rate in each of ``dtypes`` too
    ("gemm_tflops_by_dtype": a row's % ceiling and MFU are against its own dtype's rate, an fp32 row's not against
    bf16's)."""
    if device.type == "cuda":
        n_bytes, gemm_n, dtype = 2**30, 8192, torch.bfloat16
    else:
        n_bytes, gemm_n, dtype = (2**24 if quick else 2**28), (256 if quick else 2048), torch.float32
    # ceilings are peaks: the 20th percentile of the repetitions' times, not the median
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device, warmup=2, reps=7)
    copy_gbs = 2 * n_bytes / (t.p20_ms * 1e-3) / 1e9
    # an in-place add reads both and writes one: on a CPU, where a plain copy also reads every destination line
    # before writing it (write-allocate, uncounted above), it shows more of the memory system; the better of the two
    t = time_fn(lambda: y.add_(x), device, warmup=2, reps=7)
    copy_gbs = max(copy_gbs, 3 * n_bytes / (t.p20_ms * 1e-3) / 1e9)
    x = y = None  # free the buffers before the GEMM's
    by_dtype, n_by_dtype = {}, {}
    for dt in dict.fromkeys([dtype, *dtypes]):
        # a CPU's half-precision GEMM can be 50x slower than its fp32 one: a smaller problem (2048^3 fp16 took ~1 min)
        n = gemm_n if device.type == "cuda" or dt == dtype else min(gemm_n, 512)
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        t = time_fn(lambda: a @ b, device, warmup=2, reps=7)
        by_dtype[dtype_name(dt)] = 2 * n**3 / (t.p20_ms * 1e-3) / 1e12
        n_by_dtype[dtype_name(dt)] = n
        a = b = None
    return {"copy_gbs": copy_gbs, "gemm_tflops": by_dtype[dtype_name(dtype)], "gemm_dtype": dtype_name(dtype),
            "gemm_n": gemm_n, "copy_bytes": n_bytes, "gemm_tflops_by_dtype": by_dtype, "gemm_n_by_dtype": n_by_dtype}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def gemm_rate(ceilings: Dict[str, Any], dtype: Optional[torch.dtype]) -> float:
    """The measured GEMM rate (TFLOP/s) in ``dtype`` when the run measured it, else the run's main GEMM rate."""
    by_dtype = ceilings.get("gemm_tflops_by_dtype") or {}
    return by_dtype.get(dtype_name(dtype), ceilings["gemm_tflops"]) if dtype is not None else ceilings["gemm_tflops"]


# ---- realistic data for the data benchmarks -----------------------------------------------------------------

CAPTION_WORDS = ("a man woman dog cat red blue small large riding holding sitting standing next to on in the of "
                 "with near street beach table kitchen field horse bus train plate pizza two three people white "
                 "black green wooden grass water sky building car bike").split()


def write_coco_like(root: str, split: str, n_img: int, n_txt: int, distinct: int = 32, seed: int = 0) -> None:
    """A COCO-like ``split`` in the official coco arrow layout: ``n_img`` 640x480 JPEGs (quality 90, shapes on a
    gradient with sensor-like noise, ~130 KB each, about a COCO photo's size and entropy, which is what decoding
    costs; ``distinct`` different pictures repeated) with ``n_txt`` captions of 8-15 words spread over them. The data
    benchmarks read these instead of the built-in synthetic set's 64 px PNGs, whose decoding is far cheaper."""
    import numpy as np
    from PIL import Image, ImageDraw

    from vlmo_fast import data as vdata

    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(distinct):
        y, x = np.mgrid[0:480, 0:640]
        base = np.stack([(x * rng.uniform(0.1, 0.4) + y * rng.uniform(0.1, 0.4) + rng.integers(0, 255)) % 256
                         for _ in range(3)], axis=-1).astype(np.uint8)
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            draw.ellipse([x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))],
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 16.0, (480, 640, 3))
        pictures.append(vdata.encode_image(np.clip(noisy, 0, 255).astype(np.uint8), "JPEG", quality=90))
    captions = [[] for _ in range(n_img)]
    for t in range(n_txt):
        captions[t % n_img].append(" ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(8, 16)))))
    vdata.make_caption_dataset(root, "coco", split, [pictures[i % distinct] for i in range(n_img)], captions,
                               [f"{i:012d}.jpg" for i in range(n_img)])


# ---- FLOP accounting lives in the package (the trainer reports MFU with it) -----------------------------------

from vlmo_fast.flops import (  # noqa: E402,F401
    attention_flops,
    datasheet_peak,
    encoder_flops,
    forward_path_flops,
    layer_flops,
    patch_embed_flops,
    pretrain_step_flops,
)


# ---- results ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    impl: str
    mode: str  # "fwd", "fwd+bwd", "step", "copy"
    case: Dict[str, Any]
    dtype: str
    ms: Optional[float] = None
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    baseline: Optional[str] = None
    speedup: Optional[float] = None
    flops: Optional[float] = None
    tflops: Optional[float] = None
    bytes: Optional[float] = None
    gbs: Optional[float] = None
    frac_ceiling: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    samples_per_s: Optional[float] = None
    mfu_measured: Optional[float] = None
    mfu_datasheet: Optional[float] = None
    status: str = "ok"  # ok | oom | error: ... | skipped: ... | mismatch: ...
    note: str = ""
    max_rel_err: Optional[float] = None  # against the baseline's result, when the case checks agreement
    case_wall_s: Optional[float] = None  # the case's wall time: agreement runs (compiles, autotuning), timing, memory


def _tensors(out: Any) -> List[torch.Tensor]:
    """The floating-point tensors of a result (a tensor, or tuples/lists/dicts of them; dicts in key order)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def max_relative_error(out: Any, ref: Any) -> float:
    """Largest over the result's tensors of max|out - ref| / max|ref| (in fp32); inf when the results differ in
    structure or shape, or ``out`` is not finite where ``ref`` is."""
    a, b = _tensors(out), _tensors(ref)
    if len(a) != len(b) or not a:
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return math.inf
        finite = torch.isfinite(y)
        x, y = x.detach()[finite].float(), y.detach()[finite].float()
        if not torch.isfinite(x).all():
            return math.inf
        if y.numel():
            worst = max(worst, (x - y).abs().max().item() / max(y.abs().max().item(), 1e-12))
    return worst


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    """The commit of the code that runs: VLMO_BENCH_COMMIT when set (the GPU machine gets a copy of the working tree
    whose git metadata may name another commit: the caller passes its own), else git's HEAD (+dirty)."""
    given = os.environ.get("VLMO_BENCH_COMMIT", "").strip()
    if given:
        return given
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True)
        commit = out.stdout.strip() or "unknown"
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


SOURCE_PARTS = ("vlmo_fast", "csrc", "benchmarks", "CMakeLists.txt", "setup.py", "pyproject.toml")


def source_hash(root: Optional[str] = None) -> str:
    """sha256 (first 16 hex digits) of the source that runs: every .py/.cpp/.cu/.h/.cuh/.txt/.toml file under
    SOURCE_PARTS of the project root, by relative path and content, in sorted order (results are left out). The GPU
    machine's copy of the tree may carry stale git metadata; this names the code itself, and
    ``python benchmarks/harness.py --source-hash`` prints it for a checkout, to match a result with its commit."""
    import hashlib

    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    suffixes = (".py", ".cpp", ".cu", ".h", ".cuh", ".txt", ".toml")
    files = []
    for part in SOURCE_PARTS:
        path = os.path.join(root, part)
        if os.path.isfile(path):
            files.append(part)
            continue
        for folder, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in ("results", "__pycache__") and not d.startswith("."))
            files += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(suffixes)]
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def run_meta(device: torch.device, ceilings: Dict[str, float], sizes: str) -> Dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import vlmo_fast

    return {
        "schema": SCHEMA_VERSION,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "vlmo_fast": vlmo_fast.__version__,
        "build": {k: v for k, v in vlmo_fast.build_info().items() if k in ("native", "cuda", "cuda_archs", "openmp")},
        "commit": git_commit(),
        "source_sha256": source_hash(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sizes": sizes,
        "ceilings": ceilings,
        "datasheet_bf16_tflops": datasheet_peak(device_name(device)),
    }


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()[:48]


def write_results(meta: Dict[str, Any], rows: List[Row], out_dir: str, plot: bool = True) -> Dict[str, str]:
    """Write ``<date>_<device>.json`` and ``.md`` (and ``.png`` when matplotlib is present) under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{meta['date'][:19].replace(':', '').replace('-', '')}_{slug(meta['device'])}"
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    from vlmo_fast.fileio import atomic_path  # a reader (or a kill) never finds half a file

    contents = {"json": json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1),
                "md": markdown_report(meta, rows)}
    for kind, content in contents.items():
        with atomic_path(paths[kind]) as tmp, open(tmp, "w") as f:
            f.write(content)
    if plot:
        png = os.path.join(out_dir, stem + ".png")
        if plot_speedups(meta, rows, png):
            paths["png"] = png
    return paths


def load_results(path: str) -> Dict[str, Any]:
    """A results JSON written by write_results: {"meta": ..., "rows": [Row, ...]} (fields a newer Row has and the
    file lacks take their defaults)."""
    with open(path) as f:
        data = json.load(f)
    if "meta" not in data or "rows" not in data:
        raise ValueError(f"{path}: not a vlmo_fast benchmark result (no meta/rows)")
    return {"meta": data["meta"], "rows": [Row(**r) for r in data["rows"]]}


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(rows: List[Row]) -> str:
    head = ("| op | case | dtype | mode | impl | ms | speedup | TFLOP/s | GB/s | % ceiling | peak MiB | samples/s | MFU | "
            "status | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        case = " ".join(f"{k}={v}" for k, v in r.case.items())
        lines.append(
            f"| {r.op} | {case} | {r.dtype} | {r.mode} | {r.impl} | {_fmt(r.ms, '.3f')} | "
            f"{_fmt(r.speedup, '.2f')}{'x' if r.speedup is not None else ''} | {_fmt(r.tflops, '.1f')} | "
            f"{_fmt(r.gbs, '.0f')} | {_fmt(None if r.frac_ceiling is None else 100 * r.frac_ceiling, '.0f')} | "
            f"{_fmt(r.peak_mem_mb, '.0f')} | {_fmt(r.samples_per_s, '.1f')} | "
            f"{_fmt(None if r.mfu_measured is None else 100 * r.mfu_measured, '.1f')} | {r.status} | "
            f"{(r.note or '').replace('|', '/')} |"
        )
    return head + "\n".join(lines) + "\n"


def markdown_report(meta: Dict[str, Any], rows: List[Row]) -> str:
    c = meta["ceilings"]
    text = [
        f"# vlmo_fast benchmarks: {meta['device']}",
        "",
        f"- date {meta['date']}, commit `{meta['commit']}`, torch {meta['torch']}, triton {meta['triton']}, "
        f"sizes `{meta['sizes']}`" + ("" if meta.get("backend", "auto") == "auto"
                                     else f", vlmo_fast backend `{meta['backend']}`"),
        f"- measured ceilings: copy {c['copy_gbs']:.0f} GB/s (bytes read+written; the better of a copy and an "
        f"in-place add, so % ceiling errs low), GEMM "
        + ", ".join(f"{rate:.1f} TFLOP/s ({name}, {(c.get('gemm_n_by_dtype') or {}).get(name, c['gemm_n'])}^3)"
                    for name, rate in (c.get("gemm_tflops_by_dtype") or {c["gemm_dtype"]: c["gemm_tflops"]}).items())
        + " (each row against its dtype's)",
        "- speedup is against the `baseline` implementation of the same op, case and mode (the official math); "
        "MFU is against the measured GEMM rate; % ceiling is against the measured copy bandwidth (memory-bound ops) "
        "or GEMM rate, both measured on working sets larger than the caches, so cache-resident cases can exceed 100%",
        "",
        markdown_table(rows),
    ]
    return "\n".join(text)


def plot_speedups(meta: Dict[str, Any], rows: List[Row], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pts = [r for r in rows if r.speedup is not None and r.status == "ok" and r.impl != r.baseline]
    if not pts:
        return False
    # a speedup on another basis than the same case's official time (the step at a batch the official math does not
    # fit: samples/s against its step at a smaller batch) is marked, its basis in the note
    other_basis = [bool(r.note and "speedup: " in r.note) for r in pts]
    labels = [f"{'* ' if o else ''}{r.op} {r.mode} {r.impl} " + ",".join(f"{k}={v}" for k, v in r.case.items())
              for r, o in zip(pts, other_basis)]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(pts) + 1.5))
    ax.barh(range(len(pts)), [r.speedup for r in pts], color=["tab:green" if r.speedup >= 1 else "tab:red" for r in pts])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(pts)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup vs the official math (log scale)" + ("; * samples/s against the official math at a "
                  "smaller batch (it does not fit this one)" if any(other_basis) else ""))
    ax.set_title(f"vlmo_fast on {meta['device']} ({meta['date'][:10]}, {meta['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--source-hash"]:
        print(source_hash())
    else:
        raise SystemExit("usage: python benchmarks/harness.py --source-hash")
