"""The trainer's view of the data layer: datasets from the config, a resumable batch stream, evaluation loaders.

Exact resume: every sample's randomness (augmentation) and every batch's (MLM masking) is seeded from
(seed, epoch, sample index), not from a worker's running RNG, and the sampler's permutation is a function of
(seed, epoch); so a run resumed from a checkpoint sees the very batches the uninterrupted run would have seen, with
any number of workers. Per-sample seeding uses a forked RNG, so it never disturbs the main process's random stream.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .. import data as vdata
from ..data.arrow import changed_files
from ..data.loader import kill_workers
from ..data.sample import mixed_seed
from ..config import VLMoConfig
from .config import TrainConfig, input_error
from .distributed import DistInfo, barrier, gather_objects

SAMPLE_SEEDS = 2  # the version of _sample_seed's rule (1: an affine mix, before it was hashed), kept in the position


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return mixed_seed(seed, epoch, index, 1)


class SeededSamples(Dataset):
    """Wraps a map-style dataset: item ``(epoch, index)`` is ``dataset[index]`` computed under a torch RNG seeded
    from (seed, epoch, index), with the seed kept for the batch's MLM masking."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        s = _sample_seed(self.seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone (what the fork restores): torch.manual_seed would also reseed the GPU's
            torch.default_generator.manual_seed(s)
            item = self.dataset[index]
        if item is not None:
            item = dict(item)
            item["_seed"] = s
        return item


class SeededCollate:
    """The data layer's collate under a torch RNG seeded from the batch's first sample (deterministic masking)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        seeds = [it.pop("_seed") for it in items if it is not None and "_seed" in it]
        with torch.random.fork_rng(devices=[]):
            if seeds:
                torch.default_generator.manual_seed(seeds[0])
            return self.collate(items)


class EpochSampler(Sampler):
    """Yields (epoch, index) for this rank: a (seed, epoch) permutation (or the identity), padded or truncated to a
    multiple of the world size and strided by rank like DistributedSampler, from global position ``offset``: the
    epoch's first ``offset`` samples over all ranks were consumed (rank r took positions r, r + world, ...), so the
    position carries over to another number of processes or another per-process batch."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int, world: int, drop_last: bool = False):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.per_rank = n // world if drop_last else -(-n // world)
        self.drop_last = drop_last
        self.epoch, self.offset = 0, 0

    def set_position(self, epoch: int, offset: int) -> None:
        self.epoch, self.offset = epoch, offset

    def __len__(self) -> int:
        return len(range(self.offset + self.rank, self.per_rank * self.world, self.world))

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        # a tensor, turned into Python ints a slice at a time: a list of a 10M-sample epoch's order would hold
        # ~400 MB in every process for the whole epoch
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        total = self.per_rank * self.world
        order = order[:total] if self.drop_last else torch.cat([order, order[: total - self.n]])
        mine = order[self.offset + self.rank : total : self.world].clone()
        del order
        for part in mine.split(1 << 16):
            for index in part.tolist():
                yield self.epoch, index


def _shut_down(it, kill_first: bool = False) -> None:
    """Stop a DataLoader iterator's workers and unregister them from torch's SIGCHLD check; a worker that did not
    stop (stuck in a read: it ignores SIGTERM, torch's last resort) is killed, or the process could not exit.
    ``kill_first``: one is known to be stuck; torch's shutdown would wait for each in turn before giving up."""
    if kill_first:
        kill_workers(getattr(it, "_workers", ()))
    try:
        getattr(it, "_shutdown_workers", lambda: None)()
    except Exception:  # noqa: BLE001 - half shut down already: nothing more to do
        pass
    kill_workers(getattr(it, "_workers", ()))


def abandon(stream, stuck: bool = True) -> None:
    """Stop a training stream's workers now (``stuck``: a run stopped while it waited for a batch, so one may be
    stuck; killed first, not waited for), e.g. at the end of a run."""
    it, stream._it = getattr(stream, "_it", None), None
    _shut_down(it, kill_first=stuck)
    loader = getattr(stream, "loader", None)
    if getattr(loader, "_iterator", None) is it:  # (persistent workers: the loader keeps it, and its queues' threads)
        loader._iterator = None


