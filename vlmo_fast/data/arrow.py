"""The official ViLT-style arrow datasets (spec §7), readers and writers.

Files: one Arrow IPC *file* per table (``pyarrow.RecordBatchFileWriter``), named ``<data_root>/<name>.arrow``, read
memory-mapped (``pa.ipc.RecordBatchFileReader(pa.memory_map(path))``) and concatenated with type promotion. Image
columns hold encoded bytes (JPEG/PNG); the text column holds a list of strings per row.

| key    | train files                                   | val                  | test                 | text column |
|--------|-----------------------------------------------|----------------------|----------------------|-------------|
| coco   | coco_caption_karpathy_{train,restval}         | ..._val              | ..._test             | caption     |
| f30k   | f30k_caption_karpathy_train                   | ..._val              | ..._test             | caption     |
| gcc    | conceptual_caption_train_{0..29}              | conceptual_caption_val_0 (test = val)       | caption     |
| sbu    | sbu_{0..8}                                    | none                 | none                 | caption     |
| vg     | vg (region phrases, paired with the whole image) | none              | none                 | caption     |
| wikibk | wikibk_train_{0..49} (image column "None")    | wikibk_val_0 (test = val)                   | caption     |
| vqa    | vqav2_train, vqav2_trainable_val              | vqav2_rest_val       | vqav2_test           | questions   |
| nlvr2  | nlvr2_train                                   | nlvr2_dev, nlvr2_test1 (val and test)       | questions   |

Indexing: one sample per caption/question, ``index_mapper[j] = (row, caption_idx)`` in row order; with
``image_only=True`` (retrieval evaluation) one sample per row. A row's duplicate captions are kept, each a sample
(VLMo's ``BaseDataset`` defaults to ``remove_duplicate=False``, which its coco, f30k, wikibk and nlvr2 classes keep;
ViLT's default was True). Multi-dataset training is a plain ``ConcatDataset``, so datasets are drawn in proportion to
their caption counts.

Items (``__getitem__``, so decoding runs in the DataLoader workers): "image" (3, S, S) float in [-1, 1] (NLVR2:
"image_0", "image_1"; wikibk none), "text", "text_ids", "text_masks", "special_tokens_mask" (1-D int64, exactly
``max_text_len``, truncated if longer), "img_index" (row), "cap_index", "raw_index", "replica" (cap_index > 0) and
the task extras: VQA "vqa_answer", "vqa_labels", "vqa_scores", "qid"; NLVR2 "answers" (1 for "True", 0 for
"False") and "table_name".

Decisions that differ from the official code:
- A missing data root or file raises FileNotFoundError naming the path (official: missing files are silently
  skipped, which hides a wrong data_root until the dataset turns out empty). The numbered shards of gcc, sbu and
  wikibk are the exception: those present are read, with a warning naming the missing ones (a smaller download
  writes fewer shards); none present is the error. A file without a column the dataset
  reads raises ValueError naming the file and the column, at construction.
- An unreadable image does not stop the run. ``on_error="drop"`` (default) returns None for that item; the collate
  drops it and reports the count as ``batch["bad_samples"]``. ``on_error="resample"`` is the official behaviour
  (retry with a random other sample) and still counts the failures in the item's "bad_samples"; after 100 failures
  in a row it raises ValueError (the official retries never end).
- The captions are not copied into Python lists (official ``all_texts``): they stay in the memory-mapped table and
  the dataset keeps each caption's place in numpy arrays, which DataLoader workers share. Reference counting made a
  private copy of the official lists in every worker (about 125 MB per million captions per worker: 10 GB for 10
  million captions at 8 workers); ``all_texts`` is still there, built on demand.
- ``remove_duplicate=True`` (an option; VLMo's datasets keep duplicates) removes a row's duplicate captions keeping
  their first-seen order (the official ``list(set(...))`` order changes with Python's hash seed, so caption indices
  were not reproducible across runs).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import ConcatDataset, Dataset

from ..fileio import atomic_path
from .sample import BadSampleLog, decode_image, encode_text
from .transforms import build_transform

SPLITS = ("train", "val", "test")
ON_ERROR = ("drop", "resample")


class UnreadableData(ValueError):
    """The data cannot give what is asked: ``on_error="resample"`` found no readable sample in 100 tries."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the official dataset class of one key reads."""

    files: Mapping[str, Tuple[str, ...]]  # split -> file stems under data_root
    text_column: str
    image_keys: Tuple[str, ...]
    remove_duplicate: bool = False  # (official VLMo: False for every dataset)
    extra_columns: Tuple[str, ...] = ()  # read on every split
    label_columns: Tuple[str, ...] = ()  # read except on the test split (VQA test has no answers)
    kind: str = "caption"  # caption | text | vqa | nlvr2


