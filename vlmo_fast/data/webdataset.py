"""WebDataset-style tar shards for web-scale image-text sets, read with ``tarfile`` (no ``webdataset`` dependency).

Format (the WebDataset convention): each shard is a plain tar; the members of one sample are consecutive and share
a key, the member path up to the first "." of its file name (``000123.jpg``, ``000123.txt``). A sample needs one
image member (jpg, jpeg, png, webp, bmp, gif, tif, tiff, jfif, jpe, ppm, pgm, pbm, pnm; decoded by content) and a
caption: ``<key>.txt`` (UTF-8) or ``<key>.json`` with a "caption" string (a list of strings is allowed: one is drawn
per pass when training, the first is used otherwise; captions are stripped, and an empty one makes a bad sample).
Other members are ignored, and so are hidden files (a file name starting with "."), such as the ``._<name>``
AppleDouble members macOS's tar adds before every file; links are not followed (the error of a sample missing its
image or caption names them). Shard files end in .tar, or .tar.gz, .tgz, .tar.bz2, .tar.xz (compressed tar).

``WebDataset`` is an ``IterableDataset``:

- shards are split across distributed ranks and DataLoader workers (global worker ``rank * workers + worker_id``
  takes every ``world * workers``-th shard of the epoch's shard order, shuffled identically everywhere when
  training); with fewer shards than global workers every worker reads all shards and keeps every
  ``world * workers``-th sample instead; either way a pass over all readers yields every sample once. When the
  shard count is not a multiple of the readers, some read one shard more; which ones rotates each epoch (a warning
  says so: a process, or with ``repeat`` a reader, with fewer samples repeats them sooner);
- with a shard index that lists every shard given as it is now (``<prefix>.shards.json`` beside them: each shard's
  sample count, size, modification time and a digest of its first and last 16 KiB; ``write_shards`` and
  ``prepare`` write one, ``write_shard_index`` one for shards of other tools), the readers split each epoch's
  samples instead: every reader gets N // T of the N samples or one more (which ones rotates each epoch), taking
  whole shards in the epoch's order and a shard's sample range where a reader's share ends (``split_samples``: at
  most T - 1 shards split an epoch). The cost: a reader whose range starts inside a shard reads through the samples
  before it, undecoded (their headers only in an uncompressed tar, which is seeked over; a compressed one is
  decompressed through them), and the smaller piece of a split shard goes first to keep that short. An index that
  is stale (a shard's size, or its time and edge bytes, changed), misses a shard, or does not read is named in a
  warning, and the readers take whole shards as without one;
- samples are shuffled within a buffer (``shuffle_buffer``) when training;
- items are the same dictionaries as the arrow datasets ("image", "text", "text_ids", "text_masks",
  "special_tokens_mask") plus "key", "url" and "_seed"; the official transforms and tokenisation apply;
- a sample's randomness (its augmentation, and the caption a JSON list draws) comes from its own seed ("_seed"), a
  function of (seed, epoch, reader, its place in the reader's output), not of a worker's running RNG, so a reader
  that resumes mid-epoch (``set_position``) yields exactly what it would have yielded;
- a sample whose image does not decode, has no caption, or a shard that is truncated, yields None, which the
  collate drops and counts in ``batch["bad_samples"]``; with ``drop_bad=True`` (training: every batch then has its
  full size, which the all-gathers of several processes need) such a sample is not yielded and its count rides on
  the next item's "bad_samples" (those after a pass's last readable sample ride on the next pass's first item with
  ``repeat``; without it they go uncounted, unless ``count_only_items`` is set: the pass then ends with a count-only
  item ``{"bad_samples": n, "_place": p}``, which ``build_collate`` counts and leaves out, as ``IterableStream``
  needs), and every item carries
  "_place", its place in the reader's output (a resumed reader leaves out that many: ``set_position``).

Epochs: ``set_epoch(e)`` changes the shard order and the shuffle (call it before iterating when the DataLoader
does not keep persistent workers); a worker also counts the passes it made since, so persistent workers reshuffle
every pass. ``repeat=True`` loops forever (step-based training; every rank then yields batches indefinitely, which
keeps data-parallel ranks in step even when shards hold different numbers of samples).

Position: ``set_position(epoch, skip, first_worker)`` makes the next pass start epoch ``epoch`` with DataLoader worker
0 playing reader ``first_worker`` of this rank (worker i plays ``(first_worker + i) % workers``), and reader j
leaving out the first ``skip[j]`` items of its output (read, not decoded: the shuffle buffer is rebuilt as it was).
A DataLoader takes its batches from the workers in turn, so with the readers rotated so that the one due next comes
first, a stream resumes in the very order it had (``vlmo_fast.train.data_setup.IterableStream`` keeps the position).
"""

