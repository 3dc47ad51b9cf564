"""The benchmark harness: rows come from timing the named implementation, FLOP counts are right, the JSON schema
holds, and the GPU suite's dry run works end to end."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness  # noqa: E402
import run as bench_run  # noqa: E402

import vlmo_fast as vf  # noqa: E402


def test_attention_flops_by_hand():
    assert harness.attention_flops(2, 3, 5, 7) == 4 * 2 * 3 * 25 * 7
    assert harness.attention_flops(2, 3, 5, 7, backward=True) == 3.5 * 4 * 2 * 3 * 25 * 7
    # VLMo-base fused attention at B=128: 4 * 128 * 12 * 237^2 * 64 = 2.2 GFLOP... per layer
    assert harness.attention_flops(128, 12, 237, 64) == pytest.approx(22.09e9, rel=1e-3)


@pytest.mark.parametrize("path", ["infer", "infer_text", "infer_image", "infer_text_ft", "infer_image_ft"])
def test_forward_flops_match_a_counted_forward(path):
    """The analytical matmul FLOPs of each path equal what torch's FLOP counter sees in the real forward."""
    cfg = vf.preset("vlmo_tiny_patch16")
    model = vf.VLMo(cfg).eval().set_backend("torch")
    b = 3
    batch = bench_run.make_batch(cfg, b, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:  # (under no_grad its module tracker trips on views)
        getattr(model, path)(batch)
    assert harness.forward_path_flops(cfg, b, path) == counter.get_total_flops()


def test_step_flops_is_three_forwards():
    cfg = vf.preset("vlmo_base_patch16")
    fwd = 4 * harness.forward_path_flops(cfg, 8, "infer") + harness.forward_path_flops(cfg, 8, "infer_text") \
        + harness.forward_path_flops(cfg, 8, "infer_image") + 2.0 * 8 * 40 * (768 * 768 + 768 * 30522) + 2.0 * 24 * 768 * 2
    assert harness.pretrain_step_flops(cfg, 8) == pytest.approx(3 * fwd)


def _tiny_bench():
    dev = torch.device("cpu")
    ceilings = {"copy_gbs": 10.0, "gemm_tflops": 0.1, "gemm_dtype": "float32", "gemm_n": 64, "copy_bytes": 1}
    return bench_run.Bench(dev, ceilings, reps=3, budget_s=1e9, compile_baselines=False)


def _speedup(rows, impl, mode="fwd"):
    return next(r.speedup for r in rows if r.impl == impl and r.mode == mode)


def test_rows_come_from_timing_the_named_implementation(monkeypatch, one_thread):
    """Slow down one implementation and only its row (and the ratios against it) move: each row's time is the time
    of the implementation it names, and each speedup is the official row's time over the row's own."""
    sizes = bench_run.SIZES["tiny"]
    delay_ms = 200  # far above any tiny op's time, loaded or not

    def slowed(real):
        def slow(*a, **k):
            time.sleep(delay_ms / 1000)
            return real(*a, **k)
        return slow

    monkeypatch.setattr(bench_run.ops, "masked_softmax", slowed(bench_run.ops.masked_softmax))
    bench = _tiny_bench()
    bench_run.bench_softmax(bench, sizes, ["fp32"])
    rows = {r.impl: r for r in bench.rows if r.mode == "fwd"}
    assert rows["vlmo_fast"].ms >= delay_ms and rows["vlmo_fast[torch]"].ms >= delay_ms
    assert rows["official"].ms < delay_ms / 2  # the baseline was not slowed
    assert rows["vlmo_fast"].speedup == pytest.approx(rows["official"].ms / rows["vlmo_fast"].ms)
    assert rows["vlmo_fast"].speedup < 0.5
    monkeypatch.undo()

    monkeypatch.setattr(bench_run, "official_softmax", slowed(bench_run.official_softmax))
    bench = _tiny_bench()
    bench_run.bench_softmax(bench, sizes, ["fp32"])
    rows = {r.impl: r for r in bench.rows if r.mode == "fwd"}
    assert rows["official"].ms >= delay_ms and rows["vlmo_fast"].ms < delay_ms / 2
    assert rows["vlmo_fast"].speedup == pytest.approx(rows["official"].ms / rows["vlmo_fast"].ms)
    assert rows["vlmo_fast"].speedup > 2
    assert rows["official"].speedup == 1.0


def test_each_row_is_against_its_own_dtypes_gemm_rate():
    """% ceiling and MFU of an fp32 row were against the bf16 GEMM rate (the GPU run's main one): 15x too low on an
    H100. The run measures the GEMM rate in each of its dtypes."""
    ceilings = harness.measure_ceilings(torch.device("cpu"), quick=True, dtypes=[torch.float32, torch.bfloat16])
    assert set(ceilings["gemm_tflops_by_dtype"]) == {"float32", "bfloat16"}
    assert ceilings["gemm_tflops"] == ceilings["gemm_tflops_by_dtype"]["float32"]  # the CPU's main rate
    ceilings = {"copy_gbs": 10.0, "gemm_tflops": 1.0, "gemm_dtype": "bfloat16", "gemm_n": 64, "copy_bytes": 1,
                "gemm_tflops_by_dtype": {"bfloat16": 1.0, "float32": 0.25}}
    bench = bench_run.Bench(torch.device("cpu"), ceilings, reps=3, budget_s=1e9, compile_baselines=False)
    rows = {}
    for dtype in ("fp32", "bf16", "fp16"):  # fp16 was not measured: the main rate
        row = bench.measure("gemm", {"n": 1}, dtype, "fwd", {"official": lambda: time.sleep(0.01)}, flops=1e9,
                            samples=1)[0]
        rows[dtype] = row.frac_ceiling / (row.tflops / 1.0)
        assert row.mfu_measured == row.frac_ceiling
    assert rows == pytest.approx({"fp32": 4.0, "bf16": 1.0, "fp16": 1.0})
    text = harness.markdown_report(dict(harness.run_meta(torch.device("cpu"), ceilings, "tiny"), conventions={},
                                        skipped=[]), [])
    assert "1.0 TFLOP/s (bfloat16, 64^3), 0.2 TFLOP/s (float32, 64^3)" in text


def test_errors_are_recorded_not_hidden():
    bench = _tiny_bench()

    def broken():
        raise RuntimeError("kernel exploded")

    rows = bench.measure("x", {"n": 1}, "fp32", "fwd", {"official": lambda: torch.ones(3).sum(), "vlmo_fast": broken})
    assert rows[1].status.startswith("error: RuntimeError: kernel exploded") and rows[1].ms is None
    assert rows[0].status == "ok" and rows[0].speedup == 1.0


def test_a_wrong_result_is_flagged_and_never_the_best_alternative(monkeypatch):
    """Cases that check agreement compare every implementation's result (gradients too) with the official one: a
    wrong kernel is still timed, but marked, and the summary never names it as the alternative to beat."""
    sizes = bench_run.SIZES["tiny"]
    real = bench_run.ops.masked_softmax
    monkeypatch.setattr(bench_run.ops, "masked_softmax", lambda *a, **k: real(*a, **k) * 1.01)
    bench = _tiny_bench()
    bench_run.bench_softmax(bench, sizes, ["fp32"])
    rows = {(r.impl, r.mode): r for r in bench.rows}
    for mode in ("fwd", "fwd+bwd"):
        assert rows[("vlmo_fast", mode)].status.startswith("mismatch: max rel err 1.0e-02")
        assert rows[("vlmo_fast", mode)].ms is not None
        assert rows[("official", mode)].status == "ok"
    monkeypatch.undo()
    bench = _tiny_bench()
    bench_run.bench_softmax(bench, sizes, ["fp32"])
    assert all(r.status == "ok" and r.max_rel_err is not None and r.max_rel_err < 1e-6
               for r in bench.rows if r.impl != "official")
    # a mismatching alternative is not "best other" in the summary
    import summary

    data = {"rows": [dict(op="softmax", case={"N": 1}, dtype="fp32", mode="fwd", impl=i, baseline="official", ms=ms,
                          speedup=1.0, status=st)
                     for i, ms, st in [("official", 2.0, "ok"), ("vlmo_fast", 1.0, "ok"), ("sdpa", 0.1, "mismatch: x"),
                                       ("flex", 1.5, "ok")]]}
    assert summary.summary_rows(data)[0]["best_other"] == "flex"
    assert harness.max_relative_error((torch.ones(2), torch.ones(3)), (torch.ones(2),)) == float("inf")
    assert harness.max_relative_error(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")


def test_budget_and_failures_are_recorded_in_the_results(tmp_path, monkeypatch):
    """An op the budget leaves out is listed in the meta and the summary; an op that raises becomes an error row and
    the next op still runs."""
    import summary

    result = bench_run.main(["--sizes", "tiny", "--ops", "softmax,layernorm", "--budget-s", "0", "--out",
                             str(tmp_path / "a"), "--no-plot"])
    assert result["rows"] == []
    assert result["meta"]["skipped"] == ["softmax: not run (time budget)", "layernorm: not run (time budget)"]
    assert "Left out: softmax: not run (time budget)" in summary.summary_markdown(
        json.loads(Path(result["paths"]["json"]).read_text()))

    def boom(*args, **kwargs):
        raise RuntimeError("softmax suite crashed")

    monkeypatch.setattr(bench_run, "bench_softmax", boom)
    result = bench_run.main(["--sizes", "tiny", "--ops", "softmax,layernorm", "--out", str(tmp_path / "b"),
                             "--no-plot"])
    errors = [r for r in result["rows"] if r.op == "softmax"]
    assert len(errors) == 1 and errors[0].status == "error: RuntimeError: softmax suite crashed"
    assert {r.op for r in result["rows"]} == {"softmax", "layernorm"} and result["meta"]["skipped"] == []


def test_a_budget_cut_inside_an_op_is_listed(monkeypatch):
    bench = _tiny_bench()
    bench.deadline = 0.0  # past: the op's first case is not run
    bench_run.bench_softmax(bench, bench_run.SIZES["tiny"], ["fp32"])
    assert bench.rows == [] and bench.cut_short
    bench = _tiny_bench()
    bench_run.bench_softmax(bench, bench_run.SIZES["tiny"], ["fp32"])
    assert not bench.cut_short and bench.rows


def test_datasheet_peaks_by_device_name():
    assert harness.datasheet_peak("NVIDIA H100 80GB HBM3") == 989.0  # what an SXM H100 calls itself
    assert harness.datasheet_peak("NVIDIA H100 PCIe") == 756.0 and harness.datasheet_peak("NVIDIA H100 NVL") == 835.0
    assert harness.datasheet_peak("NVIDIA H200") == 989.0 and harness.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert harness.datasheet_peak("NVIDIA GH200 480GB") == 989.0
    assert harness.datasheet_peak("NVIDIA GeForce RTX 4090") is None and harness.datasheet_peak("CPU x (2 cores)") is None


def test_loader_line_compares_the_loader_with_the_step(tmp_path):
    import summary

    data = {"meta": {"device": "NVIDIA H100 80GB HBM3"},
            "rows": [dict(op="step", impl="vlmo_fast", dtype="bf16", case={"B": 64}, samples_per_s=350.0),
                     dict(op="step", impl="official", dtype="bf16", case={"B": 64}, samples_per_s=100.0),
                     dict(op="step", impl="vlmo_fast", dtype="bf16", case={"B": 128}, samples_per_s=400.0)]}
    assert summary.loader_line(str(tmp_path), data) is None  # no loader result yet
    # the newest loader run of the step's machine counts; a newer one from another machine does not
    for date, sps, gpu, cpu in (("2026-01-01", 500.0, "NVIDIA H100 80GB HBM3", "Xeon"),
                                ("2026-02-01", 1000.0, "NVIDIA H100 80GB HBM3", "Xeon"),
                                ("2026-03-01", 9000.0, None, "EPYC")):
        (tmp_path / f"data_loader_h_{date}.json").write_text(json.dumps(
            {"benchmark": "data_loader", "date": date, "gpu": gpu, "device": cpu, "rows": [
                {"workers": 16, "samples_per_s": sps, "image_size": 224, "batch_size": 64},
                {"workers": 0, "samples_per_s": 50.0, "image_size": 224, "batch_size": 64}]}))
    assert summary.loader_line(str(tmp_path), data) == (
        "Data loader: 1000 samples/s with 16 workers (224 px, batch 64) = 2.50x the training step's 400 samples/s "
        "(bf16, B=128); the loader timed alone, no training step sharing the CPU: a ceiling.")


def test_readme_table_fills_a_cut_run_from_the_run_before(tmp_path):
    """A run a budget cut short keeps its own rows, and the cases it did not reach come whole (every implementation,
    so each ratio is within one run) from the newest earlier run of the same device and sizes, each marked with its
    run; a complete newest run stands alone."""
    import summary

    def row(op, impl, ms):
        return dict(op=op, impl=impl, mode="fwd", case={"B": 2}, dtype="bf16", status="ok", ms=ms,
                    speedup=None if impl == "official" else 10.0 / ms, baseline="official")

    def run(date, commit, rows, sizes="full", **meta):
        return {"meta": dict(dict(device="GPU X", device_type="cuda", date=date, commit=commit, torch="2.13",
                                  sizes=sizes, skipped=[]), **meta), "rows": rows}

    old = run("2026-01-01T00:00:00Z", "aaa", [row("softmax", "official", 10.0), row("softmax", "vlmo_fast", 5.0),
                                              row("block", "official", 10.0), row("block", "vlmo_fast", 4.0)])
    other_sizes = run("2026-01-15T00:00:00Z", "ccc", [row("step", "official", 10.0), row("step", "vlmo_fast", 1.0)],
                      sizes="quick")
    cut = run("2026-02-01T00:00:00Z", "bbb", [row("softmax", "official", 10.0), row("softmax", "vlmo_fast", 2.0)],
              skipped=["block: not run (time budget)"])
    data = summary.merged([old, other_sizes, cut])
    rows = {r["op"]: r for r in summary.summary_rows(data)}
    assert set(rows) == {"softmax", "block"}  # not the step of another size set
    assert rows["softmax"]["ms"] == 2.0 and rows["softmax"]["status"] == "ok"
    assert rows["block"]["vs_official"] == 2.5 and "from the run of 2026-01-01, commit aaa" in rows["block"]["status"]
    text = summary.summary_markdown(data)
    assert "commit `bbb`" in text and "earlier runs on this device (2026-01-01, commit aaa)" in text
    # an op that raised in the newest run keeps its error row alone (its failure is the news, not old timings)
    crash = dict(row("block", "vlmo_fast", 1.0), mode="-", case={}, dtype="-", status="error: RuntimeError: x")
    broke = run("2026-02-02T00:00:00Z", "eee", cut["rows"] + [crash], skipped=["step: not run (time budget)"])
    rows = summary.summary_rows(summary.merged([old, broke]))
    assert [(r["op"], r["mode"]) for r in rows] == [("softmax", "fwd"), ("block", "-")]
    # a complete run replaces the table whole
    done = run("2026-03-01T00:00:00Z", "ddd", [row("softmax", "official", 10.0), row("softmax", "vlmo_fast", 2.0)],
               complete=True)
    assert summary.merged([old, cut, done]) is done
    assert "earlier runs" not in summary.summary_markdown(done)


def test_the_readme_table_is_what_its_generator_writes():
    """The README's table is `python benchmarks/summary.py --readme README.md` over the committed results: rerun it
    after committing results or changing the summary (it had drifted: rounded-up ratios the summary no longer
    writes)."""
    import summary

    text = Path(os.path.join(ROOT, "README.md")).read_text()
    table = text.split(summary.BEGIN, 1)[1].split(summary.END, 1)[0]
    assert table == "\n" + summary.readme_table(os.path.join(ROOT, "benchmarks", "results"))


def test_cpu_timing_interleaves_the_implementations():
    """On CPU the implementations take turns (A, B, A, B, ... after each one's warm-up), so drift during a case hits
    both alike; an implementation that fails part-way is reported as failed and the others keep their timings."""
    calls = []
    state = {"c": 0}

    def flaky():
        calls.append("c")
        state["c"] += 1
        if state["c"] == 4:
            raise ValueError("third timed call")

    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": flaky}
    out = harness.time_fns(fns, torch.device("cpu"), warmup=1, reps=4, burst_ms=0)
    assert calls[:3] == ["a", "b", "c"]  # warm-ups
    assert calls[3:] == ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b"]
    assert out["a"].reps == 4 and out["b"].reps == 4
    assert isinstance(out["c"], ValueError) and list(out) == ["a", "b", "c"]


def test_cpu_bursts_skip_the_first_call_of_each_turn():
    calls = []

    def slow():  # ~5 ms a call: bursts of about 20 ms are 4 calls, 3 of them timed
        calls.append("s")
        time.sleep(0.005)

    out = harness.time_fns({"s": slow, "f": lambda: calls.append("f")}, torch.device("cpu"), warmup=1, reps=3,
                           burst_ms=20)
    per_turn = (len([c for c in calls if c == "s"]) - 1) // 3
    assert 3 <= per_turn <= 5 and out["s"].reps == 3 * (per_turn - 1)
    assert out["s"].median_ms >= 5 and out["f"].reps == 3 * 49  # fast calls: the 50-call cap, 49 timed
    assert calls[1] == "f" and calls[2] == "s"  # warm-ups, then the first turn


def test_json_schema_and_outputs(tmp_path):
    result = bench_run.main(["--sizes", "tiny", "--ops", "softmax,layernorm", "--out", str(tmp_path), "--no-plot"])
    data = json.loads(Path(result["paths"]["json"]).read_text())
    meta = data["meta"]
    for key in ("schema", "device", "torch", "triton", "commit", "date", "sizes", "ceilings", "build"):
        assert key in meta, key
    assert meta["ceilings"]["copy_gbs"] > 0 and meta["ceilings"]["gemm_tflops"] > 0
    assert meta["complete"] is True  # partial results were written under the same name after each op
    assert [f for f in os.listdir(tmp_path) if f.endswith(".json")] == [os.path.basename(result["paths"]["json"])]
    import summary as summary_module

    partial = dict(data, meta=dict(meta, complete=False))
    assert "(partial" in summary_module.summary_markdown(partial)
    assert {r["op"] for r in data["rows"]} == {"softmax", "layernorm"}
    required = {"op": str, "impl": str, "mode": str, "case": dict, "dtype": str, "status": str}
    for row in data["rows"]:
        for key, typ in required.items():
            assert isinstance(row[key], typ), key
        assert row["status"] == "ok" and row["ms"] > 0 and row["gbs"] > 0 and row["speedup"] > 0
        assert row["baseline"] == "official"
    md = Path(result["paths"]["md"]).read_text()
    assert meta["device"] in md and "| softmax |" in md
    import summary

    text = summary.summary_markdown(data)
    assert "vs official" in text and "| layernorm |" in text


def test_triton_rows_dry_run_under_the_interpreter(tmp_path):
    """The rows a GPU run times with the Triton kernels (the attention with the bench's strided table slice and
    padding, its pinned-configuration variant, the block's fused FFN), run end to end on CPU under Triton's
    interpreter with --backend triton: every row agrees with the official math, and the backend that ran is
    recorded."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--sizes", "tiny", "--ops",
                           "attention,block", "--backend", "triton", "--device", "cpu", "--reps", "1", "--out", str(tmp_path),
                           "--no-plot"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(path.read_text())
    assert data["meta"]["backend"] == "triton" and data["meta"]["complete"] is True
    rows = {(r["op"], r["mode"], r["impl"]): r for r in data["rows"]}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in data["rows"]), [r["status"] for r in data["rows"]]
    for mode in ("fwd", "fwd+bwd"):
        for impl in ("vlmo_fast", "vlmo_fast[deterministic]"):
            assert rows[("attention", mode, impl)]["note"] == "ran attention=triton"
    assert "attention=triton" in rows[("block", "fwd+bwd", "vlmo_fast")]["note"]
    assert "multiway_ffn=triton" in rows[("block", "fwd+bwd", "vlmo_fast")]["note"]
    assert "vlmo_fast backend `triton`" in Path(str(path)[:-5] + ".md").read_text()
    # in half precision also the variant without the forward's kept low part (its cost), restoring the switch
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--sizes", "tiny", "--ops",
                           "attention", "--dtypes", "fp16", "--backend", "triton", "--device", "cpu", "--reps", "1", "--out",
                           str(tmp_path / "fp16"), "--no-plot"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = (tmp_path / "fp16").glob("*.json")
    rows = {(r["mode"], r["impl"]): r for r in json.loads(path.read_text())["rows"]}
    for mode in ("fwd", "fwd+bwd"):
        assert rows[(mode, "vlmo_fast[no low part]")]["status"] == "ok" and rows[(mode, "vlmo_fast")]["status"] == "ok"
    assert bench_run.triton_attention.KEEP_LOW_PART is True
    assert bench_run._without_low_part(lambda: bench_run.triton_attention.KEEP_LOW_PART)() is False
    assert bench_run.triton_attention.KEEP_LOW_PART is True


def test_bad_options():
    with pytest.raises(SystemExit):
        bench_run.main(["--ops", "nonsense", "--sizes", "tiny"])
    with pytest.raises(SystemExit):
        bench_run.main(["--dtypes", "int8", "--sizes", "tiny"])
    for device in ["xpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]):
        with pytest.raises(SystemExit) as info:
            bench_run.parse_args(["--device", device])
        assert info.value.code == 2
    assert bench_run.parse_args(["--device", "auto"]).device is None


def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = os.listdir(tmp_path)
    assert any(f.endswith(".json") for f in files) and "summary.md" in files and "environment.txt" in files
    assert "vs official" in (tmp_path / "summary.md").read_text()
    assert '"native": true' in proc.stdout
    # the gpu tests in the suite's order: the attention kernel's first, the CUDA-graph captures last
    cases = [c.get("classname") for c in ElementTree.parse(tmp_path / "gpu_tests.xml").iter("testcase")]
    assert cases[0].endswith("test_triton_attention") and cases[-1].endswith("test_cuda_graphs"), cases[:1] + cases[-1:]
    # the profile step ran its whole script (its last part: the two CUDA softmax kernel kinds, or why not)
    profile = (tmp_path / "attention_forms.txt").read_text()
    assert "DQ_PROGRAMS_PER_SM=16" in profile
    assert "masked_softmax[staged]" in profile or "no CUDA kernels compiled" in profile
    assert "Multiway block forward+backward" in (tmp_path / "block_kernels.txt").read_text()
    # the installed build ran, not the source tree the script was started in (on every Python: no `python -P`)
    source = [line.split(" ", 2)[2] for line in proc.stdout.splitlines() if line.startswith("vlmo_fast from ")]
    assert source and not os.path.realpath(source[0]).startswith(os.path.realpath(ROOT) + os.sep), source
    rows = [r for f in files if f.endswith(".json") and not f.startswith("data_loader")
            for r in json.loads((tmp_path / f).read_text()).get("rows", [])]
    assert {r["op"] for r in rows} == set(bench_run.ALL_OPS)  # every op ran in the dry run
    # the step is checked too: one step's loss and gradients from the same weights and random state agree with the
    # official's; at the target's batch each model runs alone, and the speedup compares the two rows
    tiny = bench_run.SIZES["tiny"]
    checked = [r for r in rows if r["op"] == "step" and r["impl"] != "official" and r["case"]["B"] == tiny["step_batch"]]
    assert checked and all(r["status"] == "ok" and r["max_rel_err"] is not None for r in checked)
    alone = {r["impl"]: r for r in rows if r["op"] == "step" and r["case"]["B"] == tiny["step_target_batch"]}
    assert set(alone) == {"official", "vlmo_fast"} and all(r["status"] == "ok" for r in alone.values())
    assert alone["vlmo_fast"]["speedup"] == pytest.approx(alone["official"]["ms"] / alone["vlmo_fast"]["ms"])
    # timed alone, that row says which check vouches for it (the smaller batch's)
    assert f"checked at B={tiny['step_batch']} (max rel err" in alone["vlmo_fast"]["note"]
    optimizer = {r["impl"]: r for r in rows if r["op"] == "optimizer"}
    assert set(optimizer) >= {"official", "vlmo_fast", "vlmo_fast[foreach]"}
    assert all(r["status"] == "ok" for name, r in optimizer.items() if name != "torch_adamw_fused")
    # torch's AdamW computes another rule: timed, never a "best other"
    assert optimizer.get("torch_adamw_fused", {"status": "other update rule"})["status"] == "other update rule"


def test_activation_memory_profile_dry_run(tmp_path):
    """benchmarks/profile/activation_memory.py end to end on a tiny model: a line per case, each counting what both
    models keep (the fused block keeps less: no attention probabilities, no LayerNorm outputs)."""
    out = tmp_path / "activation_memory.txt"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile", "activation_memory.py"),
                           "--dry-run", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = {line.split("  ")[0]: line for line in out.read_text().splitlines() if not line.startswith("#")}
    assert set(lines) == {"fusion layer", "pretraining step"}
    for line in lines.values():
        theirs, ours, ratio = (float(t) for t in re.findall(r"official +([\d.]+) MB +vlmo_fast +([\d.]+) MB +([\d.]+)x",
                                                             line)[0])
        assert 0 < ours < theirs and 0 < ratio < 1


def test_rows_say_which_backend_ran_and_gpu_summaries_flag_pytorch_fallbacks():
    import summary

    bench = _tiny_bench()
    bench_run.bench_softmax(bench, bench_run.SIZES["tiny"], ["fp32"])
    notes = {r.impl: r.note for r in bench.rows if r.mode == "fwd"}
    assert notes["official"] == "" and notes["vlmo_fast[torch]"] == "ran masked_softmax=torch"
    assert notes["vlmo_fast"] in ("ran masked_softmax=torch", "ran masked_softmax=native-cpu")  # the C++ kernel
    row = dict(op="attention", case={"N": 1}, dtype="bf16", mode="fwd", impl="vlmo_fast", baseline="official", ms=1.0,
               speedup=2.0, status="ok", note="ran attention=torch, masked_softmax=torch")
    gpu = {"meta": {"device_type": "cuda"}, "rows": [row]}
    assert summary.summary_rows(gpu)[0]["status"] == "PyTorch path for attention, masked_softmax"
    row["note"] = "ran attention=triton"
    assert summary.summary_rows(gpu)[0]["status"] == "ok"
    row["note"] = "ran attention=torch"
    assert summary.summary_rows({"meta": {"device_type": "cpu"}, "rows": [row]})[0]["status"] == "ok"


def test_a_failed_call_does_not_keep_its_tensors_alive():
    """An error kept for its row must not hold the failed call's frames: their tensors (a whole training step's
    activations after an out-of-memory error) would stay allocated for every later case."""
    import gc
    import weakref

    refs = []

    def step():
        activations = torch.ones(1000)
        refs.append(weakref.ref(activations))
        raise RuntimeError("out of memory")

    out = harness.time_fns({"official": step}, torch.device("cpu"), warmup=1, reps=1)
    gc.collect()
    assert isinstance(out["official"], RuntimeError) and out["official"].__traceback__ is None
    assert refs and all(r() is None for r in refs)


@pytest.mark.skipif(not vf.build_info().get("cuda"), reason="the CUDA kernels were not compiled (no nvcc at build time)")
def test_staged_softmax_rows_run_with_the_staged_kernels_and_restore_the_choice():
    """The benchmark's vlmo_fast[staged] softmax rows switch the process-wide CUDA kernel choice for their calls
    only (forward and backward alike: the wrapper encloses the whole timed callable)."""
    from vlmo_fast.ops import native

    seen = []
    call = bench_run._with_softmax_kernel("staged", lambda: seen.append(native.cuda_softmax_kernel()))
    before = native.cuda_softmax_kernel()
    call()
    assert seen == ["staged"] and native.cuda_softmax_kernel() == before == "rows"


def test_deterministic_attention_rows_pin_the_configurations_for_the_whole_call_only():
    """The benchmark's vlmo_fast[deterministic] attention rows (GPU) run the tuned kernels at their fixed configurations
    for the whole timed callable (forward and backward), and leave the choice as it was, also when the call raises."""
    from vlmo_fast.ops import triton_attention as ta

    seen = []
    assert ta.PIN_CONFIGS is None
    bench_run._with_pinned_configs(lambda: seen.append(ta.configs_pinned()))()
    assert seen == [True] and ta.PIN_CONFIGS is None and not ta.configs_pinned()

    def fail():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        bench_run._with_pinned_configs(fail)()
    assert ta.PIN_CONFIGS is None


def test_rows_whose_check_could_not_run_say_unchecked_and_are_never_the_best_other():
    """A checked case whose baseline raised in the agreement run times the others but marks them "unchecked"; the
    summary compares vlmo_fast only with competitors that ran and agreed, and names the ones it could not compare."""
    import summary

    bench = _tiny_bench()
    x = torch.randn(64)

    def broken():
        raise RuntimeError("baseline failed")

    rows = bench.measure("softmax", {"N": 64}, "fp32", "fwd", {"official": broken, "vlmo_fast": lambda: x * 2,
                                                               "sdpa": lambda: x * 2}, check=True)
    status = {r.impl: r.status for r in rows}
    assert status["official"].startswith("error: RuntimeError") and status["vlmo_fast"] == "unchecked"
    assert status["sdpa"] == "unchecked"
    as_dicts = [dict(vars(r)) for r in rows]
    line = summary.summary_rows({"meta": {"device_type": "cpu"}, "rows": as_dicts})[0]
    assert line["best_other"] is None and line["status"] == "unchecked; not compared: sdpa (unchecked)"
    good = dict(as_dicts[2], impl="flex", status="ok", ms=as_dicts[1]["ms"] * 2)
    line = summary.summary_rows({"meta": {"device_type": "cpu"}, "rows": as_dicts + [good]})[0]
    assert line["best_other"] == "flex" and line["vs_best_other"] == pytest.approx(2.0)


def test_summary_table_for_the_readme_reads_committed_files_only(tmp_path):
    """The README's table comes from result files git tracks, not from a local run left in the folder."""
    import summary

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    meta = {"device": "CPU X", "device_type": "cpu", "date": "2026-01-01T00:00:00", "commit": "abc", "torch": "2",
            "sizes": "quick"}
    row = dict(op="softmax", case={"N": 1}, dtype="fp32", mode="fwd", impl="vlmo_fast", baseline="official", ms=1.0,
               speedup=2.0, status="ok")
    (tmp_path / "a.json").write_text(json.dumps({"meta": meta, "rows": [row]}))
    (tmp_path / "b.json").write_text(json.dumps({"meta": dict(meta, date="2026-02-01T00:00:00", commit="local"),
                                                 "rows": [row]}))
    subprocess.run(["git", "add", "a.json"], cwd=tmp_path, check=True)
    # staged only: not committed yet
    assert "commit `abc`" not in summary.readme_table(str(tmp_path))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "results"]
    subprocess.run(git, cwd=tmp_path, check=True)
    table = summary.readme_table(str(tmp_path))
    assert "commit `abc`" in table and "commit `local`" not in table
    # a folder given relative to the working directory (git runs in the folder: relative paths used to miss)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path.parent)
        assert "commit `abc`" in summary.readme_table(tmp_path.name)
    finally:
        os.chdir(cwd)
    # a committed file changed since does not count
    (tmp_path / "a.json").write_text(json.dumps({"meta": dict(meta, commit="edited"), "rows": [row]}))
    assert "commit `edited`" not in summary.readme_table(str(tmp_path))


