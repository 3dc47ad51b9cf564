"""Raw public datasets -> the official ViLT/VLMo arrow files that ``vlmo_fast.data.arrow`` reads (spec §7).

Writers (each returns a ``PrepareSummary``: rows and samples per file, images missing or unreadable, rows dropped):

- ``prepare_coco(raw_root, out_root)``: Karpathy's ``dataset_coco.json`` + ``train2014/``, ``val2014/`` ->
  ``coco_caption_karpathy_{train,restval,val,test}.arrow`` (restval is read in train, as official).
- ``prepare_f30k(raw_root, out_root)``: Karpathy's ``dataset_flickr30k.json`` + ``flickr30k-images/`` ->
  ``f30k_caption_karpathy_{train,val,test}.arrow``.
- ``prepare_vg(raw_root, out_root)``: Visual Genome's ``region_descriptions.json`` + ``VG_100K/``, ``VG_100K_2/``
  -> ``vg.arrow`` (one row per image, its region phrases as captions).
- ``prepare_text(files, out_root, split)``: plain text, one sample a line -> ``wikibk_train_{0..49}.arrow`` /
  ``wikibk_val_0.arrow`` (the text-only stage's data).
- ``prepare_nlvr2(raw_root, out_root)``: the NLVR2 release (``nlvr2/data/{train,dev,test1}.json`` of the cloned
  repository, images under ``images/train/<directory>/``, ``dev/``, ``test1/``) -> ``nlvr2_{train,dev,test1}.arrow``.
- ``prepare_vqa(raw_root, out_root)``: the VQAv2 release (questions, annotations, COCO ``train2014/``, ``val2014/``,
  ``test2015/``) -> ``vqav2_{train,val,trainable_val,rest_val,test}.arrow``, with the official answer classes
  (``vqa_answers``).
- ``prepare_captions(pairs, out_root, name, split)``: (image path, caption) pairs of web caption data -> the official
  files of ``gcc`` (``conceptual_caption_{train,val}_<i>``) or ``sbu`` (``sbu_<i>``), or ``<name>_<split>_<i>`` for
  your own data; with ``fmt="shards"`` WebDataset tar shards ``<name>-<split>-<i>.tar`` instead (and their index
  ``<name>-<split>.shards.json``, with which readers split an epoch's samples evenly). ``read_pairs``
  reads such pairs from a TSV, JSON-lines or JSON file.

A run writes its files into a hidden staging folder of ``out_root`` and moves them into place together at the end,
so a failed run, or one that found none of its images, leaves earlier output as it was. The command removes its
folder on an error, Ctrl-C or SIGTERM; the folder of a run killed otherwise (SIGKILL, the OOM killer) is removed by
the next run into ``out_root`` (each folder holds an OS file lock while its run lives). A run of web captions
removes the files (or shards) of its name and split that an earlier run wrote beyond its own. Image files are read
by a few threads ahead of the writer, in order.

Raw layouts (what the official ``write_*.py`` of ViLT/VLMo read, under their ``root``)::

    coco:  train2014/*.jpg  val2014/*.jpg  karpathy/dataset_coco.json
    f30k:  flickr30k-images/*.jpg  karpathy/dataset_flickr30k.json
    vg:    images/VG_100K/<image_id>.jpg  images/VG_100K_2/...  annotations/region_descriptions.json
    nlvr2: images/train/<directory>/train-<set>-<pair>-img{0,1}.png  dev/dev-...-img{0,1}.png  test1/...
           nlvr2/data/{train,dev,test1}.json  (JSON lines: identifier, sentence, label, directory (train))
    vqa:   train2014/*.jpg  val2014/*.jpg  test2015/*.jpg  v2_mscoco_{train2014,val2014}_annotations.json
           v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json  (JSON also in annotations/)

The Karpathy JSON may also lie directly in ``raw_root`` (or be given explicitly); the NLVR2 JSON-lines also in
``raw_root/data/`` or ``raw_root``, and the dev/test1 images also under ``raw_root/images/``.

What is stored (as the official writers): image columns hold the files' bytes as they are on disk (never re-encoded);
``caption`` the Karpathy ``raw`` sentences of one image (all of them, one row per image); ``image_id`` the image's
file name; ``split`` the Karpathy split name (``restval`` in the restval file). NLVR2 groups the sentences of one
image pair into one row: ``questions`` the sentences, ``answers`` their labels as "True"/"False" strings,
``identifier`` the pair's id (the sentence identifier without its last ``-<n>``, e.g. ``dev-850-0``). Web captions:
one row per image path with all its captions, ``image_id`` the file name, at most ``shard_rows`` rows per file.

Decisions that differ from the official writers:
- A missing or unreadable image is skipped and counted (official: COCO/F30K/GCC/SBU silently leave out images that
  are not on disk, NLVR2 stops with an exception); a pair with either NLVR2 image missing is left out whole. A missing
  raw folder or JSON raises FileNotFoundError naming the path and what was expected; a malformed JSON ValueError.
- Rows keep the order of the annotation file (official: a random shuffle of the image files; VG: the order of
  region_descriptions.json), so a rerun writes the same files. VQAv2 keeps the shuffle, because its last 1,000 val
  images become the rest_val set, but seeds it. Every file is written in batches
  (``write_arrow_batches``), never holding a whole split's images.
- F30K: Karpathy splits other than train/val/test (there are none in the public ``dataset_flickr30k.json``) are left
  out and counted, as the official writer writes only those three files. COCO ``restval`` has its own file.
- Web captions: by default the rows are spread over exactly the official number of files of ``name``/``split``
  (gcc train 30, val 1; sbu 9), so ``make_dataset(name, out_root, split)`` finds every file it reads; the official
  writer cut files of 100,000 rows, which ``shard_rows=100000`` reproduces (then read with ``names=`` when the count
  differs). Images not on disk are left out before the rows are spread, as the official writer kept only those
  present. Captions are grouped by image path (official: one caption per image, keyed by file name).
- Text (wikibk): a line that is not UTF-8 is skipped, counted and named by file and line (official: an exception).
- NLVR2 ``balanced_{dev,test1}`` / ``unbalanced_{dev,test1}`` and VQAv2 ``test-dev`` (written by the official
  writers but read by no config) are written only when asked for in ``splits``.
- VQAv2: a question without an annotation is left out and counted (official: an exception); the test rows' answer
  columns are typed empty lists (official: untyped).

The CLI is ``vlmo-fast prepare {coco,f30k,vg,text,nlvr2,vqa,captions} RAW_ROOT OUT_ROOT [options]``
(``prepare_main``).
"""

from __future__ import annotations

import argparse
import codecs
import collections
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.compute as pc

from ..fileio import LOCK_BUSY, try_lock
from .arrow import CAPTION_SCHEMA, DATASETS, dataset_files, nlvr2_label, read_arrow, write_arrow_batches
from .vqa_answers import OFFICIAL_VOCAB_SIZE, answer_vocabulary, question_targets
from .sample import open_image

COCO_SPLITS = ("train", "restval", "val", "test")
F30K_SPLITS = ("train", "val", "test")
NLVR2_SPLITS = ("train", "dev", "test1")
NLVR2_EXTRA_SPLITS = ("balanced_dev", "balanced_test1", "unbalanced_dev", "unbalanced_test1")
NLVR2_SCHEMA = pa.schema([("image_0", pa.binary()), ("image_1", pa.binary()), ("questions", pa.list_(pa.string())),
                          ("answers", pa.list_(pa.string())), ("identifier", pa.string())])
OFFICIAL_SHARD_ROWS = 100_000  # rows per file of the official GCC/SBU writers
SHARD_SAMPLES = 5000  # images per WebDataset tar shard (prepare_captions(fmt="shards"))
BATCH_BYTES = 64 << 20  # image bytes per record batch (bounds the memory of a writer)
BATCH_ROWS = 2048
READ_THREADS = 8  # threads reading (and verifying) image files ahead of the writer
READ_AHEAD = 64  # rows read ahead at most (bounds the memory of the read-ahead)
_EXAMPLES = 10  # missing/unreadable paths kept in a summary
_EXISTS_SLICE = 4096  # image paths whose presence is checked at a time
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Log = Optional[Callable[[str], None]]


