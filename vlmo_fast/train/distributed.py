"""torchrun integration: process group, device, DDP or FSDP2 wrapping, rank helpers.

Launch pretraining with ``torchrun --nproc_per_node N -m vlmo_fast.train ...`` and fine-tuning with
``torchrun --nproc_per_node N -m vlmo_fast.cli finetune TASK ...``; a plain ``python`` run is one process (no
process group: the objectives' gathers are then local). NCCL on GPU, gloo on CPU. Each process uses the GPU of its
LOCAL_RANK; a single process takes the one ``device`` names (``cuda:N``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import plain_module


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # the process group was made here (``cleanup`` leaves a caller's group alone)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def elastic_restarts() -> int:
    """How often torchrun has restarted this job's workers (``TORCHELASTIC_RESTART_COUNT``; 0 outside torchrun)."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))
    except ValueError:
        return 0


TORCHRUN_UNDER_SRUN = ("srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES --nproc-per-node=<GPUs per node> "
                      "--rdzv-backend=c10d --rdzv-endpoint=<first node>:29500 -m vlmo_fast.train ...")


def launch_environment(env: Optional[Mapping[str, str]] = None) -> Tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun (or another launcher setting its variables) gave them, or (1, 0,
    0) outside one; a ValueError for a partial or inconsistent launch, which would otherwise run as something else
    than asked: RANK without WORLD_SIZE trained as a lone non-main rank that writes nothing, and Slurm's srun starting
    several tasks without torchrun gave as many independent one-process runs into the same folder."""
    env = os.environ if env is None else env

    def number(name: str, default: Optional[int] = None) -> int:
        text = env.get(name, "")
        if text.strip() == "" and default is not None:
            return default
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not an integer (set by the launcher, e.g. torchrun)") from None

    given = [name for name in ("WORLD_SIZE", "RANK") if env.get(name, "").strip()]
    if len(given) == 1:
        alone = number(given[0])
        if alone > (1 if given == ["WORLD_SIZE"] else 0):  # (WORLD_SIZE=1 or RANK=0 alone: one process, as said)
            other = "RANK" if given == ["WORLD_SIZE"] else "WORLD_SIZE"
            raise ValueError(f"{given[0]}={env[given[0]]} is set but {other} is not: launch with torchrun, which "
                             f"sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process")
        return 1, 0, number("LOCAL_RANK", 0)
    if not given:
        tasks = env.get("SLURM_STEP_NUM_TASKS", "").strip()
        if tasks.isdigit() and int(tasks) > 1 and env.get("SLURM_PROCID", "0").strip() in ("", "0"):
            warnings.warn(f"srun started {tasks} tasks (SLURM_STEP_NUM_TASKS) without torchrun: each trains alone, "
                          f"as a one-process run (a sweep with an --out-dir per task). For one run over all of them, "
                          f"start one torchrun per node, e.g. {TORCHRUN_UNDER_SRUN}")
        return 1, 0, number("LOCAL_RANK", 0)
    world, rank, local_rank = number("WORLD_SIZE"), number("RANK"), number("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}: expected 0 <= RANK < WORLD_SIZE "
                         f"and LOCAL_RANK >= 0")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not env.get(name, "").strip()]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                         f"set: launch with torchrun, which sets them (the address and port of rank 0's machine)")
    return world, rank, local_rank


def init_distributed(device: str = "auto") -> DistInfo:
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    caller_group = dist.is_available() and dist.is_initialized()  # a process group the caller made (the Python API)
    if caller_group:
        world, rank = dist.get_world_size(), dist.get_rank()
        local = os.environ.get("LOCAL_RANK", "").strip()
        # without LOCAL_RANK (mp.spawn and init_process_group(rank=...)), the GPU the caller chose
        local_rank = int(local) if local else (torch.cuda.current_device() if use_cuda else 0)
    else:
        world, rank, local_rank = launch_environment()
    if use_cuda:
        single = world == 1 and ":" in device  # an explicit cuda:N for a one-process run
        dev = torch.device(device if single else f"cuda:{local_rank}")
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = world > 1 and not caller_group
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return DistInfo(rank, world, local_rank, dev, owns_group=owns)


def cleanup(info: Optional[DistInfo] = None) -> None:
    """Leave the process group after a barrier (a run that ended normally only: see ``train``), unless it is a
    group the caller made (``info.owns_group`` false), which the caller goes on using."""
    if dist.is_available() and dist.is_initialized() and (info is None or info.owns_group):
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of all ranks (a collective: every rank calls it)."""
    return largest_over_ranks([value], device)[0]