def test_results_on_disk_name_the_op_running(tmp_path, monkeypatch):
    """Before each op starts, the results so far are on disk with that op named: a run killed during it (the suite's
    hard time limit) still says where it stopped."""
    seen = []

    def layernorm(*args, **kwargs):
        files = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
        meta = json.loads((tmp_path / files[0]).read_text())["meta"]
        seen.append((meta["running"], meta["complete"]))

    monkeypatch.setattr(bench_run, "bench_layernorm", layernorm)
    result = bench_run.main(["--sizes", "tiny", "--ops", "layernorm", "--out", str(tmp_path), "--no-plot"])
    assert seen == [("layernorm", False)]
    assert "running" not in json.loads(Path(result["paths"]["json"]).read_text())["meta"]


def test_summary_reports_peak_memory_against_the_official_math():
    import summary

    rows = [dict(op="attention", case={"N": 1}, dtype="bf16", mode="fwd", impl=impl, baseline="official", ms=ms,
                 speedup=2.0 / ms, status="ok", peak_mem_mb=mb) for impl, ms, mb in (("official", 2.0, 400.0),
                                                                                     ("vlmo_fast", 1.0, 100.0))]
    line = summary.summary_rows({"meta": {"device_type": "cuda"}, "rows": rows})[0]
    assert line["peak_mb"] == 100.0 and line["peak_vs_official"] == pytest.approx(0.25)
    assert "| 100 (0.25x) |" in summary.summary_markdown({"meta": dict(device="G", date="2026-01-01", commit="c",
                                                                        torch="2", sizes="full"), "rows": rows})


