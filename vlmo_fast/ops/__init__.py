"""The seam between the model and the kernels.

Every fused op is a function here with a PyTorch implementation; kernel backends plug in through
``vlmo_fast.ops.backend`` and are chosen by ``backend="auto" | "torch" | "triton" | "cuda"``.
"""

from .attention import rel_pos_attention
from .backend import BACKENDS, available
from .droppath import drop_path
from .ffn import FFNExpert, multiway_ffn
from .layernorm import multiway_layernorm
from .norm_linear import norm_linear
from .softmax import masked_softmax
from .relpos_gather import rel_pos_bias_gather
from .residual import scaled_residual

__all__ = [
    "BACKENDS",
    "FFNExpert",
    "available",
    "drop_path",
    "masked_softmax",
    "multiway_ffn",
    "multiway_layernorm",
    "norm_linear",
    "rel_pos_attention",
    "rel_pos_bias_gather",
    "scaled_residual",
]

from . import triton_attention as _triton_attention  # noqa: E402,F401  (registers the Triton backend)
from . import triton_ffn as _triton_ffn  # noqa: E402,F401

from . import native as _native_ops  # noqa: E402,F401  (registers the native backend)