from __future__ import annotations

import collections.abc
import contextlib
import glob
import hashlib
import io
import itertools
import json
import os
import re
import sys
import tarfile
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from ..fileio import atomic_path, atomic_write_json
from .sample import BadSampleLog, decode_image, encode_text, mixed_seed
from .transforms import build_transform

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "jfif", "jpe", "ppm", "pgm", "pbm", "pnm")
READ_EXTS = frozenset(IMAGE_EXTS + ("txt", "json"))  # what a sample is made of: other members' data are never read
# a member read whole into memory is at most this big; a larger one (or a sparse one: tar's holes can claim any size
# in a few bytes) makes its sample a bad one, never an out-of-memory kill
MAX_MEMBER_BYTES = 256 << 20
# a shard's file name ends in one of these (any case): plain tar, or tar compressed as tarfile's "r|*" reads it
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def expand_urls(urls: Union[str, Sequence[str]]) -> List[str]:
    """Shard paths from a list, a directory (its files named as shards: ``SHARD_SUFFIXES``), a glob, or a brace range
    ``shard-{000..012}.tar``."""
    if isinstance(urls, os.PathLike):
        urls = os.fspath(urls)
    if not isinstance(urls, str):
        if isinstance(urls, (bytes, dict)) or not isinstance(urls, collections.abc.Iterable):
            raise TypeError(f"urls must be a path, a glob, a brace range or a list of them, got {type(urls).__name__}")
        out: List[str] = []
        for u in urls:
            out.extend(expand_urls(u))
        return out
    if os.path.isdir(urls):
        found = sorted(p for p in glob.glob(os.path.join(urls, "*")) if is_shard_name(p) and os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"no tar shards ({', '.join(SHARD_SUFFIXES)}) in {urls}")
        return found
    match = re.search(r"\{(\d+)\.\.(\d+)\}", urls)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        return [p for i in range(int(lo), int(hi) + 1)
                for p in expand_urls(urls[: match.start()] + str(i).zfill(width) + urls[match.end():])]
    if any(ch in urls for ch in "*?["):
        found = sorted(p for p in glob.glob(urls) if not _is_index_name(p))  # (``dir/*``: the shards, not their index)
        if not found:
            raise FileNotFoundError(f"no shards match {urls}")
        return found
    if not os.path.isfile(urls):
        raise FileNotFoundError(f"shard not found: {urls}")
    return [urls]


def _is_index_name(path: str) -> bool:
    name = os.path.basename(path)
    return name == INDEX_SUFFIX or name.endswith("." + INDEX_SUFFIX)