def test_summary_shows_how_to_read_a_row_but_not_the_backend_record():
    """A row's note on how to read it (the step's speedup basis at a batch the official step does not fit) reaches
    the summary's status; the record of which backend ran does not, except a GPU fall-back to the PyTorch path."""
    import summary

    row = dict(op="step", case={"B": 128}, dtype="bf16", mode="step", impl="vlmo_fast", baseline="official", ms=1.0,
               speedup=2.0, status="ok", note="ran attention=triton, multiway_ffn=torch; speedup: samples/s against "
               "the official step at B=64 (at B=128: oom)")
    status = summary.summary_rows({"meta": {"device_type": "cuda"}, "rows": [row]})[0]["status"]
    assert status == ("speedup: samples/s against the official step at B=64 (at B=128: oom); "
                      "PyTorch path for multiway_ffn")


def test_summary_gives_the_time_of_our_kernel_variants_against_the_default():
    """Our variants (the deterministic mode's fixed tiles, #4: the default if under 10% slower; the staged softmax
    kernels): the summary's status gives their time as a multiple of vlmo_fast's; the PyTorch path and variants
    whose check failed are left out."""
    import summary

    def row(impl, ms, status="ok"):
        return dict(op="attention", case={"N": 237}, dtype="bf16", mode="fwd+bwd", impl=impl, baseline="official",
                    ms=ms, speedup=4.0 / ms, status=status)

    rows = [row("official", 4.0), row("vlmo_fast", 1.0), row("vlmo_fast[torch]", 3.0),
            row("vlmo_fast[deterministic]", 1.08), row("vlmo_fast[staged]", 0.5, "mismatch: 1e-2")]
    assert summary.summary_rows({"meta": {"device_type": "cuda"}, "rows": rows})[0]["status"] == (
        "deterministic: 1.08x the time")
    # on a CPU the PyTorch path is what the C++ kernels replace (#5: each must be faster): its time is shown too
    assert summary.summary_rows({"meta": {"device_type": "cpu"}, "rows": rows})[0]["status"] == (
        "torch: 3.00x the time; deterministic: 1.08x the time")


