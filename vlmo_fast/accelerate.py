"""Drop-in acceleration of existing official VLMo modules, in place.

    report = vlmo_fast.accelerate(pl_module)       # the official LightningModule, its .transformer, or one Block
    ...                                             # train / evaluate exactly as before, faster
    vlmo_fast.deaccelerate(pl_module)               # back to the original behaviour

Modules are recognised by structure (attribute names and shapes of spec §1.2-1.3), never by importing the official
package. For every recognised ``Block`` the instance's ``forward`` is replaced by vlmo_fast's fused block
(``vlmo_fast.model.multiway.block_forward``: fused rel-pos attention, LayerScale residual and Multiway FFN) bound to the
same submodules, so the Parameter objects, their order and the state-dict keys do not change: optimizer state, DDP
buckets and hooks stay valid. The official forward paths pass a materialised (H, N, N) bias to every block; the
dense-bias form of the attention kernel takes it. With ``gather_bias_in_kernel=True`` the top module's
``get_rel_pos_bias`` is also replaced so blocks receive (table slice, index) instead, and the attention op gathers
each layer's bias from the table itself (no (H·L, N, N) tensor per forward; the table's gradient is reduced by the
kernels: see ``vlmo_fast.ops.triton_attention.TABLE_BIAS`` for where the gather runs).

``backend`` is the ops backend the accelerated blocks use ("auto", "torch", "triton" or "cuda"; see
``vlmo_fast.ops``).
"""

from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .model.multiway import block_forward, global_module_hooks, hooked
from .ops._memo import TensorMemo

_MARK = "_vlmo_fast_accelerated"


@dataclass
class TableBias:
    """What an accelerated ``get_rel_pos_bias`` hands to a block instead of a dense (H, N, N) bias."""

    table: torch.Tensor  # (R, H) column slice of relative_position_bias_table
    index: torch.Tensor  # (N, N)

    def dense(self) -> torch.Tensor:
        """The (H, N, N) bias the official get_rel_pos_bias would have given."""
        return self.table.t()[:, self.index.long()]


@dataclass
class AccelerationReport:
    replaced: List[str] = field(default_factory=list)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)  # (module path, reason)
    bias_gather: Optional[str] = None

    def __str__(self) -> str:
        lines = [f"accelerated {len(self.replaced)} block(s)"]
        if self.bias_gather:
            lines.append(f"relative-position bias: {self.bias_gather}")
        for path, why in self.left_alone:
            lines.append(f"left alone: {path or '<root>'}: {why}")
        return "\n".join(lines)


def _dropout_p(m: Any) -> float:
    return float(getattr(m, "p", 0.0)) if isinstance(m, nn.Dropout) else 0.0


def _why_not_block(blk: nn.Module) -> Optional[str]:
    """None when ``blk`` has the official Block structure vlmo_fast can run and nothing now keeps it from the fused
    path (a dropout > 0, forward hooks on submodules), else the reason."""
    return _structural_reason(blk) or _dropout_reason(blk) or _hook_reason(_structure(blk))


def _structural_reason(blk: nn.Module) -> Optional[str]:
    """None when ``blk``'s modules have the official Block structure the fused path reads, else the reason."""
    for name in ("norm1", "attn", "norm2_text", "norm2_imag", "mlp_text", "mlp_imag", "max_text_len", "drop_path"):
        if not hasattr(blk, name):
            return f"not an official Block (no attribute {name!r})"
    attn = blk.attn
    for name in ("qkv", "proj", "num_heads", "scale", "q_bias", "v_bias"):
        if not hasattr(attn, name):
            return f"attn is not an official Attention (no attribute {name!r})"
    if attn.qkv.bias is not None:
        return "attn.qkv has its own bias (the official layout has q_bias/v_bias only)"
    why = _why_not_linear(attn.proj)  # (the official attention reads qkv's weight itself, never calls qkv)
    if why is not None:
        return f"attn.proj {why}"
    for e in _experts(blk):
        mlp, norm = getattr(blk, f"mlp_{e}"), getattr(blk, f"norm2_{e}", None)
        why = _why_not_layer_norm(norm)
        if why is not None:
            return f"norm2_{e} {why}"
        if not all(hasattr(mlp, a) for a in ("fc1", "fc2")):
            return f"mlp_{e} is not an official Mlp"
        for fc in ("fc1", "fc2"):
            why = _why_not_linear(getattr(mlp, fc))
            if why is not None:
                return f"mlp_{e}.{fc} {why}"
        act = getattr(mlp, "act", nn.GELU())
        if not isinstance(act, nn.GELU) or getattr(act, "approximate", "none") != "none":
            kind = f"GELU({act.approximate!r})" if isinstance(act, nn.GELU) else type(act).__name__
            return f"mlp_{e} activation is {kind}, not exact GELU"
    why = _why_not_layer_norm(blk.norm1)
    if why is not None:
        return f"norm1 {why}"
    dp = blk.drop_path
    if not (isinstance(dp, nn.Identity) or hasattr(dp, "drop_prob")):
        return f"drop_path is {type(dp).__name__}, not DropPath or Identity"
    return None


