"""VLMo: embeddings, the Multiway backbone, the relative-position table, the heads and every forward path (spec §3).

The forward paths take the official batch dictionary and return dictionaries with the official keys, so code written
against the official LightningModule calls this one unchanged:

    infer            fusion encoder (MLM, ITM, VQA, NLVR2): text first, then image, all layers "vl"
    infer_text       text experts in all layers + the VL-FFN re-run of the top layers (pretraining ITC)
    infer_image      the same for images
    infer_text_ft    text experts only (retrieval)
    infer_image_ft   image experts only (retrieval)
    infer_text_mlm   text experts, final norm (text-only MLM stage)

New code can use the plain-tensor methods ``fusion``, ``text_embedding`` and ``image_embedding``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..config import VLMoConfig
from ..ops._memo import TensorMemo, tracing
from ..ops.backend import check_backend
from . import relpos
from .embeddings import TextEmbeddings
from .heads import ITCHead, ITMHead, MLMHead, Pooler, classifier, init_weights
from .multiway import MultiWayTransformer, RelPos


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| with no epsilon, as the official ITC features (spec §3.4)."""
    return x / x.norm(dim=-1, keepdim=True)


# text_ids tensors whose values passed the range check (not run in a CUDA-graph capture: it would check only the
# capture's values, not a replay's)
_CHECKED_IDS = TensorMemo(16, per_stream=False, capture="skip")


def _remake_buffer(module: nn.Module, name: str, value: torch.Tensor, device: torch.device, persistent: bool) -> None:
    """``module.<name>`` := ``value`` on ``device`` (not meta): copied in place where the buffer already has that
    device, shape and dtype, else registered anew (still on meta: ``load_state_dict(assign=True)`` moves only what it
    loads)."""
    buffer = getattr(module, name)
    if buffer.device == device and buffer.shape == value.shape and buffer.dtype == value.dtype:
        buffer.copy_(value)
    else:
        module.register_buffer(name, value.to(device), persistent=persistent)


def _reset_index_buffers_after_load(module: "VLMo", incompatible_keys) -> None:
    module.reset_index_buffers()


def _head_tasks(name: str) -> str:
    """The tasks whose switch builds head ``name`` (from the objectives' table of the heads each task uses)."""
    from ..objectives import TASK_HEADS

    return " or ".join(t for t, heads in TASK_HEADS.items() if name in heads) or "its task"


def _check_ids(text_ids: torch.Tensor, vocab_size: int) -> None:
    lo, hi = torch.stack(torch.aminmax(text_ids.reshape(-1))).tolist()  # one pass, one device sync
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"text_ids must lie in [0, {vocab_size}), got range [{lo}, {hi}]")


def ids_to(text_ids: torch.Tensor, device: torch.device, vocab_size: int) -> torch.Tensor:
    """``text_ids`` moved to ``device`` (non-blocking), their range checked where they are before the copy (on the
    host: no device sync) and the copy remembered as checked, so the model's boundary check does not read it back
    from the device (a sync per forward of a training step on a GPU)."""
    if text_ids.numel():
        _CHECKED_IDS.get(text_ids, (vocab_size,), lambda: _check_ids(text_ids, vocab_size))
    moved = text_ids.to(device, non_blocking=True)
    if moved is not text_ids:
        mark_ids_checked(moved, vocab_size)
    return moved


def mark_ids_checked(text_ids: torch.Tensor, vocab_size: int) -> None:
    """Remember ``text_ids`` as in [0, vocab_size) without reading them: ids gathered or indexed from checked ids
    (the hard negatives' texts), whose check would be a device sync on a GPU."""
    _CHECKED_IDS.get(text_ids, (vocab_size,), lambda: None)


