"""The training loop: plain, readable, and fast by default (spec §5, §6.3; issue "pretraining").

    cfg = TrainConfig(...)            # or vlmo-fast pretrain --help
    summary = train(cfg)

One optimizer step = ``batch_size / (per_device_batch_size · world_size)`` micro-batches, each
``model(batch)`` running the official objectives of ``cfg.tasks`` (in the official order) under autocast, the
unweighted sum of their "loss" entries backpropagated. Then clipping (optional), AdamW, the lr schedule. A non-finite
loss on any rank skips the update everywhere; ``max_bad_steps`` in a row save a checkpoint and stop. SIGTERM/SIGINT
(and SIGHUP unless ignored) save a checkpoint before exit. Checkpoints are atomic and resumable (same trajectory).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import stat
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

from .. import objectives
from ..checkpoint import load_checkpoint, plain_module, read_state_dict, save_checkpoint, \
    text_stage_state
from ..config import PRESETS, loss_names, preset
from ..data import is_empty_batch
from ..evaluation import autocast, encode, evaluate_nlvr2, evaluate_vqa, readable, recall_at_k, the_metric, to_device
from ..fileio import atomic_write_json
from ..flops import datasheet_peak, pretrain_step_flops
from ..model import VLMo
from . import data_setup
from .config import FINETUNE_TASKS, TrainConfig, check_data_choice, input_stage
from .distributed import DistInfo, barrier, cleanup, elastic_restarts, fsdp2_unavailable, from_main, \
    full_state_dict, gather_objects, init_distributed, largest_over_ranks, load_optimizer_state, max_over_ranks, \
    mean_over_ranks, optimizer_state, sync_replicated_grads, wrap_model
from .optim import build_optimizer, build_scheduler, configured_hyperparameters, freeze_for_textmlm, \
    reapply_configuration, resolve_warmup
from .runlog import Logger
from .state import (best_so_far, check_shared_out_dir, checkpoint_path, job_checkpoints, load_on_every_rank,
                    load_training_checkpoint, mark_job_start, newest_readable_checkpoint, out_dir_lock, rng_state,
                    save_best_checkpoint, save_training_checkpoint, set_aside_later_checkpoints, set_rng_state)


def needs_unused_parameter_search(tasks) -> bool:
    """Only MLM + ITC + ITM together use every parameter but the dead ones (``VLMo.dead_parameter_names``, which DDP
    ignores): the fusion passes skip the top layers' modality experts, the retrieval paths the VL-FFN, and only ITM
    uses the pooler. DDP must look for unused parameters otherwise."""
    return not {"mlm", "itc", "itm"} <= set(tasks) or bool({"vqa", "nlvr2", "irtr", "textmlm"} & set(tasks))


class StopTraining(Exception):
    pass


class StepStart(NamedTuple):
    """Where a one-process run's current step began, kept while it reads its micro-batches: a stop or an error
    before its update saves this."""
    data: Dict[str, Any]  # the stream's position
    rng: Dict[str, Any]
    bad_samples: int  # counted so far (the step's micro-batches, read again by a resumed run, count again)


class SignalWhileWaiting(BaseException):
    """Raised by the signal handler in a one-process run while it waits for a batch (``flag["waiting"]``): a worker
    stuck in a read (a hung file system) would otherwise hold the run at that wait, unsaved, until the scheduler's
    SIGKILL. A BaseException, so that no ``except Exception`` on the way out (DataLoader's included) takes it."""


def build_model(cfg: TrainConfig) -> VLMo:
    dpr = cfg.drop_path_rate
    if dpr is None:
        dpr = 0.1 if cfg.data_root is not None else 0.0
    overrides: Dict[str, Any] = {"drop_path_rate": dpr,
                                 "loss_names": loss_names(**{t: 1 for t in cfg.tasks})}
    if cfg.image_size is not None:
        overrides["image_size"] = cfg.image_size
    if cfg.max_text_len is not None:
        overrides["max_text_len"] = cfg.max_text_len
    if cfg.vqa_label_size is not None:
        overrides["vqav2_label_size"] = cfg.vqa_label_size
    config = preset(cfg.arch, **overrides)
    if cfg.model_impl == "reference":
        from ..reference import ReferenceVLMo

        return ReferenceVLMo(config)
    return VLMo(config, backend=cfg.backend)


# the task heads the official code builds after loading the starting weights, so training never loads them (Q11)
NOT_LOADED_FOR_TRAINING = ("vqa_classifier.", "nlvr2_classifier.")


def initialise_from(model: VLMo, path: str) -> str:
    """Load an official/vlmo_fast checkpoint (or a BEiT one for the text-only stage) as the starting point, without
    its VQA/NLVR2 heads: as officially, a fine-tuning run starts them from their initialisation (spec Q11)."""
    notes: List[str] = []
    sd = text_stage_state(read_state_dict(path), model, notes)
    heads = sorted(k for k in sd if k.startswith(NOT_LOADED_FOR_TRAINING))
    report = load_checkpoint(model, {k: v for k, v in sd.items() if k not in heads}, strict=False)
    text = "\n".join([str(report)] + notes)
    if heads:
        text += (f"\ntask heads not loaded (official: built after the starting weights are loaded, so they start "
                 f"from their initialisation): {len(heads)}\n  " + "\n  ".join(heads))
    return text


# options that define which model, objective and optimizer state a checkpoint holds: a run resumes only a checkpoint
# that matches them
RUN_IDENTITY = ("arch", "tasks", "image_size", "max_text_len", "optimizer")


def _identity(values: Dict[str, Any]) -> Dict[str, Any]:
    """The RUN_IDENTITY values as they take effect: tasks as a set, the preset's size and length where unset."""
    out = {k: values.get(k) for k in RUN_IDENTITY}
    out["tasks"] = sorted(out["tasks"] or [])
    out["optimizer"] = out["optimizer"] or "torch"  # checkpoints from before the option trained with torch's AdamW
    if out["arch"] in PRESETS:
        for key in ("image_size", "max_text_len"):
            if out[key] is None:
                out[key] = getattr(preset(out["arch"]), key)
    return out


def resume_changes(cfg: TrainConfig, saved: Dict[str, Any], path: str) -> List[str]:
    """Check a checkpoint to resume against this run: one of another model, objective or optimizer (e.g. a
    pretraining checkpoint in the out_dir a fine-tuning run writes to) is refused, naming the difference; other
    changed options (a longer max_steps, a new learning rate) are returned for the log."""
    now = cfg.to_dict()
    if saved:
        theirs, ours = _identity(saved), _identity(now)
        clash = [f"{k} {theirs[k]!r} (checkpoint) vs {ours[k]!r}" for k in RUN_IDENTITY if theirs[k] != ours[k]]
        if clash:
            raise ValueError(f"cannot resume {path}: it belongs to another run ({'; '.join(clash)}). Give this run "
                             f"another --out-dir (and --load-path to start from that checkpoint's weights)")
    skip = set(RUN_IDENTITY) | {"resume", "out_dir", "load_path"}
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k not in skip and k in saved and saved[k] != v]


