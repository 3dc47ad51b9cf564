"""The command line: boolean flags, help texts (defaults, per-command presets, per-task options), option checks with
one-line errors, fine-tuning task conflicts and data requirements, evaluate's model settings from the checkpoint,
export of training checkpoints and model files. Parser-level or tiny runs only."""

import json
import os
import re

import pytest
import torch

import vlmo_fast as vf
from vlmo_fast import build_info, cli, demo
from vlmo_fast.checkpoint import read_metadata, read_state_dict, save_checkpoint
from vlmo_fast.train import TrainConfig, train
from vlmo_fast.train import finetune as ft
from vlmo_fast.train.config import PRESETS_TRAIN, build_parser, config_from_args, one_line_interrupt, presets_for

BOOL_OPTIONS = ("compile", "fsdp", "augment", "final_eval", "tensorboard", "whole_word_masking", "gather_with_grad",
                "activation_checkpointing", "deterministic")


def flat(text):
    return " ".join(text.split())


def exit_code(fn, capsys):
    """(exit status, stdout, stderr) of a command function that ends with SystemExit."""
    with pytest.raises(SystemExit) as info:
        fn()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


class Captured(Exception):
    pass


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("run")
    summary = train(TrainConfig(arch="vlmo_tiny_patch16", image_size=32, max_text_len=12, data_root=synthetic_root,
                                out_dir=str(out), batch_size=8, per_device_batch_size=8, max_steps=1, warmup_steps=0,
                                num_workers=0, tensorboard=False, final_eval=False, device="cpu"))
    return summary["last_checkpoint"]


# ---- 1. boolean options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [("true", True), ("FALSE", False), ("1", True), ("0", False), ("yes", True),
                                        ("no", False), ("on", True), ("Off", False)])
def test_boolean_options_take_every_spelling(text, value):
    parser = build_parser("vlmo-fast pretrain", "test")
    for name in BOOL_OPTIONS:
        args = parser.parse_args(["--" + name.replace("_", "-"), text])
        assert getattr(args, name) is value, name


def test_a_bare_boolean_flag_means_true(capsys):
    parser = build_parser("vlmo-fast pretrain", "test")
    args = parser.parse_args(["--fsdp", "--compile", "--max-steps", "3", "--augment"])
    assert args.fsdp is True and args.compile is True and args.augment is True and args.max_steps == 3
    assert config_from_args(parser.parse_args(["--tensorboard", "off", "--final-eval"])).tensorboard is False
    assert parser.parse_args(["--augment", "none"]).augment is None
    code, _, err = exit_code(lambda: parser.parse_args(["--fsdp", "maybe"]), capsys)
    assert code == 2 and "expected true/false" in err
    assert "a bare flag means true" in flat(parser.format_help())


# ---- 2. help shows a default once, and only a useful one ----------------------------------------------------------


def test_help_shows_each_default_once():
    texts = [flat(build_parser("vlmo-fast pretrain", "test").format_help()),
             flat(ft._evaluate_parser("irtr").format_help()), flat(ft._evaluate_parser("vqa").format_help())]
    for text in texts:
        assert "(default: None)" not in text and "the preset's) (default" not in text
    pretrain = texts[0]
    assert "image side in pixels (default: the --arch preset's, 64 for vlmo_tiny_patch16) --max-text-len" in pretrain
    assert "text length (default: the --arch preset's, 12 for vlmo_tiny_patch16) --drop-path-rate" in pretrain
    # with a --preset: the values it sets, where the text gives a general default too
    irtr = flat(build_parser("vlmo-fast finetune irtr", "test",
                             argv=["--preset", "task_finetune_irtr_coco_base_image384"]).format_help())
    assert "image side in pixels (default: 384) --max-text-len" in irtr
    assert "text length (default: the --arch preset's, 40 for vlmo_base_patch16) --drop-path-rate" in irtr
    assert "without it) (--preset task_finetune_irtr_coco_base_image384: 0.2) --vqa-label-size" in irtr
    assert "without it) --vqa-label-size" in pretrain and "(none: off) --precision" in pretrain
    assert "(default: 3129, the official vocabulary's) --backend" in pretrain
    assert "(default: 300)" in pretrain  # a real default is still shown


# ---- 3. help per command: the task's defaults and presets ---------------------------------------------------------


def test_finetune_help_shows_the_tasks_defaults_and_presets(capsys):
    code, out, _ = exit_code(lambda: ft.finetune_main(["vqa", "--help"]), capsys)
    text = flat(out)
    assert code == 0
    assert "--tasks TASKS comma-separated objectives (mlm,itc,itm | textmlm | irtr | vqa | nlvr2) (default: vqa)" \
        in text
    assert "(default: mlm,itc,itm)" not in text and "(default: coco)" not in text
    assert "(default: runs/vlmo_fast_vqa)" in text and "(default: 20)" in text
    for name in PRESETS_TRAIN:
        assert (name in text) == name.startswith("task_finetune_vqa"), name
    code, out, _ = exit_code(lambda: ft.finetune_main(["irtr", "--help"]), capsys)
    assert "(default: irtr)" in flat(out) and "(default: coco)" in flat(out)


