"""Model configuration: one dataclass, the official presets (spec §1.1) and the task switches (spec §1.3)."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np

# The task switches of the official `loss_names` dictionary. Values are on/off switches (spec Q13): > 0 means on.
LOSS_NAMES = ("itm", "itc", "mlm", "textmlm", "vqa", "nlvr2", "irtr")


def check_itm_has_itc(tasks, name: str = "tasks") -> None:
    """ITM samples its hard negatives from the ITC logits (the official code requires itc with itm)."""
    if "itm" in tasks and "itc" not in tasks:
        raise ValueError(f"{name}: itm samples its hard negatives from the ITC logits: enable itc with itm")


def loss_names(**on: int) -> Dict[str, int]:
    """A full `loss_names` dictionary with every task off except the ones given, e.g. ``loss_names(itm=1, itc=1)``;
    values are switches (any number > 0 is on, stored as 1)."""
    unknown = set(on) - set(LOSS_NAMES)
    if unknown:
        raise ValueError(f"loss_names: unknown task(s) {sorted(unknown)}; expected a subset of {list(LOSS_NAMES)}")
    for task, value in on.items():
        # bool and numpy's numbers are Real (True = on); numpy's bool_ is not, but means the same
        if not isinstance(value, (numbers.Real, np.bool_)) or value != value:
            raise TypeError(f"loss_names[{task!r}] must be a number (0 = off, > 0 = on), got {value!r}")
    # on/off switches only, as official (spec Q13: "> 0" turns a task on; a weight such as 0.5 is on, not 0)
    return {name: int(on.get(name, 0) > 0) for name in LOSS_NAMES}


PRETRAIN_TASKS = loss_names(itm=1, itc=1, mlm=1)


@dataclass
class VLMoConfig:
    """Everything that decides the shape of a VLMo model.

    The field names follow the official code where it has one (`image_size`, `max_text_len`,
    `max_text_len_of_initckpt`, `drop_path_rate`, `loss_names`, `vqav2_label_size`, `vlffn_start_layer_index`).
    """

    model_arch: str = "vlmo_base_patch16"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vlffn_start_layer_index: int = 10
    layer_scale_init_values: Optional[float] = 0.1  # None: no gamma_1/gamma_2 parameters (base_plus)
    use_rel_pos: bool = True  # the single relative-position table of spec §2
    use_abs_pos_emb: bool = False  # transformer.pos_embed and absolute text positions (base_plus)
    patch_size: int = 16
    in_chans: int = 3
    norm_eps: float = 1e-6
    image_size: int = 224
    max_text_len: int = 40
    max_text_len_of_initckpt: int = 196
    vocab_size: int = 30522
    drop_path_rate: float = 0.1
    vqav2_label_size: int = 3129
    loss_names: Dict[str, int] = field(default_factory=lambda: dict(PRETRAIN_TASKS))

    def __post_init__(self) -> None:
        self.loss_names = loss_names(**dict(self.loss_names))
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "image_size", "max_text_len", "vocab_size",
                     "in_chans", "vqav2_label_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"VLMoConfig.{name} must be a positive int, got {value!r}")
        value = self.max_text_len_of_initckpt
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise ValueError(f"VLMoConfig.max_text_len_of_initckpt must be an int >= 2, got {value!r}")
        for name in ("mlp_ratio", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"VLMoConfig.{name} must be a positive number, got {value!r}")
        if self.mlp_hidden_dim < 1:
            raise ValueError(f"VLMoConfig.mlp_ratio ({self.mlp_ratio}) gives an MLP of {self.mlp_hidden_dim} units")
        value = self.layer_scale_init_values
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool) or value != value):
            raise ValueError(f"VLMoConfig.layer_scale_init_values must be a number or None, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"VLMoConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VLMoConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if not 0 <= self.vlffn_start_layer_index <= self.depth:
            raise ValueError(
                f"VLMoConfig.vlffn_start_layer_index must be in [0, depth={self.depth}], got {self.vlffn_start_layer_index}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"VLMoConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.use_rel_pos and self.max_text_len > self.max_text_len_of_initckpt:
            # The text distance buckets cover |j - i| <= L0 - 2 and the index is not clipped (spec Q5).
            raise ValueError(
                f"VLMoConfig.max_text_len ({self.max_text_len}) must be <= max_text_len_of_initckpt "
                f"({self.max_text_len_of_initckpt}) with the relative position table"
            )

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def window_size(self) -> int:
        """W: patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.window_size**2

    @property
    def num_image_tokens(self) -> int:
        """1 + P: the image CLS token followed by the patches."""
        return self.num_patches + 1

    @property
    def vlffn_start(self) -> int:
        """F as the backbone sees it: the text-only MLM stage has no VL-FFN at all (spec §1.1)."""
        return self.depth if self.loss_names["textmlm"] > 0 else self.vlffn_start_layer_index

    def task_on(self, name: str) -> bool:
        return self.loss_names[name] > 0

    def replace(self, **changes: Any) -> "VLMoConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VLMoConfig":
        return dataclass_from_dict(cls, values, "VLMoConfig.from_dict: unknown field(s)")


def dataclass_from_dict(cls, values: Mapping[str, Any], what: str):
    """``cls(**values)`` for a config dataclass, refusing unknown keys with ``what`` and their names."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{what} {sorted(unknown)}")
    return cls(**dict(values))


_ARCHS: Dict[str, Dict[str, Any]] = {
    "vlmo_base_patch16": dict(
        embed_dim=768, depth=12, num_heads=12, vlffn_start_layer_index=10, layer_scale_init_values=0.1,
        use_rel_pos=True, use_abs_pos_emb=False,
    ),
    "vlmo_large_patch16": dict(
        embed_dim=1024, depth=24, num_heads=16, vlffn_start_layer_index=21, layer_scale_init_values=0.1,
        use_rel_pos=True, use_abs_pos_emb=False,
    ),
    "vlmo_base_plus_patch16": dict(
        embed_dim=544, depth=24, num_heads=16, vlffn_start_layer_index=21, layer_scale_init_values=None,
        use_rel_pos=False, use_abs_pos_emb=True,
    ),
    # Not an official model: a few-layer model with the base structure for tests, demos and CPU smoke runs.
    "vlmo_tiny_patch16": dict(
        embed_dim=64, depth=4, num_heads=4, vlffn_start_layer_index=2, layer_scale_init_values=0.1,
        use_rel_pos=True, use_abs_pos_emb=False, image_size=64, max_text_len=12,
    ),
}

PRESETS = tuple(_ARCHS)


def preset(name: str, **overrides: Any) -> VLMoConfig:
    """The config of a named architecture, with any field overridden (e.g. ``image_size=384``)."""
    if name not in _ARCHS:
        raise ValueError(f"preset: unknown architecture {name!r}; expected one of {list(_ARCHS)}")
    values = dict(_ARCHS[name], model_arch=name)
    values.update(overrides)
    return VLMoConfig(**values)
