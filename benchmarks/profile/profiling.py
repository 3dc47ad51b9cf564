"""What the profile scripts share: printing lines (and appending them to a file), and timing each kernel of a callable
with torch.profiler (CUDA kernels on a GPU; CPU ops in a dry run)."""
from typing import Callable, List, Optional, Tuple

import torch


def printer(out: Optional[str]) -> Callable[..., None]:
    """A print for lines that also appends them to ``out`` when given."""

    def say(line: str = "") -> None:
        print(line, flush=True)
        if out:
            with open(out, "a") as f:
                f.write(line + "\n")

    return say


def kernel_times(fn: Callable[[], object], steps: int, on_cpu: bool) -> Tuple[float, List[Tuple[float, int, str]]]:
    """Runs ``fn`` ``steps`` times under the profiler: (total us per run, [(us per run, calls per run, name)], the
    slowest first), from each event's own time on the device, or on the CPU when ``on_cpu``."""
    activity = torch.profiler.ProfilerActivity.CPU if on_cpu else torch.profiler.ProfilerActivity.CUDA
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            fn()
        if not on_cpu:
            torch.cuda.synchronize()

    def own(e) -> float:
        if on_cpu:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))

    rows = sorted(((own(e) / steps, e.count // steps, e.key) for e in prof.key_averages() if own(e) > 0),
                  key=lambda r: -r[0])
    assert rows, "the profiler recorded nothing"
    return sum(r[0] for r in rows), rows


def saved_bytes_per_sample(run: Callable[[int], object], batches: Tuple[int, int] = (1, 2)) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``run(batch)``, per sample: the difference between
    the two batch sizes, divided by theirs (parameters, and anything else the batch shares, cancel out). Each
    storage counted once."""
    total = {}
    for batch in batches:
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(batch)
        total[batch] = sum(storages.values())
    return (total[batches[1]] - total[batches[0]]) // (batches[1] - batches[0])