@pytest.mark.parametrize("form", ["--preset", "--preset=", "--pres"])
def test_help_after_a_preset_shows_the_values_the_run_will_use(capsys, form):
    name = "task_finetune_vqa_base_image480"
    args = ["vqa", form + name] if form.endswith("=") else ["vqa", form, name]  # (--pres: argparse's abbreviation)
    code, out, _ = exit_code(lambda: ft.finetune_main(args + ["--help"]), capsys)
    text = flat(out)
    assert code == 0 and "peak learning rate (default: 3e-05)" in text and "(default: vlmo_base_patch16)" in text
    assert "(default: 128)" in text and "(default: 300)" not in text  # the preset's batch and epochs, not the task's
    code, out, _ = exit_code(lambda: cli.main(["pretrain", "--preset", "task_textmlm_base", "--help"]), capsys)
    assert "(default: textmlm)" in flat(out)


def test_pretrain_help_lists_pretraining_presets_only(capsys):
    code, out, _ = exit_code(lambda: cli.main(["pretrain", "--help"]), capsys)
    text = flat(out)
    assert code == 0 and "fine-tune" not in text
    assert presets_for(None) == ["task_mlm_itm_itc_base", "task_mlm_itm_itc_base_plus", "task_mlm_itm_itc_large",
                                 "task_textmlm_base", "task_textmlm_base_plus"]
    for name in PRESETS_TRAIN:
        assert (name in text) == (name in presets_for(None)), name
    assert sorted(sum((presets_for(t) for t in (None, "irtr", "vqa", "nlvr2")), [])) == sorted(PRESETS_TRAIN)


# ---- 4. finetune TASK refuses other tasks -------------------------------------------------------------------------


def test_finetune_refuses_a_conflicting_task(tmp_path, capsys):
    code, _, err = exit_code(lambda: ft.finetune_main(["irtr", "--preset", "task_finetune_vqa_base_image480"]), capsys)
    assert code == 2 and "task_finetune_vqa_base_image480 is a recipe for `vlmo-fast finetune vqa`" in err
    code, _, err = exit_code(lambda: ft.finetune_main(["irtr", "--tasks", "vqa"]), capsys)
    assert code == 2 and err.strip().splitlines() == [
        "vlmo-fast finetune irtr: error: --tasks sets tasks vqa, which conflicts with `vlmo-fast finetune irtr`: "
        "drop it, or run `vlmo-fast finetune vqa`"]
    toml = tmp_path / "ft.toml"
    toml.write_text('[train]\npreset = "task_finetune_nlvr2_base"\n')
    code, _, err = exit_code(lambda: ft.finetune_main(["irtr", "--config", str(toml)]), capsys)
    assert code == 2 and "task_finetune_nlvr2_base is a recipe for `vlmo-fast finetune nlvr2`" in err
    toml.write_text('tasks = ["mlm", "itc"]\n')
    code, _, err = exit_code(lambda: ft.finetune_main(["irtr", "--config", str(toml)]), capsys)
    assert code == 2 and f"--config {toml} sets tasks mlm,itc" in err and "`vlmo-fast pretrain`" in err
    code, _, err = exit_code(lambda: cli.main(["pretrain", "--tasks", "nlvr2"]), capsys)
    assert code == 2 and "vlmo-fast finetune nlvr2" in err


@pytest.mark.parametrize("tasks,text", [("itm", "enable itc with itm"), ("mlm,itm", "enable itc with itm"),
                                        ("textmlm,itc", "textmlm is the text-only stage"),
                                        ("mlm,textmlm", "textmlm is the text-only stage")])