def _files(train, val, test) -> Dict[str, Tuple[str, ...]]:
    return {"train": tuple(train), "val": tuple(val), "test": tuple(test)}


DATASETS: Dict[str, DatasetSpec] = {
    "coco": DatasetSpec(_files(["coco_caption_karpathy_train", "coco_caption_karpathy_restval"],
                               ["coco_caption_karpathy_val"], ["coco_caption_karpathy_test"]), "caption", ("image",)),
    "f30k": DatasetSpec(_files(["f30k_caption_karpathy_train"], ["f30k_caption_karpathy_val"],
                               ["f30k_caption_karpathy_test"]), "caption", ("image",)),
    "gcc": DatasetSpec(_files([f"conceptual_caption_train_{i}" for i in range(30)], ["conceptual_caption_val_0"],
                              ["conceptual_caption_val_0"]), "caption", ("image",)),
    "sbu": DatasetSpec(_files([f"sbu_{i}" for i in range(9)], [], []), "caption", ("image",)),
    "vg": DatasetSpec(_files(["vg"], [], []), "caption", ("image",)),
    "wikibk": DatasetSpec(_files([f"wikibk_train_{i}" for i in range(50)], ["wikibk_val_0"], ["wikibk_val_0"]),
                          "caption", (), kind="text"),
    "vqa": DatasetSpec(_files(["vqav2_train", "vqav2_trainable_val"], ["vqav2_rest_val"], ["vqav2_test"]),
                       "questions", ("image",), extra_columns=("question_id",),
                       label_columns=("answers", "answer_labels", "answer_scores"), kind="vqa"),
    "nlvr2": DatasetSpec(_files(["nlvr2_train"], ["nlvr2_dev", "nlvr2_test1"], ["nlvr2_dev", "nlvr2_test1"]),
                         "questions", ("image_0", "image_1"), extra_columns=("answers",),
                         kind="nlvr2"),
}


def dataset_files(name: str, split: str) -> List[str]:
    """The official file stems (without ".arrow") of dataset ``name`` for ``split``."""
    return list(_spec(name).files[_split(split)])


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    return DATASETS[name]


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


# ---- reading -----------------------------------------------------------------------------------------------------


def _stamp(path: str) -> Tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def changed_files(dataset: Dataset, shrunk_only: bool = False) -> List[str]:
    """The arrow files of ``dataset`` (an ArrowDataset or a ConcatDataset of them) changed in place on disk since
    they were mapped (``shrunk_only``: made shorter), each as "path (what changed)".

    A memory-mapped file truncated or rewritten in place while it is read makes the reading process fault (SIGBUS):
    a DataLoader worker then dies with torch's message about shared memory, which names no file. A file replaced by
    a rename or deleted is not reported: the mapping keeps the old file."""
    changed = []
    for ds in getattr(dataset, "datasets", [dataset]):
        for path, (dev, ino, size, mtime) in getattr(ds, "stamps", {}).items():
            try:
                now = _stamp(path)
            except OSError:
                continue
            if now[:2] != (dev, ino):
                continue
            if now[2] < size or (now[2] != size and not shrunk_only):
                changed.append(f"{path} (size {size} -> {now[2]} bytes)")
            elif now[3] != mtime and not shrunk_only:
                changed.append(f"{path} (modified in place)")
    return changed


