"""The VLMo model: config-driven modules with the official parameter names."""

from .multiway import Attention, Block, Mlp, MultiWayTransformer
from .vlmo import VLMo, l2_normalize

__all__ = ["Attention", "Block", "Mlp", "MultiWayTransformer", "VLMo", "l2_normalize"]