def test_task_combinations_that_cannot_train_are_refused_before_the_run(tmp_path, capsys, tasks, text):
    """They used to start (writing the synthetic data, config.json and log.csv) and fail in the first step with a
    traceback (textmlm with itc: a message about vlffn_start_layer_index)."""
    out = tmp_path / "run"
    code, _, err = exit_code(lambda: cli.main(["pretrain", "--tasks", tasks, "--out-dir", str(out)]), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and text in err, err
    assert not out.exists()


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_under_torchrun_each_machine_prints_a_configuration_error_once(monkeypatch, capsys, local_rank):
    """Every process parses the same arguments: a node's first prints the error (or the help), the others exit with
    the same status silently (8 processes printed it 8 times)."""
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    for call, text in ((lambda: cli.main(["pretrain", "--tasks", "nlvr2"]), "vlmo-fast finetune nlvr2"),
                       (lambda: cli.main(["pretrain", "--max-steps", "many"]), "expected an int or none"),
                       (lambda: cli.main(["pretrian"]), "invalid choice"),
                       (lambda: ft.finetune_main(["irtr", "--tasks", "vqa"]), "conflicts"),
                       (lambda: ft.finetune_main(["irtrr"]), "invalid choice")):
        code, out, err = exit_code(call, capsys)
        assert code == 2 and (text in err if local_rank == "0" else out == err == "")
    code, out, err = exit_code(lambda: cli.main(["pretrain", "--help"]), capsys)
    assert code == 0 and ("--max-steps" in out if local_rank == "0" else out == err == "")


# ---- 5. data the built-in synthetic set does not have -------------------------------------------------------------


@pytest.mark.parametrize("argv,what", [(["finetune", "vqa"], "vqa"), (["finetune", "nlvr2"], "nlvr2"),
                                       (["finetune", "irtr", "--datasets", "f30k"], "f30k"),
                                       (["pretrain", "--preset", "task_textmlm_base"], "wikibk"),
                                       (["pretrain", "--datasets", "coco,vg"], "vg")])
def test_data_root_is_required_for_data_the_synthetic_set_lacks(tmp_path, capsys, argv, what):
    out = tmp_path / "run"
    code, _, err = exit_code(lambda: cli.main(argv + ["--out-dir", str(out)]), capsys)
    assert code == 2 and err.strip().endswith(
        f"error: --data-root is required for {what} (the built-in synthetic set has images and captions only)")
    assert not out.exists()  # failed before writing the synthetic set


def test_unreadable_inputs_of_a_run_are_one_line(tmp_path, capsys):
    """Inputs that fail only when the run reads them (a damaged arrow file, a damaged --load-path): one line, exit 2;
    an error of the run itself would keep its traceback (user_errors marked_only)."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "coco_caption_karpathy_train.arrow").write_bytes(b"")
    argv = ["pretrain", "--data-root", str(root), "--datasets", "coco", "--out-dir", str(tmp_path / "run"),
            "--max-steps", "1", "--device", "cpu"]
    code, _, err = exit_code(lambda: cli.main(argv), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "not a readable Arrow IPC file" in lines[0], err
    bad = tmp_path / "damaged.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    code, _, err = exit_code(lambda: cli.main(["pretrain", "--out-dir", str(tmp_path / "run2"), "--max-steps", "1",
                                               "--device", "cpu", "--load-path", str(bad)]), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"cannot read {bad} as safetensors" in lines[0], err


# ---- 6. evaluate: model settings from the checkpoint, per-task options --------------------------------------------


def _evaluate_cfg(monkeypatch, argv):
    """The TrainConfig evaluate_main builds its model from (it stops right there)."""
    seen = {}

    def build_model(cfg):
        seen["cfg"] = cfg
        raise Captured

    monkeypatch.setattr(ft, "build_model", build_model)
    with pytest.raises(Captured):
        ft.evaluate_main(argv)
    return seen["cfg"]


def test_evaluate_takes_the_model_settings_the_checkpoint_records(tmp_path, monkeypatch, synthetic_root,
                                                                  training_checkpoint):
    common = ["--data-root", synthetic_root, "--device", "cpu"]
    cfg = _evaluate_cfg(monkeypatch, ["irtr", "--load-path", training_checkpoint] + common)
    assert (cfg.arch, cfg.image_size, cfg.max_text_len) == ("vlmo_tiny_patch16", 32, 12)
    model = vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=48, max_text_len=10))
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    cfg = _evaluate_cfg(monkeypatch, ["irtr", "--load-path", str(path)] + common)
    assert (cfg.arch, cfg.image_size, cfg.max_text_len) == ("vlmo_tiny_patch16", 48, 10)
    cfg = _evaluate_cfg(monkeypatch, ["irtr", "--load-path", str(path), "--image-size", "64", "--arch",
                                      "vlmo_base_patch16"] + common)  # explicit options win
    assert (cfg.arch, cfg.image_size, cfg.max_text_len) == ("vlmo_base_patch16", 64, 10)
    plain = tmp_path / "model.pt"  # a plain state dict (as official checkpoints) records nothing: the base preset's
    save_checkpoint(model, plain)  # settings, but the image size its relative-position table was trained at
    cfg = _evaluate_cfg(monkeypatch, ["irtr", "--load-path", str(plain)] + common)
    assert (cfg.arch, cfg.image_size, cfg.max_text_len) == ("vlmo_base_patch16", 48, None)
    cfg = _evaluate_cfg(monkeypatch, ["irtr", "--load-path", str(plain), "--image-size", "64"] + common)
    assert cfg.image_size == 64
    absolute = tmp_path / "absolute.pt"  # base_plus has absolute image positions instead: 1 + W² of them
    with torch.device("meta"):
        meta = vf.VLMo(vf.preset("vlmo_base_plus_patch16", image_size=384))
    torch.save({k: torch.zeros(v.shape) for k, v in meta.state_dict().items() if "pos_embed" in k}, absolute)
    cfg = _evaluate_cfg(monkeypatch, ["irtr", "--load-path", str(absolute), "--arch", "vlmo_base_plus_patch16"]
                        + common)
    assert cfg.image_size == 384


def test_version_and_info_name_the_versions(capsys, monkeypatch):
    """`vlmo-fast --version` (what a bug report asks for first) and `vlmo-fast info` name vlmo_fast's version."""
    code, out, _ = exit_code(lambda: cli.main(["--version"]), capsys)
    triton = build_info()["triton"] or "not installed"
    assert code == 0 and out.strip() == f"vlmo-fast {vf.__version__} (torch {torch.__version__}, triton {triton})"
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun: once per machine, as help
    assert exit_code(lambda: cli.main(["--version"]), capsys) == (0, "", "")
    monkeypatch.delenv("LOCAL_RANK")
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vlmo_fast"] == vf.__version__ and info["torch"] == torch.__version__


def test_evaluate_help_is_per_task(capsys):
    texts = {}
    for task in ft.TASKS:
        code, out, _ = exit_code(lambda: ft.evaluate_main([task, "--help"]), capsys)
        assert code == 0
        texts[task] = flat(out)
    assert "--rerank-k" in texts["irtr"] and "f30k" in texts["irtr"] and "--work-dir" in texts["irtr"]
    for task in ("vqa", "nlvr2"):
        assert "--rerank-k" not in texts[task] and "irtr" not in texts[task] and "--dataset " not in texts[task]
        assert "--work-dir" not in texts[task]
    assert "--split" in texts["vqa"] and "--split" not in texts["nlvr2"]
    code, _, err = exit_code(lambda: ft.evaluate_main(["vqa", "--load-path", "x.pt"]), capsys)
    assert code == 2 and "--data-root" in err


def test_evaluate_configuration_errors_are_one_line(tmp_path, capsys):
    code, _, err = exit_code(lambda: ft.evaluate_main(["irtr", "--load-path", str(tmp_path / "missing.pt")]), capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"vlmo-fast evaluate irtr: error: checkpoint file not found: {tmp_path / 'missing.pt'}"]


def test_a_file_that_is_no_checkpoint_is_one_clean_line(tmp_path, capsys, synthetic_root):
    """evaluate and export name the file and the reader's first line: none of torch's advice to unpickle, no terminal
    colour codes, no doubled period."""
    jpg = tmp_path / "photo.jpg"
    jpg.write_bytes(b"\xff\xd8\xff\xe0 not a checkpoint")
    for run in (lambda: ft.evaluate_main(["irtr", "--load-path", str(jpg), "--data-root", synthetic_root,
                                           "--device", "cpu"]),
                lambda: cli.main(["export", str(jpg), str(tmp_path / "out.pt")])):
        code, _, err = exit_code(run, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert "cannot read" in lines[0] and str(jpg) in lines[0] and "it is not a checkpoint" in lines[0], err
        assert "\x1b" not in err and ".." not in err and "set to `False" not in err and "Please file" not in err, err


def test_evaluate_hints_at_arch_when_the_checkpoint_records_none(tmp_path, capsys, synthetic_root):
    plain = tmp_path / "tiny.pt"  # a plain state dict (export's .pt) records no model settings
    save_checkpoint(vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=32, max_text_len=12)), plain)
    code, _, err = exit_code(lambda: ft.evaluate_main(["irtr", "--load-path", str(plain), "--data-root",
                                                       synthetic_root, "--device", "cpu"]), capsys)
    assert code == 2 and "a different architecture" in err and "give --arch, --image-size and --max-text-len" in err, err