class VLMo(nn.Module):
    """The VLMo model with the official parameter names and state-dict layout (spec §1), built from a
    ``VLMoConfig`` (``vlmo_fast.preset("vlmo_base_patch16")`` etc.).

    ``backend`` picks the op implementations ("auto": the fastest available for each op and the tensors' device;
    "torch", "triton", "cuda"; ``set_backend`` changes it later). The forward paths of the official module take the
    official batch dictionary: ``infer``, ``infer_text``, ``infer_image``, their ``_ft`` forms and ``infer_text_mlm``;
    ``forward`` runs the objectives of ``current_tasks`` (or ``infer`` when there are none)."""

    def __init__(self, config: VLMoConfig, backend: str = "auto"):
        super().__init__()
        if not isinstance(config, VLMoConfig):
            raise TypeError(f"config must be a VLMoConfig, got {type(config).__name__}")
        self.config = config
        d = config.embed_dim
        self.transformer = MultiWayTransformer(config)
        self.num_layers = config.depth
        self.vlffn_start_layer_index = self.transformer.vlffn_start_layer_index

        if config.use_rel_pos:
            rows = relpos.num_table_rows(config.window_size, config.max_text_len_of_initckpt)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, config.num_heads * config.depth))
            # plain attributes in the official module: buffers here so they follow .to(device), not saved
            for name, index in self._index_buffers().items():
                self.register_buffer(name, index, persistent=False)
        else:
            self.relative_position_bias_table = None

        self.text_embeddings = TextEmbeddings(
            config.vocab_size, d, config.max_text_len, config.drop_path_rate, use_abs_pos=not config.use_rel_pos
        )
        self.token_type_embeddings = nn.Embedding(3 if config.task_on("nlvr2") else 2, d)
        self.pooler = Pooler(d)
        if config.task_on("mlm") or config.task_on("textmlm"):
            self.mlm_score = MLMHead(d, config.vocab_size)
        if config.task_on("itm"):
            self.itm_score = ITMHead(d)
        if config.task_on("itc") or config.task_on("irtr"):
            self.itc_text_proj = ITCHead(d)
            self.itc_image_proj = ITCHead(d)
            if config.task_on("itc"):
                self.itc_vl_text_proj = ITCHead(d)
                self.itc_vl_image_proj = ITCHead(d)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            if config.task_on("itc"):
                self.logit_vl_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if config.task_on("vqa"):
            self.vqa_classifier = classifier(d, 2 * d, config.vqav2_label_size)
        if config.task_on("nlvr2"):
            self.nlvr2_classifier = classifier(2 * d, 2 * d, 2)
        for name, module in self.named_children():
            if name != "transformer":
                module.apply(init_weights)
        if config.task_on("nlvr2"):  # the third type (second NLVR2 image) starts as a copy of the image type
            with torch.no_grad():
                self.token_type_embeddings.weight[2] = self.token_type_embeddings.weight[1]
        self.current_tasks: List[str] = []  # as the official module: forward() runs these objectives
        self.gather_with_grad = False  # ITC/IRTR all-gather with gradient (official: without)
        self.set_backend(backend)
        # the index buffers are derived, never loaded: made again after every load_state_dict (a model built on the
        # meta device holds garbage there until then; also what FSDP's and DCP's loading calls)
        self.register_load_state_dict_post_hook(_reset_index_buffers_after_load)

    def _index_buffers(self) -> Dict[str, torch.Tensor]:
        c = self.config
        w, l0, lt = c.window_size, c.max_text_len_of_initckpt, c.max_text_len
        return {"relative_position_index": relpos.image_relative_position_index(w),
                "text_relative_position_index": relpos.text_relative_position_index(lt, w, l0),
                "text_imag_relative_position_index": relpos.fusion_relative_position_index(lt, w, l0)}

    def _apply(self, fn, recurse: bool = True):
        # every move of the tensors (to(), cuda(), to_empty(), also when a parent module makes it: parents call their
        # children's _apply, never their to_empty) ends with the index buffers made again where the table is
        out = super()._apply(fn, recurse)
        self.reset_index_buffers()
        return out

    def reset_index_buffers(self) -> None:
        """Make the relative-position index buffers again, on the table's device, and the text position ids. The
        indices are not in the state dict (derived from the config, as official), and a checkpoint may lack the ids
        (newer transformers do not save them), so a model built on the meta device and materialised holds garbage
        there (or, loaded with ``assign=True``, meta tensors) until this runs; every move of the model's tensors
        (``to_empty()`` included) and every ``load_state_dict()`` calls it."""
        positions, table = self.text_embeddings.position_embeddings, self.relative_position_bias_table
        with torch.device("cpu"), torch.no_grad():  # (made on the CPU whatever the default device)
            if positions.weight.device.type != "meta":
                _remake_buffer(self.text_embeddings, "position_ids", torch.arange(positions.num_embeddings)[None],
                               positions.weight.device, persistent=True)
            if table is not None and table.device.type != "meta":
                for name, index in self._index_buffers().items():
                    _remake_buffer(self, name, index, table.device, persistent=False)

    # ---- configuration -----------------------------------------------------------------------------------------
    def set_backend(self, backend: str) -> "VLMo":
        """Choose the op implementations: "auto" (fastest available for the tensor's device), "torch", "triton", "cuda"."""
        self.backend = check_backend(backend)
        for blk in self.transformer.blocks:
            blk.backend = backend
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> "VLMo":
        """Recompute every block's activations in the backward (less memory, about one more forward of compute)."""
        self.transformer.grad_checkpointing = bool(enable)
        return self

    def dead_parameter_names(self) -> List[str]:
        """Parameters no forward path reads, so they never receive a gradient: the text position embeddings of the
        models with the relative table (base, large; spec Q8). Kept for the state dict, left out of DDP's reducer."""
        return [] if self.text_embeddings.use_abs_pos else ["text_embeddings.position_embeddings.weight"]

    @property
    def device(self) -> torch.device:
        return self.transformer.cls_token.device

    # ---- input checks --------------------------------------------------------------------------------------------
    def _check_text(self, text_ids: Any, text_masks: Any, exact: bool) -> torch.Tensor:
        if not isinstance(text_ids, torch.Tensor):
            raise TypeError(f"text_ids must be a torch.Tensor, got {type(text_ids).__name__}")
        if not isinstance(text_masks, torch.Tensor):
            raise TypeError(f"text_masks must be a torch.Tensor, got {type(text_masks).__name__}")
        if text_ids.dtype not in (torch.int64, torch.int32):  # what nn.Embedding takes
            raise TypeError(f"text_ids must be an int64 or int32 tensor, got {text_ids.dtype}")
        if text_masks.dtype.is_floating_point or text_masks.is_complex():
            raise TypeError(f"text_masks must be an integer or bool tensor (1 = real token), got {text_masks.dtype}")
        if text_ids.dim() != 2:
            raise ValueError(f"text_ids must be 2-D (batch, text_len), got shape {tuple(text_ids.shape)}")
        if text_masks.shape != text_ids.shape:
            raise ValueError(
                f"text_masks must have the shape of text_ids {tuple(text_ids.shape)}, got {tuple(text_masks.shape)}"
            )
        lt = self.config.max_text_len
        n = text_ids.shape[1]
        if exact and n != lt:
            raise ValueError(
                f"text_ids must have exactly max_text_len={lt} tokens (pad or truncate to it; the modality split and "
                f"the relative position index are built for it), got {n}"
            )
        if not exact and not 1 <= n <= lt:
            raise ValueError(f"text_ids must have 1..max_text_len={lt} tokens, got {n}")
        for name, t in (("text_ids", text_ids), ("text_masks", text_masks)):
            if t.device != self.device:
                raise ValueError(f"{name} must be on the model's device {self.device}, got {t.device}")
        # value checks would break a compiled graph, and cannot read a batched tensor under torch.func transforms
        # (there an out-of-range id still fails in the embedding lookup: an IndexError on CPU, a device-side assert
        # on CUDA)
        if text_ids.numel() and not tracing():
            # once per tensor (a training step passes the same text_ids to several encoder calls): on a GPU each
            # check is a device sync
            vocab = self.config.vocab_size
            _CHECKED_IDS.get(text_ids, (vocab,), lambda: _check_ids(text_ids, vocab))
        return text_masks.bool()

    def _check_image(self, image: Any, name: str = "image") -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
        if not image.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (normalised pixels), got {image.dtype}")
        s, c = self.config.image_size, self.config.in_chans
        if image.dim() != 4 or image.shape[1] != c or image.shape[2] != s or image.shape[3] != s:
            raise ValueError(
                f"{name} must have shape (B, {c}, {s}, {s}) for this model (image_size={s}), got {tuple(image.shape)}"
            )
        if image.device != self.device:
            raise ValueError(f"{name} must be on the model's device {self.device}, got {image.device}")
        return image.to(self.transformer.patch_embed.proj.weight.dtype)

    def _token_type(self, idx: int) -> torch.Tensor:
        rows = self.token_type_embeddings.num_embeddings
        if not isinstance(idx, int) or not 0 <= idx < rows:
            raise ValueError(f"image_token_type_idx must be an int in [0, {rows}), got {idx!r}")
        return self.token_type_embeddings.weight[idx]

    # ---- relative position -------------------------------------------------------------------------------------
    def rel_pos(self, index_name: str) -> List[RelPos]:
        """Per layer: (that layer's column slice of the table, the index). No gather here: the attention op takes
        the table and index (the kernels gather inside; the PyTorch path gathers one layer at a time)."""
        if self.relative_position_bias_table is None:
            return [None] * self.num_layers
        h = self.config.num_heads
        index = getattr(self, index_name)
        t = self.relative_position_bias_table
        return [(t[:, i * h : (i + 1) * h], index) for i in range(self.num_layers)]

    # ---- embeddings ------------------------------------------------------------------------------------------------
    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        return self.text_embeddings(text_ids) + self._token_type(0)

    def embed_image(self, image: torch.Tensor, image_token_type_idx: int = 1) -> torch.Tensor:
        return self.transformer.visual_embed(image) + self._token_type(image_token_type_idx)

    # ---- plain-tensor encoders ---------------------------------------------------------------------------------
    def fusion(
        self, text_ids: torch.Tensor, text_masks: torch.Tensor, image: torch.Tensor, image_token_type_idx: int = 1
    ) -> torch.Tensor:
        """Fusion encoder: (B, Lt + 1 + P, D) after the final norm, text first."""
        keep_text = self._check_text(text_ids, text_masks, exact=True)
        image = self._check_image(image)
        if image.shape[0] != text_ids.shape[0]:
            raise ValueError(
                f"image batch ({image.shape[0]}) must match the text batch ({text_ids.shape[0]})"
            )
        text_embeds = self.embed_text(text_ids)
        image_embeds = self.embed_image(image, image_token_type_idx)
        x = torch.cat([text_embeds, image_embeds], dim=1)
        keep = torch.cat([keep_text, keep_text.new_ones(image_embeds.shape[:2])], dim=1)
        x = self.transformer.run_blocks(
            x, keep, "vl", self.rel_pos("text_imag_relative_position_index"), range(self.num_layers)
        )
        return self.transformer.norm(x)

    def _unimodal(self, x: torch.Tensor, keep: Optional[torch.Tensor], modality: str, index_name: str, vlffn: bool):
        """Experts of ``modality`` in every layer; with ``vlffn`` also re-run the top layers with the VL-FFN from
        the output of layer F-1. Returns (last block output, VL-branch output or None), both before the final norm."""
        rel = self.rel_pos(index_name)
        f, n = self.vlffn_start_layer_index, self.num_layers
        if not vlffn:
            return self.transformer.run_blocks(x, keep, modality, rel, range(n)), None
        if f < 1 or f >= n:
            raise ValueError(f"the VL-FFN branch needs 1 <= vlffn_start_layer_index < depth, got {f} (depth {n})")
        below = self.transformer.run_blocks(x, keep, modality, rel, range(f))
        top = self.transformer.run_blocks(below, keep, modality, rel, range(f, n))
        vl = self.transformer.run_blocks(below, keep, "vl", rel, range(f, n))
        return top, vl

    def _text_hidden(self, text_ids, text_masks, vlffn: bool):
        keep = self._check_text(text_ids, text_masks, exact=self.config.use_rel_pos)
        # no key masked: skip the masking work (decided on CPU only: on GPU reading the mask would be a sync)
        if keep.device.type == "cpu" and not tracing() and bool(keep.all()):
            keep = None
        return self._unimodal(self.embed_text(text_ids), keep, "text", "text_relative_position_index", vlffn)

    def _image_hidden(self, image, image_token_type_idx: int, vlffn: bool):
        x = self.embed_image(self._check_image(image), image_token_type_idx)
        return self._unimodal(x, None, "image", "relative_position_index", vlffn)

    def head(self, name: str) -> nn.Module:
        """The head ``name`` (e.g. ``itc_image_proj``); a clear error when the config's loss_names did not build it
        (spec §1.3: the task switches decide which heads exist)."""
        module = getattr(self, name, None)
        if module is None:
            on = [t for t, v in self.config.loss_names.items() if v > 0]
            raise ValueError(f"this model has no {name}: it is built when loss_names turn on "
                             f"{_head_tasks(name)} (this model's: {on or 'none'})")
        return module

    def text_embedding(self, text_ids: torch.Tensor, text_masks: torch.Tensor) -> torch.Tensor:
        """L2-normalised retrieval embedding of the text (the ``infer_text_ft`` ``cls_feats``), (B, D)."""
        proj = self.head("itc_text_proj")
        top, _ = self._text_hidden(text_ids, text_masks, vlffn=False)
        return l2_normalize(proj(self.transformer.norm(top)[:, 0]))

    def image_embedding(self, image: torch.Tensor, image_token_type_idx: int = 1) -> torch.Tensor:
        """L2-normalised retrieval embedding of the image (the ``infer_image_ft`` ``cls_feats``), (B, D)."""
        proj = self.head("itc_image_proj")
        top, _ = self._image_hidden(image, image_token_type_idx, vlffn=False)
        return l2_normalize(proj(self.transformer.norm(top)[:, 0]))

    # ---- official batch-dictionary paths -----------------------------------------------------------------------
    @staticmethod
    def _get(batch: Mapping[str, Any], key: str) -> Any:
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a dict, got {type(batch).__name__}")
        if key not in batch:
            raise ValueError(f"batch is missing the key {key!r} (present: {sorted(batch)})")
        return batch[key]

    def _batch_image(self, batch: Mapping[str, Any], image_token_type_idx: int) -> torch.Tensor:
        key = f"image_{image_token_type_idx - 1}"
        if key not in batch:
            key = "image"
        images = self._get(batch, key)
        if not isinstance(images, (list, tuple)) or len(images) < 1:
            raise TypeError(f"batch[{key!r}] must be a list holding the image tensor (the official collate), got "
                            f"{type(images).__name__}")
        return self._check_image(images[0], name=f"batch[{key!r}][0]")

    def _batch_text(self, batch: Mapping[str, Any], mask_text: bool):
        suffix = "_mlm" if mask_text else ""
        return (
            self._get(batch, f"text_ids{suffix}"),
            batch.get(f"text_labels{suffix}"),
            self._get(batch, "text_masks"),
        )

    def infer(
        self, batch: Mapping[str, Any], mask_text: bool = False, mask_image: bool = False, image_token_type_idx: int = 1
    ) -> Dict[str, Any]:
        text_ids, text_labels, text_masks = self._batch_text(batch, mask_text)
        img = self._batch_image(batch, image_token_type_idx)
        x = self.fusion(text_ids, text_masks, img, image_token_type_idx)
        lt = text_ids.shape[1]
        return {
            "text_feats": x[:, :lt],
            "image_feats": x[:, lt:],
            "cls_feats": self.pooler(x),
            "raw_cls_feats": x[:, 0],
            "image": img,
            "text_labels": text_labels,
            "text_ids": text_ids,
            "text_masks": text_masks,
        }

    def _unimodal_out(self, top, vl, proj: str, vl_proj: Optional[str]) -> Tuple[torch.Tensor, ...]:
        feats = self.transformer.norm(top)
        cls = l2_normalize(self.head(proj)(feats[:, 0])) if proj else None
        cls_vl = None
        if vl is not None:
            cls_vl = l2_normalize(self.head(vl_proj)(self.transformer.norm(vl)[:, 0]))
        return feats, cls, cls_vl, top[:, 0]

    def _text_out(self, batch, mask_text: bool, vlffn: bool, proj: Optional[str], vl_proj: Optional[str]):
        text_ids, text_labels, text_masks = self._batch_text(batch, mask_text)
        top, vl = self._text_hidden(text_ids, text_masks, vlffn)
        feats, cls, cls_vl, raw = self._unimodal_out(top, vl, proj, vl_proj)
        return {
            "text_feats": feats,
            "image_feats": None,
            "cls_feats": cls,
            "cls_vlffn_feats": cls_vl,
            "raw_cls_feats": raw,
            "image_masks": None,
            "text_labels": text_labels,
            "text_ids": text_ids,
            "text_masks": text_masks,
        }

    def _image_out(self, batch, image_token_type_idx: int, vlffn: bool, proj: str, vl_proj: Optional[str]):
        img = self._batch_image(batch, image_token_type_idx)
        top, vl = self._image_hidden(img, image_token_type_idx, vlffn)
        feats, cls, cls_vl, raw = self._unimodal_out(top, vl, proj, vl_proj)
        return {
            "text_feats": None,
            "image_feats": feats,
            "cls_feats": cls,
            "cls_vlffn_feats": cls_vl,
            "raw_cls_feats": raw,
            "image_masks": torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device),
            "text_labels": None,
            "text_ids": None,
            "text_masks": None,
        }

    def infer_text(self, batch: Mapping[str, Any], mask_text: bool = False) -> Dict[str, Any]:
        return self._text_out(batch, mask_text, True, "itc_text_proj", "itc_vl_text_proj")

    def infer_text_ft(self, batch: Mapping[str, Any], mask_text: bool = False) -> Dict[str, Any]:
        return self._text_out(batch, mask_text, False, "itc_text_proj", None)

    def infer_text_mlm(self, batch: Mapping[str, Any], mask_text: bool = False) -> Dict[str, Any]:
        return self._text_out(batch, mask_text, False, None, None)

    def infer_image(
        self, batch: Mapping[str, Any], mask_image: bool = False, image_token_type_idx: int = 1
    ) -> Dict[str, Any]:
        return self._image_out(batch, image_token_type_idx, True, "itc_image_proj", "itc_vl_image_proj")

    def infer_image_ft(
        self, batch: Mapping[str, Any], mask_image: bool = False, image_token_type_idx: int = 1
    ) -> Dict[str, Any]:
        return self._image_out(batch, image_token_type_idx, False, "itc_image_proj", None)

    def forward(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        """As the official module: the fusion encoder when ``current_tasks`` is empty, else the objectives of
        those tasks in the official order (their outputs, losses included; see ``vlmo_fast.objectives``)."""
        if not self.current_tasks:
            return self.infer(batch)
        from ..objectives import compute_tasks

        return compute_tasks(self, batch, self.current_tasks, gather_with_grad=self.gather_with_grad)
