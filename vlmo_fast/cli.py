"""The ``vlmo-fast`` command.

    vlmo-fast info                  what this installation can run (native kernels, CUDA archs, Triton, device)
    vlmo-fast demo [...]            build a model, save/reload a checkpoint, run every forward path vs the official math
    vlmo-fast pretrain [...]        pretrain (MLM + ITC + ITM; or the text-only stage); the built-in data by default
    vlmo-fast finetune TASK [...]   fine-tune for irtr, vqa or nlvr2 (official recipes as --preset)
    vlmo-fast evaluate TASK [...]   retrieval recall, VQA score / submission, NLVR2 accuracy
    vlmo-fast export CKPT OUT       a training checkpoint's model in the official layout (.pt) or as .safetensors
Each command explains its options with --help.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vlmo-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["info", "demo", "pretrain", "finetune", "evaluate", "export"],
                        help="what to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command (see <command> --help)")
    ns = parser.parse_args(argv[:1])
    rest = argv[1:]
    if ns.command == "info":
        from ._native import build_info

        print(json.dumps(build_info(), indent=2))
        return 0
    if ns.command == "pretrain":
        from .train import main as train_main

        return train_main(rest)
    if ns.command == "finetune":
        from .train.finetune import finetune_main

        return finetune_main(rest)
    if ns.command == "evaluate":
        from .train.finetune import evaluate_main

        return evaluate_main(rest)
    if ns.command == "export":
        if len(rest) != 2:
            raise SystemExit("usage: vlmo-fast export TRAINING_CHECKPOINT OUT(.pt|.safetensors)")
        from .train import export

        export(rest[0], rest[1])
        print(f"wrote {rest[1]}")
        return 0
    from . import demo

    return demo.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