def split_key(name: str) -> Tuple[str, str]:
    """``dir/000123.seg.jpg`` -> (``dir/000123``, ``seg.jpg``): the key ends at the first "." of the file name."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def iter_tar(path: str, skip: int = 0) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard in order: {"__key__": key, "__url__": path, <ext>: bytes, ...}. A truncated or
    unreadable tar raises (``tarfile.TarError`` or ``OSError``/``EOFError``) at the point of damage; an uncompressed
    one cut at or inside a member's header too (tarfile takes that for the archive's end: the end-of-archive zero
    block is then missing).

    A member whose extension the current sample already has starts a new sample of the same key (a re-downloaded
    sample appended to the shard). A sample whose key an earlier, non-adjacent sample of the shard had is marked
    "__split__" (its members are not consecutive: ``tar`` without ``--sort=name`` stores them in directory order);
    link members are not followed, but noted in "__links__" (extension -> target), so the errors can say why.

    ``skip``: the first ``skip`` samples come with their members' data unread (None). An uncompressed shard is then
    read by seeking over that data (its headers alone are read); a compressed one is decompressed through it. The
    data of members whose extension is not in ``READ_EXTS`` is not read either (None), nor that of a member over
    ``MAX_MEMBER_BYTES`` or a sparse one, which "__bad__" then names."""
    current: Dict[str, Any] = {}
    ended = set()  # keys of the samples already yielded
    begun = 0  # samples yielded so far: the current one's index in the shard
    mode = "r:" if skip > 0 and not _is_compressed(path) else "r|*"  # (random access: tarfile seeks over data)
    with tarfile.open(path, mode) as tar:
        for member in tar:
            if os.path.basename(member.name).startswith("."):
                continue
            if not (member.isfile() or member.islnk() or member.issym()):
                continue
            key, ext = split_key(member.name)
            previous, apart = current.get("__key__"), current.get("__split__", False)
            if current and (key != previous or ext in current or ext in current.get("__links__", {})):
                ended.add(previous)
                yield current
                begun += 1
                current = {}
            if not current:
                current = {"__key__": key, "__url__": path}
                if (key != previous and key in ended) or (key == previous and apart):
                    current["__split__"] = True
            if member.isfile():
                if begun < skip or ext not in READ_EXTS:
                    current[ext] = None
                elif member.issparse() or member.size > MAX_MEMBER_BYTES:
                    current[ext] = None
                    what = "a sparse file" if member.issparse() else f"{member.size} bytes"
                    current.setdefault("__bad__", []).append(
                        f"{key}.{ext} is {what} (a member is read whole, up to {MAX_MEMBER_BYTES >> 20} MiB)")
                else:
                    fobj = tar.extractfile(member)
                    current[ext] = fobj.read() if fobj is not None else b""
            else:
                current.setdefault("__links__", {})[ext] = member.linkname
        end = tar.offset
    if current:  # (whole members; a sample cut short of one fails as a sample)
        yield current
    if not _ends_cleanly(path, end):
        raise tarfile.ReadError(f"truncated: the file ends at or inside a member's header after {end} bytes (no "
                                f"end-of-archive block)")


def count_samples(path: str) -> int:
    """The samples ``iter_tar`` yields from a whole shard (member data unread; raises as it does on a damaged one)."""
    return sum(1 for _ in iter_tar(path, skip=sys.maxsize))


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _ends_cleanly(path: str, offset: int) -> bool:
    """Whether an uncompressed tar has its end-of-archive zero block at ``offset`` (where tarfile stopped reading).
    Compressed shards are not checked here: their decompressor raises at a cut."""
    if _is_compressed(path):
        return True
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and not any(block)


