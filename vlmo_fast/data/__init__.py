"""The data layer: official ViLT-style arrow datasets, transforms, MLM masking and collate, WebDataset shards, the
built-in synthetic dataset, and loaders (spec §7, §5.2).

Typical use (pretraining on the built-in synthetic set)::

    from vlmo_fast.data import write_synthetic, build_dataset, build_collate, build_loader

    write_synthetic(root)                                     # once; reused when the parameters match
    ds = build_dataset(root, ["coco"], "train", image_size=224, max_text_len=40, train=True)
    loader = build_loader(ds, batch_size=64, collate=build_collate(), train=True, num_workers=4, seed=1)
    for batch in loader:   # batch["image"] == [tensor(B, 3, 224, 224)], batch["text_ids_mlm"], ...
        ...

Module map: ``arrow`` (datasets, readers, writers), ``transforms`` (official train/eval transforms, RandAugment),
``masking`` (whole-word and plain MLM), ``collate`` (the batch dictionary), ``webdataset`` (tar shards),
``synthetic`` (the default dataset), ``loader`` (DataLoader, throughput), ``prepare`` (raw COCO/F30K/VG/NLVR2/VQAv2/web
caption data and plain text -> the official arrow files; ``vlmo-fast prepare``), ``vqa_answers`` (the official VQAv2
answer classes and soft scores).
"""

from .arrow import (DATASETS, ArrowDataset, UnreadableData, build_dataset, check_vqa_label_files, check_vqa_labels,
                    dataset_files, encode_image, make_caption_arrow, make_caption_dataset, make_dataset, read_arrow,
                    write_arrow, write_arrow_batches)
from .collate import Collator, build_collate, is_empty_batch
from .loader import TrackedDataLoader, batch_size_of, build_loader, measure_loader, seed_worker, set_epoch
from .masking import plain_mask, whole_word_budget, whole_word_mask
from .prepare import (PrepareSummary, prepare_captions, prepare_coco, prepare_f30k, prepare_nlvr2, prepare_text,
                      prepare_vg, prepare_vqa)
from .synthetic import write_synthetic
from .transforms import EvalTransform, RandomAugment, TrainTransform, build_transform
from .webdataset import (WebDataset, expand_urls, is_shard_name, write_shard_index, write_shards,
                         write_synthetic_shards)

__all__ = [
    "DATASETS",
    "ArrowDataset",
    "Collator",
    "EvalTransform",
    "PrepareSummary",
    "RandomAugment",
    "TrainTransform",
    "UnreadableData",
    "WebDataset",
    "expand_urls",
    "is_shard_name",
    "batch_size_of",
    "build_collate",
    "build_dataset",
    "build_loader",
    "build_transform",
    "check_vqa_label_files",
    "check_vqa_labels",
    "dataset_files",
    "encode_image",
    "is_empty_batch",
    "make_caption_arrow",
    "make_caption_dataset",
    "make_dataset",
    "measure_loader",
    "plain_mask",
    "prepare_captions",
    "prepare_coco",
    "prepare_f30k",
    "prepare_nlvr2",
    "prepare_text",
    "prepare_vg",
    "prepare_vqa",
    "read_arrow",
    "seed_worker",
    "TrackedDataLoader",
    "set_epoch",
    "whole_word_budget",
    "whole_word_mask",
    "write_arrow",
    "write_arrow_batches",
    "write_shard_index",
    "write_shards",
    "write_synthetic",
    "write_synthetic_shards",
]
