"""Run a function in N CPU processes with a gloo process group (torchrun-like environment) and collect results."""

import os
import pickle
import signal
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# a rank stuck in a collective (a test's deadlock) would wait for the group's 30-minute timeout, and the test session
# with it: the rank ends by SIGALRM instead, failing its test (a test may set a shorter alarm itself)
HANG_LIMIT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    signal.alarm(HANG_LIMIT_S)
    # one intra-op thread per rank: two ranks of two threads each on a two-core machine wait for parked threads in
    # every op (a tiny step 5x slower when another process is busy), which eats into the tests' time limits
    torch.set_num_threads(1)
    result = fn(rank, world, *args)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()
    # Done, and the result is on disk: leave without the interpreter's teardown. Once in ~a dozen CI runs a rank
    # aborted there ("terminate called without an active exception": a native thread still joinable while static
    # objects are destroyed) after a complete, correct run, and the spawn then failed the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size, *args):
    """fn(rank, world_size, *args) in world_size processes; returns the list of per-rank results. ``fn`` sets up the
    process group itself (the environment variables torchrun would set are in place)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results