def _is_compressed(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(6).startswith(_COMPRESSED_MAGIC)


def _caption(raw: Dict[str, Any], rng: Optional[np.random.Generator]) -> str:
    """The sample's caption, stripped: ``.txt``, or ``.json``'s "caption" (a string or a list of strings, one drawn
    when ``rng`` is given, else the first). An empty caption (img2dataset writes an empty ``.txt`` for a missing one)
    is an error, as ``prepare`` refuses one; so is a list with no non-empty entry (empty entries are left out)."""
    key = raw["__key__"]
    if "txt" in raw:
        text = raw["txt"].decode("utf-8").strip()
        if not text:
            raise ValueError(f"{key}.txt is empty")
        return text
    if "json" in raw:
        caption = json.loads(raw["json"].decode("utf-8")).get("caption")
        if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
            options = [c.strip() for c in caption if c.strip()]
            if not options:
                raise ValueError(f"{key}.json's 'caption' list holds empty strings only")
            return options[int(rng.integers(len(options)))] if rng is not None else options[0]
        if isinstance(caption, str):
            if not caption.strip():
                raise ValueError(f"{key}.json's 'caption' is empty")
            return caption.strip()
        raise ValueError(f"{key}.json has no 'caption' string (got {type(caption).__name__})")
    raise ValueError(f"sample {key} has no caption (.txt or .json)" + _link_note(raw))


def _image_bytes(raw: Dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in raw:
            return raw[ext]
    raise ValueError(f"sample {raw['__key__']} has no image ({'/'.join(IMAGE_EXTS)})" + _link_note(raw))


def _link_note(raw: Dict[str, Any]) -> str:
    links = raw.get("__links__")
    if not links:
        return ""
    named = ", ".join(f"{raw['__key__']}.{ext} -> {target}" for ext, target in links.items())
    return f" (links are not followed in shards: {named}; store the file itself)"


def _world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class WebDataset(IterableDataset):
    """Image-text samples streamed from tar shards (see the module docstring)."""

    def __init__(self, urls: Union[str, Sequence[str]], image_size: int = 224, max_text_len: int = 40,
                 train: bool = True, tokenizer=None, transform: Optional[Callable] = None, shuffle_buffer: int = 1000,
                 seed: int = 0, repeat: bool = False, rank: Optional[int] = None, world_size: Optional[int] = None,
                 drop_bad: bool = False, use_index: bool = True):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise FileNotFoundError(f"no shards in {urls!r}")
        # the shards' sample counts, from their index (None: readers take whole shards, as without an index)
        self.counts: Optional[List[int]] = None
        self._split: Optional[Tuple[Tuple[int, int], List[List[Tuple[int, int, Optional[int]]]]]] = None
        if use_index:
            counts, why = shard_counts(self.urls)
            if why is not None:
                if _world(rank, world_size)[0] == 0:
                    warnings.warn(f"WebDataset: not using the shard index ({why}); readers read whole shards, as "
                                  f"without one (write_shard_index writes it anew)")
            else:
                self.counts = counts
        self.image_size, self.max_text_len, self.train = image_size, max_text_len, train
        self.transform = transform if transform is not None else build_transform(image_size, train)
        if tokenizer is None:
            from ..tokenizer import BertTokenizer

            tokenizer = BertTokenizer()
        self.tokenizer = tokenizer
        self.shuffle_buffer = int(shuffle_buffer) if train else 0
        self.seed, self.repeat, self.rank, self.world_size = int(seed), bool(repeat), rank, world_size
        self.drop_bad = bool(drop_bad)
        self.count_only_items = False  # (set by IterableStream: a collate that does not know them would fail)
        self.epoch = 0
        self._passes = 0
        self._skip: List[int] = []
        self._first_worker = 0
        self._log = BadSampleLog("webdataset")

    def set_epoch(self, epoch: int) -> None:
        """The next pass reads epoch ``epoch`` (from its start)."""
        self.set_position(epoch)

    def set_position(self, epoch: int, skip: Sequence[int] = (), first_worker: int = 0) -> None:
        """The next pass reads epoch ``epoch``, DataLoader worker i playing reader ``(first_worker + i) % workers``
        of this rank, and reader j leaving out the first ``skip[j]`` items of its output (``skip`` is empty, or has
        one count per DataLoader worker: one with ``num_workers=0``)."""
        skip = [int(n) for n in skip]
        if any(n < 0 for n in skip) or first_worker < 0 or (skip and first_worker >= len(skip)):
            raise ValueError(f"set_position: skip counts must be >= 0 and 0 <= first_worker < len(skip), got "
                             f"skip={skip}, first_worker={first_worker}")
        self.epoch, self._skip, self._first_worker = int(epoch), skip, int(first_worker)
        self._passes = 0  # counted from here (a main-process dataset, num_workers=0, is iterated again each epoch)

    def reader(self) -> int:
        """This rank's reader that the calling DataLoader worker plays (0 outside workers)."""
        info = get_worker_info()
        return (info.id + self._first_worker) % info.num_workers if info is not None else 0

    def assignment(self, epoch: int, rank: int, world_size: int, worker_id: int, num_workers: int
                   ) -> Tuple[List[str], int, int]:
        """(shards, sample stride, sample offset) that global worker ``rank * num_workers + worker_id`` reads.

        With S shards for T readers, S mod T readers read one shard more than the others in a pass; which readers
        rotates by S mod T places each epoch, so that over epochs every reader has the same share (with ``repeat``
        each reader makes its passes at the pace of the batches it feeds: a reader with fewer samples repeats
        them sooner)."""
        shards = [self.urls[i] for i in self._epoch_order(epoch)]
        total = world_size * num_workers
        gid = rank * num_workers + worker_id
        if len(shards) >= total:
            return shards[(gid + epoch * len(shards)) % total::total], 1, 0
        return shards, total, gid

    @property
    def balance(self) -> Optional[str]:
        """What the readers' split depends on (a checkpoint's position too): the index's counts, or None without."""
        if self.counts is None:
            return None
        return "samples/v1:" + hashlib.sha256(json.dumps(self.counts).encode("utf-8")).hexdigest()[:16]

    def drop_index(self) -> None:
        """Read whole shards, as without an index (e.g. when processes found different indexes)."""
        self.counts, self._split = None, None

    def _epoch_order(self, epoch: int) -> List[int]:
        """The shards' reading order in ``epoch``: shuffled identically in every process when training."""
        order = list(range(len(self.urls)))
        if self.train:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order

    def pieces(self, epoch: int, rank: int, world_size: int, worker_id: int, num_workers: int
               ) -> List[Tuple[str, int, Optional[int]]]:
        """With the shards' sample counts (a shard index): the (shard, first sample, end sample or None: to the
        shard's end) ranges that global worker ``rank * num_workers + worker_id`` reads in ``epoch``, in order.

        The epoch's shard order (shuffled identically everywhere when training) is cut into as many shares as
        readers (``split_samples``): every reader reads N // T samples, or one more; reader g takes share
        ``(g + epoch * N) % T``, so the shares with one more sample move to other readers each epoch."""
        if self.counts is None:
            raise ValueError("pieces: the shards have no sample counts (no shard index); see assignment")
        order = self._epoch_order(epoch)
        total = world_size * num_workers
        key = (epoch, total)
        if self._split is None or self._split[0] != key:
            self._split = (key, split_samples([self.counts[i] for i in order], total))
        place = (rank * num_workers + worker_id + epoch * sum(self.counts)) % total
        return [(self.urls[order[j]], first, stop) for j, first, stop in self._split[1][place]]

    def _piece_stream(self, pieces: Sequence[Tuple[str, int, Optional[int]]]) -> Iterator[Optional[Dict[str, Any]]]:
        for url, first, stop in pieces:
            seen = 0  # samples of the shard read, or passed over before ``first``
            try:
                with contextlib.closing(iter_tar(url, skip=first)) as samples:
                    for raw in samples:
                        seen += 1
                        if seen > first:
                            yield raw
                        if stop is not None and seen >= stop:
                            break
            except (tarfile.TarError, OSError, EOFError) as exc:
                if seen >= first:  # the damage is in this reader's range: it counts it, as one bad sample
                    self._log(f"in shard {url} after {seen} samples", exc)
                    yield None
                else:  # (the reader whose range holds the damage counts it)
                    self._log(f"in shard {url} after {seen} samples, before sample {first} where this reader's "
                              f"range begins", exc)

    def _raw_stream(self, shards: Sequence[str], stride: int, offset: int) -> Iterator[Optional[Dict[str, Any]]]:
        index = 0
        for url in shards:
            try:
                for raw in iter_tar(url):
                    if index % stride == offset:
                        yield raw
                    index += 1
            except (tarfile.TarError, OSError, EOFError) as exc:
                self._log(f"in shard {url} after {index} samples", exc)
                if index % stride == offset:
                    yield None  # one bad sample per damaged shard, counted once across workers
                index += 1

    def _decode(self, raw: Optional[Dict[str, Any]], seed: int) -> Optional[Dict[str, Any]]:
        if raw is None:
            return None
        try:
            with torch.random.fork_rng(devices=[]):  # the transforms draw from torch's RNG: this sample's seed
                torch.default_generator.manual_seed(seed)  # (the CPU generator alone, which the fork restores)
                if raw.get("__bad__"):
                    raise ValueError("; ".join(raw["__bad__"]))
                text = _caption(raw, np.random.default_rng(seed) if self.train else None)
                image = self.transform(decode_image(_image_bytes(raw)))
            # tokenized here too: a caption the tokenizer refuses (e.g. a JSON "\ud800" escape, a lone surrogate)
            # is a bad sample like an unreadable image
            encoded = encode_text(self.tokenizer, text, self.max_text_len)
        except Exception as exc:  # noqa: BLE001 - an unreadable sample is skipped and counted
            if raw.get("__split__"):
                exc = ValueError(f"{exc} (the shard stores this sample's members apart, after other samples': write "
                                 f"shards with each sample's files together, e.g. tar --sort=name)")
            self._log(f"{raw.get('__key__')} in {raw.get('__url__')}", exc)
            return None
        item = {"image": image}
        item.update(encoded)
        item.update({"key": raw["__key__"], "url": raw["__url__"], "_seed": seed})
        return item

    def __iter__(self) -> Iterator[Optional[Dict[str, Any]]]:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        reader = self.reader()
        rank, world_size = _world(self.rank, self.world_size)
        total = world_size * num_workers
        if self._passes == 0 and rank == 0 and reader == 0 and self.epoch == 0:
            if self.counts is not None:
                if len(self.urls) < total:
                    warnings.warn(f"WebDataset: {len(self.urls)} shards for {total} readers (ranks x workers): "
                                  f"readers share shards by sample range, and one whose range starts inside a shard "
                                  f"reads through the samples before it; use more shards for speed")
            elif len(self.urls) < total:
                warnings.warn(f"WebDataset: {len(self.urls)} shards for {total} readers (ranks x workers): every "
                              f"reader scans all shards; use more shards for speed")
            elif len(self.urls) % total:
                few = len(self.urls) // total
                warnings.warn(f"WebDataset: {len(self.urls)} shards for {total} readers (ranks x workers): "
                              f"{len(self.urls) % total} readers read {few + 1} shards a pass and the others {few} "
                              f"(which ones rotates each epoch); a process whose readers have fewer starts its next "
                              f"pass sooner, so its samples are seen more often until that evens out; a shard count "
                              f"divisible by {total} gives every reader the same share")
        if self._skip and len(self._skip) != num_workers:
            raise ValueError(f"set_position gave {len(self._skip)} skip counts for a DataLoader with {num_workers} "
                             f"readers (num_workers, or 1 without workers)")
        bad = 0  # unreadable samples not yet reported: those at a pass's end ride on the next pass's first item
        while True:
            first_pass = self._passes == 0
            epoch = self.epoch + self._passes
            self._passes += 1
            if self.counts is not None:
                raws = self._piece_stream(self.pieces(epoch, rank, world_size, reader, num_workers))
            else:
                raws = self._raw_stream(*self.assignment(epoch, rank, world_size, reader, num_workers))
            gid = rank * num_workers + reader
            skip = self._skip[reader] if first_pass and self._skip else 0
            rng = np.random.default_rng([self.seed, epoch, gid, 1])
            for place, raw in enumerate(self._shuffled(raws, rng)):
                if place < skip:
                    continue
                item = self._decode(raw, sample_seed(self.seed, epoch, gid, place))
                if not self.drop_bad:
                    yield item
                elif item is None:
                    bad += 1
                else:
                    item["_place"] = place
                    if bad:
                        item["bad_samples"], bad = bad, 0
                    yield item
            if not self.repeat:
                if bad and self.count_only_items:  # (its place, the pass's last, is for the position)
                    yield {"bad_samples": bad, "_place": place}
                return

    def _shuffled(self, stream: Iterable[Optional[Dict[str, Any]]], rng: np.random.Generator
                  ) -> Iterator[Optional[Dict[str, Any]]]:
        if self.shuffle_buffer <= 1:
            yield from stream
            return
        buf: List[Optional[Dict[str, Any]]] = []
        for raw in stream:
            buf.append(raw)
            if len(buf) >= self.shuffle_buffer:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


def sample_seed(seed: int, epoch: int, reader: int, place: int) -> int:
    """The seed of the ``place``-th item reader ``reader`` (global: rank x workers + worker) yields in ``epoch``."""
    return mixed_seed(seed, epoch, reader, place, 2)


# ---- the shard index --------------------------------------------------------------------------------------------

INDEX_SUFFIX = "shards.json"
INDEX_FORMAT = "vlmo_fast shard index"
INDEX_VERSION = 1
_EDGE_BYTES = 16 << 10  # the first and last bytes of a shard digested in its index entry


def index_path(shard: str) -> str:
    """The index file that would list ``shard``: ``<prefix>.shards.json`` beside it, the prefix being its file name
    without the shard suffix and the trailing number (``web-train-000003.tar`` -> ``web-train.shards.json``,
    ``00003.tar`` -> ``shards.json``)."""
    folder, name = os.path.split(shard)
    lower = name.lower()
    stem = next((name[: -len(x)] for x in SHARD_SUFFIXES if lower.endswith(x)), name)
    prefix = re.sub(r"[-_.]?\d+$", "", stem)
    return os.path.join(folder, f"{prefix}.{INDEX_SUFFIX}" if prefix else INDEX_SUFFIX)


def _edges(path: str) -> str:
    """A digest of the shard's first and last ``_EDGE_BYTES`` (what tells a copy, with a new modification time,
    from a rewritten file of the same size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE_BYTES))
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - _EDGE_BYTES, 0))
        h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()


def _index_entry(path: str, samples: int) -> Dict[str, Any]:
    st = os.stat(path)
    return {"name": os.path.basename(path), "samples": int(samples), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "edges": _edges(path)}


def write_shard_index(shards: Union[str, Sequence[str]], counts: Optional[Sequence[int]] = None) -> List[str]:
    """Write the index of ``shards`` (paths, or what ``expand_urls`` takes): for each, its sample count (``counts``,
    else counted as ``iter_tar`` reads the shard: headers only for an uncompressed one), size, modification time and
    a digest of its first and last 16 KiB, in ``index_path``'s file (one per folder and prefix; written atomically,
    keeping an earlier one's entries of other shards that are still there: shards indexed apart, e.g. added later).
    A ``WebDataset`` given shards that all have a current index entry splits each epoch's samples evenly over its
    readers. For shards written by other tools (``write_shards`` writes its own index). Returns the index paths."""
    paths = expand_urls(shards)
    if counts is not None and len(counts) != len(paths):
        raise ValueError(f"write_shard_index: counts has {len(counts)} entries for {len(paths)} shards")
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for k, path in enumerate(paths):
        n = count_samples(path) if counts is None else counts[k]
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"write_shard_index: the sample count of {path} must be an int >= 0, got {n!r}")
        entries = groups.setdefault(index_path(path), [])
        if any(e["name"] == os.path.basename(path) for e in entries):
            raise ValueError(f"write_shard_index: {path} is listed twice")
        entries.append(_index_entry(path, n))
    for ipath, entries in groups.items():
        earlier = _read_index(ipath)  # the entries of other shards there stay (indexed apart, e.g. added later)
        if isinstance(earlier, dict):
            names = {e["name"] for e in entries}
            folder = os.path.dirname(ipath)
            entries = [e for n, e in earlier.items() if n not in names and os.path.isfile(os.path.join(folder, n))
                       ] + entries
        atomic_write_json(ipath, {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shards": entries}, indent=0)
    return list(groups)


def _read_index(path: str) -> Union[None, str, Dict[str, Dict[str, Any]]]:
    """The entries of an index file by shard name; None where there is none; a str saying why it is unusable."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        return f"{path} is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(value, dict) or value.get("format") != INDEX_FORMAT:
        return f"{path} is not a {INDEX_FORMAT}"
    if value.get("version") != INDEX_VERSION:
        return f"{path} has version {value.get('version')!r}; this reader reads version {INDEX_VERSION}"
    entries = value.get("shards")
    fields = {"name": str, "samples": int, "bytes": int, "mtime_ns": int, "edges": str}
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), t) and not isinstance(e.get(k), bool)
                                        for k, t in fields.items()) and e["samples"] >= 0 for e in entries):
        return f"{path} is malformed (each of its 'shards' needs {', '.join(fields)}; samples >= 0)"
    return {e["name"]: e for e in entries}