def read_arrow(path: str) -> pa.Table:
    """The table of one arrow file, memory-mapped (no copy of the image bytes).

    The file is validated in full first (offsets within their buffers, UTF-8 text): a corrupt file would otherwise
    be read through wild offsets (a crash, not an error). This reads the offsets and the text, not the image bytes.
    An unreadable or corrupt file raises ValueError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"arrow file not found: {path}")
    try:
        table = pa.ipc.RecordBatchFileReader(pa.memory_map(path, "r")).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Arrow IPC file ({type(exc).__name__}: {exc})") from exc
    if len(set(table.schema.names)) != len(table.schema.names):
        raise ValueError(f"{path}: duplicate column names {table.schema.names}")
    return table


def _is_text_column(t: pa.DataType) -> bool:
    """A string, or a list of strings (the official layout)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _concat(tables: Sequence[pa.Table]) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="default")
    except TypeError:  # pyarrow < 14
        return pa.concat_tables(tables, promote=True)


def _first_occurrences(texts: Sequence[Optional[str]]) -> List[int]:
    """Indices of the first occurrence of each distinct text, in order (duplicates removed, first-seen order)."""
    first: Dict[Optional[str], int] = {}
    for j, t in enumerate(texts):
        first.setdefault(t, j)
    return list(first.values())