def _first_batch_unlimited(it) -> None:
    """No --data-timeout for the first batch of a new or reset iterator: its workers start, and a resumed tar
    stream's readers read through what they had yielded of the epoch (at night on a network file system, gigabytes)
    before it; the limit holds from the next batch (``_limited``)."""
    if getattr(it, "_timeout", 0):
        it._vlmo_timeout, it._timeout = it._timeout, 0


def _limited(it) -> None:
    if getattr(it, "_vlmo_timeout", None):
        it._timeout, it._vlmo_timeout = it._vlmo_timeout, None


def _stalled(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "DataLoader timed out" in str(exc)


def _raise_if_stalled(exc: BaseException, loader: DataLoader) -> None:
    """torch's "DataLoader timed out" as what it means here."""
    if _stalled(exc):
        raise RuntimeError(f"no training batch came from the {loader.num_workers} data workers in {loader.timeout:g} s "
                           f"(--data-timeout): a worker is stuck, e.g. in a read from a hung file system, or "
                           f"too slow; the last checkpoint is where a resumed run starts") from exc


def _check_arrow_files(dataset: Dataset, cause: Optional[BaseException] = None) -> None:
    """Raise naming the dataset's arrow files that changed on disk since they were mapped (a few stat calls); before
    a failure (no ``cause``), only those made shorter, which a read past their end would kill the process for."""
    changed = changed_files(dataset, shrunk_only=cause is None)
    if changed:
        raise RuntimeError(
            f"arrow files changed on disk while this run reads them: {'; '.join(changed)}. They are memory-mapped, "
            f"so a file truncated or rewritten in place kills its reader (SIGBUS); write new files under another "
            f"name and rename them into place, or stop the run first") from cause


class TrainStream:
    """Endless iterator of training batches over epochs, with a resumable position (epoch, batches consumed)."""

    def __init__(self, dataset: Dataset, collate, batch_size: int, num_workers: int, seed: int, info: DistInfo,
                 drop_last: bool = False, min_size: int = 1, timeout: float = 0.0):
        same_on_every_rank(len(dataset), "training samples", "the same data files (e.g. each node's copy of them)")
        if len(dataset) < batch_size * info.world_size:
            raise ValueError(f"the training set has {len(dataset)} samples, fewer than one global micro-batch "
                             f"({batch_size} x {info.world_size})")
        self.dataset, self.batch_size = dataset, batch_size
        # official: DistributedSampler pads every rank to ceil(n / world) samples and the DataLoader keeps the
        # final partial batch (the same size on every rank, so the ITC/ITM gathers line up)
        self.sampler = EpochSampler(len(dataset), seed, True, info.rank, info.world_size, drop_last=drop_last)
        # a final global batch of one sample has no in-batch negative for ITM (the official sampling would fail)
        drop_last = drop_last or (self.sampler.per_rank % batch_size) * info.world_size == 1
        kwargs: Dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(persistent_workers=True, worker_init_fn=vdata.seed_worker, prefetch_factor=4,
                          timeout=timeout)
        # its own generator: creating an iterator (at start, after resume) must not draw from the global stream
        self.loader = vdata.TrackedDataLoader(
            SeededSamples(dataset, seed), batch_size=batch_size, sampler=self.sampler,
            collate_fn=SeededCollate(collate), num_workers=num_workers, drop_last=drop_last,
            pin_memory=info.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed), **kwargs)
        self.batches_per_epoch = len(self.loader)  # official max_epochs steps: len(train_loader) * epochs // accum
        self.world = info.world_size
        self.epoch, self.batch, self.consumed = 0, 0, 0  # consumed: the epoch's samples so far, over all ranks
        self.resume_note: Optional[str] = None
        self._it: Optional[Iterator] = None
        # a batch left with fewer readable samples is skipped (one process: ITM needs a second sample for its
        # negatives); the unreadable samples of skipped batches are added to the next batch's count
        self.min_size, self._carried_bad = min_size, 0
        # a whole epoch, from its start, that gives no batch (no readable sample) is an error, not an endless search
        self._whole_epoch, self._given, self._readable, self._empty_epochs = False, 0, 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, Any]:
        while True:
            if self._it is None:
                self.sampler.set_position(self.epoch, self.consumed)
                self._it = iter(self.loader)
                _first_batch_unlimited(self._it)
                self._whole_epoch, self._given, self._readable = self.consumed == 0, 0, 0
            if self.loader.num_workers == 0:  # a SIGBUS would end this process itself, with no message at all
                _check_arrow_files(self.dataset)
            try:
                batch = next(self._it)
                _limited(self._it)
            except StopIteration:
                # (with enough readable samples for a batch, another epoch's order may group them: searched on, for
                # a few epochs: with 2 readable samples among 86K it would take thousands)
                self._empty_epochs = self._empty_epochs + 1 if self._whole_epoch and not self._given else 0
                if self._empty_epochs and (self._readable < self.min_size or self._empty_epochs >= 3):
                    raise input_error(ValueError(
                        "the training set gave no batch in "
                        + ("a whole epoch" if self._empty_epochs == 1 else f"{self._empty_epochs} whole epochs")
                        + f" on rank {self.sampler.rank}: "
                        + (f"none of its {self.sampler.per_rank} samples could be read" if not self._readable else
                           f"{self._readable} of its {self.sampler.per_rank} samples could be read, and a batch "
                           f"needs {self.min_size}")
                        + "; see the unreadable samples logged above")) from None
                self._it = None
                self.epoch, self.batch, self.consumed = self.epoch + 1, 0, 0
                continue
            except Exception as exc:  # noqa: BLE001 - a worker died: a RuntimeError blaming shared memory for a
                # SIGBUS, or the pipe it was writing to reset (ConnectionResetError), whatever made it fault.
                # The iterator goes first: torch's SIGCHLD handler raises in this thread for each of its workers
                # that dies by a signal, also later, e.g. while the traceback of this error is being printed
                it, self._it = self._it, None
                _shut_down(it, kill_first=_stalled(exc))
                _check_arrow_files(self.dataset, exc)
                _raise_if_stalled(exc, self.loader)
                if isinstance(exc, vdata.UnreadableData):  # the data's fault: one line (from a worker, the type
                    # comes back with the worker's traceback in its message: its last line is the error's)
                    raise input_error(ValueError(str(exc).strip().splitlines()[-1].split("UnreadableData: ")[-1])) \
                        from None
                raise
            self.batch += 1
            self.consumed += self.batch_size * self.world
            readable = len(batch.get("text_ids", ()))
            self._readable += readable
            if vdata.is_empty_batch(batch) or readable < self.min_size:
                self._carried_bad += int(batch.get("bad_samples", 0) or 0)
                continue
            if self._carried_bad:
                batch["bad_samples"] = int(batch.get("bad_samples", 0) or 0) + self._carried_bad
                self._carried_bad = 0
            self._given += 1
            return batch

    def state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "samples": self.consumed, "seeds": SAMPLE_SEEDS}

    def restore(self, state: Dict[str, int]) -> None:
        """Continue where ``state`` left off. The position is the epoch's samples consumed over all ranks, so a run
        resumed on another number of processes or with another per-process batch skips none and repeats fewer than
        one per process: every rank must get as many samples as the others (the ITC/ITM gathers), so a position
        that does not divide by the number of processes is rounded down to one that does, and one past the epoch's
        real samples (in the padding) starts the next epoch. (A checkpoint from before the position was kept holds
        batches only: read with this layout.)"""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        consumed = int(state.get("samples", self.batch * self.batch_size * self.world))
        if consumed >= min(self.sampler.per_rank * self.world, self.sampler.n):
            self.epoch, self.batch, consumed = self.epoch + 1, 0, 0
        self.consumed = consumed - consumed % self.world
        self._it = None
        if state.get("seeds") != SAMPLE_SEEDS:
            self.resume_note = ("the samples continue where they were, with other augmentation and MLM-masking draws "
                                "than the saved run would have made (its per-sample seeds are an older version's)")