def _changed(path: str, entry: Dict[str, Any]) -> Optional[str]:
    """Why the shard at ``path`` is not the one its index entry describes, or None."""
    try:
        st = os.stat(path)
        size, mtime = st.st_size, st.st_mtime_ns
        if size != entry["bytes"]:
            return f"{size} bytes, the index says {entry['bytes']}"
        if mtime != entry["mtime_ns"] and _edges(path) != entry["edges"]:  # (a copy has a new time, same bytes)
            return "another modification time, and its first or last 16 KiB differ"
    except OSError as exc:
        return f"it cannot be checked: {exc}"
    return None


def shard_counts(urls: Sequence[str]) -> Tuple[Optional[List[int]], Optional[str]]:
    """(each shard's sample count, None) when every one of ``urls`` has a current entry in its index
    (``index_path``); (None, None) when none has an index; otherwise (None, why the counts are not used)."""
    indexes: Dict[str, Union[None, str, Dict[str, Dict[str, Any]]]] = {}
    counts: List[int] = []
    unindexed: List[str] = []
    for url in urls:
        ipath = index_path(url)
        if ipath not in indexes:
            indexes[ipath] = _read_index(ipath)
        index = indexes[ipath]
        if isinstance(index, str):
            return None, index
        if index is None:
            unindexed.append(url)
            continue
        entry = index.get(os.path.basename(url))
        if entry is None:
            return None, f"{url} is not listed in {ipath}"
        why = _changed(url, entry)
        if why is not None:
            return None, f"{url} changed since {ipath} was written ({why})"
        counts.append(entry["samples"])
    if len(unindexed) == len(urls):
        return None, None
    if unindexed:
        return None, (f"{len(unindexed)} of the {len(urls)} shards have no index (e.g. {unindexed[0]}: no "
                      f"{index_path(unindexed[0])})")
    return counts, None