def _caption_index(column: Optional[pa.ChunkedArray], remove_duplicate: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Where each row's captions are in the column's flat string values (``_flat_values``).

    A text column holds a list of strings per row (the official layout), a bare string (one caption; a null row has
    none), or nothing (null type). Returns ``row_start`` (rows + 1 offsets into ``cap_pos``) and ``cap_pos`` (int64):
    row r's captions are the values at ``cap_pos[row_start[r]:row_start[r + 1]]``, with later duplicates within a
    row left out when ``remove_duplicate``. Python objects are made one chunk at a time, only to find duplicates."""
    counts, positions, base = [], [], 0
    for chunk in (column.chunks if column is not None else ()):
        n = len(chunk)
        valid = ~np.asarray(chunk.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if pa.types.is_null(chunk.type):
            counts.append(np.zeros(n, np.int64))
            continue
        if not (pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)):  # one string per row
            counts.append(valid.astype(np.int64))
            positions.append(base + np.flatnonzero(valid).astype(np.int64))
            base += n
            continue
        offsets = chunk.offsets.to_numpy().astype(np.int64)  # into chunk.values, which ignores the slice offset
        lengths = np.where(valid, np.diff(offsets), 0)
        first = np.cumsum(lengths) - lengths  # each row's first entry in pos
        pos = np.repeat(offsets[:-1], lengths) + np.arange(int(lengths.sum())) - np.repeat(first, lengths)
        if remove_duplicate:
            keep = np.ones(len(pos), dtype=bool)
            for r, texts in enumerate(chunk.to_pylist()):
                if texts is not None and len(set(texts)) < len(texts):
                    kept = _first_occurrences(texts)
                    keep[first[r]:first[r] + lengths[r]] = False
                    keep[first[r] + np.asarray(kept, dtype=np.int64)] = True
                    lengths[r] = len(kept)
            pos = pos[keep]
        counts.append(lengths.astype(np.int64))
        positions.append(base + np.asarray(pos, dtype=np.int64))
        base += len(chunk.values)
    counts_all = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    row_start = np.concatenate([[0], np.cumsum(counts_all)]).astype(np.int64)
    cap_pos = np.concatenate(positions).astype(np.int64) if positions else np.zeros(0, np.int64)
    return row_start, cap_pos


def _flat_values(column: Optional[pa.ChunkedArray]) -> pa.ChunkedArray:
    """The column's strings, flat, without a copy: the list chunks' whole value arrays, or the string chunks."""
    chunks = [] if column is None else [
        c.values if (pa.types.is_list(c.type) or pa.types.is_large_list(c.type)) else c
        for c in column.chunks if not pa.types.is_null(c.type)]
    return pa.chunked_array(chunks, type=chunks[0].type if chunks else pa.string())


def nlvr2_label(value: Any, where: str) -> str:
    """An NLVR2 label as the official files store it, "True" or "False", from those strings in any case or a JSON
    boolean (what other tools write; the official reader's ``== "True"`` would read "true" as False)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return "True" if value.lower() == "true" else "False"
    raise ValueError(f"{where} must be 'True' or 'False', got {value!r}")


class ArrowDataset(Dataset):
    """Map-style dataset over arrow files ``<data_root>/<name>.arrow`` for ``name`` in ``names``.

    Prefer ``make_dataset`` / ``build_dataset``, which fill ``names`` and the columns from the official table.

    transform: a callable ``PIL.Image -> (3, S, S) tensor``; default the official train or eval transform at
    ``image_size`` (``train`` selects which). tokenizer: a ``vlmo_fast.tokenizer.BertTokenizer`` (default: a new one).
    image_only: one sample per row, image only (retrieval evaluation). text_only: one sample per caption without
    decoding the image (the text side of retrieval evaluation; not official, which decodes it and drops it).
    """

    def __init__(self, data_root: str, names: Sequence[str], image_size: int = 224, max_text_len: int = 40,
                 train: bool = False, tokenizer=None, text_column: str = "caption",
                 image_keys: Sequence[str] = ("image",), image_only: bool = False, text_only: bool = False,
                 remove_duplicate: bool = False,
                 required_columns: Sequence[str] = (), transform: Optional[Callable] = None, on_error: str = "drop",
                 dataset_name: str = "arrow", split: str = "train", kind: str = "caption"):
        if not os.path.isdir(data_root):
            raise FileNotFoundError(f"data root not found (not a directory): {data_root}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if not isinstance(max_text_len, int) or max_text_len < 2:
            raise ValueError(f"max_text_len must be an int >= 2, got {max_text_len!r}")
        if image_only and not image_keys:
            raise ValueError(f"{dataset_name} has no image column: image_only=True is not possible")
        if image_only and text_only:
            raise ValueError("image_only and text_only exclude each other")
        self.data_root, self.names = data_root, list(names)
        self.paths = [os.path.join(data_root, f"{n}.arrow") for n in self.names]
        self.image_size, self.max_text_len, self.train = image_size, max_text_len, train
        self.text_column, self.image_only, self.text_only = text_column, image_only, text_only
        self.image_keys = () if text_only else tuple(image_keys)
        self.dataset_name, self.split, self.kind, self.on_error = dataset_name, split, kind, on_error
        self.transform = transform if transform is not None else (
            build_transform(image_size, train) if self.image_keys else None)
        if tokenizer is None and not image_only:
            from ..tokenizer import BertTokenizer

            tokenizer = BertTokenizer()
        self.tokenizer = tokenizer
        self._log = BadSampleLog(f"{dataset_name}/{split}")

        columns = list(dict.fromkeys(list(image_keys) + [text_column] + list(required_columns)))
        tables = []
        self.stamps: Dict[str, Tuple[int, int, int, int]] = {}  # what each file was when mapped (changed_files)
        for path in self.paths:
            table = read_arrow(path)
            self.stamps[path] = _stamp(path)
            for col in columns:
                if col not in table.schema.names:
                    raise ValueError(f"{path}: missing column {col!r} (the {dataset_name} dataset reads "
                                     f"{columns}; the file has {table.schema.names})")
            text_type = table.schema.field(text_column).type
            if not _is_text_column(text_type) and not pa.types.is_null(text_type):
                raise ValueError(f"{path}: column {text_column!r} must hold a list of strings per row (or a "
                                 f"string), got {text_type}")
            tables.append(table)
        self._table: Optional[pa.Table] = _concat(tables) if tables else None
        self.table_index = np.concatenate(
            [np.full(len(t), i, dtype=np.int32) for i, t in enumerate(tables)]) if tables else np.zeros(0, np.int32)
        # The captions stay in the memory-mapped table: per caption only its place in the column's flat string values
        # is kept (numpy, so DataLoader workers share it; Python lists of strings would be copied into every worker
        # page by page as reference counts change: about 125 MB per million captions per worker).
        column = self._table.column(text_column) if self._table is not None else None
        self._row_start, self._cap_pos = _caption_index(column, remove_duplicate)
        self._values = _flat_values(column)
        counts = np.diff(self._row_start)
        if image_only:
            self.rows = np.arange(len(counts), dtype=np.int64)
            self.caps = np.full(len(counts), -1, dtype=np.int64)
        else:
            self.rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
            self.caps = np.arange(len(self._cap_pos), dtype=np.int64) - np.repeat(self._row_start[:-1], counts)

    # A DataLoader using "spawn" pickles the dataset: reopen the memory maps instead of copying the tables.
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_table"] = state["_values"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.paths:
            self._table = _concat([read_arrow(p) for p in self.paths])
            self._values = _flat_values(self._table.column(self.text_column))

    @property
    def table(self) -> Optional[pa.Table]:
        return self._table

    @property
    def index_mapper(self) -> List[Tuple[int, Optional[int]]]:
        """``index_mapper[j] = (row, caption_idx)`` as official (caption_idx None in image_only mode)."""
        return [(int(r), None if c < 0 else int(c)) for r, c in zip(self.rows, self.caps)]

    def __len__(self) -> int:
        return len(self.rows)

    def num_rows(self) -> int:
        return len(self._row_start) - 1

    def captions(self, row: int) -> List[Optional[str]]:
        """The captions (questions) of ``row``, duplicates removed where the dataset removes them."""
        row = range(self.num_rows())[row]  # negative rows count from the end; out of range raises IndexError
        return [self._values[int(p)].as_py() for p in self._cap_pos[self._row_start[row]:self._row_start[row + 1]]]

    def caption(self, index: int) -> Optional[str]:
        """The caption (question) of sample ``index`` (not in image_only mode)."""
        if self.image_only:
            raise ValueError("an image_only dataset's samples are images, not captions")
        return self._values[int(self._cap_pos[index])].as_py()

    @property
    def all_texts(self) -> List[List[Optional[str]]]:
        """Every row's captions, as the official ``all_texts``: a Python copy made at each call (the dataset itself
        keeps none), for inspection and small sets."""
        return [self.captions(r) for r in range(self.num_rows())]

    def cell(self, column: str, row: int) -> Any:
        return self._table.column(column)[row].as_py()

    def get_raw_image(self, row: int, image_key: str = "image"):
        """The decoded RGB PIL image of ``row``."""
        return decode_image(self.cell(image_key, row))

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.dataset_name}/{self.split}: index {index} out of range (len {len(self)})")
        failures = 0
        while True:
            try:
                item = self._item(index)
                if failures:
                    item["bad_samples"] = failures
                return item
            except Exception as exc:  # noqa: BLE001 - any unreadable sample is skipped and counted (as official)
                self._log(self._where(index), exc)
                failures += 1
                if self.on_error == "drop":
                    return None
                if failures >= 100:  # a None here made this process's batch smaller than the others' (a collective
                    # mismatch in the all-gathers: an abort with gloo), and the official retries never end
                    raise UnreadableData(f"{self.dataset_name}/{self.split}: {failures} random samples in a row could "
                                     f"not be read (see the samples logged above): the set is mostly unreadable, and "
                                     f"resampling, which keeps every process's batch full, needs readable samples") \
                        from exc
                index = int(torch.randint(len(self), (1,)).item())

    def _where(self, index: int) -> str:
        """Sample ``index`` as a reader finds it: its file, the row in that file, and its image_id."""
        row = int(self.rows[index])
        table = int(self.table_index[row])
        first = int(np.searchsorted(self.table_index, table))  # the file's first row in the concatenated table
        where = f"{index} (row {row - first} of {self.paths[table]}"
        if "image_id" in self._table.schema.names:
            try:
                where += f", image_id {self.cell('image_id', row)!r}"
            except Exception:  # noqa: BLE001 - the message must not fail
                pass
        return where + ")"

    def _item(self, index: int) -> Dict[str, Any]:
        row, cap = int(self.rows[index]), int(self.caps[index])
        item: Dict[str, Any] = {}
        for key in self.image_keys:
            item[key] = self.transform(self.get_raw_image(row, key))
        if not self.image_only:
            text = self.caption(index)
            if not isinstance(text, str):
                raise TypeError(f"caption {cap} of row {row} is {type(text).__name__}, not str")
            item.update(encode_text(self.tokenizer, text, self.max_text_len))
        item.update({"img_index": row, "cap_index": None if cap < 0 else cap, "raw_index": index})
        if not self.image_only:
            item["replica"] = cap > 0
        self._extras(item, row, cap)
        return item

    def _extras(self, item: Dict[str, Any], row: int, cap: int) -> None:
        if cap < 0:  # image_only: the extras belong to a question, not to the image
            return
        if self.kind == "vqa":
            item["qid"] = self.cell("question_id", row)[cap]
            if self.split != "test":
                item["vqa_answer"] = self.cell("answers", row)[cap]
                item["vqa_labels"] = self.cell("answer_labels", row)[cap]
                item["vqa_scores"] = self.cell("answer_scores", row)[cap]
            else:
                item["vqa_answer"], item["vqa_labels"], item["vqa_scores"] = [], [], []
        elif self.kind == "nlvr2":
            item["answers"] = int(nlvr2_label(self.cell("answers", row)[cap], "NLVR2 answer") == "True")
            item["table_name"] = self.names[self.table_index[row]]

    def __repr__(self) -> str:
        return (f"ArrowDataset({self.dataset_name}/{self.split}, files={self.names}, rows={self.num_rows()}, "
                f"samples={len(self)}, image_only={self.image_only})")


SHARDED = ("gcc", "sbu", "wikibk")  # datasets whose splits are numbered shards (conceptual_caption_train_0, ...)


def _present_shards(name: str, data_root: str, split: str) -> List[str]:
    """The official file stems of ``name``/``split``; for a sharded dataset only those under ``data_root``, with a
    warning naming how many are missing (all of them missing: the full list, so the reader names the first)."""
    stems = list(_spec(name).files[split])
    if name not in SHARDED or len(stems) < 2 or not os.path.isdir(data_root):
        return stems
    present = [st for st in stems if os.path.isfile(os.path.join(data_root, f"{st}.arrow"))]
    if not present or len(present) == len(stems):
        return stems
    missing = [st for st in stems if st not in present]
    warnings.warn(f"{name} {split}: reading the {len(present)} of its {len(stems)} official files that are in "
                  f"{data_root}; missing: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    return present


def make_dataset(name: str, data_root: str, split: str, image_size: int = 224, max_text_len: int = 40,
                 train: Optional[bool] = None, tokenizer=None, image_only: bool = False, text_only: bool = False,
                 transform: Optional[Callable] = None, on_error: str = "drop",
                 names: Optional[Sequence[str]] = None) -> ArrowDataset:
    """The official dataset ``name`` ("coco", "f30k", "gcc", "sbu", "vg", "wikibk", "vqa", "nlvr2") for ``split``.

    train: which transform (default: ``split == "train"``). names: other file stems than the official ones (e.g.
    fewer GCC shards). Splits without official files (sbu/vg val and test) give an empty dataset. The numbered
    shards of gcc, sbu and wikibk are read as far as they are there (a warning names the missing ones), as the
    official reader skips missing files: a writer given less data writes fewer. None there is an error.
    """
    spec = _spec(name)
    split = _split(split)
    required = list(spec.extra_columns) + (list(spec.label_columns) if split != "test" else [])
    if names is None:
        names = _present_shards(name, data_root, split)
    return ArrowDataset(
        data_root, list(names), image_size=image_size,
        max_text_len=max_text_len, train=(split == "train") if train is None else train, tokenizer=tokenizer,
        text_column=spec.text_column, image_keys=spec.image_keys, image_only=image_only, text_only=text_only,
        remove_duplicate=spec.remove_duplicate, required_columns=required, transform=transform, on_error=on_error,
        dataset_name=name, split=split, kind=spec.kind)


def check_vqa_labels(dataset: Dataset, label_size: int) -> None:
    """Every VQA answer label of ``dataset`` (an ``ArrowDataset``, or a ``ConcatDataset`` of them; other datasets pass)
    lies in [0, label_size), the model's classes: a label beyond them failed at the first step that drew it, after
    the model and data were built. One pass over the label column of each file (memory-mapped)."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    check_vqa_label_files([p for part in parts if isinstance(part, ArrowDataset) and part.kind == "vqa"
                           for p in part.paths], label_size)


def check_vqa_label_files(paths: Sequence[str], label_size: int) -> None:
    """``check_vqa_labels`` of the VQA arrow files ``paths``."""
    import pyarrow.compute as pc

    for path in paths:
        table = read_arrow(path)
        if "answer_labels" not in table.schema.names:
            continue
        labels = table.column("answer_labels")
        while pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type):
            labels = pc.list_flatten(labels)
        if pa.types.is_null(labels.type) or len(labels) == labels.null_count:
            continue  # the test split's empty lists
        low, high = pc.min_max(labels).values()
        if low.as_py() < 0 or high.as_py() >= label_size:
            bad = high.as_py() if high.as_py() >= label_size else low.as_py()
            raise ValueError(f"{path}: VQA answer label {bad} is outside the model's {label_size} classes "
                             f"(give --vqa-label-size: the size of the answer vocabulary the file was written "
                             f"with)")


def build_dataset(data_root: str, names: Union[str, Sequence[str]], split: str, image_size: int = 224,
                  max_text_len: int = 40, train: Optional[bool] = None, tokenizer=None, image_only: bool = False,
                  text_only: bool = False, on_error: str = "drop") -> Dataset:
    """The (multi-)dataset of an official config: ``ConcatDataset`` of ``make_dataset(name, ...)`` for each name
    (sampling proportional to caption counts), or the single dataset when one name is given. Datasets without files
    for ``split`` are left out; none at all is a ValueError."""
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("build_dataset: names is empty; expected dataset keys such as ['coco']")
    if tokenizer is None and not image_only:
        from ..tokenizer import BertTokenizer

        tokenizer = BertTokenizer()
    parts = [make_dataset(n, data_root, split, image_size, max_text_len, train, tokenizer, image_only, text_only,
                          on_error=on_error) for n in names]
    parts = [p for p in parts if p.names]
    if not parts:
        raise ValueError(f"build_dataset: none of {list(names)} has files for split {split!r}")
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


# ---- writing -----------------------------------------------------------------------------------------------------


def write_arrow(path: str, data: Union[pa.Table, Sequence[Mapping[str, Any]], Mapping[str, Sequence[Any]]],
                schema: Optional[pa.Schema] = None) -> str:
    """Write ``data`` (rows as dicts, columns as a dict of lists, or a Table) as one Arrow IPC file, atomically
    (a temporary file in the same folder, then a rename). Returns ``path``."""
    if isinstance(data, pa.Table):
        table = data if schema is None else data.cast(schema)
    elif isinstance(data, Mapping):
        table = pa.table(dict(data), schema=schema)
    else:
        rows = list(data)
        if not rows and schema is None:
            raise ValueError(f"write_arrow({path!r}): no rows and no schema; pass schema= to write an empty file")
        table = pa.Table.from_pylist(rows, schema=schema)
    write_arrow_batches(path, table.schema, [table])
    return path


def write_arrow_batches(path: str, schema: pa.Schema, batches: Iterable[Union[pa.RecordBatch, pa.Table]]) -> int:
    """Write ``batches`` (record batches or tables of ``schema``) one after another as one Arrow IPC file, so only one
    batch is in memory at a time; atomically (a temporary file in the same folder, renamed over ``path`` once every
    batch is written; on any error the temporary file is removed and ``path`` is untouched). Returns the row count."""
    rows = 0
    with atomic_path(path) as tmp:
        with pa.OSFile(tmp, "wb") as sink:
            with pa.RecordBatchFileWriter(sink, schema) as writer:
                for batch in batches:
                    if isinstance(batch, pa.Table):
                        writer.write_table(batch)
                    else:
                        writer.write_batch(batch)
                    rows += batch.num_rows
    return rows


CAPTION_SCHEMA = pa.schema([("image", pa.binary()), ("caption", pa.list_(pa.string())), ("image_id", pa.string()),
                            ("split", pa.string())])


def make_caption_arrow(path: str, images: Sequence[bytes], captions: Sequence[Sequence[str]],
                       image_ids: Optional[Sequence[str]] = None, split: str = "train",
                       extra: Optional[Mapping[str, Sequence[Any]]] = None) -> str:
    """A coco/f30k/gcc/sbu-like file: columns image (bytes), caption (list of str), image_id, split (+ extra)."""
    if len(images) != len(captions):
        raise ValueError(f"make_caption_arrow: {len(images)} images but {len(captions)} caption lists")
    ids = list(image_ids) if image_ids is not None else [f"{i}" for i in range(len(images))]
    columns: Dict[str, Any] = {
        "image": pa.array([bytes(b) for b in images], pa.binary()),
        "caption": pa.array([list(c) for c in captions], pa.list_(pa.string())),
        "image_id": pa.array([str(i) for i in ids], pa.string()),
        "split": pa.array([split] * len(images), pa.string()),
    }
    for key, values in (extra or {}).items():
        if len(values) != len(images):
            raise ValueError(f"make_caption_arrow: extra column {key!r} has {len(values)} values for "
                             f"{len(images)} rows")
        columns[key] = pa.array(list(values))
    return write_arrow(path, pa.table(columns))


def make_caption_dataset(root: str, name: str, split: str, images: Sequence[bytes],
                         captions: Sequence[Sequence[str]], image_ids: Optional[Sequence[str]] = None,
                         extra: Optional[Mapping[str, Sequence[Any]]] = None) -> List[str]:
    """Write the official files of caption dataset ``name`` (coco, f30k, gcc, sbu, vg, wikibk) for ``split`` under
    ``root``, spreading the rows over the split's files in order (coco train: train then restval). Returns the
    paths. For wikibk pass ``images=None``: the image column holds the string "None" as official."""
    spec = _spec(name)
    if spec.kind not in ("caption", "text"):
        raise ValueError(f"make_caption_dataset: {name!r} is not a caption dataset")
    stems = dataset_files(name, split)
    if not stems:
        raise ValueError(f"make_caption_dataset: {name} has no {split} files")
    n = len(captions)
    ids = list(image_ids) if image_ids is not None else [f"{name}_{split}_{i}" for i in range(n)]
    paths = []
    for stem, part in zip(stems, np.array_split(np.arange(n), len(stems))):
        path = os.path.join(root, f"{stem}.arrow")
        sel = part.tolist()
        part_extra = {k: [v[i] for i in sel] for k, v in (extra or {}).items()}
        if spec.kind == "text":
            table = pa.table({"image": pa.array(["None"] * len(sel), pa.string()),
                              "caption": pa.array([list(captions[i]) for i in sel], pa.list_(pa.string())),
                              "source": pa.array([name] * len(sel), pa.string()),
                              "split": pa.array([split] * len(sel), pa.string()), **part_extra})
            paths.append(write_arrow(path, table))
        else:
            paths.append(make_caption_arrow(path, [images[i] for i in sel], [captions[i] for i in sel],
                                            [ids[i] for i in sel], split, part_extra))
    return paths


def encode_image(img, format: str = "PNG", quality: int = 95) -> bytes:
    """A PIL image or uint8 (H, W), (H, W, 3) or (H, W, 4) array as encoded bytes (PNG lossless by default, or
    JPEG)."""
    import io

    from PIL import Image

    from .transforms import image_from_array

    if not isinstance(img, Image.Image):
        img = image_from_array(img)  # a uint8 array (a float or 16-bit one is refused: it would be black or wrap)
    buf = io.BytesIO()
    if format.upper() in ("JPEG", "JPG"):
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format=format.upper())
    return buf.getvalue()
