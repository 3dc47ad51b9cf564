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
