"""Training checkpoints: atomic writes, keep-last-K, exact resume (spec-independent; issue "pretraining").

A training checkpoint is a plain dict of tensors, numbers, strings and lists (readable with
``torch.load(weights_only=True)``: nothing is unpickled beyond that): the model state in the official layout, the
optimizer, scheduler and grad-scaler states, the step, the data position, the RNG states, and the config.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import random
import re
import socket
import time
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import (CheckpointError, atomic_write, first_line, require_file, torch_load, torch_save,
                          verify_checksums)
from ..fileio import LOCK_BUSY, NO_LOCKS, NOT_A_FILE, TMP_PREFIX, try_lock
from .config import input_stage
from .distributed import DistInfo, barrier, from_main, gather_objects

CKPT_RE = re.compile(r"step_(\d+)\.pt$")


def rng_state() -> Dict[str, Any]:
    np_state, py_state = np.random.get_state(), random.getstate()  # (read once: a one-process run reads every step)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(py_state[1]) + [py_state[0], str(py_state[2])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    version, gauss = py[-2], py[-1]
    random.setstate((version, tuple(int(v) for v in py[:-2]), None if gauss == "None" else float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"step_{step:08d}.pt")


def checkpoint_step(path: str) -> int:
    return int(CKPT_RE.search(path).group(1))


def list_checkpoints(out_dir: str) -> List[str]:
    files = glob.glob(os.path.join(out_dir, "checkpoints", "step_*.pt"))
    return sorted(files, key=checkpoint_step)


JOB_MARK = ".job_start"


def mark_job_start(out_dir: str) -> None:
    """Note when a job (a command, not a torchrun restart of it) began in ``out_dir``: ``job_checkpoints``."""
    atomic_write(os.path.join(out_dir, JOB_MARK), lambda tmp: None)  # (an empty file: its time is the mark)


SHARED_MARK = ".ranks_see"  # rank 0 writes a token here at every start; every rank must read it back
SHARED_WAIT_S = 60.0  # how long a rank looks for the token (an NFS client may cache a name's lookup for ~30 s)


def check_shared_out_dir(out_dir: str, info: DistInfo) -> None:
    """A ValueError on every rank unless every rank sees ``out_dir`` as rank 0 does (a collective: every rank calls
    it; nothing to check in a one-process run). Rank 0 alone writes checkpoints, and every rank reads the one it
    resumes (and the synthetic dataset rank 0 writes there): an output folder on a node's local disk would fail at
    the first resume, or resume a stale file of the same name there."""
    if not info.enabled:
        return
    token = from_main(f"{socket.gethostname()} pid {os.getpid()} {time.time_ns()} {random.random()}"
                      if info.is_main else None)
    path = os.path.join(out_dir, SHARED_MARK)
    if info.is_main:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(token)

        atomic_write(path, write)
    barrier()
    sees, deadline, pause = False, time.monotonic() + SHARED_WAIT_S, 0.1
    while True:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                sees = f.read() == token
        except OSError:
            pass
        if sees or time.monotonic() >= deadline:
            break
        time.sleep(pause)  # (a network file system's caches: the file, or its new contents, may show up late)
        pause = min(2 * pause, 2.0)
    seen = gather_objects((sees, socket.gethostname()))
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise ValueError(f"--out-dir {out_dir} is not the same folder for every process: {', '.join(blind)} cannot "
                         f"read what rank 0 ({seen[0][1]}) wrote there. Every process reads the checkpoint it resumes "
                         f"from it: put it on a file system every node shares, at the same path")


def checkpoint_digest(path: str) -> str:
    """What a torch (zip) file holds, from its directory alone: each record's name, size and CRC-32 (ranks reading
    "the same" checkpoint compare these; no data is read)."""
    with zipfile.ZipFile(path) as archive:
        records = [(i.filename, i.file_size, i.CRC) for i in archive.infolist()]
    return hashlib.sha256(repr(records).encode("utf-8")).hexdigest()[:16]


def load_on_every_rank(path: str, info: DistInfo, loaded: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The training checkpoint at ``path`` as every rank reads it (``loaded``: the state this rank read already), or
    the same error on every rank (a collective in a run of several processes): unless every rank read the very file
    rank 0 read (rank 0 checks its checksums), the ranks would train on from different states, which DDP never
    reconciles, or one would fail alone while the others wait."""
    state, error = loaded, None
    if state is None:
        try:
            state = load_training_checkpoint(path, verify=info.is_main)
        except (ValueError, OSError) as exc:  # (CheckpointError is a ValueError; a missing file an OSError)
            error = exc
    if not info.enabled:
        if error is not None:
            raise error
        return state
    try:
        digest = checkpoint_digest(path) if error is None else None
    except (OSError, zipfile.BadZipFile) as exc:
        digest, error = None, exc
    seen = gather_objects((socket.gethostname(), None if error is None else first_line(error), digest))
    if error is not None and len({why for _, why, _ in seen}) == 1:  # every rank failed alike (e.g. a wrong path)
        raise error
    failed = [f"rank {r} on {host}: {why}" for r, (host, why, _) in enumerate(seen) if why is not None]
    other = [f"rank {r} on {host}" for r, (host, why, d) in enumerate(seen) if why is None and d != seen[0][2]]
    if failed or other:
        what = (f"cannot read it ({'; '.join(failed)})" if failed else
                f"read another file there than rank 0 on {seen[0][0]} ({', '.join(other)})")
        raise CheckpointError(f"resuming {path}: {what}. Every process reads the checkpoint it resumes: the path must "
                              f"name the same file for every process (an output folder every node shares; an "
                              f"absolute path)")
    return state