def _experts(blk: nn.Module) -> List[str]:
    return ["text", "imag"] + (["vl"] if getattr(blk, "mlp_vl", None) is not None else [])


def _dropout_reason(blk: nn.Module) -> Optional[str]:
    """A dropout > 0 in the attention or an expert MLP (the fused block has none), checked when accelerating and at
    each call (one turned on later sends the block back to its official forward)."""
    attn = blk.attn
    if _dropout_p(getattr(attn, "attn_drop", None)) > 0:
        return f"attention dropout {attn.attn_drop.p} > 0 is not supported by the fused attention"
    if _dropout_p(getattr(attn, "proj_drop", None)) > 0:
        return f"projection dropout {attn.proj_drop.p} > 0 is not supported"
    for e in _experts(blk):
        if _dropout_p(getattr(getattr(blk, f"mlp_{e}"), "drop", None)) > 0:
            return f"mlp_{e} dropout > 0 is not supported"
    return None


def _hook_reason(structure: List[Tuple[str, nn.Module, type, tuple]]) -> Optional[str]:
    """The fused block reads its submodules' parameters instead of calling them: hooks on them would not run (the
    block's own hooks, on the first entry of its ``_structure``, do run: they are the caller's)."""
    for name, m, _, _ in structure[1:]:
        if hooked(m):
            return f"{name} has forward or backward hooks, which the fused block would not run"
    if global_module_hooks():
        return "global module hooks are set, which the fused block would not run for its submodules"
    return None


def _why_not_linear(m: Any) -> Optional[str]:
    """None for a plain ``nn.Linear`` (the fused kernels read its weight and bias), else why not: a subclass with its
    own forward (e.g. LoRA) would be bypassed."""
    if not isinstance(m, nn.Linear):
        return "is not a Linear"
    if type(m).forward is not nn.Linear.forward:
        return f"is a {type(m).__name__} with its own forward"
    return None


def _why_not_layer_norm(m: Any) -> Optional[str]:
    """None for a plain affine ``nn.LayerNorm`` (its weight and bias are what the fused kernels take), else why not."""
    if not isinstance(m, nn.LayerNorm):
        return "is not a LayerNorm"
    if type(m).forward is not nn.LayerNorm.forward:
        return f"is a {type(m).__name__} with its own forward"
    if m.weight is None or m.bias is None:
        return "has no affine weight and bias"
    return None


def _gamma(g: Any) -> Optional[torch.Tensor]:
    """The official blocks use ``1.0`` (a float) when layer scale is off."""
    return g if isinstance(g, torch.Tensor) else None


_BACKEND = "_vlmo_fast_backend"
_CHECKED = "_vlmo_fast_checked"  # (structure, structural reason) of the block's last structural check


def _structure(blk: nn.Module) -> List[Tuple[str, Optional[nn.Module], type, tuple]]:
    """Per module of the block (itself first): its name, the module, its class and its children. A submodule
    replaced (a LoRA-style Linear injected, an activation swapped), added, deleted or given another class changes
    it, whether or not anything was registered."""
    # (the block itself as None: a reference to it from its own __dict__ would be a reference cycle)
    return [(name, None if m is blk else m, type(m), tuple(m._modules.values())) for name, m in blk.named_modules()]