def split_samples(counts: Sequence[int], places: int) -> List[List[Tuple[int, int, Optional[int]]]]:
    """The samples of shards with ``counts`` (in reading order) split over ``places`` readers: place p gets
    N // places samples, one more when p < N % places, as (shard number, first sample, end sample or None: the
    shard's end) ranges in shard order.

    The places take the sample sequence of the shards in order, each its share: whole shards, and a shard split by
    sample range where a share ends (at most ``places - 1`` shards are split). A reader starting inside a shard
    reads through the samples before its range without decoding them (a tar has no index), so the pieces of a split
    shard go in order of size, the smallest first: the readers after it skip the least (a shard split in two costs
    the smaller piece, read once more). A split shard's last piece runs to its end, and a shard the index counts as
    empty is read whole: every sample is read once even if a count were wrong."""
    total = sum(counts)
    share, extra = divmod(total, places)

    def end(p: int) -> int:  # where place p's share ends in the sample sequence
        return (p + 1) * share + min(p + 1, extra)

    out: List[List[Tuple[int, int, Optional[int]]]] = [[] for _ in range(places)]
    place, pos = 0, 0
    for j, n in enumerate(counts):
        while place < places - 1 and end(place) <= pos:
            place += 1
        parts: List[Tuple[int, int]] = []  # (length, place)
        lo, p = pos, place
        while True:
            while p < places - 1 and end(p) <= lo:
                p += 1
            take = min(pos + n, end(p)) - lo
            parts.append((take, p))
            lo += take
            if lo >= pos + n:
                break
        parts.sort()  # smallest piece first (ties: the earlier place)
        start = 0
        for k, (length, p) in enumerate(parts):
            out[p].append((j, start, None if k == len(parts) - 1 else start + length))
            start += length
        pos += n
    return out