class _ReaderTag:
    """A worker's collate for tar shards: the batch carries ("_reader") the reader that made it (the DataLoader worker's
    role, ``WebDataset.reader``) and ("_end") how far into the reader's output its last item was (the reader's
    position after it), and its MLM masking is seeded from its first sample's seed."""

    def __init__(self, collate):
        self.collate = SeededCollate(collate)

    def __call__(self, items):
        batch = self.collate(items)
        info = get_worker_info()
        batch["_reader"] = info.dataset.reader() if info is not None else 0
        batch.pop("_place", None)
        places = [item["_place"] for item in items if item is not None and "_place" in item]  # count-only items too
        batch["_end"] = int(places[-1]) + 1 if places else None
        return batch


def same_on_every_rank(value: Any, what: str, needs: str) -> None:
    """A ValueError on every rank unless all have the same ``value`` (a collective: every rank calls it). The ranks
    each build their own sample order and epoch length from their data: different data (a node's copy that is
    partial or stale) would have them skip and repeat samples, or stop at different steps and hang."""
    seen = gather_objects(value)
    if len(set(map(repr, seen))) > 1:
        found = "; ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
        raise ValueError(f"the processes found different {what} ({found}): every process must read {needs}")


def _shard_list_digest(urls: List[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode("utf-8")).hexdigest()


class IterableStream:
    """Web-scale tar shards (``WebDataset``): an endless stream over epochs, with a resumable position.

    A rank's DataLoader takes batches from its workers in turn; the position is, per rank, the epoch, how far into
    each worker's reader's output the batches taken reach, and the reader due next. A resumed stream rotates the
    readers so that the one due next comes first, and each reader leaves out what it had yielded (read again, not
    decoded), so the run sees the very batches it would have seen. That needs the same shard list, seed, number of
    processes, workers per process and batch per process; with another layout the stream restarts the epoch's shards
    (``resume_note`` says which).

    The readers leave unreadable samples out (``WebDataset(drop_bad=True)``), so every batch has its full size, as
    the all-gathers of several processes need; a reader's last, partial batch of an epoch is left out here (not by
    the DataLoader's drop_last, which would lose the unreadable samples counted on it and at the pass's end: their
    count rides on the next batch); a whole epoch that gives no batch (no readable sample, or fewer than a batch per
    reader) is an error, not an endless search."""

    def __init__(self, dataset, collate, batch_size: int, num_workers: int, info: DistInfo, pin_memory: bool = False,
                 timeout: float = 0.0):
        same_on_every_rank(f"{len(dataset.urls)} shards, list digest {_shard_list_digest(dataset.urls)[:12]}",
                           "tar shards", "the same shard list (e.g. each node's copy of all the shards)")
        balances = gather_objects(dataset.balance)  # (a collective) every process must split the shards alike
        if len(set(balances)) > 1:
            if info.is_main:
                found = ", ".join(f"rank {r}: {b or 'none'}" for r, b in enumerate(balances))
                warnings.warn(f"WebDataset: the processes found different shard indexes ({found}; e.g. each its own "
                              f"copy of the shards): every process reads whole shards, as without an index")
            dataset.drop_index()
        dataset.drop_bad = True  # full batches; each item says where it is in its reader's output
        dataset.count_only_items = True  # a pass's last unreadable samples counted too (its collate skips the item)
        self.dataset = dataset
        self.loader = vdata.TrackedDataLoader(
            dataset, batch_size=batch_size, collate_fn=_ReaderTag(collate), num_workers=num_workers,
            generator=torch.Generator().manual_seed(0), pin_memory=pin_memory,
            worker_init_fn=vdata.seed_worker if num_workers > 0 else None, timeout=timeout if num_workers > 0 else 0)
        self.batch_size, self.readers, self.info = batch_size, max(num_workers, 1), info
        self.batches_per_epoch = 0
        self.epoch, self.taken, self.next_reader = 0, [0] * self.readers, 0
        self.resume_note: Optional[str] = None
        self._it = None
        # what a saved position is valid for
        self.layout = {"world": info.world_size, "readers": self.readers, "batch_size": batch_size,
                       "seed": dataset.seed, "shards": _shard_list_digest(dataset.urls),
                       # "places": readers took the shards of their place in every epoch (an older version's)
                       "position": "places/rotating"}
        if dataset.balance is not None:  # readers split each epoch's samples by the shard index's counts (without
            # one, and before there were indexes, they take whole shards: a position of either stays valid there)
            self.layout["balance"] = dataset.balance
        self._fresh_epoch, self._batches_this_epoch = True, 0
        # unreadable samples counted on batches left out, reported with the next batch (within one __next__ call,
        # so never part of a saved position)
        self._carried_bad = 0

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                self._fresh_epoch = not any(self.taken)
                self._batches_this_epoch = 0
                self.dataset.set_position(self.epoch, list(self.taken), self.next_reader)
                self._it = iter(self.loader)
                _first_batch_unlimited(self._it)
            try:
                batch = next(self._it)
                _limited(self._it)
            except RuntimeError as exc:
                it, self._it = self._it, None
                _shut_down(it, kill_first=_stalled(exc))
                _raise_if_stalled(exc, self.loader)
                raise
            except StopIteration:
                if self._fresh_epoch and not self._batches_this_epoch:
                    raise input_error(ValueError(
                        f"the tar shards gave no batch in a whole epoch on rank {self.info.rank}: no reader found "
                        f"{self.batch_size} readable samples among its shards ({len(self.dataset.urls)} shards, "
                        f"{self.readers} reader(s) per process; see the unreadable samples logged above)")) from None
                self._it, self.epoch = None, self.epoch + 1
                self.taken, self.next_reader = [0] * self.readers, 0
                continue
            reader = int(batch.pop("_reader"))
            end = batch.pop("_end")
            if end is not None:
                self.taken[reader] = end
            self.next_reader = (reader + 1) % self.readers
            bad = int(batch.pop("bad_samples", 0) or 0) + self._carried_bad
            if vdata.is_empty_batch(batch) or len(batch["text_ids"]) < self.batch_size:  # a reader's last, partial
                self._carried_bad = bad
                continue
            self._carried_bad = 0
            batch["bad_samples"] = bad
            self._batches_this_epoch += 1
            return batch

    def state(self) -> Dict[str, Any]:
        """Every rank's position (a collective: every rank calls it)."""
        mine = {"epoch": self.epoch, "taken": list(self.taken), "next": self.next_reader}
        return {"epoch": self.epoch, "batch": 0, "layout": self.layout, "ranks": gather_objects(mine)}

    def restore(self, state: Dict[str, Any]) -> None:
        self._it, self._carried_bad = None, 0
        saved, layout = state.get("layout"), self.layout
        if saved == layout:
            mine = state["ranks"][self.info.rank]
            self.epoch, self.taken, self.next_reader = int(mine["epoch"]), [int(n) for n in mine["taken"]], \
                int(mine["next"])
            self.resume_note = (f"the tar shards continue where they were (epoch {self.epoch}; each reader reads "
                                f"again, without decoding, what it had yielded of the epoch)")
            return
        self.epoch, self.taken, self.next_reader = int(state["epoch"]), [0] * self.readers, 0
        if saved is None:
            why = "the checkpoint has no position in them (an older version's)"
        else:
            others = [_LAYOUT_NAMES[k] for k in layout if k != "balance" and saved.get(k) != layout[k]]
            why = ", ".join("another " + name for name in others)
            if saved.get("balance") != layout.get("balance"):
                why += ("; " if why else "") + _balance_change(saved.get("balance"), layout.get("balance"))
        self.resume_note = (f"the tar shards restart epoch {self.epoch} (samples of it are seen again): {why}")


def _balance_change(saved: Optional[str], now: Optional[str]) -> str:
    if saved is None:
        return ("the readers now split each epoch's samples evenly by the shard index; the checkpoint's took whole "
                "shards (it was saved without an index, or by an older version)")
    if now is None:
        return ("the readers now take whole shards; the checkpoint's split the samples by a shard index that is "
                "missing, changed or not used now")
    return "another shard index (other sample counts)"


_LAYOUT_NAMES = {"world": "number of processes", "readers": "--num-workers", "batch_size": "per-process batch",
                 "seed": "--seed", "shards": "shard list", "position": "position format (an older version's)"}


def data_root(cfg: TrainConfig, model_config: VLMoConfig, info: DistInfo) -> str:
    """The configured data root, or the built-in synthetic dataset (generated once, by rank 0)."""
    if cfg.data_root is not None:
        return cfg.data_root
    root = os.path.join(cfg.out_dir, "synthetic")
    if info.is_main:
        vdata.write_synthetic(root, image_size=64, seed=0)
    barrier()
    return root


def _is_shards(name: str) -> bool:
    """A --datasets entry naming tar shards: a shard file (.tar, .tar.gz, ...), a glob or brace range, or a folder
    given as a path (with a "/": a dataset key such as coco is never a folder, even where one of that name exists)."""
    return vdata.is_shard_name(name) or any(c in name for c in "*?[{") or ("/" in name and os.path.isdir(name))


def eval_datasets(cfg: TrainConfig, split: str = "val") -> List[str]:
    """The run's arrow datasets that have official files for ``split`` (vg and sbu have none, so a run on ``coco,vg``
    evaluates on coco's and one on ``vg`` alone on nothing), of those the ones whose files are under --data-root
    when some are not (a warning at start names the others; see check_eval_files). Tar shards are training data
    only: a run on shards evaluates on the arrow files of --data-root (COCO's), and without one on nothing."""
    names = _with_split(cfg, split)
    present = [d for d in names if not _missing_files(cfg, d, split)]
    return present or names  # none there: all of them, so that reading them names a missing file


def _with_split(cfg: TrainConfig, split: str) -> List[str]:
    """The run's arrow datasets that have official files for ``split``; COCO's for a run on shards with a
    --data-root."""
    arrow = [d for d in cfg.datasets if not _is_shards(d)]
    if not arrow:
        return ["coco"] if cfg.data_root is not None else []
    return [d for d in arrow if vdata.dataset_files(d, split)]


def has_val_split(cfg: TrainConfig) -> bool:
    return bool(eval_datasets(cfg))


def no_eval_reason(cfg: TrainConfig) -> str:
    if any(_is_shards(d) for d in cfg.datasets):
        return "the training data are tar shards, which have no val split, and no --data-root gives one"
    return f"none of the datasets {', '.join(cfg.datasets)} has a val split"


def _missing_files(cfg: TrainConfig, name: str, split: str) -> List[str]:
    """The files of dataset ``name``/``split`` that --data-root lacks (none for the built-in synthetic set)."""
    if cfg.data_root is None:
        return []
    paths = (os.path.join(cfg.data_root, stem + ".arrow") for stem in vdata.dataset_files(name, split))
    return [p for p in paths if not os.path.isfile(p)]


def evaluation_reads_data(cfg: TrainConfig) -> bool:
    """Whether the training loop's evaluation reads anything: retrieval recall (models with ITC heads), the VQA
    score, NLVR2 accuracy, ITC accuracy. The MLM-only stages evaluate nothing."""
    return bool({"itc", "irtr", "vqa", "nlvr2"} & set(cfg.tasks))


def check_eval_files(cfg: TrainConfig, vqa_label_size: Optional[int] = None) -> None:
    """Before training: the val files an evaluation will read exist (a missing one would otherwise end the run after
    its last step, at the final evaluation), and VQA's labels fit the model's ``vqa_label_size`` classes. With
    several datasets, those without their val files are left out of the evaluation, with a warning; none of them
    there is the error."""
    if not (cfg.final_eval or cfg.eval_every) or not evaluation_reads_data(cfg) or cfg.data_root is None:
        return
    missing = {d: _missing_files(cfg, d, "val") for d in _with_split(cfg, "val")}
    if "vqa" in missing and not missing["vqa"] and vqa_label_size is not None:
        vdata.check_vqa_label_files([os.path.join(cfg.data_root, f"{stem}.arrow")
                                     for stem in vdata.dataset_files("vqa", "val")], vqa_label_size)
    absent = [d for d, paths in missing.items() if paths]
    if absent and len(absent) == len(missing):
        raise FileNotFoundError(f"{missing[absent[0]][0]}: the {absent[0]} val split, which the evaluation reads, "
                                f"is missing (--final-eval false and --eval-every 0 train without it)")
    if absent:
        warnings.warn(f"the evaluation reads the val splits of {', '.join(d for d in missing if d not in absent)} "
                      f"only: {', '.join(f'{d} (no {os.path.basename(missing[d][0])})' for d in absent)}")


def has_test_split(cfg: TrainConfig) -> bool:
    """Whether the test files of the evaluation's datasets are there (the final retrieval evaluation reads them
    when they are, as the official validation does; they are not required)."""
    names = eval_datasets(cfg, "test")
    return bool(names) and not any(_missing_files(cfg, d, "test") for d in names)


def train_stream(cfg: TrainConfig, model_config: VLMoConfig, info: DistInfo):
    text_only = cfg.tasks == ["textmlm"]
    collate = vdata.build_collate(whole_word_masking=cfg.whole_word_masking, mlm_prob=cfg.mlm_prob,
                                  mlm=bool({"mlm", "textmlm"} & set(cfg.tasks)))
    if "itm" in cfg.tasks and info.world_size == 1 and cfg.per_device_batch_size < 2:  # (every batch would be
        # skipped, an arrow epoch read before the error; tar shards failed in the ITM sampling)
        raise ValueError(f"itm in one process needs per_device_batch_size >= 2 (its negatives come from the "
                         f"micro-batch), got {cfg.per_device_batch_size}")
    shards = [d for d in cfg.datasets if _is_shards(d)]
    if shards:
        if len(shards) != len(cfg.datasets):
            raise ValueError("datasets: mix either arrow dataset keys or tar shard globs, not both")
        urls: List[str] = []
        for pattern in shards:  # a file, folder, glob or brace range; one that names nothing is an error naming it
            urls += vdata.expand_urls(pattern)
        # train=True whatever --augment says: it also shuffles the shards and samples and draws one caption of a
        # list per pass; --augment false changes the image transform only, as on arrow files
        transform = vdata.build_transform(model_config.image_size, train=cfg.augment is not False)
        ds = vdata.WebDataset(urls, image_size=model_config.image_size, max_text_len=model_config.max_text_len,
                              train=True, transform=transform, seed=cfg.seed, rank=info.rank,
                              world_size=info.world_size)  # (IterableStream sets drop_bad)
        return IterableStream(ds, collate, cfg.per_device_batch_size, cfg.num_workers, info,
                              pin_memory=info.device.type == "cuda", timeout=cfg.data_timeout)
    # the official augmentation at 64 px (crops removing whole cells, flips swapping left and right, colour ops)
    # destroys what the synthetic captions describe, so the built-in set trains with the eval transform
    augment = cfg.augment if cfg.augment is not None else cfg.data_root is not None
    # several processes must see equal batch sizes (the all-gathers): unreadable samples are then replaced by
    # random others (still counted) instead of dropped
    on_error = "resample" if info.world_size > 1 else "drop"
    ds = vdata.build_dataset(data_root(cfg, model_config, info), cfg.datasets, "train",
                             image_size=model_config.image_size, max_text_len=model_config.max_text_len,
                             train=augment, text_only=text_only, on_error=on_error)
    vdata.check_vqa_labels(ds, model_config.vqav2_label_size)
    # with dropped unreadable samples (one process) a batch can shrink to one sample: no negative for ITM
    min_size = 2 if "itm" in cfg.tasks and on_error == "drop" else 1
    return TrainStream(ds, collate, cfg.per_device_batch_size, cfg.num_workers, cfg.seed, info, cfg.drop_last,
                       min_size, timeout=cfg.data_timeout)


def eval_loader(ds: Dataset, batch_size: int, collate, num_workers: int,
                batches: Optional[List[List[int]]] = None) -> DataLoader:
    """The dataset in order (or in the given ``batches`` of indices), decoded by ``num_workers`` workers (as the
    official val/test loaders: image decoding at 384/480 px in the main process would leave the GPU idle for minutes
    on a 5k-image split), pinned on CUDA;
    workers leave SIGTERM/SIGINT to the main process (``seed_worker``). Its own generator: an iterator drawn from
    the global RNG (its workers' base seed) would move it on the evaluating rank only, so a resumed run, whose ranks
    restore rank 0's RNG state, and an FSDP run (every rank evaluates) would leave the trajectory."""
    order = dict(batch_size=batch_size, shuffle=False) if batches is None else dict(batch_sampler=batches)
    return vdata.TrackedDataLoader(ds, collate_fn=collate, num_workers=num_workers,
                                   pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                                   worker_init_fn=vdata.seed_worker if num_workers > 0 else None, **order)


def _eval_source(cfg: TrainConfig, split: str) -> Tuple[str, List[str]]:
    """(data root, dataset names) an evaluation of ``split`` reads."""
    names = eval_datasets(cfg, split)
    if not names:
        raise ValueError(f"evaluation: {no_eval_reason(cfg)}")
    return (cfg.data_root if cfg.data_root is not None else os.path.join(cfg.out_dir, "synthetic")), names


def retrieval_loaders(cfg: TrainConfig, model_config: VLMoConfig, max_batches: Optional[int] = None,
                      split: str = "val"):
    """(image batches, caption batches) of the split, for dual-encoder recall: one item per image, one per caption."""
    root, names = _eval_source(cfg, split)
    kw = dict(image_size=model_config.image_size, max_text_len=model_config.max_text_len, train=False)
    # the first only: img_index numbers the rows of one dataset, so two datasets' images would share numbers
    images = vdata.build_dataset(root, names[:1], split, image_only=True, **kw)
    texts = vdata.build_dataset(root, names[:1], split, text_only=True, **kw)
    collate = vdata.build_collate(mlm=False)
    bs = cfg.per_device_batch_size
    n = cfg.num_workers
    return (_limit(eval_loader(images, bs, collate, n), max_batches),
            _limit(eval_loader(texts, bs, collate, n), None))


def val_batches(cfg: TrainConfig, model_config: VLMoConfig, split: str = "val", world_size: Optional[int] = None):
    """The val split's batches in order; with ``world_size``, the batches the official validation's contrastive
    accuracies see instead (``official_val_batches``)."""
    root, names = _eval_source(cfg, split)
    # all of them, as the official val set (a ConcatDataset of every dataset's val split)
    ds = vdata.build_dataset(root, names, split, image_size=model_config.image_size,
                             max_text_len=model_config.max_text_len, train=False)
    batches = None if world_size is None else official_val_batches(len(ds), cfg.per_device_batch_size, world_size)
    return eval_loader(ds, cfg.per_device_batch_size, vdata.build_collate(mlm=False), cfg.num_workers, batches)


def official_val_batches(n: int, per_device: int, world_size: int) -> List[List[int]]:
    """The global batches of the official validation (spec §6: a shuffled DistributedSampler, seed 0, epoch never
    set): one permutation of the n samples, padded from its start to a multiple of the world size, rank r taking
    every world_size-th index from r, its k-th batch of ``per_device`` gathered with the other ranks' k-th into
    global batch k (the contrastive logits are all-gathered). In order the val split holds an image's captions side
    by side, and a batch of them makes every image's captions compete with each other."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    total = -(-n // world_size) * world_size
    perm += perm[: total - n]
    per_rank = [perm[r::world_size] for r in range(world_size)]
    return [[i for rank in per_rank for i in rank[k : k + per_device]]
            for k in range(0, len(per_rank[0]), per_device)]


def _limit(loader, max_batches: Optional[int]):
    if max_batches is None:
        return loader
    return itertools.islice(loader, max_batches)  # stops pulling (and decoding) after max_batches