def _unchanged(structure: List[Tuple[str, Optional[nn.Module], type, tuple]], blk: nn.Module) -> bool:
    for _, m, kind, children in structure:
        m = blk if m is None else m
        if type(m) is not kind or tuple(m._modules.values()) != children:
            return False
    return True


def _changed_since(blk: nn.Module) -> Optional[str]:
    """What would now make the fused block differ from the official forward, though it did not when accelerated:
    a submodule replaced so that the block is no longer one the fused path can run (a LoRA-style Linear, another
    activation), a dropout turned on, or a forward hook on a submodule. The structural verdict is remembered while
    the block's modules stay the same objects of the same classes (compared at each call: a few microseconds);
    dropout and hooks are read at each call, so a block goes back to the fused path when they go. (A changed DropPath
    rate is simply read at each call.)"""
    structure, reason = blk.__dict__[_CHECKED]
    if not _unchanged(structure, blk):
        structure = _structure(blk)
        reason = _structural_reason(blk)
        blk.__dict__[_CHECKED] = (structure, reason)
    return reason or _dropout_reason(blk) or _hook_reason(structure)


def _accelerated_forward(self, x, mask=None, modality_type=None, relative_position_bias=None):
    """The official ``Block.forward`` signature, run by vlmo_fast's fused block (bound to the block: ``_Bound``),
    reading the block's settings at each call."""
    if _changed_since(self) is not None:  # the official forward, with the dense bias it expects
        if isinstance(relative_position_bias, TableBias):
            relative_position_bias = relative_position_bias.dense()
        return type(self).forward(self, x, mask=mask, modality_type=modality_type,
                                  relative_position_bias=relative_position_bias)
    if isinstance(relative_position_bias, TableBias):
        bias = {"bias_table": relative_position_bias.table, "bias_index": relative_position_bias.index}
    elif relative_position_bias is not None:
        bias = {"bias": relative_position_bias}
    else:
        bias = {}
    if mask is not None and (mask.is_floating_point() or mask.is_complex()):
        mask = mask.bool()  # as the official attention does with any mask (nonzero = keep)
    modality = modality_type if modality_type in ("text", "image") else "vl"
    drop_prob = float(getattr(self.drop_path, "drop_prob", 0.0) or 0.0)
    return block_forward(self, x, mask, modality, bias, drop_prob, _gamma(self.gamma_1), _gamma(self.gamma_2),
                         self.__dict__[_BACKEND])


