"""Values derived from a tensor, computed once per tensor and reused until it is modified in place.

A model's relative-position index and a forward pass's key mask are the same tensor objects in every layer (and, for
the index, every step): their range check, int32 copy, CSR layout or mask parts need not be redone each call.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch


def func_transforms_active() -> bool:
    """True while a torch.func transform (vmap, grad, jacrev, ...) runs."""
    return torch._C._are_functorch_transforms_active()


def tracing() -> bool:
    """True while torch.compile traces or a torch.func transform runs: a tensor's values cannot be read on the host
    then (a graph break; a batched tensor has no single value), so value checks and the shortcuts decided by reading
    values are skipped."""
    return torch.compiler.is_compiling() or func_transforms_active()


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # (a fast read; CUDA builds of torch have it)


def stream_key(t: torch.Tensor):
    """The CUDA stream a CUDA tensor's derived value is made and used on (None off CUDA): a value is remembered per
    stream, since one made on stream A may still be being written when stream B reads it, and its memory, once
    freed, goes back to A's pool while B may still read it."""
    if not t.is_cuda:
        return None
    return _RAW_STREAM(t.device.index) if _RAW_STREAM is not None else torch.cuda.current_stream(t.device).cuda_stream


def capturing(t: torch.Tensor) -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (only asked for a CUDA tensor)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class TensorMemo:
    """Remembers ``compute()`` per tensor, by identity (through a weak reference, so it never keeps a tensor alive)
    and version counter (so an in-place change is seen), plus an extra key for other inputs of the computation.
    Bounded: past ``size`` tensors the entries of freed tensors are dropped, and all when that is not enough. While
    ``torch.compile`` traces, ``compute()`` simply runs (traced into the graph): reading the version counter there
    would break the graph. Nor is anything remembered for an inference tensor (made under ``torch.inference_mode``),
    which has no version counter to see a change. Safe to share between threads (e.g. a server running forwards in
    several): a lost entry is only computed again. A CUDA tensor's values are kept per CUDA stream (``stream_key``),
    unless ``per_stream=False`` (values that hold no device memory, e.g. the fact that a check passed).

    CUDA graphs: a capture runs on a stream of its own, after a warm-up on another, and may make no host sync.
    ``lend_to_capture=True`` is for values whose computation needs one (an index copy's range check, a copy from
    the host) and whose tensor a graph treats as fixed (a model's relative-position index): a stream being captured
    with no value of its own takes the one another stream made for the same tensor (torch.cuda.graph synchronizes
    the device before capturing, so that value is complete) and keeps it. A graph reads that value on every replay:
    the tensor must stay alive and unchanged while the graph is used. Values of tensors that change from replay to
    replay (a key padding mask's parts) are computed inside the capture instead, so each replay recomputes them.
    """

    def __init__(self, size: int = 64, per_stream: bool = True, lend_to_capture: bool = False):
        self._entries: Dict[Tuple[int, Any], Tuple[Any, Tuple, Any]] = {}
        self._size = size
        self._per_stream = per_stream
        self._lend = lend_to_capture

    def __reduce__(self):  # a copy or a pickle (of a module holding one) starts empty: it is a cache
        return TensorMemo, (self._size, self._per_stream, self._lend)

    def get(self, t: torch.Tensor, extra: Tuple[Hashable, ...], compute: Callable[[], Any],
            stream_of: Optional[torch.Tensor] = None) -> Any:
        """``compute()``'s value for ``t`` and ``extra``; ``stream_of``: the tensor whose device's stream the value is
        made on, when it is not ``t``'s (a device copy of a CPU tensor)."""
        if tracing() or t.is_inference():  # (under torch.func transforms t may be a batched wrapper)
            return compute()
        on = t if stream_of is None else stream_of
        stream = stream_key(on) if self._per_stream else None
        key = (t._version, stream) + extra
        hit = self._entries.get((id(t), stream))
        if hit is not None and hit[0]() is t and hit[1] == key:
            return hit[2]
        made = None
        if self._lend and stream is not None and capturing(on):
            made = self._made_elsewhere(t, key)
            if made is None:  # computing it would sync with the host, which ends the capture with a CUDA error
                raise RuntimeError(
                    "vlmo_fast: a CUDA graph capture met an index tensor (or a new version of one) that no call "
                    "before it used: run the captured code once first, outside the capture (the warm-up that "
                    "torch.cuda.graph asks for), so that the index's checked device copy exists")
        value = made[0] if made is not None else compute()  # an exception (e.g. a failed check): nothing remembered
        if len(self._entries) > self._size:  # the entries of freed tensors go first, then (still full) all
            # from a snapshot (one C call): another thread's forward may add an entry meanwhile, and iterating the dict
            # itself then raised "dictionary changed size during iteration" (inference served from several threads)
            self._entries = {k: e for k, e in list(self._entries.items()) if e[0]() is not None}
            if len(self._entries) > self._size:
                self._entries.clear()
        try:
            self._entries[(id(t), stream)] = (weakref.ref(t), key, value)
        except TypeError:  # not weak-referenceable: simply recomputed next time
            pass
        return value

    def _made_elsewhere(self, t: torch.Tensor, key: Tuple) -> Optional[Tuple[Any]]:
        """(the value) another stream made for ``t`` with the same version and extra key, or None."""
        for (ident, _), (ref, other, value) in list(self._entries.items()):
            if ident == id(t) and ref() is t and other[:1] + other[2:] == key[:1] + key[2:]:
                return (value,)
        return None
