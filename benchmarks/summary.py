"""Short summaries of benchmark results, and the README's performance table (generated from committed results only).

    python benchmarks/summary.py benchmarks/results          # summary of the newest result file in the folder
    python benchmarks/summary.py --readme README.md          # rewrite the README table from benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"


def load(path: str) -> Dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a vlmo_fast benchmark result (no meta/rows)")
    missing = [k for k in ("device", "date", "commit", "torch", "sizes") if k not in meta]
    if missing:
        raise ValueError(f"{path}: a benchmark result without {', '.join(missing)} in its meta")
    return data


# rivals an issue's target names: shown against ours even when another rival is the fastest
TARGET_RIVALS = ("flex", "compile(official)")

# timed next to ours, but computing something else, so never a "best other" (results from before run.py marked them)
OTHER_MATH = {"torch_adamw_fused": "torch's AdamW rule (eps after the bias correction, decay before the update)"}


def committed(paths: List[str]) -> List[str]:
    """The paths committed at HEAD, as they are there (all of them outside a git work tree, or without git). A file
    only staged, or changed since, does not count: the README's numbers come from committed results only."""
    if not paths:
        return paths
    paths = [os.path.abspath(p) for p in paths]  # git runs in the results folder: relative paths would miss
    folder = os.path.dirname(paths[0])
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True,
                             timeout=30)
        if top.returncode != 0:
            return paths
        root = top.stdout.strip()
        rel = [os.path.relpath(os.path.realpath(p), os.path.realpath(root)) for p in paths]
        done = subprocess.run(["git", "ls-tree", "-r", "--name-only", "-z", "HEAD", "--", *rel], cwd=root,
                              capture_output=True, text=True, timeout=30)
        changed = subprocess.run(["git", "diff", "--name-only", "-z", "HEAD", "--", *rel], cwd=root,
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return paths
    if done.returncode != 0 or changed.returncode != 0:
        return []  # no commit yet: nothing is committed
    at_head = set(done.stdout.split("\0")) - set(changed.stdout.split("\0"))
    return [p for p, r in zip(paths, rel) if r in at_head]


def results_in(folder: str, committed_only: bool = False) -> List[Dict[str, Any]]:
    """Every benchmark result file in ``folder`` (other JSON files there, e.g. data-loader runs, are skipped); with
    ``committed_only``, only those git tracks."""
    out = []
    paths = glob.glob(os.path.join(folder, "*.json"))
    for path in committed(paths) if committed_only else paths:
        try:
            data = load(path)
        except (ValueError, OSError):
            continue
        data["path"] = path
        out.append(data)
    return out


def newest(folder: str) -> Optional[str]:
    files = sorted(results_in(folder), key=lambda d: d["meta"]["date"])
    return files[-1]["path"] if files else None


def _case(row: Dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in row["case"].items())


def _torch_fallbacks(row: Dict[str, Any]) -> List[str]:
    """The ops a vlmo_fast row ran on the PyTorch path (its note: "ran attention=triton, masked_softmax=torch")."""
    note = (row.get("note") or "").split("; ")[0]  # the backend record comes first; other notes follow "; "
    if not note.startswith("ran "):
        return []
    return [part.split("=")[0] for part in note[4:].split(", ") if part.endswith("=torch")]


def summary_rows(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One line per (op, case, dtype, mode): vlmo_fast against the official math and the best other alternative.
    On a GPU, a vlmo_fast row whose ops fell back to the PyTorch path says so in its status."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in data["rows"]:
        groups.setdefault((r["op"], _case(r), r["dtype"], r["mode"]), []).append(r)
    out = []
    for (op, case, dtype, mode), rows in groups.items():
        ours = next((r for r in rows if r["impl"] == "vlmo_fast"), None)
        base = next((r for r in rows if r["impl"] == (ours or rows[0])["baseline"]), None)
        if ours is None:
            continue
        # our own variants (the PyTorch path, the staged softmax kernels) are not "other" implementations; a
        # competitor counts only when it ran and agreed with the official math ("ok": not mismatch, not unchecked)
        rivals = [r for r in rows if not r["impl"].startswith("vlmo_fast") and r is not base
                  and r["impl"] not in OTHER_MATH]
        others = [r for r in rivals if r["ms"] is not None and r.get("status", "ok") == "ok"]
        best = min(others, key=lambda r: r["ms"]) if others else None
        status = ours["status"]
        if ours.get("from_run"):
            status = ("" if status == "ok" else status + "; ") + f"from the run of {ours['from_run']}"
        missing = [f"{r['impl']} ({(r.get('status') or 'no time').split(':')[0]})" for r in rivals if r not in others]
        if missing:  # so that "best other" is never read as "the best of all" when a competitor had no valid row
            status = ("" if status == "ok" else status + "; ") + "not compared: " + ", ".join(missing)
        # what a row's own note says about how to read it (the step's speedup basis, a warm end-to-end run), as
        # opposed to the record of which backend ran ("ran ..."; fall-backs are flagged below)
        said = [p for p in (ours.get("note") or "").split("; ") if p and not p.startswith("ran ")]
        if said:
            status = ("" if status == "ok" else status + "; ") + "; ".join(said)
        fallbacks = _torch_fallbacks(ours) if data.get("meta", {}).get("device_type") == "cuda" else []
        if fallbacks:
            status = ("" if status == "ok" else status + "; ") + "PyTorch path for " + ", ".join(fallbacks)
        # our own variants other than the PyTorch path (the attention's fixed tiles of the deterministic mode, for
        # #4's "the default if under 10%"; the staged softmax kernels; the optimizer's foreach path): their time as a
        # multiple of the default's
        # (on a CPU the PyTorch path too: #5's "every CPU kernel faster than the torch CPU path it replaces")
        cpu = data.get("meta", {}).get("device_type") == "cpu"
        variants = [f"{r['impl'][len('vlmo_fast['):-1]}: {_down(r['ms'] / ours['ms'], 2, up=True)}x the time" for r in rows
                    if r["impl"].startswith("vlmo_fast[") and (cpu or r["impl"] != "vlmo_fast[torch]") and r["ms"]
                    and ours["ms"] and r.get("status", "ok") == "ok"]
        if variants:
            status = ("" if status == "ok" else status + "; ") + "; ".join(variants)
        # the rivals a target names (#4: FlexAttention; #6: torch.compile of the official math) when the "best other"
        # column shows another one, and what a rival's row says about how it ran (e.g. Flex's reduced tiles)
        named = [f"vs {r['impl']} {_down(r['ms'] / ours['ms'], 2)}x" for r in others
                 if r is not best and r["impl"] in TARGET_RIVALS and ours["ms"]]
        named += [f"{r['impl']}: {p}" for r in rivals for p in (r.get("note") or "").split("; ")
                  if p and not p.startswith("ran ")]
        if named:
            status = ("" if status == "ok" else status + "; ") + "; ".join(named)
        out.append({
            "op": op, "case": case, "dtype": dtype, "mode": mode, "ms": ours["ms"], "status": status,
            "vs_official": ours["speedup"],
            "best_other": best["impl"] if best else None,
            "vs_best_other": (best["ms"] / ours["ms"]) if best and ours["ms"] else None,
            "rate": (f"{_down(ours['tflops'], 1)} TFLOP/s" if ours.get("tflops") else
                     f"{_down(ours['gbs'], 0)} GB/s" if ours.get("gbs") else ""),
            "frac": ours.get("frac_ceiling"),
            "mfu": ours.get("mfu_measured"),
            "mfu_datasheet": ours.get("mfu_datasheet"),
            "samples": ours.get("samples_per_s"),
            "peak_mb": ours.get("peak_mem_mb"),
            "peak_vs_official": (ours["peak_mem_mb"] / base["peak_mem_mb"]
                                 if ours.get("peak_mem_mb") and base is not None and base.get("peak_mem_mb") else None),
        })
    return out


def _f(x, spec, suffix=""):
    return "" if x is None else format(x, spec) + suffix


def _down(x: float, digits: int, up: bool = False) -> str:
    """x with ``digits`` decimals, rounded toward zero: a ratio, rate or fraction read against a target (2x, 80%,
    200 TFLOP/s) never shows as reached when it is not (1.996 -> "1.99", not "2.00"). ``up``: rounded up instead, for
    a ratio where lower is better (a variant's time against the default, #4's "under 10%")."""
    q = 10**digits
    return f"{(math.ceil(x * q - 1e-9) if up else math.floor(x * q + 1e-9)) / q:.{digits}f}"


def _d(x, digits, suffix=""):
    return "" if x is None else _down(x, digits) + suffix


def _peak(s: Dict[str, Any]) -> str:
    """vlmo_fast's peak memory (MiB beyond what was allocated before the call; GPU runs) and its ratio to the official
    math's."""
    ratio = s["peak_vs_official"]
    return _f(s["peak_mb"], ".0f") + ("" if ratio is None else f" ({ratio:.2f}x)")


def _cut(meta: Dict[str, Any]) -> List[str]:
    """What a run's budget or a broken CUDA context left out (as opposed to what its options left out)."""
    return [n for n in meta.get("skipped", []) if "time budget" in n or "CUDA error" in n]


def _partial(meta: Dict[str, Any]) -> bool:
    return meta.get("complete") is False or bool(_cut(meta))


def _run_label(meta: Dict[str, Any]) -> str:
    return f"{meta['date'][:10]}, commit {meta['commit']}"


def summary_markdown(data: Dict[str, Any]) -> str:
    m = data["meta"]
    filled = data.get("filled_from") or []
    lines = [
        f"**{m['device']}**, {m['date'][:10]}, commit `{m['commit']}`"
        + (f" (source {m['source_sha256']})" if m.get("source_sha256") else "")
        + f", torch {m['torch']}, sizes `{m['sizes']}`"
        + ("" if m.get("backend", "auto") == "auto" else f", vlmo_fast backend `{m['backend']}`")
        + (" (partial: the run stopped before its end)" if m.get("complete") is False
           else " (partial: see Left out)" if _cut(m) else "")
        + ("" if not filled else "; the cases it did not reach are from earlier runs on this device ("
           + "; ".join(filled) + "), each marked with its run"),
        "",
        "| op | case | dtype | mode | vlmo_fast ms | vs official | best other | vs it | rate | % ceiling | "
        "MFU vs GEMM | MFU vs datasheet | samples/s | call peak MiB (x official) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary_rows(data):
        lines.append(
            f"| {s['op']} | {s['case']} | {s['dtype']} | {s['mode']} | {_f(s['ms'], '.3f')} | "
            f"{_d(s['vs_official'], 2, 'x')} | {s['best_other'] or ''} | {_d(s['vs_best_other'], 2, 'x')} | "
            f"{s['rate']} | {_d(None if s['frac'] is None else 100 * s['frac'], 0)} | "
            f"{_d(None if s['mfu'] is None else 100 * s['mfu'], 1, '%')} | "
            f"{_d(None if s['mfu_datasheet'] is None else 100 * s['mfu_datasheet'], 1, '%')} | "
            f"{_f(s['samples'], '.1f')} | {_peak(s)} |" + ("" if s["status"] == "ok" else f" {s['status']}")
        )
    if m.get("skipped"):
        lines += ["", "Left out: " + "; ".join(m["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def _loader_device(d: Dict[str, Any]) -> str:
    """The device a loader result ran with, named as run.py names it (older CPU results recorded the bare model)."""
    if d.get("gpu"):
        return d["gpu"]
    name = str(d.get("device", ""))
    return name if name.startswith("CPU ") else f"CPU {name} ({d.get('cpu_count')} cores)"


def loader_line(folder: str, data: Dict[str, Any]) -> Optional[str]:
    """The newest data-loader result in ``folder`` from the device of ``data`` against its training step (issue
    target: the loader alone sustains at least 2x the step's samples/s), or None when either is missing."""
    loaders = []
    for path in glob.glob(os.path.join(folder, "data_loader*.json")):
        try:
            with open(path) as f:
                loaders.append(json.load(f))
        except (OSError, ValueError):
            continue
    # the same machine as the step's results (a loader run on another host says nothing about this step's)
    device = data["meta"]["device"]
    loaders = [d for d in loaders if d.get("benchmark") == "data_loader" and d.get("rows")
               and _loader_device(d) == device]
    steps = [r for r in data["rows"] if r["op"] == "step" and r["impl"] == "vlmo_fast" and r.get("samples_per_s")]
    if not loaders or not steps:
        return None
    loader = max(loaders, key=lambda d: d.get("date", ""))
    best = max(loader["rows"], key=lambda r: r["samples_per_s"])
    step = max(steps, key=lambda r: r["samples_per_s"])  # the fastest step (the target's batch): the harder bar
    ratio = best["samples_per_s"] / step["samples_per_s"]
    return (f"Data loader: {best['samples_per_s']:.0f} samples/s with {best['workers']} workers "
            f"({best['image_size']} px, batch {best['batch_size']}) = {_down(ratio, 2)}x "
            f"the training step's {step['samples_per_s']:.0f} samples/s ({step['dtype']}, "
            + " ".join(f"{k}={v}" for k, v in step["case"].items()) + "); the loader timed alone, no training "
            "step sharing the CPU: a ceiling.")


def readme_table(folder: str) -> str:
    """Per device, the newest committed result, summarised (with the cases a cut-short run missed from the runs
    before it: ``merged``); files git does not track are left out."""
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for data in results_in(folder, committed_only=True):
        runs.setdefault(data["meta"]["device"], []).append(data)
    if not runs:
        return "No committed benchmark results yet.\n"
    tables = sorted((merged(r) for r in runs.values()), key=lambda d: (d["meta"]["device_type"], d["meta"]["device"]))
    return "\n".join(summary_markdown(d) for d in tables)


def _group(row: Dict[str, Any]) -> tuple:
    return row["op"], _case(row), row["dtype"], row["mode"]


def merged(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The newest of one device's runs; when a budget or a CUDA error cut it short, the cases it did not reach are
    taken whole (every implementation of the case, so that each ratio stays within one run) from the newest earlier
    run of the same sizes (and vlmo_fast backend) that has them, each of their rows marked with its run. A complete newest run stands alone:
    cases it no longer has are gone from the benchmark, not missing."""
    runs = sorted(runs, key=lambda d: d["meta"]["date"], reverse=True)
    newest = runs[0]
    if not _partial(newest["meta"]):
        return newest
    rows = list(newest["rows"])
    have = {_group(r) for r in rows}
    # an op that raised in the newest run (its one error row, mode "-") is not filled: its failure is the news
    crashed = {r["op"] for r in rows if r.get("mode") == "-" and str(r.get("status", "")).startswith("error")}
    filled = []
    for old in runs[1:]:
        if any(old["meta"].get(k, "auto") != newest["meta"].get(k, "auto") for k in ("sizes", "backend")):
            continue
        took = {g for g in (_group(r) for r in old["rows"]) if g[0] not in crashed} - have
        if not took:
            continue
        label = _run_label(old["meta"])
        rows += [dict(r, from_run=label) for r in old["rows"] if _group(r) in took]
        have |= took
        filled.append(label)
    return dict(newest, rows=rows, filled_from=filled)


def update_readme(readme: str, folder: str) -> None:
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: markers {BEGIN} ... {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(head + BEGIN + "\n" + readme_table(folder) + END + tail)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", default=os.path.join(HERE, "results"), help="a result JSON or a folder of them")
    p.add_argument("--readme", default=None, help="rewrite the performance table in this README from the folder")
    args = p.parse_args(argv)
    if args.readme:
        folder = args.path if os.path.isdir(args.path) else os.path.dirname(args.path)
        update_readme(args.readme, folder)
        return 0
    path = newest(args.path) if os.path.isdir(args.path) else args.path
    if path is None:
        print(f"no result files in {args.path}")
        return 1
    try:
        data = load(path)
    except (OSError, ValueError) as exc:  # a missing file, not JSON, or not a benchmark result
        print(f"summary.py: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    print(summary_markdown(data))
    line = loader_line(os.path.dirname(os.path.abspath(path)), data)
    if line:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