def _find_blocks(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    if hasattr(module, "attn") and hasattr(module, "mlp_text"):
        return [("", module)]
    transformer = getattr(module, "transformer", module)
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return []
    prefix = "transformer.blocks" if transformer is not module else "blocks"
    return [(f"{prefix}.{i}", b) for i, b in enumerate(blocks)]


class _Bound:
    """``fn`` bound to a module as an instance attribute (its forward, its get_rel_pos_bias). Unlike a bound method,
    a pickled model gets it back (a bound method pickles as a lookup of its name on the module, which fails), and a
    deep copy (EMA, model averaging) binds it to the copy, which then runs its own weights."""

    def __init__(self, fn, module: nn.Module):
        self.fn, self._module = fn, weakref.ref(module)  # weak: the module's __dict__ holds this (no cycle)

    @property
    def module(self) -> nn.Module:
        return self._module()

    def __call__(self, *args, **kwargs):
        return self.fn(self._module(), *args, **kwargs)

    def __reduce__(self):
        return _Bound, (self.fn, self.module)

    def __deepcopy__(self, memo):
        return _Bound(self.fn, copy.deepcopy(self.module, memo))


def _replicate_for_data_parallel(self):
    """``nn.DataParallel``'s replica of an accelerated module for another GPU (made anew at every forward). The class's
    replica shares this module's ``__dict__`` entries, so the fused forward (and ``get_rel_pos_bias``) would stay bound
    to this module and every GPU would run this one's weights: they are bound to the replica, which also gets an index
    cache of its own (its device's copy)."""
    replica = type(self)._replicate_for_data_parallel(self)
    for name, value in list(replica.__dict__.items()):
        if isinstance(value, _Bound) and value.module is self:
            replica.__dict__[name] = _Bound(value.fn, replica)
    if _INDEX_COPIES in replica.__dict__:
        replica.__dict__[_INDEX_COPIES] = TensorMemo(8, capture="reuse")  # (fixed indices; see TensorMemo)
    return replica


_REPLICATE = "_replicate_for_data_parallel"
_INDEX_COPIES = "_vlmo_fast_index_copies"


def _accelerated_get_rel_pos_bias(self, relative_position_index):
    """Per layer, the (table column slice, index) the accelerated blocks' attention gathers its bias from. The official
    module keeps its index tensors on the CPU (plain attributes, not buffers): a fresh device copy per forward would
    also defeat the kernels' per-index caches (range check, index structure), so each index's device copy is kept
    while the same tensor, unchanged, is passed again (traced as a plain .to() under torch.compile)."""
    table = self.relative_position_bias_table
    h = table.shape[1] // self.num_layers
    src = relative_position_index
    index = self.__dict__[_INDEX_COPIES].get(src, (table.device,), lambda: _device_copy(src, table.device),
                                             stream_of=table)  # (a copy per CUDA stream of the table's device)
    return [TableBias(table[:, i * h : (i + 1) * h], index) for i in range(self.num_layers)]


def _device_copy(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A normal tensor even when made under torch.inference_mode (e.g. a sanity validation before training): the
    copy is kept for later forwards, and an inference tensor could not be saved for a training backward."""
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():  # (the check does not trace)
        return index.to(device)
    with torch.inference_mode(False):
        return index.to(device, copy=True)


def _bind_get_rel_pos_bias(module: nn.Module):
    module.__dict__[_INDEX_COPIES] = TensorMemo(8, capture="reuse")  # (fixed indices; see TensorMemo)
    return _Bound(_accelerated_get_rel_pos_bias, module)


def accelerate(module: nn.Module, backend: str = "auto", gather_bias_in_kernel: bool = False) -> AccelerationReport:
    """Swap vlmo_fast's fused kernels into an official VLMo module tree, in place; see the module docstring."""
    from .ops.backend import check_backend

    check_backend(backend)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    from .model import multiway, vlmo

    fused = (multiway.MultiWayTransformer, multiway.Block)
    if isinstance(module, fused) or (isinstance(module, vlmo.VLMo) and isinstance(module.transformer, fused)):
        raise TypeError(f"module is vlmo_fast's own {type(module).__name__}, which runs the fused kernels already "
                        f"(its backend: .set_backend(...)); accelerate is for the official code's modules")
    report = AccelerationReport()
    blocks = _find_blocks(module)
    if not blocks:
        report.left_alone.append(("", "no official Block / MultiWayTransformer / VLMo structure found"))
        return report
    for path, blk in blocks:
        if getattr(blk, _MARK, False):
            if blk.__dict__.get(_BACKEND, backend) != backend:  # a second call with another backend switches to it
                blk.__dict__[_BACKEND] = backend
                report.left_alone.append((path, f"already accelerated; backend now {backend!r}"))
            else:
                report.left_alone.append((path, "already accelerated"))
            continue
        why = _why_not_block(blk)
        if why is not None:
            report.left_alone.append((path, why))
            continue
        # instance attributes (the forward shadows the class's), bound to the block
        blk.__dict__[_BACKEND] = backend
        blk.__dict__[_CHECKED] = (_structure(blk), None)
        blk.forward = _Bound(_accelerated_forward, blk)
        blk.__dict__[_REPLICATE] = _Bound(_replicate_for_data_parallel, blk)
        setattr(blk, _MARK, True)
        report.replaced.append(path)
    if gather_bias_in_kernel:
        plain = [path or "<root>" for path, blk in blocks if not getattr(blk, _MARK, False)]
        if getattr(module, "relative_position_bias_table", None) is None or not hasattr(module, "get_rel_pos_bias"):
            report.bias_gather = "left alone: the module has no relative_position_bias_table/get_rel_pos_bias"
        elif not hasattr(module, "num_layers"):
            report.bias_gather = "left alone: the module has no num_layers"
        elif plain:  # their official forward takes the dense bias only
            report.bias_gather = f"left alone: {', '.join(plain)} not accelerated (they need the dense bias)"
        else:
            module.get_rel_pos_bias = _bind_get_rel_pos_bias(module)
            module.__dict__[_REPLICATE] = _Bound(_replicate_for_data_parallel, module)
            setattr(module, _MARK, True)
            report.bias_gather = "gathered from the table by the attention op (get_rel_pos_bias replaced)"
    return report


def deaccelerate(module: nn.Module) -> int:
    """Restore the original forwards (and ``get_rel_pos_bias``); returns the number of modules restored."""
    restored = 0
    for m in [module] + [b for _, b in _find_blocks(module)]:
        if getattr(m, _MARK, False):
            for attr in ("forward", "get_rel_pos_bias", _REPLICATE, _BACKEND, _CHECKED, _INDEX_COPIES):
                if attr in m.__dict__:
                    del m.__dict__[attr]
            delattr(m, _MARK)
            restored += 1
    return restored


def from_official(checkpoint: Any, config: Mapping[str, Any], backend: str = "auto", strict: bool = False):
    """A vlmo_fast ``VLMo`` from an official checkpoint (path or state dict) and an official (sacred) config dict:
    ``model_arch``, ``image_size``, ``max_text_len``, ``loss_names``, ``drop_path_rate``, optionally
    ``max_text_len_of_initckpt`` and ``vqav2_label_size``; a key the dict lacks takes the official default (e.g.
    ``loss_names`` itm = itc = mlm = 1, the pretraining heads). The checkpoint is adapted as the official loader does
    (table resize, text positions, nesting, legacy index tensors; with ``textmlm`` on, a BEiT checkpoint converted as
    ``checkpoint.convert_beit_checkpoint`` does) and, like it, loaded with ``strict=False``: a
    fine-tuning config's new heads keep their initialisation and the pretraining heads it does not use are left out
    (the report goes to the ``vlmo_fast`` logger at INFO); ``strict=True`` refuses both."""
    from .checkpoint import load_checkpoint, read_state_dict, text_stage_state, unwrap_state_dict
    from .config import PRESETS, PRETRAIN_TASKS, loss_names, preset
    from .model import VLMo

    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of official config keys, got {type(config).__name__}")
    arch = config.get("model_arch", "vlmo_base_patch16")
    if arch == "vit_large_patch16_224":  # spec Q12: the official large pretraining config names a timm ViT
        arch = "vlmo_large_patch16"
    if arch not in PRESETS:
        raise ValueError(f"config['model_arch']: unknown {arch!r}; expected one of {list(PRESETS)}")
    names = config.get("loss_names", PRETRAIN_TASKS)  # the official default: itm, itc, mlm
    if not isinstance(names, Mapping):
        raise TypeError(f"config['loss_names'] must be a dict of task name -> weight, got {type(names).__name__}")
    try:
        overrides: Dict[str, Any] = {"loss_names": loss_names(**names)}
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"config['loss_names']: {exc}") from None
    for key in ("image_size", "max_text_len", "drop_path_rate", "max_text_len_of_initckpt", "vqav2_label_size"):
        if key in config:
            overrides[key] = config[key]
    model = VLMo(preset(arch, **overrides), backend=backend)
    notes: List[str] = []
    if model.config.task_on("textmlm"):  # as the official loader: the text-only stage starts from a BEiT checkpoint
        sd = read_state_dict(checkpoint) if not isinstance(checkpoint, Mapping) else unwrap_state_dict(checkpoint)
        checkpoint = text_stage_state(sd, model, notes)
    report = load_checkpoint(model, checkpoint, strict=strict)
    logging.getLogger("vlmo_fast").info("from_official: %s", "\n".join([str(report)] + notes))
    return model