def test_the_agreement_run_stops_at_the_budget_and_each_case_reaches_the_disk(tmp_path, monkeypatch):
    """The agreement run made every implementation's first call (compilation, autotuning: tens of seconds on a GPU)
    whatever the budget said; results reached the disk only between ops, so a run killed during one lost its
    finished cases."""
    bench = _tiny_bench()
    bench.deadline = time.time() + 0.3
    calls = []

    def impl(name, first_s):
        def f():
            if name not in calls:
                time.sleep(first_s)
            calls.append(name)
            return torch.ones(4)
        return f

    t0 = time.time()
    bench.measure("attention", {"B": 1}, "fp32", "fwd", {"official": impl("official", 0.4), "vlmo_fast":
                  impl("vlmo_fast", 0.4), "flex": impl("flex", 3.0)}, check=True)
    assert time.time() - t0 < 2.5 and "flex" not in calls
    # every case on disk as it ends
    seen = []
    real = harness.write_results

    def spy(meta, rows, out, plot=True):
        seen.append((meta.get("running"), len(rows)))
        return real(meta, rows, out, plot=plot)

    monkeypatch.setattr(harness, "write_results", spy)
    bench_run.main(["--sizes", "tiny", "--ops", "softmax", "--out", str(tmp_path), "--no-plot"])
    assert ("softmax", 3) in seen and ("softmax", 6) in seen  # after the fwd case, and after the fwd+bwd one


