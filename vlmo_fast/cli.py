"""The vlmo-fast command: one subcommand per job (see COMMANDS); each explains its options with --help.

The subcommands' parsers live with their code (train/config.py, train/finetune.py, demo.py, data/prepare.py); this
module only dispatches, plus the small pretrain, info and export front ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

COMMANDS = (
    ("info", "what this installation can run (native kernels, CUDA archs, Triton, device)"),
    ("demo", "build a model, save/reload a checkpoint, check every forward path against the official math"),
    ("pretrain", "pretrain (MLM + ITC + ITM, or the text-only MLM stage); the built-in synthetic data by default"),
    ("finetune", "fine-tune for a task: irtr, vqa or nlvr2 (official recipes as --preset)"),
    ("evaluate", "retrieval recall, VQA score / submission, NLVR2 accuracy of a checkpoint"),
    ("export", "a checkpoint's model in the official layout (.pt) or as .safetensors"),
    ("prepare", "raw COCO, Flickr30K, VG, NLVR2, VQAv2, plain text or web captions -> the official arrow files"),
)
EXAMPLES = """examples:
  vlmo-fast pretrain                  # the tiny model, 300 steps on the built-in synthetic set, on this machine
  vlmo-fast finetune irtr --load-path runs/vlmo_fast/checkpoints/step_00000300.pt
  vlmo-fast evaluate irtr --load-path runs/vlmo_fast_irtr/checkpoints/step_00000300.pt
  vlmo-fast export runs/vlmo_fast_irtr/checkpoints/step_00000300.pt irtr.safetensors
  vlmo-fast prepare coco /data/coco /data/arrows   # train2014/, val2014/, karpathy/dataset_coco.json

Each command explains its options: vlmo-fast COMMAND --help"""
EXPORT_SUFFIXES = (".pt", ".pth", ".safetensors")


def main(argv: Optional[List[str]] = None) -> int:
    from .train.config import one_line_interrupt, one_line_warnings

    with one_line_warnings(), one_line_interrupt("vlmo-fast"):
        return _main(list(sys.argv[1:] if argv is None else argv))


def _main(argv: List[str]) -> int:
    from .train.config import Parser  # prints once per machine under torchrun

    parser = Parser(
        prog="vlmo-fast", usage="vlmo-fast COMMAND [options]", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="VLMo vision-language models: train, fine-tune, evaluate, export.\n\ncommands:\n"
                    + "".join(f"  {name:<10}{text}\n" for name, text in COMMANDS))
    parser.add_argument("command", metavar="COMMAND", choices=[name for name, _ in COMMANDS],
                        help="one of the commands above")
    parser.add_argument("--version", action=_Version,
                        help="print the versions of vlmo_fast, torch and Triton, and exit")
    command = parser.parse_args(argv[:1]).command
    rest = argv[1:]
    if command == "info":
        return _info(rest)
    if command == "pretrain":
        return _pretrain(rest)
    if command == "finetune":
        from .train.finetune import finetune_main

        return finetune_main(rest)
    if command == "evaluate":
        from .train.finetune import evaluate_main

        return evaluate_main(rest)
    if command == "export":
        return _export(rest)
    if command == "prepare":
        from .data.prepare import prepare_main

        return prepare_main(rest)
    from . import demo

    return demo.main(rest, prog="vlmo-fast demo")


class _Version(argparse.Action):
    """--version: vlmo_fast's, torch's and Triton's, as their packages record them (nothing imported, no device
    touched); printed once per machine under torchrun, as help is."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(version_line() + "\n", sys.stdout)
        parser.exit()


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from . import __version__

    try:
        triton = version("triton")
    except PackageNotFoundError:
        triton = "not installed"
    return f"vlmo-fast {__version__} (torch {torch.__version__}, triton {triton})"


def _info(argv: List[str]) -> int:
    argparse.ArgumentParser(prog="vlmo-fast info", description="What this installation can run, as JSON: native "
                            "kernels, CUDA architectures, Triton, the device.").parse_args(argv)
    from . import __version__
    from ._native import build_info

    print(json.dumps({"vlmo_fast": __version__, **build_info()}, indent=2))
    return 0


def _pretrain(argv: List[str]) -> int:
    from .train import main

    return main(argv)


def _export(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmo-fast export", description="Write the model of a checkpoint in the official state-dict layout "
        "(.pt or .pth: a plain torch.save dict of tensors) or as .safetensors. A training checkpoint "
        "(OUT_DIR/checkpoints/step_*.pt) gives its model, rebuilt from its recorded config; a model-only file "
        "(official or vlmo_fast, any of these formats) is converted as it is.")
    parser.add_argument("checkpoint", help="training checkpoint or model file")
    parser.add_argument("out", help="output file, by its suffix: " + ", ".join(EXPORT_SUFFIXES))
    args = parser.parse_args(argv)
    if not args.out.endswith(EXPORT_SUFFIXES):
        parser.error(f"OUT must end in {', '.join(EXPORT_SUFFIXES)} (the suffix picks the format), got {args.out}")
    from .fileio import check_writable_file
    from .train.config import user_errors

    with user_errors(parser):  # includes CheckpointError: an unreadable or odd file
        check_writable_file(args.out, "OUT")
        kind = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {args.out} (from a {kind})")
    return 0


def export_checkpoint(path: str, out: str) -> str:
    """Export ``path`` to ``out``; returns what it was ("training checkpoint" or "model file"). A training checkpoint
    goes through ``vlmo_fast.train.export`` (the model rebuilt from its config, with the index tensors the official
    loader expects); a model file's tensors are re-saved unchanged, with its safetensors metadata if any."""
    from .checkpoint import is_safetensors, read_metadata, save_checkpoint
    from .train.finetune import read_checkpoint

    if os.path.abspath(path) == os.path.abspath(out):
        raise ValueError(f"OUT is the checkpoint itself: {out}")
    state, _, training = read_checkpoint(path)
    if training:
        from .train import export

        del state
        export(path, out)
        return "training checkpoint"
    meta = read_metadata(path) if is_safetensors(path) and out.endswith(".safetensors") else None
    save_checkpoint(state, out, metadata=meta or None)
    return "model file"


if __name__ == "__main__":
    raise SystemExit(main())