# ---- writing -----------------------------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(out_dir: str, samples: Iterable[Tuple[str, bytes, Union[str, Sequence[str]]]],
                 samples_per_shard: int = 1000, prefix: str = "shard", image_ext: str = "png",
                 caption_format: str = "txt") -> List[str]:
    """Write (key, encoded image, caption) samples as ``<out_dir>/<prefix>-000000.tar``, ... (each shard written to
    a temporary file, then renamed), and their index ``<out_dir>/<prefix>.shards.json`` last (``write_shard_index``:
    the samples a reader counts in each shard, so that readers split them evenly). ``caption_format``: "txt" or
    "json" ({"caption": ...}). Returns the shard paths."""
    if caption_format not in ("txt", "json"):
        raise ValueError(f"caption_format must be 'txt' or 'json', got {caption_format!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    paths: List[str] = []
    it = iter(samples)
    for first in it:  # one shard per pass, streaming: one sample in memory at a time
        path = os.path.join(out_dir, f"{prefix}-{len(paths):06d}.tar")
        with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
            for key, image, caption in itertools.chain([first], itertools.islice(it, samples_per_shard - 1)):
                _add(tar, f"{key}.{image_ext}", bytes(image))
                if caption_format == "txt":
                    if not isinstance(caption, str):
                        raise TypeError(f"caption of {key} must be a str for caption_format='txt'")
                    _add(tar, f"{key}.txt", caption.encode("utf-8"))
                else:
                    _add(tar, f"{key}.json", json.dumps({"caption": caption}).encode("utf-8"))
        paths.append(path)
    if paths:
        write_shard_index(paths)  # (counted as read: headers only, the shards just written)
    return paths


def write_synthetic_shards(out_dir: str, n: int = 1000, samples_per_shard: int = 100, image_size: int = 64,
                           seed: int = 0, caption_format: str = "json") -> List[str]:
    """The synthetic scenes (``vlmo_fast.data.synthetic``) as tar shards, one caption per image (a paraphrase drawn
    at random, as web data has one caption per image)."""
    from .synthetic import generate

    images, captions, _ = generate(n, image_size, seed=seed)
    rng = np.random.default_rng([seed, 7])
    samples = ((f"{i:08d}", images[i], captions[i][int(rng.integers(len(captions[i])))]) for i in range(n))
    return write_shards(out_dir, samples, samples_per_shard, prefix="synthetic", image_ext="png",
                        caption_format=caption_format)