def test_the_official_softmax_baseline_makes_only_the_official_passes():
    """The official scale multiplies q before QK^T: the baseline timed a full-size scale pass the official model never
    makes, which inflated the softmax speedups."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    scores, bias = torch.randn(2, 3, 5, 5), torch.randn(3, 5, 5)
    keep = torch.ones(2, 5, dtype=torch.bool)
    with Ops() as ops:
        out = bench_run.official_softmax(scores, bias, keep)
    assert not any(n.startswith("mul") for n in ops.names), ops.names
    torch.testing.assert_close(out, vf.ops.masked_softmax(scores, scale=1.0, bias=bias, key_padding_mask=keep))


def test_reports_carry_notes_and_the_run_commit_and_loader_devices_match(tmp_path, monkeypatch):
    """The per-run table dropped each row's note (e.g. a step speedup measured against the official step at a smaller
    batch); the GPU machine's copy of the tree named another commit; a CPU loader result never matched the CPU
    benchmark's device name."""
    import summary

    row = harness.Row(op="step", impl="vlmo_fast", mode="step", case={"B": 128}, dtype="bf16", baseline="official",
                      note="speedup: samples/s against the official step at B=64")
    assert "| speedup: samples/s against the official step at B=64 |" in harness.markdown_table([row])
    monkeypatch.setenv("VLMO_BENCH_COMMIT", "abc1234")
    assert harness.git_commit() == "abc1234"
    cpu = harness.device_name(torch.device("cpu"))
    assert summary._loader_device({"device": cpu}) == cpu
    assert summary._loader_device({"device": harness.cpu_model(), "cpu_count": os.cpu_count()}) == cpu  # older files
    assert summary._loader_device({"gpu": "NVIDIA H100 80GB HBM3", "device": cpu}) == "NVIDIA H100 80GB HBM3"