@dataclass
class PrepareSummary:
    """What a writer did. ``files``/``samples``: rows / captions (or questions) written per arrow file path.
    ``missing_images``: image files not on disk; ``unreadable_images``: present but unreadable (an I/O error, empty,
    or not an image when verified); ``skipped_rows``: rows (images, NLVR2 pairs) left out for either reason.
    ``dropped``: other annotations left out, by reason. ``examples``: the first few missing/unreadable paths;
    ``malformed``: the first few malformed caption-list lines."""

    dataset: str
    out_root: str
    files: Dict[str, int] = field(default_factory=dict)
    samples: Dict[str, int] = field(default_factory=dict)
    missing_images: int = 0
    unreadable_images: int = 0
    skipped_rows: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)
    examples: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    malformed: List[str] = field(default_factory=list)  # the first few malformed caption-list lines, and why
    _staging: Optional[str] = field(default=None, repr=False, compare=False)
    _lock: Optional[int] = field(default=None, repr=False, compare=False)  # the staging folder's held lock

    @property
    def rows(self) -> int:
        return sum(self.files.values())

    def report(self) -> str:
        """A few human-readable lines (the CLI prints them)."""
        lines = [f"{self.dataset}: wrote {len(self.files)} file(s) under {self.out_root}, {self.rows} rows, "
                 f"{sum(self.samples.values())} samples"]
        lines += [f"  {os.path.basename(p)}: {n} rows, {self.samples.get(p, 0)} samples" for p, n in self.files.items()]
        if self.missing_images or self.unreadable_images:
            lines.append(f"  skipped {self.skipped_rows} row(s): {self.missing_images} image(s) missing, "
                         f"{self.unreadable_images} unreadable; e.g. " + ", ".join(self.examples[:3]))
        lines += [f"  dropped {n}: {reason}" for reason, n in self.dropped.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def _bad(self, path: str, missing: bool) -> None:
        if missing:
            self.missing_images += 1
        else:
            self.unreadable_images += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(path)

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


# ---- shared helpers ----------------------------------------------------------------------------------------------


def _need_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"expected {what} at {path} (not a directory)")
    return path


def _find_file(candidates: Sequence[str], what: str, explicit: Optional[str] = None) -> str:
    if explicit is not None:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"{what} not found: {explicit}")
        return explicit
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"expected {what} at one of: {', '.join(candidates)}")


