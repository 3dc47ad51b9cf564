"""DataLoader construction as the official datamodule does it, and a data-only throughput measurement.

Official (spec §6.3 "Trainer", §7): the datamodule builds its own ``DistributedSampler``s (train shuffled, val
shuffled, test in order; Lightning's ``replace_sampler_ddp=False``). Here:

- ``DistributedSampler`` whenever ``torch.distributed`` is initialised, or when ``distributed=True`` (then
  ``world_size``/``rank`` are taken from the arguments or the process group); shuffled iff ``train``, seeded by
  ``seed``; call ``set_epoch(loader, epoch)`` every epoch (it reaches the sampler, or a ``WebDataset``);
- otherwise a seeded ``RandomSampler`` (train) or the dataset order (eval);
- ``IterableDataset``s (``WebDataset``) shard themselves: no sampler;
- pinned memory when CUDA is available, persistent workers when ``num_workers > 0``;
- ``worker_init_fn`` seeds numpy's and Python's global RNGs from torch's per-worker seed (code that still uses
  ``np.random``/``random`` then differs per worker; the transforms here draw from torch already, see
  ``vlmo_fast.data.transforms``), and leaves SIGTERM/SIGINT to the main process (at its exit, the workers of
  iterators still alive are stopped by vlmo_fast, since multiprocessing's SIGTERM would not stop them).
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing.util  # noqa: F401 - its exit handler registered first: _kill_workers_at_exit runs before it
import random
import signal
import threading
import time
import weakref
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: numpy and ``random`` seeded from torch's seed of this worker (base_seed + worker_id).

    Workers also ignore SIGTERM and SIGINT: a signal sent to the whole process group (``timeout``, a cluster
    scheduler, Ctrl-C) must not kill them under the main process while it saves a checkpoint; the DataLoader stops
    them when the main process is done (and they exit on their own if it dies)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _kill_workers_at_exit() -> None:
    """At exit, the workers of live DataLoader iterators that use ``seed_worker`` are killed: multiprocessing's exit
    handler stops daemonic children with SIGTERM, which these workers ignore, and then waits for them, so a process
    ending with a live iterator (an uncaught error in training or evaluation) hung forever. atexit runs the handlers
    last-registered first, so this runs before multiprocessing's."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    if threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler raises in the main thread when a worker has died by a signal: not in the middle
        # of this handler (a traceback at exit, and the workers after it left alive)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for obj in gc.get_objects():  # type(), not isinstance: some objects' __class__ warns when read
        if issubclass(type(obj), _MultiProcessingDataLoaderIter) and obj._worker_init_fn is seed_worker:
            try:
                obj._shutdown_workers()  # as when the iterator is freed: the workers are told to stop, and joined
            except Exception:  # noqa: BLE001 - an iterator half set up, or half shut down: the kill below does it
                pass
            kill_workers(getattr(obj, "_workers", ()))  # did not stop in time (torch's SIGTERM is ignored)
    # and workers whose iterator is gone but which did not stop (stuck in a read when it was shut down: they ignore
    # torch's terminate()), which multiprocessing's exit handler would wait for forever
    kill_workers(list(_WORKERS))


def kill_workers(workers) -> None:
    """SIGKILL the worker processes still alive among ``workers`` (one gone meanwhile, or closed, is passed over)."""
    for worker in workers:
        try:
            if worker.is_alive():
                worker.kill()
        except (OSError, ValueError, AssertionError):
            pass


atexit.register(_kill_workers_at_exit)

_WORKERS: "weakref.WeakSet" = weakref.WeakSet()  # the worker processes of TrackedDataLoader iterators


class TrackedDataLoader(DataLoader):
    """A DataLoader whose worker processes are recorded, so that ones left stuck in a read (they ignore SIGTERM) are
    killed at exit rather than waited for; a daemonic process of the program's own is left to multiprocessing."""

    def _get_iterator(self):
        it = super()._get_iterator()
        for worker in getattr(it, "_workers", ()):
            _WORKERS.add(worker)
        return it


def build_loader(dataset: Dataset, batch_size: int, collate: Callable, train: bool, num_workers: int = 0,
                 distributed: Optional[bool] = None, seed: int = 0, drop_last: Optional[bool] = None,
                 world_size: Optional[int] = None, rank: Optional[int] = None, prefetch_factor: Optional[int] = None,
                 pin_memory: Optional[bool] = None) -> DataLoader:
    """A DataLoader for ``dataset``. ``drop_last`` defaults to ``train``; ``distributed`` None means "if a process
    group is initialised"."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"build_loader: batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"build_loader: num_workers must be an int >= 0, got {num_workers!r}")
    drop_last = train if drop_last is None else drop_last
    initialised = dist.is_available() and dist.is_initialized()
    distributed = initialised if distributed is None else distributed
    sampler = None
    if not isinstance(dataset, IterableDataset):
        if distributed:
            if world_size is None or rank is None:
                if not initialised:
                    raise ValueError("build_loader: distributed=True without an initialised process group needs "
                                     "world_size and rank")
                world_size = dist.get_world_size() if world_size is None else world_size
                rank = dist.get_rank() if rank is None else rank
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed,
                                         drop_last=drop_last)
        elif train:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    kwargs = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, worker_init_fn=seed_worker)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    generator = torch.Generator().manual_seed(seed)  # the workers' base seeds
    return TrackedDataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                             num_workers=num_workers,
                             pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                             drop_last=drop_last, generator=generator, **kwargs)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's DistributedSampler (or WebDataset) which epoch starts, for a fresh shuffle."""
    for obj in (loader.sampler, loader.dataset):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Number of samples in a collated batch (0 for an all-bad batch)."""
    if "text_ids" in batch:
        return int(batch["text_ids"].shape[0])
    for key, value in batch.items():
        if "image" in key and isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return int(value[0].shape[0])
    return 0


def measure_loader(loader: DataLoader, batches: int, warmup: int = 1) -> float:
    """Data-only throughput in samples/s over ``batches`` batches, after ``warmup`` untimed batches (worker start
    and the first prefetch). Stops early if the loader runs out."""
    it = iter(loader)
    for _ in range(warmup):
        next(it, None)
    samples, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(it, None)
        if batch is None:
            break
        samples += batch_size_of(batch)
    elapsed = time.perf_counter() - start
    return samples / elapsed if elapsed > 0 else float("inf")