def test_a_broken_cuda_context_continues_the_run_in_a_fresh_process(tmp_path, monkeypatch):
    """After an op, a CUDA context broken by a sticky error (an illegal address) would fail every later call in the
    process: the run writes its rows and starts again for the ops left (exec of run.py --continue-from), which keeps
    the rows, the date (file name) and the ceilings, and lists what happened."""
    calls = []
    monkeypatch.setattr(bench_run, "context_ok", lambda dev: bool(calls))  # broken until the restart
    monkeypatch.setattr(bench_run, "restart", lambda *a: calls.append(a))
    first = bench_run.main(["--sizes", "tiny", "--ops", "softmax,layernorm,optimizer", "--out", str(tmp_path),
                            "--no-plot", "--deadline", str(time.time() + 600)])
    assert first.get("restarted") and len(calls) == 1
    args, size_name, dtypes, results, left, deadline, device = calls[0]
    assert device == "cpu" and left == ["layernorm", "optimizer"] and results == first["paths"]["json"] and deadline < time.time() + 601
    saved = json.loads(Path(results).read_text())
    assert {r["op"] for r in saved["rows"]} == {"softmax"} and saved["meta"]["complete"] is False
    assert saved["meta"]["skipped"] == ["softmax: a sticky CUDA error broke the process's context after it"]
    # what restart runs in the fresh process
    second = bench_run.main(["--sizes", size_name, "--dtypes", ",".join(dtypes), "--out", str(tmp_path), "--no-plot",
                             "--continue-from", results, "--resume-order", "|".join(left)])
    assert second["paths"]["json"] == results  # the same run, the same file
    final = json.loads(Path(results).read_text())
    assert [r["op"] for r in final["rows"]][:1] == ["softmax"]
    assert {r["op"] for r in final["rows"]} == {"softmax", "layernorm", "optimizer"}
    assert final["meta"]["complete"] is True and final["meta"]["date"] == saved["meta"]["date"]
    assert final["meta"]["ceilings"] == saved["meta"]["ceilings"]
    assert final["meta"]["skipped"] == saved["meta"]["skipped"]
    assert all(r["case_wall_s"] is not None and r["case_wall_s"] >= 0 for r in final["rows"])


