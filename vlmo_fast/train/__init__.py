"""Pretraining and fine-tuning: ``vlmo-fast pretrain`` / ``python -m vlmo_fast.train``.

    from vlmo_fast.train import TrainConfig, train
    summary = train(TrainConfig(arch="vlmo_tiny_patch16", max_steps=200))
"""

from .config import PRESETS_TRAIN, TrainConfig
from .loop import exit_status, export, train


def main(argv=None, prog: str = "vlmo-fast pretrain") -> int:
    """``vlmo-fast pretrain`` and ``python -m vlmo_fast.train``: configuration errors end in one line (exit 2)."""
    import sys

    from .config import (FINETUNE_TASKS, build_parser, command_config, one_line_interrupt, one_line_warnings,
                         presets_for, user_errors)

    def check(cfg, args) -> None:
        tasks = [t for t in cfg.tasks if t in FINETUNE_TASKS]
        if tasks:  # the fine-tuning command has the task's defaults (datasets, out_dir, head learning rate)
            raise ValueError(f"tasks {','.join(tasks)}: fine-tuning tasks; run `vlmo-fast finetune {tasks[0]}`")

    presets = presets_for(None)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog, "Pretrain VLMo: MLM + ITC + ITM on image-text data, or the text-only MLM stage "
                          "(--preset task_textmlm_base). With no options it trains the tiny model on the built-in "
                          "synthetic dataset on this machine.", presets=presets, argv=argv)
    with one_line_warnings(), one_line_interrupt(prog):
        cfg = command_config(parser, argv, presets=presets, check=check)
        with user_errors(parser, marked_only=True):  # unreadable data or checkpoints: one line, not a traceback
            summary = train(cfg)
    return exit_status(summary)


__all__ = ["PRESETS_TRAIN", "TrainConfig", "export", "main", "train"]