# ---- 7. finetune has its own out_dir ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["irtr", "vqa", "nlvr2"])
def test_finetune_default_out_dir_is_the_tasks(tmp_path, monkeypatch, task):
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        return {"stop_reason": "max_steps"}

    monkeypatch.setattr(ft, "train", fake_train)
    extra = [] if task == "irtr" else ["--data-root", str(tmp_path)]
    assert ft.finetune_main([task] + extra) == 0
    assert seen["cfg"].out_dir == f"runs/vlmo_fast_{task}" and seen["cfg"].tasks == [task]
    assert TrainConfig().out_dir == "runs/vlmo_fast"  # pretraining keeps its own


# ---- 8. option values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(max_steps=-1), "max_steps must be >= 1, got -1"), (dict(max_steps=0), "max_steps must be >= 1"),
    (dict(max_steps=None, max_epochs=0), "max_epochs must be >= 1"),
    (dict(eval_batches=-1), r"eval_batches must be >= 0 \(0: the whole val split\)"),
    (dict(keep_last=-1), r"keep_last must be >= 0 \(0 keeps every checkpoint\)"),
    (dict(log_every=0), "log_every must be >= 1"), (dict(save_every=0), "save_every must be >= 1"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"), (dict(learning_rate=-1e-4), "learning_rate must be > 0"),
    (dict(warmup_steps=1.5), r"a fraction of max_steps, in \[0, 1\]"), (dict(warmup_steps=-2), "warmup_steps"),
    (dict(device="gpu"), "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (dict(max_steps="two"), "max_steps: expected int, got str 'two'"),
    (dict(compile="yes"), "compile: expected bool, got str 'yes'"),
    (dict(learning_rate="fast"), "learning_rate: expected float, got str"),
    (dict(tasks=["mlm", 3]), "tasks: expected list of str"),
    # each of these trained, and exited 0: gradient ascent, a rising "decay", zeroed or flipped gradients
    (dict(lr_mult=-3.0), "lr_mult must be >= 0"), (dict(end_lr=-1.0), r"end_lr must be in \[0, learning_rate"),
    (dict(end_lr=1.0), r"end_lr must be in \[0, learning_rate=0.0002\], got 1.0"),
    (dict(grad_clip=0.0), r"grad_clip must be > 0 \(none: no clipping\)"), (dict(grad_clip=-1.0), "grad_clip"),
    (dict(weight_decay=-0.01), "weight_decay must be >= 0"),
    (dict(learning_rate=float("inf")), "learning_rate must be a finite number"),
    (dict(end_lr=float("nan")), "end_lr must be a finite number"),
    (dict(datasets=[]), "datasets: at least one dataset is needed"),
    # it failed inside torch at the first step (GradScaler's unscale of sharded and replicated gradients together)
    (dict(fsdp=True, precision="fp16"), "fsdp with precision fp16 is not supported"),
])
def test_bad_values_name_the_option(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_fsdp_on_a_torch_older_than_2_10_stops_the_run_at_its_start(monkeypatch, tmp_path, capsys):
    """An older torch stops a --fsdp run before any process group starts, in one line naming the option (2.6 has no
    fully_shard(ignored_params), 2.8-2.9 cannot load the optimizer state back: both checked for real). The config
    itself stays valid, as export rebuilds models from FSDP runs' configs."""
    from vlmo_fast.train import distributed

    if not distributed.torch_older_than(2, 10):
        assert distributed.fsdp2_unavailable() is None
    for version, older in (("2.9.1+cu128", True), ("2.6.0", True), ("2.10.0", False), ("3.0.0a0+git", False)):
        monkeypatch.setattr(torch, "__version__", version)
        assert distributed.torch_older_than(2, 10) is older
        assert (distributed.fsdp2_unavailable() is not None) is older
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    from vlmo_fast.train import loop

    monkeypatch.setattr(loop, "init_distributed", lambda *a: pytest.fail("a process group was started"))
    cfg = TrainConfig(fsdp=True, out_dir=str(tmp_path / "run"), max_steps=1, device="cpu")
    assert TrainConfig.from_dict(cfg.to_dict()).fsdp
    expected = r"fsdp: FSDP2 needs torch >= 2\.10 .*; this is torch 2\.9\.1\+cu128"
    with pytest.raises(ValueError, match=expected):
        train(cfg)
    argv = ["pretrain", "--fsdp", "--out-dir", str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu"]
    code, _, err = exit_code(lambda: cli.main(argv), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and re.search(expected, lines[0]), err


def test_warmup_longer_than_the_run_warns():
    """A preset's warmup kept in a shortened smoke run is legitimate, but the peak learning rate is never reached."""
    with pytest.warns(UserWarning, match=r"warmup_steps \(150\) exceeds max_steps \(100\)"):
        TrainConfig(max_steps=100, warmup_steps=150)


def test_good_edge_values_pass():
    assert TrainConfig(keep_last=0).keep_last == 0  # 0 keeps every checkpoint (state.save_training_checkpoint)
    assert TrainConfig(max_steps=100, warmup_steps=100).warmup_steps == 100
    assert TrainConfig(device="cuda:1").device == "cuda:1"  # the machine is checked by the commands, not here
    cfg = TrainConfig(learning_rate=1, lr_mult=20, tasks="mlm, itc")
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float) and cfg.tasks == ["mlm", "itc"]


def test_warmup_parse_error_is_readable(capsys):
    parser = build_parser("vlmo-fast pretrain", "test")
    code, _, err = exit_code(lambda: parser.parse_args(["--warmup-steps", "abc"]), capsys)
    assert code == 2 and "_warmup" not in err
    assert "argument --warmup-steps: expected an int (steps) or a float (a fraction of max_steps), got 'abc'" in err
    code, _, err = exit_code(lambda: parser.parse_args(["--max-steps", "x"]), capsys)
    assert code == 2 and "parse" not in err and "expected an int or none, got 'x'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_says_so(capsys):
    code, _, err = exit_code(lambda: cli.main(["pretrain", "--device", "cuda"]), capsys)
    assert code == 2 and "CUDA is not available" in err and "Traceback" not in err


def test_toml_values_are_type_checked_and_may_name_a_preset(tmp_path, capsys):
    parser = build_parser("vlmo-fast pretrain", "test")
    toml = tmp_path / "cfg.toml"
    toml.write_text('[train]\nmax_steps = "two"\n')
    with pytest.raises(ValueError, match="max_steps: expected int, got str 'two'"):
        config_from_args(parser.parse_args(["--config", str(toml)]))
    toml.write_text('[train]\npreset = "task_mlm_itm_itc_base"\nmax_steps = 7\nwarmup_steps = 0.1\n'
                    'learning_rate = 1\n')
    cfg = config_from_args(parser.parse_args(["--config", str(toml), "--batch-size", "64"]))
    assert cfg.arch == "vlmo_base_patch16" and cfg.datasets == ["coco", "vg", "sbu", "gcc"]  # the preset
    assert cfg.max_steps == 7 and cfg.learning_rate == 1.0 and cfg.batch_size == 64  # < the file < the flags
    cfg = config_from_args(parser.parse_args(["--config", str(toml), "--preset", "task_mlm_itm_itc_large"]))
    assert cfg.arch == "vlmo_large_patch16" and cfg.max_steps == 7  # --preset replaces the file's preset
    toml.write_text('preset = "no_such_preset"\n')
    with pytest.raises(ValueError, match="unknown preset 'no_such_preset'"):
        config_from_args(parser.parse_args(["--config", str(toml)]))
    toml.write_text('preset = "task_textmlm_base"\n[train]\nmax_steps = 2\n')  # the preset would be ignored
    with pytest.raises(ValueError, match=r"either at the top level or in a \[train\] table.*outside \[train\]: preset"):
        config_from_args(parser.parse_args(["--config", str(toml)]))
    toml.write_text('[train]\npreset = "task_textmlm_base"\nmax_steps = 3000\n')
    cfg = config_from_args(parser.parse_args(["--config", str(toml)]))
    assert cfg.tasks == ["textmlm"] and cfg.max_steps == 3000


# ---- 9. configuration errors: one line, exit status 2 -------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--max-steps", "-1"], "vlmo-fast pretrain: error: max_steps must be >= 1, got -1"),
    (["pretrain", "--config", "/nonexistent/cfg.toml"], "vlmo-fast pretrain: error: config file not found: "
                                                        "/nonexistent/cfg.toml"),
    (["finetune", "irtr", "--load-path", "/nonexistent/start.pt"], "vlmo-fast finetune irtr: error: --load-path: no "
                                                                   "such file: /nonexistent/start.pt"),
])
def test_configuration_errors_are_one_line(capsys, argv, message):
    code, _, err = exit_code(lambda: cli.main(argv), capsys)
    assert code == 2 and err.strip().splitlines() == [message]