def largest_over_ranks(values: Sequence[int], device: torch.device) -> List[int]:
    """The elementwise largest of host integers over all ranks: several flags in one collective (every rank calls
    it); with one process, the values themselves (no device work)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; a collective: every rank calls it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> List[Any]:
    """Every rank's ``value`` (a picklable object), in rank order, on every rank (a collective: every rank calls
    it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def torch_older_than(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) < (major, minor)


def fsdp2_unavailable():
    """Why this torch cannot run FSDP2 here (None when it can). It needs torch >= 2.10: ``fully_shard`` takes
    ``ignored_params`` (which keeps the 0-d logit scales replicated) from 2.7 on, and before 2.10 loading a full
    optimizer state raised KeyError for parameters that never had a gradient (the unused absolute text positions),
    so a run could train but not resume."""
    if torch_older_than(2, 10):
        return (f"FSDP2 needs torch >= 2.10 (fully_shard with ignored_params, and resume of optimizer states that "
                f"lack never-updated parameters); this is torch {torch.__version__}")
    return None


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool = False, find_unused_parameters: bool = False) -> nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` per block, then the root) when running distributed."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # FSDP2 cannot shard 0-d parameters (logit_scale, logit_vl_scale): they stay replicated and their gradients
        # are averaged by sync_replicated_grads, in name order: the same on every rank (an order by id(), a memory
        # address, paired one rank's logit_scale with another's logit_vl_scale)
        scalars = [p for _, p in sorted(model.named_parameters()) if p.dim() == 0]
        for block in model.transformer.blocks:
            fully_shard(block)
        fully_shard(model, ignored_params=set(scalars))
        model._vlmo_replicated = scalars
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # a parameter that never gets a gradient (spec Q8) would stall DDP's reducer on the second step unless DDP searched
    # for unused parameters on every step; it is left out instead (AdamW skips it either way: it has no gradient)
    dead = getattr(model, "dead_parameter_names", lambda: [])()
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, dead)
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the parameters FSDP2 left replicated (a no-op for DDP and single processes)."""
    for p in getattr(model, "_vlmo_replicated", ()):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def optimizer_state(model: nn.Module, optimizer, fsdp: bool):
    """The optimizer state to save: gathered to full tensors under FSDP2 (every rank must call it).

    An optimizer without state yet (no update so far: every step skipped as non-finite) is saved as it is: torch's
    FSDP2 state-dict helpers would first create its state by stepping it with zero gradients, which makes the run's
    first real update a second one (its bias correction and step count one ahead) just because a checkpoint was
    written."""
    if not fsdp or not optimizer.state:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state, fsdp: bool) -> None:
    """Load a saved optimizer state: torch's (parameters by position, as a DDP or one-process run saves it) or
    FSDP2's full state (parameters by name); either into either kind of run."""
    if not fsdp or not state["state"]:
        # by position in the groups: a state keyed by name loads as well. A state without entries (saved before any
        # update) leaves the optimizer without state, as it was: FSDP2's loader would create it with a zero step
        optimizer.load_state_dict(state)
        for values in optimizer.state.values():  # (on the CPU torch keeps the loaded tensors themselves: from a
            for key, value in values.items():    # mapped checkpoint, its pages for the whole run)
                if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                    values[key] = value.clone()
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = _keyed_by_name(model, optimizer, state)

    # strict=False: parameters that never received a gradient (e.g. the unused absolute text positions of the
    # relative-position models) have no state to restore
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
    # the loader made every parameter's state first (a zero-gradient step); those without a saved state must have
    # none, as in the run that saved it (AdamW skips a parameter without gradient and state alike)
    saved = set(state["state"])
    for name, p in model.named_parameters():
        if name not in saved:
            optimizer.state.pop(p, None)


def _keyed_by_name(model: nn.Module, optimizer, state):
    """``state`` with its parameters named as FSDP2's loader expects; torch's optimizer state numbers them by their
    position in the groups, which the same model's optimizer fills in the same order."""
    saved = [k for g in state["param_groups"] for k in g["params"]]
    if all(isinstance(k, str) for k in saved):
        return state
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(names) != len(saved):
        raise ValueError(f"the checkpoint's optimizer state has {len(saved)} parameters, this model's optimizer "
                         f"{len(names)}")
    rename = dict(zip(saved, names))
    return {"state": {rename[k]: v for k, v in state["state"].items()},
            "param_groups": [dict(g, params=[rename[k] for k in g["params"]]) for g in state["param_groups"]]}


def full_state_dict(model: nn.Module, fsdp: bool):
    """The unsharded model state on CPU (rank 0 writes it)."""
    if not fsdp:
        return {k: v.detach().cpu() for k, v in plain_module(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