def job_checkpoints(out_dir: str) -> List[str]:
    """The checkpoints of ``out_dir`` written since its job began (``mark_job_start``): a torchrun restart resumes
    these, not an earlier run's left in the folder (it sets those aside only once it has started training)."""
    try:
        began = os.stat(os.path.join(out_dir, JOB_MARK)).st_mtime_ns
    except OSError:
        return []
    return [p for p in list_checkpoints(out_dir) if os.stat(p).st_mtime_ns >= began]  # (>=: coarse clocks)


def newest_readable_checkpoint(out_dir: str, among: Optional[List[str]] = None
                               ) -> Tuple[Optional[str], Optional[Dict[str, Any]], List[str]]:
    """(path, state) of the newest training checkpoint of ``out_dir`` (or of ``among``, in step order) that loads,
    and a note for each newer one that does not (e.g. truncated by a crash of the machine): resume=auto falls back
    past them."""
    notes: List[str] = []
    for path in reversed(list_checkpoints(out_dir) if among is None else among):
        try:
            return path, load_training_checkpoint(path, verify=True), notes
        except (CheckpointError, ValueError, OSError, RuntimeError) as exc:
            notes.append(f"skipped {path}: {first_line(exc)}")
    return None, None, notes


SUPERSEDED = "superseded"


def _set_aside(path: str, name: str) -> str:
    """Move ``path`` to ``checkpoints/superseded/<name>``, replacing an earlier roll-back's file of that name: one
    file per step, so a run killed and resumed again and again (which sets aside the same steps each time) does not
    fill the disk with copies."""
    target = os.path.join(os.path.dirname(path), SUPERSEDED, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(path, target)
    return target


def set_aside_later_checkpoints(out_dir: str, step: int) -> List[str]:
    """Move the checkpoints of steps after ``step`` (a run resumed from an earlier one, or started afresh, in a used
    folder) into ``checkpoints/superseded/`` (one file per step: a later roll-back's replaces an earlier one's), and
    remove the partial writes a killed process left. They belong to another trajectory: left in place, keep-last
    would delete this run's newer checkpoints instead of them (it keeps the highest steps) and resume=auto would
    continue them. Returns what was moved or removed, for the log."""
    folder = os.path.join(out_dir, "checkpoints")
    moved: List[str] = []
    for path in list_checkpoints(out_dir):
        if checkpoint_step(path) > step:
            moved.append(f"moved {path} to {_set_aside(path, os.path.basename(path))}")
    for tmp in glob.glob(os.path.join(folder, TMP_PREFIX + "*")):
        os.unlink(tmp)
        moved.append(f"removed {tmp} (a write a killed process began)")
    return moved


_LOCK_FDS: List[int] = []  # the out-dir locks this process holds


def _close_locks_in_child() -> None:
    """A forked child (a DataLoader worker) gets copies of the lock's file descriptor, and an ``flock`` lasts as long
    as any copy is open: a killed run's orphaned workers held its folder. Children close their copies at once."""
    for fd in _LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


@contextlib.contextmanager
def out_dir_lock(out_dir: str, enabled: bool = True):
    """Hold ``<out_dir>/.lock`` for a run: a second run in the same folder (a job resubmitted while the first still
    runs) would resume the first one's checkpoints, delete them as keep-last and write log.csv twice. It is refused
    with the holder's pid, host and start time. The lock is an OS file lock (``flock``), released when the process
    ends however it ends, so a killed run leaves no stale lock. Where the OS or the file system has no such locks
    (Windows; Lustre without ``-o flock``), the run goes on without one, with a warning."""
    if not enabled:
        yield
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        writable = os.access(out_dir, os.W_OK | os.X_OK)
    except OSError as exc:
        with input_stage():
            raise ValueError(f"--out-dir {out_dir} cannot be made: {exc.strerror or exc}") from None
    if not writable:  # (a read-only file system or folder: the first write would have failed with a traceback)
        with input_stage():
            raise ValueError(f"--out-dir {out_dir} is not writable (a read-only file system or folder?)")
    path = os.path.join(out_dir, ".lock")
    fd, why = try_lock(path)
    if why == LOCK_BUSY:
        with open(path, "rb") as f:
            holder = f.read(4096).decode("utf-8", "replace").strip() or "another process"
        tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "").strip()
        hint = (f" (srun started {tasks} tasks without torchrun, each a run of its own: start one torchrun per node "
                f"for one run over them)" if tasks.isdigit() and int(tasks) > 1 and "WORLD_SIZE" not in os.environ
                else "")
        with input_stage():
            raise ValueError(f"{out_dir} is in use by another run ({holder}; {path} is locked): wait for it to end, "
                             f"or give another --out-dir{hint}")
    if why == NOT_A_FILE:
        with input_stage():
            raise ValueError(f"{path} is {why}: remove it (a run's lock file is a plain file it makes itself)")
    if fd is None:
        if why != NO_LOCKS:
            warnings.warn(f"{path}: no file lock on this file system ({why}); a second run in {out_dir} would not be "
                          f"refused")
        yield
        return
    owner = os.getpid()
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {owner} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    except OSError as exc:  # (e.g. a full disk)
        os.close(fd)
        with input_stage():
            raise ValueError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    _LOCK_FDS.append(fd)
    try:
        yield
    finally:
        if os.getpid() == owner:  # (a forked child leaving this block: its copy was closed at the fork)
            if fd in _LOCK_FDS:
                _LOCK_FDS.remove(fd)
            os.close(fd)  # (releases the lock)