@pytest.mark.parametrize("kw,match", [
    (dict(tasks=["vqa"], datasets=["nlvr2"]), "datasets: task vqa trains on the vqa dataset only, got nlvr2"),
    (dict(tasks=["vqa"], datasets=["vqa", "coco"]), "task vqa trains on the vqa dataset only"),
    (dict(tasks=["nlvr2"], datasets=["vqa"]), "task nlvr2 trains on the nlvr2 dataset only"),
    (dict(tasks=["irtr"], datasets=["coco", "vqa"]), "datasets: vqa is task data .* not captions for irtr"),
])
def test_a_task_on_another_tasks_data_is_refused(tmp_path, kw, match):
    """It failed at the first step with a KeyError, or (retrieval on VQA questions) trained silently: refused by
    the commands' checks and by train() itself, before any work."""
    cfg = TrainConfig(out_dir=str(tmp_path), device="cpu", **kw)
    from vlmo_fast.train.config import check_environment

    for run in (check_environment, train):
        with pytest.raises(ValueError, match=match):
            run(cfg)
    assert not os.listdir(tmp_path)


def test_outputs_and_backends_that_cannot_work_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """An --out-dir that is a file or empty, an explicit backend the device cannot run, an evaluate --out or export
    OUT that is a folder or lies under a file, invalid model sizes: tracebacks, after the evaluation for --out."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir.pt").mkdir()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = ["pretrain", "--max-steps", "1", "--device", "cpu"]
    for argv, message in [
        (base + ["--out-dir", str(afile)], f"--out-dir: {afile} exists and is not a folder"),
        (base + ["--out-dir", ""], "--out-dir must name a folder, got an empty string"),
        (base + ["--backend", "triton"], "--backend triton cannot run on device cpu: "),
        (["evaluate", "irtr", "--load-path", "x.pt", "--device", "cpu", "--out", str(tmp_path / "adir.pt")],
         f"--out: {tmp_path / 'adir.pt'} is a folder; expected a file path"),
        (["evaluate", "vqa", "--load-path", "x.pt", "--device", "cpu", "--split", "test", "--data-root",
          str(tmp_path), "--out", str(afile / "sub.json")], f"--out: cannot write {afile / 'sub.json'}: {afile} is not a folder"),
        (["export", "x.pt", str(tmp_path / "adir.pt")], f"OUT: {tmp_path / 'adir.pt'} is a folder; expected a file path"),
    ]:
        code, _, err = exit_code(lambda: cli.main(argv), capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, err)


def test_evaluate_model_sizes_and_out_folders(tmp_path, capsys, synthetic_root, training_checkpoint):
    """--image-size 0 (or a text length past the table) was a traceback; --out in a folder not there yet failed
    with a traceback after the whole evaluation (the VQA submission made its folder: now every output does)."""
    base = ["evaluate", "irtr", "--load-path", training_checkpoint, "--data-root", synthetic_root, "--device", "cpu"]
    code, _, err = exit_code(lambda: cli.main(base + ["--max-text-len", "300"]), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "VLMoConfig.max_text_len (300) must be <= " in err
    # counts below 1 are refused by the option's name, with argparse's usage line
    for flag in ("--image-size", "--max-text-len", "--batch-size"):
        code, _, err = exit_code(lambda: cli.main(base + [flag, "0"]), capsys)
        assert code == 2 and err.strip().splitlines()[-1].endswith(f"argument {flag}: expected an int >= 1, got '0'")
    out = tmp_path / "new" / "folder" / "metrics.json"
    assert cli.main(base + ["--out", str(out)]) == 0
    assert json.loads(out.read_text())["tr_r1"] >= 0


def test_bad_toml_syntax_is_a_configuration_error(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("max_steps = = 3\n")
    code, _, err = exit_code(lambda: cli.main(["pretrain", "--config", str(toml)]), capsys)
    assert code == 2 and f"{toml}: not valid TOML" in err and "Traceback" not in err


def test_config_files_nested_too_deeply_or_not_utf8_are_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    latin = tmp_path / "latin.toml"
    latin.write_bytes("# caf\xe9\nmax_steps = 3\n".encode("latin-1"))
    for path, why in ((deep, "not a config file (tables or arrays nested too deeply"), (latin, "not valid TOML")):
        code, _, err = exit_code(lambda: cli.main(["pretrain", "--config", str(path)]), capsys)
        assert code == 2 and f"{path}: {why}" in err and "Traceback" not in err, err


def test_a_checkpoints_recorded_settings_are_checked_before_a_model_is_built(tmp_path, capsys, synthetic_root,
                                                                             training_checkpoint):
    """The settings a checkpoint records choose the model evaluate and export build: a hostile or damaged file's
    (an image size of 65536 allocates tens of GB; a string) is refused naming the file, never built."""
    import json as json_

    from safetensors.torch import save_file

    weights = vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=32)).state_dict()
    for value, why in ((65536, "recorded image_size 65536 is not a size from 1 to 2048"),
                       ("../../x", "recorded image_size '../../x' is not a size from 1 to 2048")):
        path = tmp_path / "lying.safetensors"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata={
            "vlmo_fast_config": json_.dumps({"model_arch": "vlmo_tiny_patch16", "image_size": value})})
        base = ["irtr", "--load-path", str(path), "--data-root", synthetic_root, "--device", "cpu"]
        code, _, err = exit_code(lambda: ft.evaluate_main(base), capsys)
        assert code == 2 and err.strip().splitlines() == [
            f"vlmo-fast evaluate irtr: error: {path}: its {why} (give --image-size to build the model anyway)"], err
        assert ft.evaluate_main(base + ["--image-size", "32"]) == 0  # an explicit option replaces what is recorded
    # metadata nested past the JSON parser's depth is no recorded config (kept as the string it is)
    save_file({"w": torch.ones(2)}, str(tmp_path / "deep.safetensors"),
              metadata={"vlmo_fast_config": "[" * 100000 + "]" * 100000})
    assert isinstance(read_metadata(tmp_path / "deep.safetensors")["vlmo_fast_config"], str)
    # export rebuilds a training checkpoint's model from its config: a lying one's state dict is exported as saved,
    # with a warning
    state = torch.load(training_checkpoint, weights_only=True)
    state["config"]["image_size"] = 65536
    torch.save(state, tmp_path / "lying.pt")
    with pytest.warns(UserWarning, match="recorded image_size 65536 is not a size"):
        assert cli.main(["export", str(tmp_path / "lying.pt"), str(tmp_path / "out.pt")]) == 0
    _same_tensors(state["model"], read_state_dict(tmp_path / "out.pt"))


# ---- 10. export ---------------------------------------------------------------------------------------------------


def _same_tensors(a, b):
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_export_accepts_model_files(tmp_path, capsys):
    model = vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=32))
    src = tmp_path / "model.safetensors"
    save_checkpoint(model, src)
    assert cli.main(["export", str(src), str(tmp_path / "model.pt")]) == 0
    assert "from a model file" in capsys.readouterr().out
    _same_tensors(read_state_dict(src), read_state_dict(tmp_path / "model.pt"))
    assert cli.main(["export", str(tmp_path / "model.pt"), str(tmp_path / "again.safetensors")]) == 0
    _same_tensors(read_state_dict(src), read_state_dict(tmp_path / "again.safetensors"))
    assert cli.main(["export", str(src), str(tmp_path / "copy.safetensors")]) == 0
    assert read_metadata(tmp_path / "copy.safetensors")["vlmo_fast_config"]["image_size"] == 32  # metadata kept
    # weights beside their config (no optimizer, step, ...) are a model file, as evaluate and --load-path read them
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, tmp_path / "with_config.pt")
    assert cli.main(["export", str(tmp_path / "with_config.pt"), str(tmp_path / "plain.pt")]) == 0
    assert "from a model file" in capsys.readouterr().out
    _same_tensors(model.state_dict(), read_state_dict(tmp_path / "plain.pt"))
    state, recorded, training = ft.read_checkpoint(str(tmp_path / "with_config.pt"))
    assert not training and recorded == {"arch": "vlmo_tiny_patch16", "image_size": 32, "max_text_len": 12}


def test_export_of_a_training_checkpoint(tmp_path, capsys, training_checkpoint):
    out = tmp_path / "exported.pth"
    assert cli.main(["export", training_checkpoint, str(out)]) == 0
    assert "from a training checkpoint" in capsys.readouterr().out
    _same_tensors(torch.load(training_checkpoint, weights_only=True)["model"],
                  {k: v for k, v in read_state_dict(out).items() if "relative_position_index" not in k})
    # the recorded run's training-only notices (here: warmup beyond max_steps) are not the export's to give
    state = torch.load(training_checkpoint, weights_only=True)
    state["config"]["warmup_steps"] = 300
    torch.save(state, tmp_path / "long_warmup.pt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["export", str(tmp_path / "long_warmup.pt"), str(tmp_path / "quiet.pt")]) == 0


def test_export_refuses_bad_names_and_has_help(tmp_path, capsys):
    code, _, err = exit_code(lambda: cli.main(["export", "in.pt", str(tmp_path / "out.bin")]), capsys)
    assert code == 2 and "OUT must end in .pt, .pth, .safetensors" in err
    code, _, err = exit_code(lambda: cli.main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "o.pt")]),
                             capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"vlmo-fast export: error: checkpoint file not found: {tmp_path / 'missing.pt'}"]
    code, out, _ = exit_code(lambda: cli.main(["export", "--help"]), capsys)
    assert code == 0 and "training checkpoint" in out and "model-only file" in flat(out)


# ---- 11. top-level and task-level help ----------------------------------------------------------------------------


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vlmo_fast", "export", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "usage: vlmo-fast export" in done.stdout, done.stderr


def test_a_folder_given_as_a_checkpoint_is_named_as_one(tmp_path, capsys):
    (tmp_path / "ds.ckpt").mkdir()
    code, _, err = exit_code(lambda: cli.main(["export", str(tmp_path / "ds.ckpt"), str(tmp_path / "o.pt")]), capsys)
    assert code == 2 and "ds.ckpt is a folder, not a file" in err
    code, _, err = exit_code(lambda: cli.main(["pretrain", "--load-path", str(tmp_path / "ds.ckpt")]), capsys)
    assert code == 2 and f"--load-path: {tmp_path / 'ds.ckpt'} is a folder; expected a checkpoint file" in err


def test_top_level_help_lists_the_commands(capsys):
    code, out, _ = exit_code(lambda: cli.main(["--help"]), capsys)
    assert code == 0 and "``" not in out and "args" not in out and "examples:" in out
    lines = out.splitlines()
    for name, _ in cli.COMMANDS:
        assert any(line.split()[:1] == [name] and len(line.split()) > 3 for line in lines), name
    code, _, err = exit_code(lambda: cli.main(["train"]), capsys)
    assert code == 2 and "invalid choice" in err


def test_finetune_and_evaluate_help_list_the_tasks(capsys):
    for command in ("finetune", "evaluate"):
        code, out, _ = exit_code(lambda: cli.main([command, "--help"]), capsys)
        assert code == 0 and f"usage: vlmo-fast {command} TASK [options]" in out
        for task in ft.TASKS:
            assert f"  {task} " in out
    code, _, err = exit_code(lambda: ft.finetune_main([]), capsys)
    assert code == 2 and "TASK" in err


def test_demo_help_matches_its_defaults(capsys):
    code, out, _ = exit_code(lambda: demo.main(["--help"], prog="vlmo-fast demo"), capsys)
    assert code == 0 and "usage: vlmo-fast demo" in out and "batch size (default: 3)" in out
    assert "[--batch 3]" in out and "[--batch 2]" not in out


def test_evaluate_refuses_a_negative_rerank_k_before_any_work(capsys, tmp_path):
    argv = ["irtr", "--load-path", str(tmp_path / "none.pt"), "--rerank-k", "-3"]
    code, _, err = exit_code(lambda: ft.evaluate_main(argv), capsys)
    assert code == 2 and "--rerank-k: expected an int >= 0, got '-3'" in err


def test_command_warnings_print_as_one_line():
    import warnings

    from vlmo_fast.train.config import one_line_warnings

    before = warnings.formatwarning
    with one_line_warnings():
        text = warnings.formatwarning("warmup_steps (2500) exceeds max_steps (2)", UserWarning, "/x/config.py", 124,
                                      "return cls(**dict(values))")
    assert text == "UserWarning: warmup_steps (2500) exceeds max_steps (2)\n"
    assert warnings.formatwarning is before


# ---- 10. exit status: a run a signal stopped is not a success -----------------------------------------------------


def test_exit_status_of_a_stopped_run(tmp_path, synthetic_root, monkeypatch, capsys):
    """0 at max_steps, 128 + N after signal N stopped the run (it saves first; `pretrain && export` must not go on
    as if it had finished: the command returned 0), 1 after repeated non-finite losses."""
    import signal

    from vlmo_fast import objectives
    from vlmo_fast.train import exit_status

    assert exit_status({"stop_reason": "max_steps"}) == 0
    assert exit_status({"stop_reason": "signal 15"}) == 143 and exit_status({"stop_reason": "signal 2"}) == 130
    assert exit_status({"stop_reason": "signal on another rank"}) == 1
    assert exit_status({"stop_reason": "5 non-finite losses in a row"}) == 1
    real, calls = objectives.total_loss, []

    def interrupted(out):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(out)

    monkeypatch.setattr(objectives, "total_loss", interrupted)
    argv = ["--data-root", synthetic_root, "--arch", "vlmo_tiny_patch16", "--image-size", "32", "--max-text-len",
            "12", "--per-device-batch-size", "8", "--batch-size", "8", "--num-workers", "0", "--tensorboard",
            "false", "--device", "cpu", "--max-steps", "4", "--final-eval", "false"]
    assert cli.main(["pretrain", "--out-dir", str(tmp_path / "pre")] + argv) == 143
    assert os.path.isfile(tmp_path / "pre" / "checkpoints" / "step_00000002.pt")
    calls.clear()
    assert ft.finetune_main(["irtr", "--out-dir", str(tmp_path / "ft")] + argv) == 143
    monkeypatch.setattr(objectives, "total_loss", real)
    assert cli.main(["pretrain", "--out-dir", str(tmp_path / "pre")] + argv) == 0  # resumed to the end
    assert "max_epochs" not in capsys.readouterr().out
    assert cli.main(["pretrain", "--out-dir", str(tmp_path / "pre2"), "--max-epochs", "3", "--max-steps", "1"]
                    + argv[:-4] + ["--final-eval", "false"]) == 0
    assert "max_epochs 3 is not used: max_steps 1 ends the run (--max-steps none runs by epochs)" \
        in capsys.readouterr().out


@pytest.mark.parametrize("command", ["evaluate", "pretrain", "python -m vlmo_fast.train"])
def test_ctrl_c_ends_a_command_with_one_line_and_sigint(monkeypatch, capsys, command):
    """Ctrl-C in evaluate (or in a training run before its own signal handling, which saves and exits 130) printed a
    traceback of wherever the command was, e.g. 40 lines ending inside the model's forward. Now one line; the
    KeyboardInterrupt goes on (Python then ends the process by SIGINT, which stops a shell loop of commands), with
    the traceback hook quiet for it alone."""
    import sys

    from vlmo_fast import train as train_package

    def interrupted(*_args, **_kw):
        raise KeyboardInterrupt
    if command == "evaluate":
        monkeypatch.setattr(ft, "evaluate_main", interrupted)
        run = lambda: cli.main(["evaluate", "irtr"])  # noqa: E731
    else:
        monkeypatch.setattr(train_package, "train", interrupted)
        run = (lambda: cli.main(["pretrain"])) if command == "pretrain" else (  # noqa: E731
            lambda: train_package.main([], prog="python -m vlmo_fast.train"))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # (restored after the test)
    raised = None
    try:
        run()
    except (KeyboardInterrupt, SystemExit) as exc:  # (a KeyboardInterrupt let out would stop pytest itself)
        raised = exc
    out, err = capsys.readouterr()
    prog = {"evaluate": "vlmo-fast", "pretrain": "vlmo-fast pretrain"}.get(command, command)
    assert isinstance(raised, KeyboardInterrupt) and err.strip().splitlines() == [f"{prog}: interrupted"]
    assert "Traceback" not in out
    sys.excepthook(KeyboardInterrupt, raised, None)  # what Python calls with it at the top: prints nothing
    assert capsys.readouterr().err == ""
    # any other error still reaches the hook that was there before
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, *_: seen.append(kind))
    for _ in range(3):  # (a caller that catches the interrupt and goes on: one quiet hook, not one per catch)
        with pytest.raises(KeyboardInterrupt):
            with one_line_interrupt("x"):
                raise KeyboardInterrupt
    wrapped = sys.excepthook.__closure__[0].cell_contents  # the hook the quiet one passes other errors to
    assert getattr(sys.excepthook, "_vlmo_quiet_interrupt", False) and not hasattr(wrapped, "_vlmo_quiet_interrupt")
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    sys.excepthook(ValueError, ValueError("shown"), None)
    assert seen == [ValueError]