def test_compile_baselines_under_a_budget_only_where_a_target_compares(monkeypatch):
    monkeypatch.setattr(harness, "device_name", lambda dev: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")
    free = bench_run.Bench(cuda, {}, 1, float("inf"), compile_baselines=True)
    assert all(free.compile_for(op) for op in ("attention", "softmax", "layernorm", "step", "model"))
    budgeted = bench_run.Bench(cuda, {}, 1, 300.0, compile_baselines=True)
    assert budgeted.compile_for("block") and budgeted.compile_for("attention")
    assert not budgeted.compile_for("softmax") and not budgeted.compile_for("attention (other sizes)")
    assert budgeted.notes == ["softmax: compile(official) left out under --budget-s (no target compares with it)",
                              "attention (other sizes): compile(official) left out under --budget-s (no target "
                              "compares with it)"]
    assert not bench_run.Bench(cuda, {}, 1, 300.0, compile_baselines=False).compile_for("block")
    assert not _tiny_bench().compile_for("block")  # CPU: never
    # an absolute deadline alone makes the run budgeted; with both, the earlier wins
    assert bench_run.Bench(cuda, {}, 1, float("inf"), True, deadline=time.time() + 50).budgeted
    assert bench_run.Bench(cuda, {}, 1, 10.0, True, deadline=time.time() + 50).deadline < time.time() + 11


def test_the_benchmarks_device_is_made_current_with_its_index(monkeypatch):
    """--device cuda:N makes N the current device (do_bench's timers and the memory statistics read it); "cuda" alone
    (and auto) is the current device, named with its index, as torch.cuda.set_device requires."""
    current, made = [3], []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made.append(d))
    assert bench_run.make_current(torch.device("cuda")) == torch.device("cuda", 3)
    assert bench_run.make_current(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert made == [torch.device("cuda", 3), torch.device("cuda", 1)] and all(d.index is not None for d in made)
    assert bench_run.make_current(torch.device("cpu")) == torch.device("cpu") and len(made) == 2


def test_flex_steps_down_its_tiles_on_a_shared_memory_shortage_and_keeps_them(monkeypatch):
    monkeypatch.setattr(bench_run.Flex, "tiles_index", {False: 0, True: 0})
    last = len(bench_run.Flex.TILES) - 1

    def stand_in(failures, message="out of resource: shared memory, Required: 237568, Hardware limit: 232448"):
        """A Flex whose call (as Flex.__call__: the grad mode noted, the tiles read for it) fails ``failures`` times."""
        flex = object.__new__(bench_run.Flex)  # no FlexAttention needed: only the retry logic
        seen = []

        def call():
            flex.last_grad = torch.is_grad_enabled()
            seen.append(flex.kernel_options(flex.last_grad))
            if len(seen) <= failures:
                raise RuntimeError(message)
            return "ok"

        return flex, flex.retrying(call), seen

    # the forward fails twice: it steps down twice, and forward and backward start from the forward's tiles
    flex, forward, seen = stand_in(2)
    with torch.no_grad():
        assert forward() == "ok"
    assert seen[0] is None and seen[1]["num_stages"] == 2 and seen[1]["BLOCK_M"] == 128 and seen[2]["BLOCK_M"] == 64
    later = object.__new__(bench_run.Flex)  # the next case starts from the tiles that worked
    assert later.kernel_options(False) == later.kernel_options(True) == seen[2]
    assert "too much shared memory" in later.note("fwd") and later.note("fwd+bwd") == later.note("fwd")

    # only the backward's tiles too large: a forward alone keeps the defaults
    monkeypatch.setattr(bench_run.Flex, "tiles_index", {False: 0, True: 0})
    flex, forward_backward, seen = stand_in(1)
    assert forward_backward() == "ok" and seen[0] is None and seen[1]["BLOCK_M"] == 128
    assert flex.kernel_options(False) is None and flex.note("fwd") == ""
    assert flex.kernel_options(True) == seen[1] and "too much shared memory" in flex.note("fwd+bwd")

    # past the smallest tiles: the error is the row's
    flex, always, _ = stand_in(99)
    with pytest.raises(RuntimeError, match="out of resource"):
        always()
    assert bench_run.Flex.tiles_index == {False: 0, True: last}

    # another error is not retried
    monkeypatch.setattr(bench_run.Flex, "tiles_index", {False: 0, True: 0})
    flex, other, seen = stand_in(1, "something else")
    with pytest.raises(RuntimeError, match="something else"):
        other()
    assert len(seen) == 1 and bench_run.Flex.tiles_index == {False: 0, True: 0}


def test_summary_never_rounds_up_to_a_target_and_names_the_target_rivals():
    import summary

    def row(impl, ms, **kw):
        return dict(dict(op="attention", case={"N": 237}, dtype="bf16", mode="fwd+bwd", impl=impl,
                         baseline="official", ms=ms, speedup=9.996 / ms, status="ok"), **kw)

    rows = [row("official", 9.996), row("vlmo_fast", 1.0, tflops=199.96, frac_ceiling=0.7996),
            row("sdpa", 1.996), row("flex", 2.5, note="kernel_options={'BLOCK_M': 64} (the default tiles need too much "
                                                         "shared memory)")]
    data = {"meta": {"device": "NVIDIA H100", "date": "2026-12-07T00:00:00Z", "commit": "abc", "torch": "2.x",
                     "sizes": "full", "device_type": "cuda", "source_sha256": "0123"}, "rows": rows}
    s = summary.summary_rows(data)[0]
    assert s["best_other"] == "sdpa" and s["rate"] == "199.9 TFLOP/s"
    assert "vs flex 2.50x" in s["status"] and "flex: kernel_options=" in s["status"]
    line = [x for x in summary.summary_markdown(data).splitlines() if x.startswith("| attention")][0]
    assert "| 9.99x |" in line and "| 1.99x |" in line and "| 79 |" in line  # not 10.00x/2.00x/80
    assert "(source 0123)" in summary.summary_markdown(data)


def test_source_hash_names_the_code(tmp_path):
    for part in ("vlmo_fast", "csrc", "benchmarks/results"):
        os.makedirs(tmp_path / part)
    (tmp_path / "vlmo_fast" / "a.py").write_text("x = 1\n")
    (tmp_path / "csrc" / "k.cu").write_text("// kernel\n")
    (tmp_path / "setup.py").write_text("pass\n")
    h = harness.source_hash(str(tmp_path))
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}")  # results are not the code
    (tmp_path / "vlmo_fast" / "b.so").write_text("binary")  # nor build outputs
    assert harness.source_hash(str(tmp_path)) == h
    (tmp_path / "csrc" / "k.cu").write_text("// kernel, changed\n")
    assert harness.source_hash(str(tmp_path)) != h
    assert re.fullmatch(r"[0-9a-f]{16}", harness.source_hash())


def test_the_official_step_is_skipped_where_its_scaled_peak_does_not_fit(monkeypatch):
    """At the target batch the official step is skipped when its peak at the checked batch, scaled to this one,
    exceeds the free memory (a known OOM on an 80 GB H100 that cost time and fragmented memory)."""
    checked = [harness.Row(op="step", impl="official", mode="step", case={"B": 64}, dtype="bf16", peak_mem_mb=50000.0),
               harness.Row(op="step", impl="vlmo_fast", mode="step", case={"B": 64}, dtype="bf16", peak_mem_mb=20000.0)]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (79 * 2**30, 80 * 2**30))
    cuda = torch.device("cuda")
    why = bench_run._predicted_not_to_fit(cuda, checked, "official", 128)
    assert why.startswith("would not fit: about 98 GB by its peak at B=64 scaled to B=128, 79 GB free")
    assert bench_run._predicted_not_to_fit(cuda, checked, "vlmo_fast", 128) == ""
    assert bench_run._predicted_not_to_fit(torch.device("cpu"), checked, "official", 128) == ""
    assert bench_run._predicted_not_to_fit(cuda, [], "official", 128) == ""  # nothing to scale: try it