def load_path_clash(cfg: TrainConfig, saved: Dict[str, Any], path: str) -> Optional[str]:
    """Why a checkpoint to resume does not go with this run's --load-path (resuming loads that run's weights over
    the new starting point, which would be ignored), or None. Asked on rank 0 alone (it looks at files, which another
    node may not see alike) and shared."""
    ours, theirs = cfg.load_path, (saved or {}).get("load_path")
    if not saved or not ours or _same_file(ours, theirs):
        return None
    return (f"cannot resume {path} with --load-path {ours}: that run started from "
            f"{theirs or 'its initialisation (no --load-path)'}, and resuming it would replace the new starting "
            f"weights. Give this run another --out-dir (or --resume none to start over in this one), or leave out "
            f"--load-path to continue that run")


def _same_file(a: str, b: Optional[str]) -> bool:
    """The same path as given, or the same file (another spelling of it, from another working directory)."""
    if b is None:
        return False
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def resolve_precision(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32."""
    p = cfg.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]


@torch.no_grad()
def evaluate(model: VLMo, cfg: TrainConfig, info: DistInfo, amp: Optional[torch.dtype],
             max_batches: Optional[int] = None, final: bool = False,
             stop: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """The val split's metrics (its first ``max_batches`` batches; None: all of it): retrieval recall (dual encoder,
    official) when the model has the ITC heads, and at the end of a retrieval fine-tuning run (``final``) on the
    test split too, as the official validation; the val batch accuracies of the run's contrastive objectives (ITC,
    retrieval), the VQA score, the NLVR2 accuracies; and ``val/the_metric``, the official model-selection value,
    for fine-tuning runs (``evaluation.the_metric``). A signal (``stop["signal"]``, set by the run's handler) stops
    it between batches: it then returns no metrics."""
    # rank 0 evaluates; under FSDP every rank runs the same forwards (each gathers its parameters collectively: a
    # forward on one rank alone would wait for the others forever) and rank 0 reports
    if not (info.is_main or cfg.fsdp):
        return {}
    was_training = model.training
    model.eval()
    try:
        with _unsharded(model, cfg.fsdp and info.world_size > 1):
            metrics = _evaluate(model, cfg, info, amp, max_batches, final, _signal_check(stop, cfg.fsdp, info))
    except _Interrupted as interrupted:
        metrics = {}
        if info.is_main:
            print(f"evaluation stopped by signal {interrupted.signum}", flush=True)
    model.train(was_training)
    return metrics if info.is_main else {}


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _signal_check(stop: Optional[Dict[str, Any]], collective: bool, info: DistInfo):
    """A check to run before each evaluation batch: raises _Interrupted once the run's signal flag is set. Under
    FSDP every rank runs the evaluation's forwards (collectives), so the ranks agree on the flag and stop at the
    same batch, and a batch with no readable sample (skipped by ``evaluation.readable``) must be one on every rank:
    it is an error if not (the ranks' copies of the data differ), where the ranks would otherwise pair up
    different collectives and hang."""
    collective = collective and info.world_size > 1

    def check(batch: Optional[Mapping[str, Any]] = None) -> None:
        signum = int(stop.get("signal", 0)) if stop is not None else 0
        if collective:
            empty = batch is not None and is_empty_batch(batch)
            flags = torch.tensor([signum, int(empty), int(not empty)], dtype=torch.int64, device=info.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            signum, some_empty, some_not = (int(v) for v in flags.tolist())
            if some_empty and some_not:
                raise RuntimeError(
                    "evaluation: a batch has no readable sample on some ranks only: under --fsdp every rank "
                    "evaluates the same batches, so every rank must read identical data files")
        if signum:
            raise _Interrupted(signum)

    return check


def _batches(batches, check, n: Optional[int] = None):
    """The first ``n`` batches (None: all; islice loads no batch past them), the check run before each."""
    for batch in itertools.islice(batches, n):
        check(batch)
        yield batch


def _evaluate(model: VLMo, cfg: TrainConfig, info: DistInfo, amp: Optional[torch.dtype],
              max_batches: Optional[int], final: bool, check) -> Dict[str, float]:
    metrics: Dict[str, float] = {}
    if hasattr(model, "itc_image_proj"):
        final_irtr = "irtr" in cfg.tasks and final and data_setup.has_test_split(cfg)
        for split in ["val"] + (["test"] if final_irtr else []):
            images, texts = data_setup.retrieval_loaders(cfg, model.config, max_batches, split)
            stats: Dict[str, int] = {}
            img_feats, img_ids = encode(model, _batches(images, check), info.device, "image", amp, stats)
            txt_feats, txt_img_ids = encode(model, _batches(texts, check), info.device, "text", amp, stats)
            # a periodic evaluation uses the captions of its images; an unreadable image's captions are left out
            keep = torch.isin(txt_img_ids, img_ids)
            metrics.update({f"{split}/{k}": v for k, v in
                            recall_at_k(img_feats, txt_feats[keep], txt_img_ids[keep], img_ids).items()})
            del img_feats, txt_feats, keep  # (not kept through the evaluations that follow)
            _count_unreadable(metrics, split, stats)
    if "vqa" in cfg.tasks:
        stats = {}
        score = evaluate_vqa(model, _batches(data_setup.val_batches(cfg, model.config), check, max_batches),
                             info.device, amp, stats)["vqa_score"]
        if score is not None:
            metrics["val/vqa_score"] = score
        _count_unreadable(metrics, "val", stats)
    if "nlvr2" in cfg.tasks:
        stats = {}
        accs = evaluate_nlvr2(model, _batches(data_setup.val_batches(cfg, model.config), check, max_batches),
                              info.device, amp, stats)
        metrics.update({f"val/{k}": v for k, v in accs.items()})
        _count_unreadable(metrics, "val", stats)
    for task, compute in (("itc", objectives.compute_itc), ("irtr", objectives.compute_irtr)):
        if task in cfg.tasks:
            metrics.update(_val_batch_accuracies(model, cfg, info, amp, max_batches, compute, task, check))
    value = the_metric(metrics, cfg.tasks)
    if value is not None:
        metrics["val/the_metric"] = value
    return metrics


@contextlib.contextmanager
def _unsharded(model: VLMo, on: bool):
    """FSDP2's root parameters (embeddings, heads) gathered for the evaluation, which calls the model's inference
    methods rather than its forward (whose hook would gather them); the blocks gather their own in their forwards."""
    if on:
        # FSDP2 decides which module is the root at the first forward: an evaluation before any training forward (a
        # resumed run re-running the evaluation a signal stopped) must make it the model, or the blocks' own forwards
        # take the role and the first training step then fails ("FSDP state has already been lazily initialized")
        state = getattr(model, "_get_fsdp_state", None)
        if state is not None:
            state()._lazy_init()
        model.unshard()
    try:
        yield
    finally:
        if on:
            model.reshard()


def _count_unreadable(metrics: Dict[str, float], split: str, stats: Dict[str, int]) -> None:
    """``<split>/unreadable_samples``: the samples an evaluation left out, when there were any."""
    if stats.get("bad_samples"):
        key = f"{split}/unreadable_samples"
        metrics[key] = metrics.get(key, 0) + stats["bad_samples"]


def _val_batch_accuracies(model: VLMo, cfg: TrainConfig, info: DistInfo, amp: Optional[torch.dtype],
                          max_batches: Optional[int], compute, task: str,
                          check: Callable[..., None] = lambda batch=None: None) -> Dict[str, float]:
    """``val/<task>_i2t_acc`` and ``_t2i_acc``: the contrastive objective's accuracies over the val batches the
    official validation forms (``data_setup.official_val_batches``: shuffled with seed 0, of the global batch size,
    here on one rank without a gather), counted per sample as the official torchmetrics Accuracy does."""
    correct = {"i2t": 0, "t2i": 0}
    total = 0
    batches = data_setup.val_batches(cfg, model.config, world_size=info.world_size)
    for batch in readable(_batches(batches, check, max_batches)):
        batch = to_device(batch, info.device, model.config.vocab_size)
        with autocast(info.device, amp):
            out = compute(model, batch, local=True)
        labels = out[f"{task}_labels"]
        for way in correct:
            correct[way] += int((out[f"{task}_{way}_logits"].argmax(-1) == labels).sum())
        total += labels.numel()
        del out, labels  # (not kept through the next batch's forward)
    return {f"val/{task}_{way}_acc": correct[way] / total for way in correct} if total else {}


def _accuracies(out: Dict[str, Any]):
    """(name, accuracy) of the training accuracies the objectives' outputs allow (logged with the losses): each the
    fraction of argmax hits over the labels that are not -100 (0 when none is), as a device tensor (no host sync in
    the training step: the loop reads it at log time). Nothing of ``out`` outlives the loop over them (a loop variable
    of the caller's would keep the MLM logits, B x L x vocab, through the next micro-step's forward)."""
    for name, logits_key, labels_key in (("itc_acc", "itc_i2t_logits", "itc_labels"),
                                         ("itm_acc", "itm_logits", "itm_labels"),
                                         ("irtr_acc", "irtr_i2t_logits", "irtr_labels"),
                                         ("nlvr2_acc", "nlvr2_logits", "nlvr2_labels"),
                                         ("mlm_acc", "mlm_logits", "mlm_labels")):  # (MLM: over the masked tokens)
        if logits_key in out and labels_key in out:
            labels = out[labels_key]
            counted = labels != -100
            hits = ((out[logits_key].detach().argmax(-1) == labels) & counted).sum()
            yield name, hits.float() / counted.sum().clamp_min(1).float()


def _install_signal_handlers(flag: Dict[str, Any], info: Optional[DistInfo] = None):
    previous = {}
    # torchrun passes a SIGTERM on to every rank: one notice each, so each says whose it is
    who = f"rank {info.rank}: " if info is not None and info.world_size > 1 else ""

    hangup = getattr(signal, "SIGHUP", None)

    def handler(signum, frame):
        first = "signal" not in flag
        flag["signal"] = signum
        if signum == hangup:  # the terminal is gone: a write to it would fail (EIO) and end the run unsaved
            _detach_from_terminal()
        if first:
            try:
                print(f"{who}signal {signum}: stopping at the end of this step or evaluation, with a checkpoint",
                      flush=True)
            except OSError:
                pass
        if flag.get("waiting"):
            flag["waiting"] = False
            raise SignalWhileWaiting(signum)

    # SIGHUP too (the terminal of an ssh session closing; torchrun passes it on), unless it is ignored (nohup)
    hangups = [hangup] if hangup is not None and signal.getsignal(hangup) is signal.SIG_DFL else []
    for sig in [signal.SIGTERM, signal.SIGINT] + hangups:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return previous


def _detach_from_terminal() -> None:
    """Point stdout and stderr, where they are a terminal, at /dev/null (as nohup does): after a hang-up, writes to
    the terminal fail, and the run still has its checkpoint to save and its log file to write."""
    for fd in (1, 2):
        try:  # (a character device, not isatty: a hung-up terminal fails isatty's query)
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
        except OSError:
            pass


def _restore_signal_handlers(previous) -> None:
    for sig, h in previous.items():
        signal.signal(sig, h)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train as configured; returns a summary (steps, losses, metrics, timings, the last checkpoint, and ``history``:
    this run's training rows, kept in memory, about 0.8 KB each; ``log.csv`` holds the rows of every run)."""
    # checked when a run starts, not in the config: export rebuilds models from FSDP runs' configs on any torch
    reason = fsdp2_unavailable() if cfg.fsdp else None
    with input_stage():
        if reason is not None:
            raise ValueError(f"fsdp: {reason}")
        check_data_choice(cfg)  # (also made by the commands, before any other check)
    with _deterministic_algorithms(cfg.deterministic):
        with input_stage():  # (a partial or inconsistent launch environment)
            info = init_distributed(cfg.device)
        with out_dir_lock(cfg.out_dir, info.is_main):
            summary = _train(cfg, info)
        # not after an error: the barrier would wait for ranks waiting for this one in another collective (the job
        # hung until the group's timeout, its error unprinted; NCCL's shutdown can block the same way); the error
        # ends the process and torchrun stops the others
        cleanup(info)
        return summary


@contextlib.contextmanager
def _deterministic_algorithms(on: bool):
    """PyTorch's deterministic mode for the run when ``on`` (warn_only: an op without a deterministic implementation
    warns instead of stopping a long run; on CUDA, NLLLoss, under every cross-entropy loss, is one), the previous mode
    afterwards. cuBLAS needs a fixed workspace: CUBLAS_WORKSPACE_CONFIG, read once, when the process makes its first
    cuBLAS handle, so it takes effect when train() runs before any GEMM of the process (as the command does; a value
    the environment already sets is kept). A mode the caller already set (strict or warn_only) stays as it is.
    vlmo_fast's ops follow the mode: the Triton attention runs fixed tile configurations, and the CUDA kernels whose
    gradients add with atomics step aside."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    if not before[0]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _choose_resume(cfg: TrainConfig, info: DistInfo) -> Tuple[Optional[str], Optional[Dict[str, Any]], List[str]]:
    """The checkpoint the run resumes from, its state (loaded on every rank), and notes on the checkpoints it passed
    over; (None, None, notes) for a fresh start. A folder whose checkpoints all fail to load is refused."""
    resume_path, state, unreadable = None, None, []
    restarts = elastic_restarts()
    # resume=auto: the folder's newest checkpoint that loads; a torchrun restart of another --resume: the job's
    # (one written since its command began), not --resume none or PATH again. Rank 0 chooses (a rank that
    # failed to read a file must not resume another).
    job_only = bool(restarts) and cfg.resume != "auto"
    if job_only or cfg.resume == "auto":
        why_not = None
        if info.is_main:
            among = job_checkpoints(cfg.out_dir) if job_only else None
            resume_path, state, unreadable = newest_readable_checkpoint(cfg.out_dir, among)
            if resume_path and job_only:
                unreadable.append(f"torchrun restart {restarts}: resuming {resume_path}, the job's newest "
                                  f"checkpoint, not --resume {cfg.resume}")
            elif resume_path is None and unreadable and not job_only:
                why_not = (f"{cfg.out_dir} holds checkpoints but none loads ({'; '.join(unreadable)}): resuming "
                           f"would start the run over. --resume none starts over there (setting them aside), "
                           f"--resume PATH resumes another file")
        why_not = from_main(why_not)
        if why_not:
            raise ValueError(why_not)
        resume_path = from_main(resume_path)
        if resume_path:
            state = load_on_every_rank(resume_path, info, state)
    if resume_path is None and cfg.resume not in ("auto", "none", "", None):
        resume_path = cfg.resume
        state = load_on_every_rank(resume_path, info)
    return resume_path, state, unreadable


def _changes_on_resume(cfg: TrainConfig, info: DistInfo, state: Dict[str, Any], path: str, per_step: int, accum: int,
                       max_steps: int) -> List[str]:
    """What differs from the resumed run (reported when it resumes): its options (``resume_changes``), the number of
    processes, the step count the epochs give; a ``--load-path`` clash raises."""
    changed = resume_changes(cfg, state.get("config", {}), path)
    clash = from_main(load_path_clash(cfg, state.get("config", {}), path) if info.is_main else None)
    if clash:
        raise ValueError(clash)
    saved_world = state.get("world_size")  # (older checkpoints do not record it)
    if saved_world is not None and saved_world != info.world_size:
        before = state.get("config", {}).get("per_device_batch_size", cfg.per_device_batch_size) * saved_world
        changed.append(f"processes {saved_world} -> {info.world_size}" + (
            f": micro-batches of {per_step} samples, not {before} (the ITC/ITM negatives of a step's "
            f"objectives come from its micro-batch), gradient accumulation {accum}" if before != per_step
            else ""))
    planned = state.get("max_steps")
    if planned is not None and planned != max_steps and not any(
            c.split(" ")[0] in ("max_steps", "max_epochs") for c in changed):
        # the same options, another layout (world size, per-device batch: an epoch's last partial batch
        # is dropped or padded differently): the epochs give another step count, and the schedule with it
        changed.append(f"max_steps (from max_epochs {cfg.max_epochs} with this layout) {planned} -> "
                       f"{max_steps}: the learning-rate schedule follows the new length")
    return changed


def _nonfinite_values(info: DistInfo, finite: torch.Tensor, parts: Dict[str, torch.Tensor], unmasked: bool) -> str:
    """A skipped step's values on the rank(s) whose loss went non-finite, not rank 0's finite ones: one more
    collective (every rank calls it: the flag was reduced), on this rare path only."""
    mine = (not bool(finite), {k: round(float(v), 4) for k, v in parts.items()}, unmasked)
    seen = gather_objects(mine)
    where = [r for r, (nonfinite, _, _) in enumerate(seen) if nonfinite]
    return "; ".join((f"rank {r}: " if info.world_size > 1 else "") + str(seen[r][1])
                     + (" (a micro-batch with no masked token: its MLM loss, a mean over none, is NaN; the official "
                        "masking allows it for short captions, as in small per-device batches)" if seen[r][2] else "")
                     for r in where)


def _train(cfg: TrainConfig, info: DistInfo) -> Dict[str, Any]:
    if info.is_main and not elastic_restarts():  # first, before anything can fail: what a torchrun restart resumes
        mark_job_start(cfg.out_dir)
    with input_stage():
        check_shared_out_dir(cfg.out_dir, info)
    torch.manual_seed(cfg.seed)
    run = _Run(cfg, info)
    finished = run.finished()
    if finished is not None:
        return finished
    run.start()
    return run.train()


class _Run:
    """One training run of ``_train``: built from its inputs (``__init__``: the model, the data, the optimizer, a
    resumed state), started (``start``: the log, the run's notes), trained (``train``: the steps, evaluations and
    checkpoints, until max_steps, a signal or repeated non-finite losses), summarised."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.amp = resolve_precision(cfg, info.device)
        with input_stage():  # the model, its initial weights, the data and a resumed state: the inputs
            self._build_model()
            self._build_data_and_optimizer()
            self._resume()

    def _build_model(self) -> None:
        cfg, info = self.cfg, self.info
        self.model = model = build_model(cfg)
        self.init_report = initialise_from(model, cfg.load_path) if cfg.load_path else None
        if "textmlm" in cfg.tasks:
            freeze_for_textmlm(model)
        model.to(info.device)
        model.current_tasks = list(cfg.tasks)
        model.gather_with_grad = cfg.gather_with_grad
        if cfg.activation_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.compile:
            model.compile()
        if cfg.fsdp and not info.enabled:
            warnings.warn("fsdp: one process (not under torchrun), so nothing is sharded: the run trains the plain "
                          "model")
        self.wrapped = wrap_model(model, info, fsdp=cfg.fsdp,
                                  find_unused_parameters=needs_unused_parameter_search(cfg.tasks))

    def _build_data_and_optimizer(self) -> None:
        cfg, info, model = self.cfg, self.info, self.model
        self.per_step = per_step = cfg.per_device_batch_size * info.world_size
        if cfg.batch_size % per_step:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of per_device_batch_size x world size "
                             f"({cfg.per_device_batch_size} x {info.world_size})")
        self.accum = accum = cfg.batch_size // per_step
        self.stream = stream = data_setup.train_stream(cfg, model.config, info)
        data_setup.check_eval_files(cfg, model.config.vqav2_label_size)
        max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.max_epochs * stream.batches_per_epoch // accum
        self.max_steps = max_steps
        warmup = resolve_warmup(cfg.warmup_steps, max_steps)
        if cfg.max_steps is None and warmup > max_steps and info.is_main:  # (TrainConfig warns when it knows both)
            warnings.warn(f"warmup_steps ({warmup}) exceeds the {max_steps} steps of {cfg.max_epochs} epoch(s): the "
                          f"learning rate never reaches its peak; give fewer steps or a fraction (e.g. "
                          f"--warmup-steps 0.1)")
        self.optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, cfg.lr_mult, kind=cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, warmup, max_steps, cfg.schedule, cfg.end_lr)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp == torch.float16)

    def _resume(self) -> None:
        """The state of the checkpoint the run resumes from, if any (``_choose_resume``), loaded into the model,
        optimizer, schedule, scaler, data stream and RNGs; the step, counts and time it records."""
        cfg, info = self.cfg, self.info
        configured = configured_hyperparameters(self.optimizer)
        self.step, self.counts, self.eval_pending, self.elapsed_before = 0, {}, False, 0.0
        self.resume_path, state, self.unreadable = _choose_resume(cfg, info)
        self.changed: List[str] = []
        if not self.resume_path:
            return
        self.changed = _changes_on_resume(cfg, info, state, self.resume_path, self.per_step, self.accum,
                                          self.max_steps)
        model = self.model
        plain_module(model).load_state_dict(state["model"]) if not cfg.fsdp else _fsdp_load(model, state["model"])
        load_optimizer_state(model, self.optimizer, state["optimizer"], cfg.fsdp)
        self.scheduler.load_state_dict(state["scheduler"])
        reapply_configuration(self.optimizer, self.scheduler, configured)
        if state.get("scaler"):  # a bf16/fp32 run saved no scaler state: a resumed fp16 run starts a fresh one
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.counts = dict(state.get("counts", {}))
        # older checkpoints record neither: no evaluation pending, the time unknown (0)
        self.eval_pending = bool(state.get("eval_pending", False))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.stream.restore(state["data"])
        set_rng_state(state["rng"])
        # the file is mapped (torch_load(mmap=True)): kept, it would hold its pages, and its disk space once keep-last
        # removes it, for the whole run (``state`` is this method's only reference)

    def finished(self) -> Optional[Dict[str, Any]]:
        """The summary of a resumed run that had already finished (nothing to train), else None."""
        cfg, step = self.cfg, self.step
        finished = _finished_summary(cfg, step) if self.resume_path and step >= self.max_steps else None
        if finished is None:
            return None
        if self.info.is_main:
            more = "--max-steps" if cfg.max_steps is not None else "--max-epochs"
            print(f"already complete: {self.resume_path} is at step {step} of {self.max_steps}; nothing to train (a "
                  f"larger {more} continues this run, another --out-dir starts a new one)", flush=True)
        return dict(finished, already_complete=True, last_checkpoint=self.resume_path, history=[])

    def start(self) -> None:
        """The run's log (its first notes: checkpoints set aside or unreadable, options not used, the initial
        weights, a resume), its config.json, and the counters the steps keep."""
        cfg, info, step = self.cfg, self.info, self.step
        set_aside = set_aside_later_checkpoints(cfg.out_dir, step) if info.is_main else []
        self.best, best_notes = best_so_far(cfg.out_dir, step) if info.is_main else (None, [])
        self.logger = Logger(cfg.out_dir, info.is_main, self.max_steps, step, cfg.tensorboard)
        try:
            if info.is_main:
                self._write_start(self.unreadable + set_aside + best_notes)
            self._start_counters()
        except BaseException:  # (e.g. a full disk) the progress bar and TensorBoard's writer thread end here too
            self.logger.close()
            raise

    def _write_start(self, checkpoint_notes: List[str]) -> None:
        """config.json, then the run's first log lines."""
        cfg, logger = self.cfg, self.logger
        atomic_write_json(os.path.join(cfg.out_dir, "config.json"),
                          {"train": cfg.to_dict(), "model": self.model.config.to_dict()}, indent=1)
        for note in checkpoint_notes:
            logger.write(f"checkpoints: {note}")
        if cfg.max_steps is not None and cfg.max_epochs is not None:  # as official, max_steps wins
            logger.write(f"max_epochs {cfg.max_epochs} is not used: max_steps {cfg.max_steps} ends the run "
                         f"(--max-steps none runs by epochs)")
        if self.init_report:
            logger.write(f"initialised from {cfg.load_path}:\n{self.init_report}")
        elif not self.resume_path and set(cfg.tasks) & set(FINETUNE_TASKS):
            logger.write("no --load-path: fine-tuning starts from randomly initialised weights, not a pretrained "
                         "VLMo (give one with --load-path: an official .pt, a vlmo_fast checkpoint or export)")
        if self.resume_path:
            logger.write(f"resumed from {self.resume_path} at step {self.step}"
                         + (f" with changed options: {', '.join(self.changed)}" if self.changed else ""))
            if getattr(self.stream, "resume_note", None):
                logger.write(self.stream.resume_note)

    def _start_counters(self) -> None:
        """The counters, flags and clocks' companions the steps keep (the clocks start in ``train``)."""
        cfg, info, step = self.cfg, self.info, self.step
        tasks = set(cfg.tasks)
        self.flops_per_sample = pretrain_step_flops(self.model.config, 1) if tasks == {"mlm", "itc", "itm"} else None
        self.peak_tflops = _peak_tflops(info.device)

        self.step_start: Optional[StepStart] = None
        # the step a run resumes from is saved already when it resumes from this folder's own checkpoint of it (from
        # another file, e.g. best.pt or another folder's, resume=auto here would not find it)
        own = self.resume_path and os.path.abspath(self.resume_path) == os.path.abspath(checkpoint_path(cfg.out_dir,
                                                                                                       step))
        self.saved_step = step if own else None
        self.paused = 0.0  # seconds since the last log line spent evaluating and saving: not training time (samples/s)
        self.flag: Dict[str, Any] = {}  # the signal handlers' notes: the signal received, whether a batch is awaited
        # counted since the run began (a resumed run continues the counts of its checkpoint); bad samples per rank
        self.bad_in_a_row, self.skipped, self.bad_samples = 0, int(self.counts.get("skipped_steps", 0)), 0
        self.bad_before = int(self.counts.get("bad_samples", 0))
        self.scheduler_stepped = False
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the lr of the latest step, as logged
        self.last_ckpt = self.resume_path  # the run's latest checkpoint, until it saves one
        self.history: List[Dict[str, float]] = []
        self.can_evaluate = data_setup.has_val_split(cfg)
        self.periodic_eval = bool(cfg.eval_every) and self.can_evaluate
        # losses and accuracies are logged as means over the updates since the previous log line (one batch's
        # accuracy is too noisy to read); skipped (non-finite) steps are not averaged in
        self.window: Dict[str, float] = {}
        self.window_steps = 0
        self.samples_since = 0
        self.stop_reason = "max_steps"
        # one process: a signal while a batch is awaited stops the run there (with several, the other ranks wait in the
        # step's collectives, which this rank could not join without its batch)
        self.interruptible = not info.enabled
        self.mlm_on = bool({"mlm", "textmlm"} & tasks)  # (asked once, not per micro-step)

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def payload(self, tag: str) -> Dict[str, Any]:
        """The checkpoint's state (a collective: FSDP's full state, the bad-sample count)."""
        cfg, start = self.cfg, self.step_start
        return {
            "model": full_state_dict(self.wrapped, cfg.fsdp),
            "optimizer": optimizer_state(self.model, self.optimizer, cfg.fsdp),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
            # (a one-process run stopped inside a step's accumulation saves where the step began)
            "data": start.data if start else self.stream.state(),
            "rng": start.rng if start else rng_state(),
            "config": cfg.to_dict(), "tag": tag,
            "counts": {"skipped_steps": self.skipped, "bad_samples": self.bad_samples_total()},
            "eval_pending": self.eval_pending, "elapsed_s": self.elapsed_before + time.time() - self.t_start,
            "max_steps": self.max_steps,  # as resolved (from --max-epochs: by this run's layout)
            "world_size": self.info.world_size,
        }

    def save(self, tag: str) -> Optional[str]:
        t0 = time.time()
        state = self.payload(tag)
        path = save_training_checkpoint(self.cfg.out_dir, self.step, state, self.cfg.keep_last) \
            if self.info.is_main else None
        barrier()
        self.saved_step = self.step
        self.paused += time.time() - t0
        return path

    def back_to_step_start(self) -> None:
        """A one-process run stopping inside a step: its workers stopped (one may be stuck), the gradients and the
        bad-sample count of its micro-batches so far dropped (a resumed run reads them again)."""
        data_setup.abandon(self.stream)
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_samples = self.step_start.bad_samples

    def save_before_error(self, exc: BaseException) -> None:
        """A one-process run's error inside a step: back to the step's start, the steps since the last log row
        logged (now or never: a resumed run starts after them), and that saved (a failed log or save is reported,
        never in the error's place)."""
        what = f"{type(exc).__name__} in step {self.step + 1}"
        self.back_to_step_start()
        try:
            if self.window_steps:
                self.log_training(None)
            path = self.save(f"error: {what}")
        except Exception as save_exc:  # (out of memory or disk: the error that stopped the run is the one raised)
            self.logger.write(f"{what}: the checkpoint of step {self.step} could not be saved "
                              f"({type(save_exc).__name__}: {save_exc})")
        else:
            self.logger.write(f"{what}: saved step {self.step}, where it began, to {path} (--resume auto continues "
                              f"there)")

    def keep_if_best(self, metrics: Dict[str, float]) -> None:
        """best.pt := this step's state when this evaluation of the whole val split beats the run's best
        ``val/the_metric`` (the official checkpoint monitor). Evaluations of a few batches choose nothing: their
        values are not comparable (retrieval recall is higher in a smaller gallery)."""
        value = metrics.get("val/the_metric")
        best = self.best
        if not from_main(value is not None and (best is None or value > best["the_metric"])):
            return
        state = self.payload("best")
        if self.info.is_main:
            self.best = {"step": self.step, "the_metric": value,
                         "path": save_best_checkpoint(self.cfg.out_dir, state, value)}
            self.logger.write(f"step {self.step}: val/the_metric {value:.4f}, the run's best: {self.best['path']}")
        barrier()

    # ---- the log, evaluations, counts across ranks ----------------------------------------------------------------

    def log_training(self, last: Optional[Dict[str, torch.Tensor]]) -> None:
        """A training row: the means since the previous row (``last``, the latest step's values, when every step
        since was skipped) over the ranks (collectives: every rank calls it), the lr, the rate, the counts."""
        info = self.info
        now = time.time()
        rate = self.samples_since / max(now - self.t_last - self.paused, 1e-9)
        self.t_last, self.samples_since, self.paused = now, 0, 0.0
        window, steps = self.window, self.window_steps
        logged = {k: v / steps for k, v in window.items()} if steps else (last or {})
        self.window, self.window_steps = {}, 0
        # the values and the unreadable-sample count, averaged over the ranks in one collective and read at once
        mine = [torch.as_tensor(v, device=info.device).to(torch.float64) for v in logged.values()]
        means = mean_over_ranks(torch.stack(mine + [torch.full((), float(self.bad_samples), dtype=torch.float64,
                                                                device=info.device)])).tolist()
        values = dict(zip(logged, means[:-1]))
        values["loss"] = sum(v for k, v in values.items() if "loss" in k)
        values["lr"] = self.step_lr
        values["samples_per_s"] = rate
        if self.flops_per_sample and self.peak_tflops:
            values["mfu"] = rate * self.flops_per_sample / (self.peak_tflops * 1e12) / info.world_size
        values["bad_samples"] = self.bad_from_mean(means[-1])
        values["skipped_steps"] = self.skipped
        if self.scaler.is_enabled():  # fp16: the GradScaler's scale (halved at each update it skipped for inf/NaN)
            values["grad_scale"] = self.scaler.get_scale()
        values["elapsed_s"] = round(self.elapsed_before + now - self.t_start, 1)  # the run's, over its resumes
        self.history.append(values)
        self.logger.log(self.step, values)

    def periodic_evaluation(self) -> None:
        """The evaluation every ``eval_every`` steps; one a signal stops stays pending (``eval_pending`` in the
        checkpoint of this step), so the resumed run runs it before it trains on."""
        cfg, info = self.cfg, self.info
        t0 = time.time()
        self.eval_pending = True
        metrics = evaluate(self.model, cfg, info, self.amp, cfg.eval_batches or None, stop=self.flag)
        if metrics:
            self.logger.log(self.step, metrics, show=False)
            self.logger.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        # stopped: rank 0 (which reports) has no metrics and a rank had the signal (under FSDP a signal to another
        # rank stops every rank's evaluation: rank 0's own flag is not enough); every rank takes its word
        sig = self.signalled()
        self.eval_pending = bool(from_main(info.is_main and not metrics and bool(sig)))
        if not cfg.eval_batches:
            self.keep_if_best(metrics)
        self.paused += time.time() - t0

    def bad_from_mean(self, mean: float) -> int:
        """The run's unreadable samples from this process's mean over the ranks."""
        return self.bad_before + int(round(mean * self.info.world_size))

    def bad_samples_total(self) -> int:
        """Every rank's unreadable samples (a collective: every rank calls it)."""
        return self.bad_from_mean(float(mean_over_ranks(torch.full((), float(self.bad_samples), dtype=torch.float64,
                                                                   device=self.info.device))))

    def signalled(self) -> int:
        """The signal any rank received, 0 for none (a collective: every rank stops together)."""
        return max_over_ranks(int(self.flag.get("signal", 0)), self.info.device)

    # ---- one step -------------------------------------------------------------------------------------------------

    def next_batch(self, micro: int) -> Dict[str, Any]:
        """The step's next micro-batch. One process: a signal while it is awaited (or noted during this step: a worker
        may be stuck on this batch) stops the run at the last step."""
        flag = self.flag
        if not self.interruptible:
            return next(self.stream)
        if micro == 0:  # (the stream's position moves before a batch comes: a stop in between saves this one)
            self.step_start = StepStart(self.stream.state(), rng_state(), self.bad_samples)
        try:
            if flag.get("signal"):
                raise SignalWhileWaiting(flag["signal"])
            flag["waiting"] = True
            return next(self.stream)
        except SignalWhileWaiting as exc:
            self.back_to_step_start()
            self.stop_reason = f"signal {exc.args[0]}"
            self.logger.write(f"signal {exc.args[0]} while waiting for step {self.step + 1}'s batch {micro + 1} of "
                              f"{self.accum}: stopping at step {self.step}")
            raise StopTraining(self.stop_reason) from None
        finally:
            flag["waiting"] = False

    def forward_backward(self) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, bool]:
        """The step's micro-batches, forward and backward (gradients accumulated): their loss parts and accuracies
        (means over the micro-batches) and whether every loss was finite, all on the device (read at log time: a host
        read per micro-step would stall the GPU), and whether a micro-batch had no MLM target (its MLM loss is 0/0;
        read on the host)."""
        info, model, wrapped, accum = self.info, self.model, self.wrapped, self.accum
        parts: Dict[str, torch.Tensor] = {}
        finite = torch.ones((), dtype=torch.bool, device=info.device)
        unmasked = False
        for micro in range(accum):
            batch = self.next_batch(micro)
            self.bad_samples += int(batch.pop("bad_samples", 0) or 0)
            labels = batch.get("text_labels_mlm") if self.mlm_on else None
            if isinstance(labels, torch.Tensor) and labels.device.type == "cpu" and not (labels != -100).any():
                unmasked = True
            batch = to_device(batch, info.device, model.config.vocab_size)  # ids checked on the host
            # list-valued labels as tensors, outside a compiled forward (which would recompile on them)
            batch = objectives.prepare_targets(batch, self.cfg.tasks, model.config.vqav2_label_size, info.device)
            sync = contextlib.nullcontext()
            if micro < accum - 1 and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
                sync = wrapped.no_sync()
            with sync:
                with autocast(info.device, self.amp):
                    out = wrapped(batch)
                    loss = objectives.total_loss(out)
                finite = finite & torch.isfinite(loss.detach())
                for k in [k for k in out if "loss" in k]:  # (no loop variable left holding one of the outputs)
                    parts[k] = parts.get(k, 0.0) + out[k].detach().float() / accum
                for name, accuracy in _accuracies(out):
                    parts[name] = parts.get(name, 0.0) + accuracy / accum
                # the outputs go before the backward, whose start is the step's memory peak: the backward needs none
                # of them (the MLM logits, B x L x vocab, are fp32 after the head's bias: 0.6 GB at batch 128)
                del out
                self.scaler.scale(loss / accum).backward()
            # the rows this micro-batch really had (an epoch's final batch, dropped bad samples), on every rank
            self.samples_since += len(batch.get("text_ids", ())) * info.world_size
            del loss  # not kept through the next micro-step's forward
        return parts, finite, unmasked

    def skip_update(self, parts: Dict[str, torch.Tensor], finite: torch.Tensor, unmasked: bool) -> Optional[str]:
        """A step with a non-finite loss on some rank: its gradients dropped and noted; why the run stops (too many in
        a row: it stops after the step is counted), or None."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_in_a_row += 1
        self.skipped += 1
        shown = _nonfinite_values(self.info, finite, parts, unmasked)
        self.logger.write(f"step {self.step + 1}: non-finite loss ({shown}); update skipped ({self.bad_in_a_row} in "
                          f"a row)")
        return f"{self.bad_in_a_row} non-finite losses in a row" if self.bad_in_a_row >= self.cfg.max_bad_steps \
            else None

    def update(self, parts: Dict[str, torch.Tensor]) -> None:
        """A finite step: its values into the log's window, then the update (replicated gradients synchronized,
        clipped with --grad-clip, unscaled by the fp16 GradScaler)."""
        self.bad_in_a_row = 0
        for k, v in parts.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.window_steps += 1
        sync_replicated_grads(self.model)
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def step_schedule(self) -> None:
        """The lr schedule moves on to the next step (the step's lr kept for its log row)."""
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler_stepped:
            self.scheduler.step()
            return
        # torch checks the first call only: a skipped first update is deliberate, not the misuse it means
        with warnings.catch_warnings():  # (not around every step: that would reset warnings shown once)
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.scheduler_stepped = True

    # ---- the run --------------------------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        self.stop_reason = reason
        raise StopTraining(reason)

    def resume_pending_evaluation(self) -> None:
        """The evaluation a signal stopped, run before training on (or dropped where none would run now)."""
        if self.eval_pending and self.periodic_eval and self.step < self.max_steps:
            self.logger.write(f"step {self.step}: running the evaluation a signal stopped")
            self.periodic_evaluation()
            if not self.eval_pending:  # done: a stop now saves this step again, recording it
                self.saved_step = None
            signum = self.signalled()
            if signum:
                self.stop(f"signal {signum}")
        elif self.eval_pending:  # not re-run (periodic evaluation off now, or at max_steps, which has the final one)
            self.eval_pending, self.saved_step = False, None

    def train_steps(self) -> None:
        """Steps until max_steps (then the final save), or a ``StopTraining``: a signal, repeated non-finite
        losses."""
        cfg, info = self.cfg, self.info
        self.resume_pending_evaluation()
        while self.step < self.max_steps:
            parts, finite, unmasked = self.forward_backward()
            self.step_start = None  # (its micro-batches are all in: a stop from here on saves the step's end)
            # the step's read of the device (the backward is queued by now: the host waits here for most of a GPU
            # step), then the signal flag, read after that wait; with several processes one collective for both
            # (and its read): whether any rank's loss was non-finite, and the signal any rank received
            bad, signum = largest_over_ranks([not bool(finite), int(self.flag.get("signal", 0))], info.device)
            stop_bad = self.skip_update(parts, finite, unmasked) if bad else None
            if not bad:
                self.update(parts)
            self.step_schedule()
            self.step += 1
            self.logger.advance()
            if self.step % cfg.log_every == 0 or self.step == self.max_steps:
                self.log_training(parts)
            if stop_bad:  # counted as every skipped step (its batches, the schedule): the save holds this step
                self.stop(stop_bad)
            paused_here = False  # an evaluation or a save: a signal during it stops the run at this step
            if self.periodic_eval and self.step % cfg.eval_every == 0 and self.step < self.max_steps:
                self.periodic_evaluation()
                paused_here = True
            if self.step % cfg.save_every == 0 and self.step < self.max_steps:
                self.last_ckpt = self.save("periodic")
                paused_here = True
            if paused_here:
                signum = max(signum, self.signalled())
            if signum:  # every rank stops, with the signal's number (exit status 128 + N on each)
                self.stop(f"signal {signum}")
        if self.step >= self.max_steps:  # (the loop has no break: always, today)
            self.last_ckpt = self.save("final")

    def train(self) -> Dict[str, Any]:
        """The steps, the final evaluation, the summary (signal handlers installed throughout)."""
        cfg, info = self.cfg, self.info
        previous = _install_signal_handlers(self.flag, info)
        self.t_start = self.t_last = time.time()
        self.model.train()
        try:  # the handlers stay until the end (final save and evaluation included), and go on any error
            try:
                self.train_steps()
            except StopTraining:
                if self.window_steps:  # the steps since the last row: logged now, or never (a resumed run starts
                    self.log_training(None)  # after them)
                if self.saved_step != self.step:  # (a periodic save of this step holds it already)
                    self.last_ckpt = self.save(self.stop_reason)
            except Exception as exc:
                # one process, inside a step's micro-batches (a data worker killed, out of memory, a bad batch): the
                # model and optimizer are still those of the step's start, so that is saved before the error goes on
                # (not the last periodic checkpoint's hours ago); the error is the run's outcome either way
                if self.step_start is not None and self.step > 0 and self.saved_step != self.step:
                    self.save_before_error(exc)
                raise
            # the handlers stay through the final evaluation: a signal stops it, and the run ends as stopped by the
            # signal (its summary then is not a finished run's, so a resumed run evaluates again)
            metrics = {}
            if self.stop_reason == "max_steps" and cfg.final_eval:
                if self.can_evaluate:
                    metrics = evaluate(self.model, cfg, info, self.amp, None, final=True, stop=self.flag)
                    self.keep_if_best(metrics)
                else:
                    self.logger.write(f"no final evaluation: {data_setup.no_eval_reason(cfg)}")
            signum = self.signalled()
            if signum and self.stop_reason == "max_steps":
                self.stop_reason = f"signal {signum}"
        except BaseException:
            # the run ends with an error: its data workers and the TensorBoard writer's thread end with it (a caller
            # that goes on, e.g. a sweep calling train() again, kept them, and a kept traceback keeps this frame)
            data_setup.abandon(self.stream)
            self.logger.close()
            raise
        finally:
            _restore_signal_handlers(previous)
        data_setup.abandon(self.stream, stuck=False)  # its workers stop now (a stuck one is killed), not when freed
        return self.summarise(metrics)

    def summarise(self, metrics: Dict[str, float]) -> Dict[str, Any]:
        """The run's summary (returned, and written to summary.json), its last log lines."""
        cfg, info, step, logger = self.cfg, self.info, self.step, self.logger
        elapsed = self.elapsed_before + time.time() - self.t_start
        bad_total = self.bad_samples_total()
        history = self.history
        summary = {
            "steps": step, "stop_reason": self.stop_reason, "elapsed_s": elapsed, "skipped_steps": self.skipped,
            "bad_samples": bad_total, "last_checkpoint": self.last_ckpt,
            "final": history[-1] if history else logger.last_training_row(),
            "metrics": metrics, "best": self.best, "history": history,
        }
        last_line = None
        if info.is_main:
            if metrics:  # an evaluation row (none: no row holding the step alone)
                logger.log(step, metrics, show=False)
            try:  # (the run's work is saved by now: a full disk here warns instead of turning its exit status into 1)
                atomic_write_json(os.path.join(cfg.out_dir, "summary.json"),
                                  {k: v for k, v in summary.items() if k != "history"}, indent=1)
            except OSError as exc:
                warnings.warn(f"{os.path.join(cfg.out_dir, 'summary.json')} not written: {exc}")
            done = [f"done: {step} steps in {elapsed:.1f}s ({self.stop_reason})"]
            if "loss" in summary["final"]:
                done.append(f"loss {summary['final']['loss']:.4f}")
            if metrics:
                done.append(", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            done.append(f"skipped steps {self.skipped}, bad samples {bad_total}; checkpoint {self.last_ckpt}")
            last_line = "; ".join(done)
        logger.close(last_line)
        return summary


def exit_status(summary: Dict[str, Any]) -> int:
    """The commands' exit status for a run's summary: 0 when it reached max_steps (or was already complete), 128 + N
    when signal N stopped it (after saving, as a shell reports a process a signal ended: `pretrain && export` stops
    there), 1 for any other stop (repeated non-finite losses)."""
    reason = str(summary.get("stop_reason", ""))
    if reason == "max_steps":
        return 0
    if reason.startswith("signal "):
        number = reason.split()[1]
        return 128 + int(number) if number.isdigit() else 1  # "signal on another rank": an older run's summary
    return 1


def _finished_summary(cfg: TrainConfig, step: int) -> Optional[Dict[str, Any]]:
    """The summary a run wrote when it reached max_steps at ``step`` (final checkpoint and evaluation done), or None:
    then a run resumed at max_steps still saves and evaluates, e.g. after a signal on its last step."""
    try:
        with open(os.path.join(cfg.out_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("stop_reason") != "max_steps" or summary.get("steps") != step:
        return None
    return summary


def _peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return datasheet_peak(torch.cuda.get_device_name(device))


def _fsdp_load(model, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def export(checkpoint_path: str, out_path: str) -> None:
    """Write the model of a training checkpoint in the official layout (``.pt``) or as safetensors, with the index
    tensors the official loader expects (see ``save_checkpoint``)."""
    state = load_training_checkpoint(checkpoint_path)
    try:
        with warnings.catch_warnings():  # its training-only notices (e.g. warmup beyond max_steps) say nothing here
            warnings.simplefilter("ignore")
            recorded = TrainConfig.from_dict(state["config"])
        from .finetune import check_recorded  # (finetune builds on this module)

        check_recorded({"arch": recorded.arch, "image_size": recorded.image_size,
                        "max_text_len": recorded.max_text_len}, checkpoint_path)
        model = build_model(recorded)
        model.load_state_dict(state["model"])
    except (ValueError, TypeError, RuntimeError) as exc:  # a config this version no longer builds: the weights still
        warnings.warn(f"{checkpoint_path}: exporting the state dict as saved, without the relative-position index "
                      f"tensors, because its model could not be rebuilt: {exc}")
        save_checkpoint(state["model"], out_path)
        return
    save_checkpoint(model, out_path)
