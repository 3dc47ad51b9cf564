"""vlmo_fast: a kernel-accelerated engine for VLMo, the Multiway Transformer vision-language model."""

from .config import LOSS_NAMES, PRESETS, VLMoConfig, loss_names, preset
from ._native import build_info
from .accelerate import accelerate, deaccelerate, from_official
from .checkpoint import load_checkpoint, save_checkpoint
from .model import VLMo

__version__ = "0.1.0"

__all__ = [
    "LOSS_NAMES",
    "PRESETS",
    "VLMo",
    "VLMoConfig",
    "accelerate",
    "build_info",
    "deaccelerate",
    "from_official",
    "load_checkpoint",
    "loss_names",
    "preset",
    "save_checkpoint",
    "__version__",
]
