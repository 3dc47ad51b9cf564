"""Pretraining and fine-tuning: ``vlmo-fast pretrain`` / ``python -m vlmo_fast.train``.

    from vlmo_fast.train import TrainConfig, train
    summary = train(TrainConfig(arch="vlmo_tiny_patch16", max_steps=200))
"""

from .config import PRESETS_TRAIN, TrainConfig
from .loop import export, train


def main(argv=None, prog: str = "vlmo-fast pretrain") -> int:
    from .config import build_parser, config_from_args

    parser = build_parser(prog, "Pretrain (MLM + ITC + ITM, or the text-only MLM stage) or fine-tune VLMo. With no "
                                "options it trains the tiny model on the built-in synthetic dataset on this machine.")
    cfg = config_from_args(parser.parse_args(argv))
    summary = train(cfg)
    return 0 if summary["stop_reason"] in ("max_steps",) or summary["stop_reason"].startswith("signal") else 1


__all__ = ["PRESETS_TRAIN", "TrainConfig", "export", "main", "train"]
