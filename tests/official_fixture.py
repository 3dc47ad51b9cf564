"""Deterministic weights and inputs for the official-parity fixture (tests/fixtures/official_outputs.safetensors).

The fixture holds outputs of the *official* VLMo code (microsoft/unilm vlmo/, run outside this repository by
tests/fixtures/make_official_fixture.py) for weights and batches produced by the functions below, so the test can
rebuild the same weights from a few lines of code instead of shipping gigabytes of checkpoints.
"""

import math
import zlib
from typing import Dict, Iterable, Tuple

import torch

# name -> (model_arch, image_size, max_text_len, tasks)
CONFIGS = {
    "base_pretrain": ("vlmo_base_patch16", 224, 40, ("itm", "itc", "mlm")),
    "baseplus_pretrain": ("vlmo_base_plus_patch16", 224, 40, ("itm", "itc", "mlm")),
    "base_textmlm": ("vlmo_base_patch16", 224, 196, ("textmlm",)),
    "base_vqa480": ("vlmo_base_patch16", 480, 40, ("vqa",)),
    "base_nlvr2_384": ("vlmo_base_patch16", 384, 40, ("nlvr2",)),
}
SEED = 20261128


def fill_state_dict(shapes: Iterable[Tuple[str, Tuple[int, ...], torch.dtype]]) -> Dict[str, torch.Tensor]:
    """A state dict with every entry drawn from a generator seeded by its key: LayerNorm weights near 1, LayerScale
    near 0.1, the relative table at scale 0.5, logit scales near ln(1/0.07), other weights and biases at 0.02."""
    sd = {}
    for key, shape, dtype in shapes:
        if key.endswith("position_ids"):
            sd[key] = torch.arange(shape[-1], dtype=dtype).reshape(shape)
            continue
        g = torch.Generator().manual_seed(SEED + zlib.crc32(key.encode()))
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        parts = key.split(".")
        leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
        # LayerNorms: every *norm* module, and index 1 of the VQA/NLVR2 classifier Sequentials
        is_norm = "norm" in parent.lower() or (parent == "1" and "classifier" in key)
        if key == "relative_position_bias_table":
            x = 0.5 * x
        elif key.startswith("logit"):
            x = math.log(1 / 0.07) + 0.1 * x
        elif leaf in ("gamma_1", "gamma_2"):
            x = 0.1 + 0.05 * x
        elif is_norm and leaf == "weight":
            x = 1.0 + 0.1 * x
        elif is_norm and leaf == "bias":
            x = 0.1 * x
        else:
            x = 0.02 * x
        sd[key] = x.to(dtype)
    return sd


def make_batch(max_text_len: int, image_size: int, nlvr2: bool, b: int = 2) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(1000, 30000, (b, max_text_len), generator=g)
    ids[:, 0] = 101
    masks = torch.ones(b, max_text_len, dtype=torch.long)
    masks[1, 7:] = 0
    ids[1, 7:] = 0
    mlm = ids.clone()
    mlm[:, 2:4] = 103
    batch = {"text_ids": ids, "text_masks": masks, "text_ids_mlm": mlm,
             "text_labels": torch.full_like(ids, -100), "text_labels_mlm": torch.full_like(ids, -100),
             "image": torch.randn(b, 3, image_size, image_size, generator=g)}
    if nlvr2:
        batch["image_0"] = torch.randn(b, 3, image_size, image_size, generator=g)
        batch["image_1"] = torch.randn(b, 3, image_size, image_size, generator=g)
    return batch


def as_official_batch(batch: Dict[str, torch.Tensor]) -> Dict[str, object]:
    return {k: [v] if k.startswith("image") else v for k, v in batch.items()}


def outputs(model, batch, tasks) -> Dict[str, torch.Tensor]:
    """The compared outputs (a compact subset of every forward path and head), for the official model and ours."""
    b = as_official_batch(batch)
    out: Dict[str, torch.Tensor] = {}

    def keep(prefix, ret, keys=("text_feats", "image_feats", "cls_feats", "cls_vlffn_feats", "raw_cls_feats")):
        for k in keys:
            v = ret.get(k)
            if isinstance(v, torch.Tensor):
                out[f"{prefix}.{k}"] = v[:, :6].contiguous() if v.dim() == 3 else v.contiguous()

    with torch.no_grad():
        if "textmlm" in tasks:
            ret = model.infer_text_mlm(b, mask_text=True)
            keep("infer_text_mlm", ret)
            out["head.mlm_logits"] = model.mlm_score(ret["text_feats"])[:, :8, :64].contiguous()
            return out
        if "nlvr2" in tasks:
            r1, r2 = model.infer(b, image_token_type_idx=1), model.infer(b, image_token_type_idx=2)
            keep("infer_itt1", r1)
            keep("infer_itt2", r2)
            out["head.nlvr2_logits"] = model.nlvr2_classifier(torch.cat([r1["cls_feats"], r2["cls_feats"]], -1))
            return out
        ret = model.infer(b)
        keep("infer", ret)
        if "vqa" in tasks:
            out["head.vqa_logits"] = model.vqa_classifier(ret["cls_feats"])[:, :256].contiguous()
        if "itm" in tasks:
            out["head.itm_logits"] = model.itm_score(ret["cls_feats"])
        if "mlm" in tasks:
            m = model.infer(b, mask_text=True)
            keep("infer_mlm", m)
            out["head.mlm_logits"] = model.mlm_score(m["text_feats"])[:, :8, :64].contiguous()
        if "itc" in tasks:
            for path in ("infer_text", "infer_image", "infer_text_ft", "infer_image_ft"):
                keep(path, getattr(model, path)(b))
    return out