def save_training_checkpoint(out_dir: str, step: int, payload: Dict[str, Any], keep_last: int) -> str:
    """Write ``step_<step>.pt`` atomically and durably, then delete all but the newest ``keep_last`` checkpoints."""
    path = checkpoint_path(out_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: torch_save(payload, tmp), durable=True)
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            os.unlink(old)
    return path


TRAINING_KEYS = ("model", "optimizer", "scheduler", "step", "data", "rng")


def best_checkpoint_path(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints", "best.pt")


def save_best_checkpoint(out_dir: str, payload: Dict[str, Any], the_metric: float) -> str:
    """Write ``best.pt``, a training checkpoint (evaluate, export and --resume read it) recording the
    ``val/the_metric`` that chose it; keep-last and resume=auto never touch it."""
    path = best_checkpoint_path(out_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: torch_save(dict(payload, the_metric=float(the_metric)), tmp), durable=True)
    return path


def best_so_far(out_dir: str, step: int) -> Tuple[Optional[Dict[str, float]], List[str]]:
    """({"step", "the_metric", "path"} of the folder's ``best.pt`` when it belongs to this run's trajectory (chosen
    at or before ``step``, where the run starts or resumes), notes for the log). A later or unreadable one is moved into
    ``checkpoints/superseded/`` as ``set_aside_later_checkpoints`` moves later checkpoints: a resumed run must not
    compare against, or keep, the weights of a trajectory it abandoned."""
    path = best_checkpoint_path(out_dir)
    if not os.path.exists(path):
        return None, []
    try:
        state = load_training_checkpoint(path)
        best = {"step": int(state["step"]), "the_metric": float(state["the_metric"]), "path": path}
        reason = None if best["step"] <= step else f"chosen at step {best['step']}, after step {step}"
        name = f"best_step_{best['step']:08d}.pt"
    except (CheckpointError, ValueError, OSError, RuntimeError, KeyError, TypeError) as exc:
        best, reason, name = None, f"unreadable: {first_line(exc)}", "best_unreadable.pt"
    if reason is None:
        return best, []
    return None, [f"moved {path} ({reason}) to {_set_aside(path, name)}"]


def load_training_checkpoint(path: str, verify: bool = False) -> Dict[str, Any]:
    """A training checkpoint (``save_training_checkpoint``'s payload); a file of weights alone (an exported or
    official checkpoint) is a CheckpointError saying how to start from it instead. ``verify``: every record checked
    against its checksum first (a resume: one read of the file, where a damaged one would train on garbage)."""
    require_file(path, "training checkpoint")
    if verify:
        verify_checksums(path)
    # mapped, not read: a caller that needs only the model (export) never reads the optimizer state from disk
    state = torch_load(path, mmap=True, what="the training checkpoint")
    missing = [k for k in TRAINING_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {', '.join(missing)}): a file of weights "
                              f"alone; training starts from one given as --load-path")
    return state