def _out_root(out_root: str) -> str:
    if os.path.exists(out_root) and not os.path.isdir(out_root):
        raise FileNotFoundError(f"OUT_ROOT is a file, expected a directory for the arrow files: {out_root}")
    try:
        os.makedirs(out_root, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot make OUT_ROOT {out_root}: {exc.strerror or exc}") from exc
    if not os.access(out_root, os.W_OK | os.X_OK):
        raise ValueError(f"OUT_ROOT {out_root} is not writable")
    return out_root


def _load(path: Union[str, Tuple[str, ...]], verify: bool) -> Tuple[Optional[bytes], bool]:
    """(the file's bytes as they are on disk, False), or (None, whether it is missing rather than unreadable).
    ``path`` may be a tuple of places the file may be in: the first that exists."""
    if isinstance(path, tuple):
        path = next((p for p in path if os.path.isfile(p)), path[0])
    if not os.path.isfile(path):
        return None, True
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            raise OSError("empty file")
        if verify:
            _decode_check(data)
    except Exception:  # noqa: BLE001 - any unreadable file is skipped and counted, never ends the run
        return None, False
    return data, False


def _decode_check(data: bytes) -> None:
    """Raise unless the image decodes, as training decodes it: ``Image.verify`` reads only the headers, so a partly
    downloaded JPEG (the usual broken file of a web crawl) passed it. A JPEG is decoded at 1/8 scale (libjpeg's
    draft mode still reads every byte of the compressed data, and finds a truncated file as the full decode does)."""
    with open_image(data) as img:
        img.draft(None, (1, 1))
        img.load()


def _read_rows(rows: Iterable[Sequence[Union[str, Tuple[str, ...]]]], summary: PrepareSummary,
               verify: bool) -> Iterator[List[Optional[bytes]]]:
    """For each row's image paths, in order, their bytes (None where missing or unreadable, counted in ``summary``;
    a path given as a tuple of alternatives is looked up in the reading thread and counted under its first).
    Files are read (and verified) by ``READ_THREADS`` threads, at most ``READ_AHEAD`` rows ahead of the writer: on
    a network file system or with ``verify`` the writer otherwise waits on one file at a time."""
    pending: Deque[Tuple[Sequence[str], List[Future]]] = collections.deque()

    def collect() -> List[Optional[bytes]]:
        paths, futures = pending.popleft()
        out = []
        for path, future in zip(paths, futures):
            data, missing = future.result()
            if data is None:
                summary._bad(path[0] if isinstance(path, tuple) else path, missing)
            out.append(data)
        return out

    with ThreadPoolExecutor(READ_THREADS) as pool:
        for paths in rows:
            pending.append((paths, [pool.submit(_load, path, verify) for path in paths]))
            if len(pending) >= READ_AHEAD:
                yield collect()
        while pending:
            yield collect()


def _found(items: Sequence[Any], files_of: Callable[[Any], Sequence[Union[str, Tuple[str, ...]]]],
           summary: PrepareSummary, verify: bool,
           on_skip: Optional[Callable[[Any], None]] = None) -> Iterator[Tuple[Any, List[bytes]]]:
    """(item, the bytes of its image files) for each of ``items`` whose files ``files_of(item)`` were all read, in
    order (``_read_rows``); the others are counted in ``summary.skipped_rows`` (and passed to ``on_skip``)."""
    for images, item in zip(_read_rows((files_of(item) for item in items), summary, verify), items):
        if any(image is None for image in images):
            summary.skipped_rows += 1
            if on_skip is not None:
                on_skip(item)
            continue
        yield item, images


def _batches(rows: Iterable[Dict[str, Any]], schema: pa.Schema, image_keys: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of ``rows``, each cut once it holds ``BATCH_BYTES`` of images or ``BATCH_ROWS`` rows."""
    batch_bytes, batch_rows = BATCH_BYTES, BATCH_ROWS
    columns: Dict[str, List[Any]] = {name: [] for name in schema.names}
    size = n = 0
    for row in rows:
        for name in schema.names:
            columns[name].append(row[name])
        size += sum(len(row[k]) for k in image_keys)
        n += 1
        if size >= batch_bytes or n >= batch_rows:
            yield pa.RecordBatch.from_pydict(columns, schema=schema)
            columns = {name: [] for name in schema.names}
            size = n = 0
    if n:
        yield pa.RecordBatch.from_pydict(columns, schema=schema)


_STAGING_PREFIX = ".prepare-"


def _staging(summary: PrepareSummary) -> str:
    """The run's hidden staging folder in OUT_ROOT: files are written there and moved into place together by
    ``_finish`` once the run has written something, so a failed or empty run never replaces earlier output. Its
    name carries the host and process (``.prepare-<host>-<pid>-<random>``, for people) and it holds a lock the run
    keeps, so a later run can tell the folder of a killed one (SIGKILL, or a SIGTERM outside ``prepare_main``), which
    nothing removed, from a live run's."""
    if summary._staging is None:
        out_root = _out_root(summary.out_root)
        _remove_dead_staging(summary, out_root)
        # made under a name scans pass over, locked, then renamed (atomically, the lock going with the file): a scan
        # never sees a run's folder before its lock is held
        made = tempfile.mkdtemp(prefix=f"{_NEW_PREFIX}{_HOST}-{os.getpid()}-", dir=out_root)
        fd, why = try_lock(os.path.join(made, _LOCK))
        staging = os.path.join(out_root, _STAGING_PREFIX + os.path.basename(made)[len(_NEW_PREFIX):])
        os.rename(made, staging)
        if fd is None:
            summary.notes.append(f"no file lock in {out_root} ({why}): were this run killed, a later run could not "
                                 f"tell its staging folder from a live run's and would leave it for you to remove")
        summary._lock, summary._staging = fd, staging
    return summary._staging


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_NEW_PREFIX = _STAGING_PREFIX + "new-"  # a staging folder being made (not yet locked): scans pass over it
_LOCK = ".lock"  # in a staging folder: held (an OS file lock) by the run writing there, released when it ends


def _remove_dead_staging(summary: PrepareSummary, out_root: str) -> None:
    """Remove the staging folders in OUT_ROOT whose run is gone: no process holds the lock in them (a killed run's
    lock went with it; this holds across hosts and PID namespaces where the file system has locks). A live run's
    folder is left alone; one whose lock cannot be checked (no lock file: an older version's; a file system without
    locks) is named in a note."""
    for name in sorted(os.listdir(out_root)):
        path = os.path.join(out_root, name)
        if not name.startswith(_STAGING_PREFIX) or name.startswith(_NEW_PREFIX) or not os.path.isdir(path):
            continue
        fd, why = try_lock(os.path.join(path, _LOCK), create=False)
        if fd is None:
            if why != LOCK_BUSY and os.path.isdir(path):  # (a folder removed meanwhile, by its run or a scan: gone)
                summary.notes.append(f"{path} is the staging folder of another run, whose lock cannot be checked "
                                     f"({why}): remove it if no prepare is writing there")
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        summary.notes.append(f"removed {name}, the staging folder of an earlier run that was killed")


def _write(summary: PrepareSummary, path: str, rows: Iterable[Dict[str, Any]], schema: pa.Schema,
           image_keys: Sequence[str], text_column: str, log: Log) -> None:
    samples = [0]

    def counted() -> Iterator[Dict[str, Any]]:
        for row in rows:
            samples[0] += len(row[text_column])
            yield row

    try:
        n = write_arrow_batches(os.path.join(_staging(summary), os.path.basename(path)), schema,
                                _batches(counted(), schema, image_keys))
    except BaseException:
        _discard(summary)
        raise
    summary.files[path], summary.samples[path] = n, samples[0]
    if log is not None:
        log(f"wrote {os.path.basename(path)}: {n} rows, {samples[0]} samples")


def _discard(summary: PrepareSummary) -> None:
    if summary._staging is not None:
        shutil.rmtree(summary._staging, ignore_errors=True)
        summary._staging = None
    if summary._lock is not None:
        os.close(summary._lock)
        summary._lock = None


def _finish(summary: PrepareSummary, also: Sequence[str] = ()) -> PrepareSummary:
    """Move the staged files over OUT_ROOT's, then ``also`` (staged file names: a shard index, which lists the files
    moved before it), or, when the run found none of its images (a wrong RAW_ROOT, or a caption list with its
    columns the other way round, e.g. Google's GCC TSV: caption, URL), discard them and say so rather than replace
    earlier output with empty files and exit 0."""
    malformed = summary.dropped.get(MALFORMED, 0)
    if summary.rows == 0 and (summary.missing_images or summary.unreadable_images or malformed):
        _discard(summary)
        lines = f", {malformed} malformed caption-list lines ({'; '.join(summary.malformed)})" if malformed else ""
        raise FileNotFoundError(
            f"{summary.dataset}: none of the images was found or readable ({summary.missing_images} missing, "
            f"{summary.unreadable_images} unreadable; e.g. {', '.join(summary.examples[:3])}{lines}); nothing "
            f"written. Check RAW_ROOT (or, for captions, that each line is <image path><TAB><caption>)")
    try:
        for path in summary.files:
            os.replace(os.path.join(summary._staging, os.path.basename(path)), path)
        for name in also:
            os.replace(os.path.join(summary._staging, name), os.path.join(summary.out_root, name))
    finally:
        _discard(summary)
    return summary


def _check_splits(splits: Optional[Sequence[str]], allowed: Sequence[str], what: str) -> List[str]:
    if splits is None:
        return list(allowed)
    if isinstance(splits, str):
        splits = [s for s in splits.split(",") if s]
    bad = [s for s in splits if s not in allowed]
    if bad or not splits:
        raise ValueError(f"{what} splits must be a non-empty subset of {list(allowed)}, got {list(splits)}")
    return list(dict.fromkeys(splits))


# ---- COCO and Flickr30K (Karpathy splits) ------------------------------------------------------------------------


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: not an annotation file (JSON nested too deeply to read)") from None


def _inside_name(name: str) -> bool:
    """Whether an annotation's file or folder name stays under the folder it is joined to: relative, with no ".."
    part (a hostile annotation file must not have prepare copy, say, ~/.ssh/id_rsa into a published arrow file)."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and "\0" not in name and not os.path.isabs(name) and ".." not in parts


def _karpathy_images(path: str, need_filepath: bool) -> List[Mapping[str, Any]]:
    data = _load_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path}: expected Karpathy's format, a JSON object with an 'images' list")
    keys = ("filepath", "filename", "split") if need_filepath else ("filename", "split")
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), str) for k in keys):
            raise ValueError(f"{path}: images[{i}] must be an object with string fields {list(keys)}")
        for k in keys[:-1]:
            if not _inside_name(entry[k]):
                raise ValueError(f"{path}: images[{i}] {k} {entry[k]!r} is not a relative name inside RAW_ROOT "
                                 "(absolute, or with a '..' part)")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or any(not isinstance(s, dict) or not isinstance(s.get("raw"), str)
                                                  for s in sentences):
            raise ValueError(f"{path}: images[{i}] ({entry['filename']}) must have 'sentences', a list of objects "
                             "with a string 'raw'")
    return images


def _prepare_karpathy(dataset: str, raw_root: str, out_root: str, karpathy_json: Optional[str], json_name: str,
                      stem: str, all_splits: Sequence[str], splits: Optional[Sequence[str]],
                      folder_of: Callable[[Mapping[str, Any]], str], verify: bool, log: Log) -> PrepareSummary:
    _need_dir(raw_root, f"the raw {dataset} folder (RAW_ROOT)")
    chosen = _check_splits(splits, all_splits, dataset)
    path = _find_file([os.path.join(raw_root, json_name), os.path.join(raw_root, "karpathy", json_name)],
                      f"{json_name} (Karpathy's {dataset} splits)", karpathy_json)
    images = _karpathy_images(path, need_filepath=(dataset == "coco"))
    summary = PrepareSummary(dataset, out_root)
    # one row per file name (as official, which keys by file name), in the JSON's order; captions of a repeated
    # file name are merged into its first entry
    rows: Dict[str, Dict[str, Any]] = {}
    for entry in images:
        split = entry["split"]
        if split not in all_splits:
            summary._drop(f"images of Karpathy split {split!r} (the official {dataset} writer writes only "
                          f"{', '.join(all_splits)})")
            continue
        name = entry["filename"]
        captions = [s["raw"] for s in entry["sentences"]]
        if name in rows:
            rows[name]["caption"].extend(captions)
            continue
        rows[name] = {"folder": folder_of(entry), "caption": captions, "image_id": name, "split": split}
    del images  # the parsed JSON (about 0.5 GB for COCO's): the rows hold what is written
    for folder in sorted({r["folder"] for r in rows.values() if r["split"] in chosen}):
        _need_dir(os.path.join(raw_root, folder), f"the {dataset} image folder {folder!r} (named by {path})")
    _out_root(out_root)

    def split_rows(split: str) -> Iterator[Dict[str, Any]]:
        todo = [row for row in rows.values() if row["split"] == split]
        for row, (data,) in _found(todo, lambda r: [os.path.join(raw_root, r["folder"], r["image_id"])], summary,
                                   verify):
            yield {"image": data, "caption": row["caption"], "image_id": row["image_id"], "split": split}

    for split in chosen:
        _write(summary, os.path.join(out_root, f"{stem}_{split}.arrow"), split_rows(split), CAPTION_SCHEMA,
               ("image",), "caption", log)
    return _finish(summary)


def prepare_coco(raw_root: str, out_root: str, karpathy_json: Optional[str] = None,
                 splits: Optional[Sequence[str]] = None, verify: bool = False, log: Log = None) -> PrepareSummary:
    """Write ``coco_caption_karpathy_{train,restval,val,test}.arrow`` under ``out_root`` from Karpathy's
    ``dataset_coco.json`` (default: ``raw_root/dataset_coco.json`` or ``raw_root/karpathy/dataset_coco.json``) and
    the images under ``raw_root/<filepath>/<filename>`` (``train2014/``, ``val2014/``). ``splits``: a subset of
    ``COCO_SPLITS`` to write. ``verify``: also skip images that do not decode (slower)."""
    return _prepare_karpathy("coco", raw_root, out_root, karpathy_json, "dataset_coco.json", "coco_caption_karpathy",
                             COCO_SPLITS, splits, lambda e: e["filepath"], verify, log)


def prepare_f30k(raw_root: str, out_root: str, karpathy_json: Optional[str] = None,
                 splits: Optional[Sequence[str]] = None, verify: bool = False, log: Log = None) -> PrepareSummary:
    """Write ``f30k_caption_karpathy_{train,val,test}.arrow`` under ``out_root`` from Karpathy's
    ``dataset_flickr30k.json`` (default: ``raw_root/`` or ``raw_root/karpathy/``) and ``raw_root/flickr30k-images/``.
    Entries of any other Karpathy split are left out and counted in ``dropped`` (as official: only these three
    files are written)."""
    return _prepare_karpathy("f30k", raw_root, out_root, karpathy_json, "dataset_flickr30k.json",
                             "f30k_caption_karpathy", F30K_SPLITS, splits, lambda e: "flickr30k-images", verify, log)


# ---- NLVR2 -------------------------------------------------------------------------------------------------------


def _nlvr2_lines(path: str, train: bool) -> List[Dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ValueError(f"{where}: not a JSON line ({exc}); expected NLVR2's JSON-lines format") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("identifier"), str) \
                    or not isinstance(rec.get("sentence"), str) or "label" not in rec:
                raise ValueError(f"{where}: expected an object with 'identifier' (str), 'sentence' (str), 'label'")
            if rec["identifier"].count("-") < 1 or "/" in rec["identifier"] or "\\" in rec["identifier"] \
                    or not _inside_name(rec["identifier"]):
                raise ValueError(f"{where}: identifier {rec['identifier']!r} is not of the form <pair>-<n>")
            if train and "directory" not in rec:
                raise ValueError(f"{where}: a train record needs 'directory' (its image folder under images/train)")
            if train and not _inside_name(str(rec["directory"])):
                raise ValueError(f"{where}: directory {rec['directory']!r} is not a folder name inside images/train "
                                 "(absolute, or with a '..' part)")
            rec["label"] = nlvr2_label(rec["label"], f"{where}: label")
            records.append(rec)
    return records


def _nlvr2_json(raw_root: str, split: str) -> str:
    name = f"{split}.json"
    sub = split.split("_")[0] if "_" in split else None  # balanced / unbalanced live in their own folder
    candidates = [os.path.join(raw_root, "nlvr2", "data", *([sub] if sub else []), name),
                  os.path.join(raw_root, "data", *([sub] if sub else []), name)]
    if sub is None:
        candidates.append(os.path.join(raw_root, name))
    return _find_file(candidates, f"the NLVR2 {split} annotations {name} (JSON lines)")


def _nlvr2_image_dir(raw_root: str, split: str) -> str:
    base = split.split("_")[-1]  # balanced_dev -> dev
    if base == "train":
        return _need_dir(os.path.join(raw_root, "images", "train"),
                         "the NLVR2 train images (images/train/<directory>/train-...-img0.png)")
    for path in (os.path.join(raw_root, base), os.path.join(raw_root, "images", base)):
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"expected the NLVR2 {base} images ({base}-...-img0.png) in "
                            f"{os.path.join(raw_root, base)} or {os.path.join(raw_root, 'images', base)}")


def prepare_nlvr2(raw_root: str, out_root: str, splits: Optional[Sequence[str]] = None, verify: bool = False,
                  log: Log = None) -> PrepareSummary:
    """Write ``nlvr2_{train,dev,test1}.arrow`` under ``out_root`` from the NLVR2 release under ``raw_root``.

    One row per image pair (the identifier without its last ``-<n>``), in order of first appearance, with all the
    pair's sentences (``questions``) and labels (``answers``, "True"/"False"); ``identifier`` is the pair id. Train
    images are read from ``images/train/<directory>/<pair>-img{0,1}.png`` (the directory of the pair's first
    record), dev/test1 from ``<split>/<pair>-img{0,1}.png``. ``splits`` may also name ``NLVR2_EXTRA_SPLITS``."""
    _need_dir(raw_root, "the raw NLVR2 folder (RAW_ROOT)")
    chosen = _check_splits(splits if splits is not None else NLVR2_SPLITS, NLVR2_SPLITS + NLVR2_EXTRA_SPLITS,
                           "nlvr2")
    plan = []
    for split in chosen:
        json_path, image_dir = _nlvr2_json(raw_root, split), _nlvr2_image_dir(raw_root, split)
        pairs: Dict[str, List[Dict[str, Any]]] = {}  # pair id -> its records, in order of first appearance
        for rec in _nlvr2_lines(json_path, split == "train"):
            pairs.setdefault(rec["identifier"].rsplit("-", 1)[0], []).append(rec)
        plan.append((split, image_dir, pairs))
    summary = PrepareSummary("nlvr2", _out_root(out_root))
    for split, image_dir, pairs in plan:
        train = split == "train"

        def pair_rows(pairs=pairs, image_dir=image_dir, train=train) -> Iterator[Dict[str, Any]]:
            def files(pair: str, recs: List[Dict[str, Any]]) -> List[str]:
                folder = os.path.join(image_dir, str(recs[0]["directory"])) if train else image_dir
                return [os.path.join(folder, f"{pair}-img{k}.png") for k in (0, 1)]

            def skipped(item: Tuple[str, List[Dict[str, Any]]]) -> None:
                summary._drop("NLVR2 sentences of pairs with a missing or unreadable image", len(item[1]))

            for (pair, recs), images in _found(list(pairs.items()), lambda t: files(*t), summary, verify, skipped):
                yield {"image_0": images[0], "image_1": images[1], "questions": [r["sentence"] for r in recs],
                       "answers": [r["label"] for r in recs], "identifier": pair}

        _write(summary, os.path.join(out_root, f"nlvr2_{split}.arrow"), pair_rows(), NLVR2_SCHEMA,
               ("image_0", "image_1"), "questions", log)
    return _finish(summary)


# ---- VQAv2 --------------------------------------------------------------------------------------------------------

VQA_SPLITS = ("train", "val", "test")
VQA_EXTRA_SPLITS = ("test-dev",)  # written by the official writer but read by no config
VQA_REST_VAL_IMAGES = 1000  # the last images of vqav2_val form vqav2_rest_val (the fine-tuning val set)
VQA_SCHEMA = pa.schema([("image", pa.binary()), ("questions", pa.list_(pa.string())),
                        ("answers", pa.list_(pa.list_(pa.string()))), ("answer_labels", pa.list_(pa.list_(pa.int64()))),
                        ("answer_scores", pa.list_(pa.list_(pa.float64()))), ("image_id", pa.int64()),
                        ("question_id", pa.list_(pa.int64())), ("split", pa.string())])
_VQA_YEAR = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}
_VQA_IMAGE_DIR = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test2015"}


def _vqa_json(raw_root: str, name: str, what: str) -> str:
    return _find_file([os.path.join(raw_root, name), os.path.join(raw_root, "annotations", name)], what)


def _vqa_records(path: str, key: str, fields: Mapping[str, type]) -> List[Mapping[str, Any]]:
    data = _load_json(path)
    records = data.get(key) if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON object with a {key!r} list (the VQAv2 release's format)")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or any(not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)
                                            for k, t in fields.items()):
            raise ValueError(f"{path}: {key}[{i}] must be an object with "
                             + ", ".join(f"{k} ({t.__name__})" for k, t in fields.items()))
    return records


def _vqa_annotations(raw_root: str, split: str) -> List[Tuple[int, str, List[str]]]:
    """(question id, multiple-choice answer, the annotators' answers) of each annotation of ``split``, in file
    order (the JSON itself is dropped before the next file is read)."""
    name = f"v2_mscoco_{_VQA_YEAR[split]}_annotations.json"
    path = _vqa_json(raw_root, name, f"the VQAv2 {split} annotations {name} (the answer vocabulary is counted over "
                     "train and val)")
    out = []
    for i, rec in enumerate(_vqa_records(path, "annotations", {"question_id": int, "multiple_choice_answer": str})):
        answers = rec.get("answers")
        if not isinstance(answers, list) or any(not isinstance(a, dict) or not isinstance(a.get("answer"), str)
                                                for a in answers):
            raise ValueError(f"{path}: annotations[{i}] must have 'answers', a list of objects with a string 'answer'")
        out.append((rec["question_id"], rec["multiple_choice_answer"], [a["answer"] for a in answers]))
    return out


_Targets = Dict[int, Tuple[List[int], List[float]]]  # question id -> (its classes, their soft scores)


def _split_val(summary: PrepareSummary, out_root: str, val_path: str, rest: int, log: Log) -> None:
    """vqav2_trainable_val (the staged val file but its last ``rest`` rows) and vqav2_rest_val (those rows), written
    from the memory-mapped file without copying the images through Python."""
    try:
        table = read_arrow(os.path.join(_staging(summary), os.path.basename(val_path)))
        cut = max(table.num_rows - rest, 0)
        for stem, part in (("vqav2_trainable_val", table.slice(0, cut)), ("vqav2_rest_val", table.slice(cut))):
            path = os.path.join(out_root, f"{stem}.arrow")
            n = write_arrow_batches(os.path.join(_staging(summary), f"{stem}.arrow"), VQA_SCHEMA,
                                    part.to_batches(max_chunksize=BATCH_ROWS))
            summary.files[path] = n
            summary.samples[path] = pc.sum(pc.list_value_length(part.column("questions"))).as_py() or 0
            if log is not None:
                log(f"wrote {stem}.arrow: {n} rows, {summary.samples[path]} samples")
    except BaseException:
        _discard(summary)
        raise


def prepare_vqa(raw_root: str, out_root: str, splits: Optional[Sequence[str]] = None, seed: int = 0,
                rest_val_images: int = VQA_REST_VAL_IMAGES, verify: bool = False, log: Log = None) -> PrepareSummary:
    """Write ``vqav2_{train,val,trainable_val,rest_val,test}.arrow`` under ``out_root`` from the VQAv2 release:
    ``v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json`` and ``v2_mscoco_{train2014,val2014}_
    annotations.json`` (in ``raw_root`` or ``raw_root/annotations``) and the COCO images ``train2014/``,
    ``val2014/``, ``test2015/`` (``COCO_<folder>_<12-digit id>.jpg``, or ``<12-digit id>.jpg``).

    As the official writer: one row per image with its questions (``questions``, ``question_id``), and for train
    and val each question's classes (``answer_labels``), their soft scores (``answer_scores``) and answers
    (``answers``); test rows have empty answer lists. The classes are those of ``vqa_answers`` (3,129 on the
    release; a question with none is left out, and an image with no question left). ``vqav2_trainable_val`` is
    ``vqav2_val`` without its last ``rest_val_images`` rows, ``vqav2_rest_val`` those rows: fine-tuning trains on
    train + trainable_val and validates on rest_val. Writing train or val reads both annotation files (the
    vocabulary is counted over both). ``splits`` may also name ``test-dev`` (``vqav2_test-dev``, read by no config).

    Rows are in a random order, as official (a shuffle of the image files), but drawn from ``seed``, so a rerun
    writes the same files; the official shuffle is unseeded, so its rest_val is a different 1,000 images."""
    _need_dir(raw_root, "the raw VQAv2 folder (RAW_ROOT)")
    chosen = _check_splits(splits if splits is not None else VQA_SPLITS, VQA_SPLITS + VQA_EXTRA_SPLITS, "vqa")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"prepare_vqa: seed must be an int, got {type(seed).__name__}")
    if not isinstance(rest_val_images, int) or isinstance(rest_val_images, bool) or rest_val_images < 1:
        raise ValueError(f"prepare_vqa: rest_val_images must be an int >= 1, got {rest_val_images!r}")
    questions = {split: _vqa_questions(raw_root, split) for split in chosen}
    summary = PrepareSummary("vqa", _out_root(out_root))
    targets: Dict[str, _Targets] = {}
    vocab: List[str] = []
    if "train" in chosen or "val" in chosen:
        targets, vocab = _vqa_targets(raw_root, summary)
    for split in chosen:
        path = os.path.join(out_root, f"vqav2_{split}.arrow")
        rows = _vqa_rows(raw_root, split, questions[split], targets.get(split), vocab, seed, summary, verify)
        _write(summary, path, rows, VQA_SCHEMA, ("image",), "questions", log)
        if split == "val":  # as official: the written val file cut into trainable_val and its last rows, rest_val
            _split_val(summary, out_root, path, rest_val_images, log)
    return _finish(summary)


def _vqa_questions(raw_root: str, split: str) -> List[Mapping[str, Any]]:
    """The questions of ``split``, its image folder checked."""
    name = f"v2_OpenEnded_mscoco_{_VQA_YEAR[split]}_questions.json"
    questions = _vqa_records(_vqa_json(raw_root, name, f"the VQAv2 {split} questions {name}"),
                             "questions", {"image_id": int, "question_id": int, "question": str})
    _need_dir(os.path.join(raw_root, _VQA_IMAGE_DIR[split]),
              f"the COCO images of VQAv2 {split} ({_VQA_IMAGE_DIR[split]}/COCO_{_VQA_IMAGE_DIR[split]}_<id>.jpg)")
    return questions


def _vqa_targets(raw_root: str, summary: PrepareSummary) -> Tuple[Dict[str, _Targets], List[str]]:
    """The targets of the train and val questions, and the answer of each class (the vocabulary is counted over
    both annotation files)."""
    annotated = {split: _vqa_annotations(raw_root, split) for split in ("train", "val")}
    vocab = answer_vocabulary(major for split in ("train", "val") for _, major, _ in annotated[split])
    label_of = {answer: i for i, answer in enumerate(vocab)}
    targets = {split: {qid: question_targets(answers, label_of) for qid, _, answers in annotated.pop(split)}
               for split in ("train", "val")}
    note = f"answer vocabulary: {len(vocab)} answers seen at least 9 times in train + val"
    summary.notes.append(note + (" (as the official files)" if len(vocab) == OFFICIAL_VOCAB_SIZE else
                                 f"; the official files have {OFFICIAL_VOCAB_SIZE}, so a released VQA checkpoint's "
                                 "classifier does not fit these classes"))
    return targets, vocab


def _vqa_image_rows(questions: List[Mapping[str, Any]], targets: Optional[_Targets], split: str, seed: int,
                    summary: PrepareSummary) -> List[Tuple[int, List[Mapping[str, Any]]]]:
    """(image id, its questions) in a seeded random order; with ``targets`` (train/val) only questions with a
    class."""
    per_image: Dict[int, List[Mapping[str, Any]]] = {}
    for q in questions:
        if targets is not None:
            labels = targets.get(q["question_id"])
            if labels is None:
                summary._drop(f"VQAv2 {split} questions without an annotation")
                continue
            if not labels[0]:
                summary._drop(f"VQAv2 {split} questions with no answer among the classes (as official)")
                continue
        per_image.setdefault(q["image_id"], []).append(q)
    rows = list(per_image.items())
    random.Random(f"vqav2-{split}-{seed}").shuffle(rows)
    return rows


def _vqa_rows(raw_root: str, split: str, questions: List[Mapping[str, Any]], targets: Optional[_Targets],
              vocab: List[str], seed: int, summary: PrepareSummary, verify: bool) -> Iterator[Dict[str, Any]]:
    """The file's rows (made as the file is written): each image found on disk with its questions and (train/val)
    their classes, scores and answers."""
    folder = os.path.join(raw_root, _VQA_IMAGE_DIR[split])

    def files(item: Tuple[int, Any]) -> List[Tuple[str, ...]]:
        return [(os.path.join(folder, f"COCO_{_VQA_IMAGE_DIR[split]}_{item[0]:012d}.jpg"),
                 os.path.join(folder, f"{item[0]:012d}.jpg"))]

    def skipped(item: Tuple[int, List[Any]]) -> None:
        summary._drop(f"VQAv2 {split} questions of images that are missing or unreadable", len(item[1]))

    image_rows = _vqa_image_rows(questions, targets, split, seed, summary)
    for (iid, qs), (image,) in _found(image_rows, files, summary, verify, skipped):
        labelled = [targets[q["question_id"]] for q in qs] if targets is not None else []
        yield {"image": image, "questions": [q["question"] for q in qs],
               "answers": [[vocab[i] for i in labels] for labels, _ in labelled],
               "answer_labels": [labels for labels, _ in labelled],
               "answer_scores": [scores for _, scores in labelled],
               "image_id": iid, "question_id": [q["question_id"] for q in qs], "split": split}


# ---- Visual Genome (region descriptions) --------------------------------------------------------------------------

VG_SCHEMA = pa.schema([("image", pa.binary()), ("caption", pa.list_(pa.string())), ("width", pa.list_(pa.int64())),
                       ("height", pa.list_(pa.int64())), ("x", pa.list_(pa.int64())), ("y", pa.list_(pa.int64())),
                       ("image_id", pa.string())])
VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2")


def prepare_vg(raw_root: str, out_root: str, verify: bool = False, log: Log = None) -> PrepareSummary:
    """Write ``vg.arrow`` under ``out_root`` from Visual Genome's ``region_descriptions.json`` (default:
    ``raw_root/annotations/`` or ``raw_root/``) and its images ``<image_id>.jpg`` under ``images/VG_100K/`` and
    ``images/VG_100K_2/`` (or those folders directly under ``raw_root``).

    One row per image with all its region phrases as captions, paired with the whole image as official (the
    regions' width, height, x, y are stored beside them, unused by training), ``image_id`` the id as a string; rows
    in the order of the JSON (official: a random shuffle of the image files). Images without regions are not
    written, as official."""
    _need_dir(raw_root, "the raw Visual Genome folder (RAW_ROOT)")
    path = _find_file([os.path.join(raw_root, "annotations", "region_descriptions.json"),
                       os.path.join(raw_root, "region_descriptions.json")],
                      "Visual Genome's region_descriptions.json")
    folders = [d for base in (os.path.join(raw_root, "images"), raw_root) for d in
               (os.path.join(base, name) for name in VG_IMAGE_DIRS) if os.path.isdir(d)]
    if not folders:
        raise FileNotFoundError(f"expected Visual Genome's image folders {' and '.join(VG_IMAGE_DIRS)} under "
                                f"{os.path.join(raw_root, 'images')} or {raw_root}")
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'regions': [...], 'id': ...}} entries")
    keys = ("image_id", "phrase", "width", "height", "x", "y")
    rows: Dict[int, Dict[str, List[Any]]] = {}
    for i, entry in enumerate(data):
        regions = entry.get("regions") if isinstance(entry, dict) else None
        if not isinstance(regions, list):
            raise ValueError(f"{path}: entry {i} must be an object with a 'regions' list")
        for region in regions:
            if not isinstance(region, dict) or any(k not in region for k in keys):
                raise ValueError(f"{path}: entry {i} has a region without {list(keys)}")
            row = rows.setdefault(int(region["image_id"]), {"caption": [], "width": [], "height": [], "x": [],
                                                            "y": []})
            row["caption"].append(str(region["phrase"]))
            for k in ("width", "height", "x", "y"):
                row[k].append(int(region[k]))
    del data
    summary = PrepareSummary("vg", _out_root(out_root))

    def vg_rows() -> Iterator[Dict[str, Any]]:
        def places(item: Tuple[int, Any]) -> List[Tuple[str, ...]]:  # the first folder that has the file
            return [tuple(os.path.join(folder, f"{item[0]}.jpg") for folder in folders)]

        for (iid, row), (image,) in _found(list(rows.items()), places, summary, verify):
            yield {"image": image, **row, "image_id": str(iid)}

    _write(summary, os.path.join(out_root, "vg.arrow"), vg_rows(), VG_SCHEMA, ("image",), "caption", log)
    return _finish(summary)


# ---- text only (the language stage's wikibk) ---------------------------------------------------------------------

WIKIBK_SCHEMA = pa.schema([("image", pa.string()), ("caption", pa.list_(pa.string())), ("source", pa.string()),
                           ("split", pa.string())])


def prepare_text(files: Sequence[str], out_root: str, split: str = "train", log: Log = None) -> PrepareSummary:
    """Write plain text for the text-only (language) stage as the official wikibk files: every non-empty line of
    ``files`` (UTF-8; e.g. one sentence or passage a line of BookCorpus and English Wikipedia) is one sample, spread
    in order over ``wikibk_train_0..49`` (split train) or ``wikibk_val_0`` (split val). Columns as official: image
    the string "None", caption ``[line]``, source the file's name without its suffix, split. Lines longer than the
    text length (196 tokens in the official language stage) are truncated when tokenised."""
    if split not in ("train", "val"):
        raise ValueError(f"prepare_text: split must be train or val, got {split!r}")
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [os.fspath(f) for f in files]
    if not files:
        raise ValueError("prepare_text: no text files given")
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file not found: {path} (expected UTF-8 text, one sample a line)")

    summary = PrepareSummary("wikibk", _out_root(out_root))

    def lines(bad: Optional[Callable[[str, str], None]] = None) -> Iterator[Tuple[str, str]]:
        # read as bytes and decoded a line at a time: a line that is not UTF-8 (one in a multi-GB dump) is skipped,
        # counted and named by file and line, not the end of the run; lines end at \n, \r\n or \r (as text mode)
        for path in files:
            source = os.path.splitext(os.path.basename(path))[0]
            with open(path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    if number == 1 and raw.startswith(codecs.BOM_UTF8):
                        raw = raw[len(codecs.BOM_UTF8):]
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        if bad is not None:
                            bad(f"{path}:{number}", f"not UTF-8 ({exc.reason} at byte {exc.start} of the line)")
                        continue
                    for line in text.replace("\r\n", "\n").split("\r"):
                        line = line.strip()
                        if line:
                            yield source, line

    total = sum(1 for _ in lines())  # first pass: the count, to spread the rows over the official files evenly
    if total == 0:
        raise ValueError(f"prepare_text: no non-empty UTF-8 line in {', '.join(files)}")
    stems = dataset_files("wikibk", split)
    stream = lines(lambda where, why: _malformed(summary, where, why, NOT_UTF8))
    for k, stem in enumerate(stems):
        n = total * (k + 1) // len(stems) - total * k // len(stems)
        rows = ({"image": "None", "caption": [text], "source": source, "split": split}
                for source, text in itertools.islice(stream, n))
        _write(summary, os.path.join(out_root, f"{stem}.arrow"), rows, WIKIBK_SCHEMA, (), "caption", log)
    return _finish(summary)


# ---- web caption data (GCC, SBU, your own) -------------------------------------------------------------------------


def read_pairs(path: str, malformed: Optional[Callable[[str, str], None]] = None) -> Iterator[Tuple[str, str]]:
    """(image path, caption) pairs from a file, by its suffix:

    - ``.tsv``: one ``<image path>\\t<caption>`` a line (a header line ``image<TAB>caption`` is skipped);
    - ``.jsonl``: one object a line with "image" and "caption" (a string or a list of strings);
    - ``.json``: a list of ``[image path, caption]`` pairs (the official ``annot.json``) or of such objects.

    Lines end at "\\n" only (a carriage return inside a caption is part of it). A malformed line or item (no TAB,
    not UTF-8, not JSON, not a path and caption strings) raises ValueError naming its line, or, with ``malformed``,
    is skipped after ``malformed(where, why)``. An empty caption list gives one empty caption (the caller counts it).
    Image paths are returned as written (``prepare_captions`` resolves relative ones against its ``image_root``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption list not found: {path} (expected a .tsv, .jsonl or .json file)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".tsv", ".jsonl", ".json"):
        raise ValueError(f"{path}: unknown caption list format {suffix!r}; expected .tsv, .jsonl or .json")

    def bad(where: str, why: str) -> None:
        if malformed is None:
            raise ValueError(f"{where}: {why}")
        malformed(where, why)

    if suffix == ".json":
        data = _load_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of [image, caption] pairs or objects")
        for i, item in enumerate(data):
            yield from _pair_items(item, f"{path}: item {i}", bad)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                bad(where, f"not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if lineno == 1:
                line = line.lstrip("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            if suffix == ".tsv":
                parts = line.split("\t", 1)
                if len(parts) != 2:
                    bad(where, "expected '<image path><TAB><caption>'")
                    continue
                if lineno == 1 and parts[0].strip().lower() in ("image", "image_path", "path", "file"):
                    continue
                yield parts[0], parts[1]
            else:
                try:
                    item = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    bad(where, f"not a JSON line ({exc})")
                    continue
                yield from _pair_items(item, where, bad)


def _pair_items(item: Any, where: str, bad: Callable[[str, str], None]) -> Iterator[Tuple[str, str]]:
    if isinstance(item, dict):
        image, caption = item.get("image"), item.get("caption")
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        image, caption = item
    else:
        bad(where, "expected [image, caption] or an object with 'image' and 'caption'")
        return
    captions = caption if isinstance(caption, list) else [caption]
    if not isinstance(image, str) or not all(isinstance(c, str) for c in captions):
        bad(where, "the image must be a path (str) and the caption a string or list of strings")
        return
    for c in captions or [""]:
        yield image, c


def _malformed(summary: PrepareSummary, where: str, why: str, kind: str = "") -> None:
    """A caption-list (or text) line that gives no pair (no sample): skipped, counted, and the first few named in
    the report."""
    kind = kind or MALFORMED
    if summary.dropped.get(kind, 0) < 3:
        summary.malformed.append(f"{where}: {why}")
        summary.notes.append(f"skipped {where}: {why}")
    summary._drop(kind)


MALFORMED = "malformed caption-list lines"
NOT_UTF8 = "lines that are not UTF-8"


def caption_stems(name: str, split: str, n_files: int) -> List[str]:
    """File stems (without ".arrow") for ``n_files`` files of caption data ``name``/``split``: gcc
    ``conceptual_caption_<split>_<i>``, sbu ``sbu_<i>``, any other name ``<name>_<split>_<i>``."""
    if name == "gcc":
        return [f"conceptual_caption_{split}_{i}" for i in range(n_files)]
    if name == "sbu":
        return [f"sbu_{i}" for i in range(n_files)]
    return [f"{name}_{split}_{i}" for i in range(n_files)]


def prepare_captions(pairs: Union[str, Iterable[Tuple[str, str]]], out_root: str, name: str, split: str = "train",
                     shard_rows: Optional[int] = None, image_root: Optional[str] = None, verify: bool = True,
                     log: Log = None, fmt: str = "arrow") -> PrepareSummary:
    """Write web caption data as the official arrow files of ``name`` (columns image, caption, image_id, split), or
    with ``fmt="shards"`` as WebDataset tar shards ``<name>-<split>-<i>.tar`` (``<key>.jpg`` + ``<key>.json`` with
    the image's captions; ``shard_rows`` images each, default 5000), with their index ``<name>-<split>.shards.json``
    (moved in after them), that training reads with ``--datasets 'OUT_ROOT/<name>-<split>-*.tar'``: the way to train
    on data of your own from the command line.
    A pass over shards draws one of an image's captions per image (arrow files: one sample per caption).

    pairs: an iterable of (image path, caption), or the path of a caption list file (see ``read_pairs``). Captions
    of the same image path go into one row (in order of first appearance); ``image_id`` is the file name. Relative
    image paths are resolved against ``image_root`` (default: the caption list's folder, or the current directory).

    name: "gcc" (split train or val: ``conceptual_caption_<split>_<i>``), "sbu" (split train: ``sbu_<i>``), or a
    name of your own (``<name>_<split>_<i>``; read them with ``make_dataset("gcc", root, split, names=[...])``).
    shard_rows: rows per file. Default: for gcc/sbu the rows are spread over exactly the official number of files
    (gcc train 30, val 1; sbu 9), so ``make_dataset(name, out_root, split)`` reads them all; for other names files of
    100,000 rows (the official writers' size). Missing or unreadable images (``verify``: the image must decode) are
    skipped and counted."""
    allowed = _check_caption_args(name, split, fmt, shard_rows)
    if isinstance(pairs, (str, os.PathLike)) and image_root is None:
        image_root = os.path.dirname(os.path.abspath(pairs))
    summary = PrepareSummary(name, out_root)
    if isinstance(pairs, (str, os.PathLike)):
        pairs = read_pairs(os.fspath(pairs), lambda where, why: _malformed(summary, where, why))
    if image_root is not None:
        _need_dir(image_root, "the image folder (image_root) that relative image paths are read from")
    groups = _group_captions(pairs, image_root, summary)
    _out_root(out_root)
    paths = _images_on_disk(groups, summary)

    if fmt == "shards":
        return _write_caption_shards(summary, groups, out_root, name, split, shard_rows or SHARD_SAMPLES, verify,
                                     log)
    bounds = _caption_file_bounds(name, split, len(paths), shard_rows, summary)
    stems = caption_stems(name, split, len(bounds) - 1)
    if allowed is None:
        summary.notes.append(f"read these files with make_dataset('gcc', root, 'train', names={stems[:3]}"
                             f"{'...' if len(stems) > 3 else ''})")

    def file_rows(part: List[str]) -> Iterator[Dict[str, Any]]:
        for path, (data,) in _found(part, lambda p: [p], summary, verify):
            yield {"image": data, "caption": groups[path], "image_id": os.path.basename(path), "split": split}

    for k, stem in enumerate(stems):
        _write(summary, os.path.join(out_root, f"{stem}.arrow"), file_rows(paths[bounds[k]:bounds[k + 1]]),
               CAPTION_SCHEMA, ("image",), "caption", log)
    _finish(summary)
    # files of an earlier run that wrote more of them would be read with these (make_dataset reads every file there)
    stem = caption_stems(name, split, 1)[0].rsplit("_", 1)[0]
    _remove_earlier(summary, out_root, re.escape(stem) + r"_\d+\.arrow$", "a file")
    return summary


def _check_caption_args(name: str, split: str, fmt: str, shard_rows: Optional[int]) -> Optional[Tuple[str, ...]]:
    """prepare_captions' argument checks; the splits the name has official arrow files for (None: any split)."""
    if name in DATASETS and name not in ("gcc", "sbu"):
        raise ValueError(f"prepare_captions: {name!r} is an official dataset that is not web caption data; expected "
                         "gcc, sbu or a name of your own (coco, f30k and nlvr2 have their own prepare_* writers)")
    if not _NAME_RE.match(name):
        raise ValueError(f"prepare_captions: name must be gcc, sbu or a file-name-safe name of your own, got {name!r}")
    if fmt not in ("arrow", "shards"):
        raise ValueError(f"prepare_captions: fmt must be 'arrow' or 'shards', got {fmt!r}")
    # official arrow files exist for these splits only; shards are found by their glob, any name and split will do
    allowed = {"gcc": ("train", "val"), "sbu": ("train",)}.get(name) if fmt == "arrow" else None
    if allowed is not None and split not in allowed:
        raise ValueError(f"prepare_captions: {name} has official files for split(s) {list(allowed)} only, got "
                         f"{split!r}")
    if allowed is None and not _NAME_RE.match(split):
        raise ValueError(f"prepare_captions: split must be a file-name-safe word, got {split!r}")
    if shard_rows is not None and (not isinstance(shard_rows, int) or shard_rows < 1):
        raise ValueError(f"prepare_captions: shard_rows must be a positive int, got {shard_rows!r}")
    return allowed


def _group_captions(pairs: Iterable[Tuple[str, str]], image_root: Optional[str],
                    summary: PrepareSummary) -> Dict[str, List[str]]:
    """The captions by image path (strings only; the images are read while writing), in order of first appearance;
    empty captions dropped and counted."""
    groups: Dict[str, List[str]] = {}
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], (str, os.PathLike)) \
                or not isinstance(pair[1], str):
            raise ValueError(f"prepare_captions: pair {i} must be (image path, caption str), got {pair!r}")
        if not pair[1].strip():
            summary._drop("empty captions")
            continue
        path = os.fspath(pair[0])
        if image_root is not None and not os.path.isabs(path):
            path = os.path.join(image_root, path)
        groups.setdefault(os.path.normpath(path), []).append(pair[1])
    if not groups:
        why = "; ".join([f"dropped {n} {reason}" for reason, n in summary.dropped.items()] + summary.malformed)
        raise ValueError(f"prepare_captions: no (image, caption) pair to write{f' ({why})' if why else ''}")
    return groups


def _images_on_disk(groups: Dict[str, List[str]], summary: PrepareSummary) -> List[str]:
    """The image paths that are files, in order; the others are counted as missing and leave ``groups``.

    Done before the rows are spread over the files (else a partial download, in list order, gave full first files
    and empty last ones); files that are there but unreadable are found when read."""
    paths = []
    with ThreadPoolExecutor(READ_THREADS) as pool:
        listed = list(groups)
        for start in range(0, len(listed), _EXISTS_SLICE):  # in slices: a future per path would hold GBs for GCC
            part = listed[start:start + _EXISTS_SLICE]
            for path, there in zip(part, pool.map(os.path.isfile, part)):
                if there:
                    paths.append(path)
                else:
                    summary._bad(path, missing=True)
                    summary.skipped_rows += 1
                    del groups[path]
    return paths


def _caption_file_bounds(name: str, split: str, rows: int, shard_rows: Optional[int],
                         summary: PrepareSummary) -> List[int]:
    """Where each arrow file's rows begin and end: for gcc/sbu without ``shard_rows`` spread over exactly the official
    number of files, else files of ``shard_rows`` (default the official writers' 100,000) rows."""
    official = len(dataset_files(name, split)) if name in ("gcc", "sbu") else None
    if shard_rows is None and official is not None:
        return [rows * k // official for k in range(official + 1)]
    size = shard_rows or OFFICIAL_SHARD_ROWS
    n_files = max(1, math.ceil(rows / size))
    if official is not None and n_files != official:
        summary.notes.append(
            f"{n_files} file(s) written where {name} {split} officially has {official}: training reads "
            + ("the ones there (with a warning naming the rest)" if n_files < official else
               f"the official {official} only (make_dataset({name!r}, root, {split!r}, names=[...]) reads all)"))
    return [min(k * size, rows) for k in range(n_files + 1)]


def _remove_earlier(summary: PrepareSummary, out_root: str, pattern: str, what: str) -> None:
    """Remove the files of OUT_ROOT matching ``pattern`` that this run did not write, saying so."""
    matches = re.compile(pattern).match
    for f in sorted(os.listdir(out_root)):
        if matches(f) and os.path.join(out_root, f) not in summary.files:
            os.unlink(os.path.join(out_root, f))
            summary.notes.append(f"removed {f}, {what} of an earlier run")


def _write_caption_shards(summary: PrepareSummary, groups: Dict[str, List[str]], out_root: str, name: str,
                          split: str, per_shard: int, verify: bool, log: Log) -> PrepareSummary:
    from .webdataset import index_path, write_shards

    counts: List[int] = []  # captions of each sample written, in order

    def samples() -> Iterator[Tuple[str, bytes, List[str]]]:
        for i, (path, (data,)) in enumerate(_found(list(groups), lambda p: [p], summary, verify)):
            counts.append(len(groups[path]))
            yield f"{i:09d}", data, groups[path]

    # every member is named .jpg (web data is mostly JPEG); the bytes are stored as read and readers decode them by
    # their content, so a PNG among them still decodes
    prefix = f"{name}-{split}"
    try:
        staged = write_shards(_staging(summary), samples(), samples_per_shard=per_shard, prefix=prefix,
                              image_ext="jpg", caption_format="json")
    except BaseException:
        _discard(summary)
        raise
    for k, path in enumerate(staged):
        part = counts[k * per_shard:(k + 1) * per_shard]
        final = os.path.join(out_root, os.path.basename(path))
        summary.files[final], summary.samples[final] = len(part), sum(part)
        if log is not None:
            log(f"wrote {os.path.basename(path)}: {len(part)} images, {sum(part)} captions")
    # the index (each shard's samples, size and time: kept by the move, so it stays current) after the shards
    _finish(summary, also=[os.path.basename(index_path(p)) for p in staged[:1]])
    # shards of an earlier, longer run under the same name and split would be read by the same glob: remove them
    _remove_earlier(summary, out_root, re.escape(prefix) + r"-\d{6}\.tar$", "a shard")
    summary.notes.append(f"train on them with --datasets '{os.path.join(out_root, prefix + '-*.tar')}' (each pass "
                         f"draws one of an image's captions: an epoch is one sample per image, not per caption)")
    return summary


# ---- the command -------------------------------------------------------------------------------------------------

PROG = "vlmo-fast prepare"
DESCRIPTION = """Turn raw public datasets into the official ViLT/VLMo arrow files (spec §7) that --data-root reads.

  coco      Karpathy's dataset_coco.json + train2014/, val2014/
            -> coco_caption_karpathy_{train,restval,val,test}.arrow
  f30k      Karpathy's dataset_flickr30k.json + flickr30k-images/
            -> f30k_caption_karpathy_{train,val,test}.arrow
  vg        annotations/region_descriptions.json + images/VG_100K/, images/VG_100K_2/
            -> vg.arrow (one row per image, its region phrases as captions)
  text      plain .txt files, one sentence or passage a line (the language stage's BookCorpus + Wikipedia)
            -> wikibk_train_{0..49}.arrow, wikibk_val_0.arrow
  nlvr2     nlvr2/data/{train,dev,test1}.json + images/train/<dir>/, dev/, test1/
            -> nlvr2_{train,dev,test1}.arrow (one row per image pair)
  vqa       VQAv2 questions + annotations JSON + COCO train2014/, val2014/, test2015/
            -> vqav2_{train,val,trainable_val,rest_val,test}.arrow (one row per image, its questions)
  captions  a list of (image path, caption) pairs (TSV, JSON lines or JSON) of web data
            -> gcc: conceptual_caption_{train,val}_<i>.arrow, sbu: sbu_<i>.arrow, or <name>_<split>_<i>.arrow

Images are stored as the bytes on disk. Missing or unreadable images are skipped and counted in the summary.

Each subcommand explains its options: vlmo-fast prepare SUBCOMMAND --help"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", metavar="{coco,f30k,vg,text,nlvr2,vqa,captions}", required=True)

    def add(name: str, help_: str, description: str, raw_help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description, prog=f"{prog} {name}")
        p.add_argument("raw_root", metavar="RAW_ROOT", help=raw_help)
        p.add_argument("out_root", metavar="OUT_ROOT", help="folder for the arrow files (created if missing; the "
                       "--data-root of training)")
        return p

    coco = add("coco", "COCO captions, Karpathy splits",
               "COCO captions with Karpathy's splits -> coco_caption_karpathy_{train,restval,val,test}.arrow "
               "(one row per image: image bytes, its captions, image_id = file name, split). restval is read "
               "together with train.",
               "folder with train2014/ and val2014/ (and dataset_coco.json or karpathy/dataset_coco.json)")
    f30k = add("f30k", "Flickr30K captions, Karpathy splits",
               "Flickr30K captions with Karpathy's splits -> f30k_caption_karpathy_{train,val,test}.arrow. "
               "Any other Karpathy split is left out (as the official writer does) and counted.",
               "folder with flickr30k-images/ (and dataset_flickr30k.json or karpathy/dataset_flickr30k.json)")
    for p, name, splits in ((coco, "dataset_coco.json", COCO_SPLITS), (f30k, "dataset_flickr30k.json", F30K_SPLITS)):
        p.add_argument("--karpathy-json", metavar="FILE", help=f"Karpathy's {name} (default: RAW_ROOT/{name} or "
                       f"RAW_ROOT/karpathy/{name})")
        p.add_argument("--splits", metavar="LIST", help=f"comma-separated subset of {','.join(splits)} to write "
                       "(default: all)")
    vg = add("vg", "Visual Genome region descriptions",
             "Visual Genome -> vg.arrow: one row per image with its region phrases as captions (each paired with "
             "the whole image, as official), and the regions' width/height/x/y.",
             "folder with annotations/region_descriptions.json (or RAW_ROOT/region_descriptions.json) and "
             "images/VG_100K/, images/VG_100K_2/ (or VG_100K/, VG_100K_2/)")
    text = add("text", "plain text for the language stage (wikibk)",
               "Plain text -> wikibk_train_0..49.arrow (or wikibk_val_0.arrow with --split val), the text-only "
               "stage's data: every non-empty line of the .txt files is one sample (a sentence or passage), "
               "source = the file's name.",
               "a .txt file, or a folder whose *.txt files are read in name order")
    text.add_argument("--split", default="train", choices=["train", "val"], help="train (default) or val")
    nlvr2 = add("nlvr2", "NLVR2 (image pairs with sentences)",
                "NLVR2 -> nlvr2_{train,dev,test1}.arrow: one row per image pair with all its sentences "
                "(questions), labels (answers, \"True\"/\"False\") and the pair id (identifier).",
                "folder with nlvr2/data/{train,dev,test1}.json (or data/ or RAW_ROOT itself), images/train/<dir>/, "
                "and dev/, test1/ (or images/dev/, images/test1/)")
    nlvr2.add_argument("--splits", metavar="LIST", help="comma-separated subset of " + ",".join(NLVR2_SPLITS)
                       + " (default), may add " + ",".join(NLVR2_EXTRA_SPLITS) + " (read by no config)")
    vqa = add("vqa", "VQAv2 (questions with soft answer scores)",
              "VQAv2 -> vqav2_{train,val,trainable_val,rest_val,test}.arrow: one row per COCO image with its "
              "questions and, for train/val, each question's answer classes and soft scores (the official 3,129 "
              "classes: normalised multiple-choice answers seen at least 9 times in train + val). trainable_val is "
              "val without its last 1,000 images, rest_val those images (the fine-tuning val set).",
              "folder with train2014/, val2014/, test2015/ and the VQAv2 questions/annotations JSON files "
              "(there or in annotations/)")
    vqa.add_argument("--splits", metavar="LIST", help="comma-separated subset of " + ",".join(VQA_SPLITS)
                     + " (default), may add test-dev (read by no config); val also writes trainable_val and "
                     "rest_val")
    vqa.add_argument("--seed", type=int, default=0, help="seed of the row shuffle, which picks the rest_val "
                     "images (default: 0; the official shuffle is unseeded)")
    captions = add("captions", "web caption data: gcc, sbu or your own",
                   "Web caption data -> the official files of --name: gcc conceptual_caption_<split>_<i>.arrow, "
                   "sbu sbu_<i>.arrow, any other name <name>_<split>_<i>.arrow. The captions of one image path go "
                   "into one row. --pairs formats: .tsv (<image path><TAB><caption> a line), .jsonl (one "
                   "{\"image\": ..., \"caption\": ...} a line), .json (a list of [image path, caption], as the "
                   "official annot.json).",
                   "folder that relative image paths in --pairs are read from")
    captions.add_argument("--pairs", metavar="FILE", required=True, help="the (image path, caption) list")
    captions.add_argument("--format", default="arrow", choices=["arrow", "shards"],
                          help="arrow: the official files of --name (training reads gcc and sbu by name); shards: "
                               "WebDataset tar files <name>-<split>-<i>.tar, read with --datasets "
                               "'OUT_ROOT/<name>-<split>-*.tar' (data of your own; each pass draws one caption per "
                               "image)")
    captions.add_argument("--name", default="gcc", help="gcc (default), sbu, or a name of your own (arrow files of "
                          "another name are read through the Python API only; use --format shards to train on them "
                          "from the command line)")
    captions.add_argument("--split", default="train", help="train (default) or val (gcc only; sbu has train only)")
    captions.add_argument("--shard-rows", type=int, metavar="N", help="rows (images) per file (default: arrow gcc/sbu "
                          "spread over the official number of files, gcc train 30, val 1, sbu 9; other names 100000, "
                          "the official writers' size; shards 5000)")
    for p, default in ((coco, False), (f30k, False), (vg, False), (nlvr2, False), (vqa, False), (captions, True)):
        p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=default,
                       help="also skip images that do not decode, e.g. truncated downloads (slower: every image is "
                       "decoded; default: %(default)s)")
    return parser


def _text_files(raw_root: str) -> List[str]:
    if os.path.isfile(raw_root):
        return [raw_root]
    _need_dir(raw_root, "a .txt file or a folder of them (RAW_ROOT)")
    files = sorted(os.path.join(raw_root, f) for f in os.listdir(raw_root) if f.endswith(".txt"))
    if not files:
        raise FileNotFoundError(f"no .txt file in {raw_root}")
    return files


def prepare_main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """``vlmo-fast prepare ...``: run one writer and print its summary. Configuration errors (a missing folder or
    JSON, a malformed file, bad options) end in one line ``vlmo-fast prepare: error: ...`` and exit status 2."""
    parser = build_parser(prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from ..train.config import user_errors

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # as Ctrl-C does: the writers' cleanup runs (no partial staging copy stays)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: left as it is
        previous = None
    try:
        with user_errors(parser):
            summary = _run(args, log)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(summary.report())
    return 0


def _run(args: argparse.Namespace, log: Log) -> PrepareSummary:
    """The writer ``args.dataset`` names, with the command's options."""
    if args.dataset == "coco":
        return prepare_coco(args.raw_root, args.out_root, args.karpathy_json, args.splits, args.verify, log)
    if args.dataset == "f30k":
        return prepare_f30k(args.raw_root, args.out_root, args.karpathy_json, args.splits, args.verify, log)
    if args.dataset == "nlvr2":
        return prepare_nlvr2(args.raw_root, args.out_root, args.splits, args.verify, log)
    if args.dataset == "vqa":
        return prepare_vqa(args.raw_root, args.out_root, args.splits, args.seed, verify=args.verify, log=log)
    if args.dataset == "vg":
        return prepare_vg(args.raw_root, args.out_root, args.verify, log)
    if args.dataset == "text":
        return prepare_text(_text_files(args.raw_root), args.out_root, args.split, log)
    return prepare_captions(args.pairs, args.out_root, args.name, args.split, args.shard_rows,
                            image_root=args.raw_root, verify=args.verify, log=log, fmt=args.format)
