"""The official collate (spec §7 "Collate"): item dictionaries -> the batch dictionary the model and
``vlmo_fast.objectives`` read.

Output keys:

- every image key ("image"; NLVR2 "image_0", "image_1"): a ONE-ELEMENT LIST ``[tensor(B, 3, S, S)]`` (images of
  different sizes are zero-padded to the largest, as official);
- "text": the caption strings (list);
- "text_ids", "text_masks" (B, Lt) int64; "text_labels" all -100;
- "text_ids_mlm", "text_labels_mlm": the masked ids and MLM targets (-100 where not selected), whole-word masking by
  default (every named pretraining config), or the plain per-token collator;
- every other item key passed through as a list in batch order: img_index, cap_index, raw_index, replica, and the
  task extras (vqa_answer, vqa_labels, vqa_scores, qid, answers, table_name, key, ...);
- "bad_samples" (int, not official): how many items of this batch could not be read and were dropped. A dataset
  marks such an item by returning None (or, when it resampled, by an item field "bad_samples"; or by a count-only
  item ``{"bad_samples": n}``, perhaps with the reader's "_place", which is counted and left out). If every item
  was bad the batch is just ``{"bad_samples": n}``: skip it (``is_empty_batch``).

Dropping makes the batch smaller than the sampler's batch size. Across data-parallel ranks that means uneven
batches; the ITC/ITM all-gathers need equal sizes, so distributed training should build its datasets with
``on_error="resample"`` (the official behaviour: the dataset retries with another random sample and still counts it).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

from .masking import continuation_table, plain_mask, whole_word_mask

MLM_MODES = ("whole_word", "plain", None)


def _stack_images(key: str, values: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor) or v.dim() != 3:
            raise ValueError(f"collate: item {i} has {key!r} of type {type(v).__name__} "
                             f"{tuple(getattr(v, 'shape', ()))}; expected a (3, H, W) tensor")
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) == 1:
        if get_worker_info() is not None:
            # in a worker: default_collate stacks straight into shared memory (no extra copy to send the batch)
            return [default_collate(list(values))]
        if all(v.device.type == "cpu" and not v.requires_grad for v in values):
            # numpy copies on one thread; torch.stack's parallel copy stalls when the cores are busy (the main
            # process of a num_workers=0 loader shares them with training): 35 ms vs 700 ms for 64 x 224 px
            return [torch.from_numpy(np.stack([v.numpy() for v in values]))]
        return [torch.stack(list(values))]
    height = max(v.shape[1] for v in values)
    width = max(v.shape[2] for v in values)
    out = values[0].new_zeros(len(values), values[0].shape[0], height, width)
    for i, v in enumerate(values):
        out[i, :, : v.shape[1], : v.shape[2]] = v
    return [out]


_COUNT_ONLY = {"bad_samples", "_place"}  # an item that only counts unreadable samples (WebDataset(drop_bad=True))


def is_empty_batch(batch: Mapping[str, Any]) -> bool:
    """True for the batch of a step whose every item was unreadable (only "bad_samples" in it)."""
    return set(batch) <= {"bad_samples"}


class Collator:
    """Picklable collate function (it runs in the DataLoader workers).

    mlm: "whole_word" (official pretraining), "plain" (Bernoulli per token), or None (no "_mlm" keys).
    generator: a torch.Generator for the masking draws (tests, ``num_workers=0``); None uses torch's global RNG,
    which DataLoader seeds differently in every worker.
    """

    def __init__(self, tokenizer=None, mlm: Optional[str] = "whole_word", mlm_prob: float = 0.15,
                 generator: Optional[torch.Generator] = None):
        if mlm not in MLM_MODES:
            raise ValueError(f"Collator: mlm must be one of {MLM_MODES}, got {mlm!r}")
        if not 0.0 <= mlm_prob <= 1.0:
            raise ValueError(f"Collator: mlm_prob must be in [0, 1], got {mlm_prob!r}")
        self.mlm, self.mlm_prob, self.generator = mlm, float(mlm_prob), generator
        self.is_continuation = None
        if mlm == "whole_word":
            if tokenizer is None:
                from ..tokenizer import BertTokenizer

                tokenizer = BertTokenizer()
            self.is_continuation = continuation_table(tokenizer)

    def __call__(self, items: Sequence[Optional[Mapping[str, Any]]]) -> Dict[str, Any]:
        bad = sum(1 if item is None else int(item.get("bad_samples", 0)) for item in items)
        good = [item for item in items if item is not None and not set(item) <= _COUNT_ONLY]
        if not good:
            return {"bad_samples": bad}
        keys: List[str] = []
        for item in good:
            keys.extend(k for k in item if k not in keys)
        batch: Dict[str, Any] = {}
        for key in keys:
            if key == "bad_samples":
                continue
            values = [item.get(key) for item in good]
            if "image" in key and all(isinstance(v, torch.Tensor) for v in values):
                batch[key] = _stack_images(key, values)
            elif key in ("text_ids", "text_masks", "special_tokens_mask"):
                batch[key] = torch.stack([torch.as_tensor(v, dtype=torch.long) for v in values])
            else:
                batch[key] = values
        special = batch.pop("special_tokens_mask", None)
        if "text_ids" in batch:
            ids = batch["text_ids"]
            batch["text_labels"] = torch.full_like(ids, -100)
            if self.mlm == "whole_word":
                batch["text_ids_mlm"], batch["text_labels_mlm"] = whole_word_mask(
                    ids, self.is_continuation, self.mlm_prob, self.generator)
            elif self.mlm == "plain":
                batch["text_ids_mlm"], batch["text_labels_mlm"] = plain_mask(ids, special, self.mlm_prob,
                                                                             self.generator)
        batch["bad_samples"] = bad
        return batch


def build_collate(tokenizer=None, whole_word_masking: bool = True, mlm_prob: float = 0.15, mlm: bool = True,
                  generator: Optional[torch.Generator] = None) -> Collator:
    """The collate of the official configs: whole-word masking (``whole_word_masking=True`` in every named
    pretraining config) or the plain collator; ``mlm=False`` leaves the "_mlm" keys out (fine-tuning, eval)."""
    mode = ("whole_word" if whole_word_masking else "plain") if mlm else None
    return Collator(tokenizer, mode, mlm_prob, generator)
