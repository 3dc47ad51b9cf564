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

    CUDA graphs (``capture``): a capture runs on a stream of its own, after a warm-up, and may not read the host.
      - None: the value is device work, computed inside the capture and never kept from it, so each replay
        recomputes it for the new values of its tensor (a key padding mask's parts), and no other graph or stream
        reads this graph's buffers.
      - "reuse": computing reads the host (an index copy's range check, a copy from the host), and a graph treats the
        tensor as fixed (a model's relative-position index): the capture takes the value a call before it made for
        the same tensor and version, on any stream (torch.cuda.graph synchronizes the device before capturing, so it
        is complete), and that value is then kept for good, since the graph reads it on every replay. With none
        (a tensor no warm-up used, or changed since) it is a clear error, where computing would end the capture with
        a CUDA error. The tensor must stay unchanged while the graph is used.
      - "skip": a check that reads the host (index or id ranges): a capture does not run it, since it would check
        only the values at capture time, not those of later replays.
    """

    def __init__(self, size: int = 64, per_stream: bool = True, capture: Optional[str] = None):
        if capture not in (None, "reuse", "skip"):
            raise ValueError(f"capture must be None, 'reuse' or 'skip', got {capture!r}")
        self._entries: Dict[Tuple[int, Any], Tuple[Any, Tuple, Any]] = {}
        self._size = size
        self._per_stream = per_stream
        self._capture = capture
        self._graphs_read: Dict[int, Any] = {}  # values a capture took: never dropped (by id, so each once)

    def __reduce__(self):  # a copy or a pickle (of a module holding one) starts empty: it is a cache
        return TensorMemo, (self._size, self._per_stream, self._capture)

    def get(self, t: torch.Tensor, extra: Tuple[Hashable, ...], compute: Callable[[], Any],
            stream_of: Optional[torch.Tensor] = None) -> Any:
        """``compute()``'s value for ``t`` and ``extra``; ``stream_of``: the tensor whose device's stream the value is
        made on, when it is not ``t``'s (a device copy of a CPU tensor)."""
        if tracing():
            return compute()
        on = t if stream_of is None else stream_of
        if capturing(on):
            return self._in_capture(t, extra, compute)
        if t.is_inference():  # (under torch.func transforms t may be a batched wrapper)
            return compute()
        stream = stream_key(on) if self._per_stream else None
        key = (t._version, stream) + extra
        hit = self._entries.get((id(t), stream))
        if hit is not None and hit[0]() is t and hit[1] == key:
            return hit[2]
        value = compute()  # an exception (e.g. a failed check) leaves nothing remembered
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

    def _in_capture(self, t: torch.Tensor, extra: Tuple[Hashable, ...], compute: Callable[[], Any]) -> Any:
        """The value inside a CUDA-graph capture (see ``capture`` above)."""
        if self._capture is None:
            return compute()
        if not t.is_inference():
            for ref, key, value in [e for (ident, _), e in list(self._entries.items()) if ident == id(t)]:
                if ref() is t and key[0] == t._version and key[2:] == extra:
                    if self._capture == "reuse":
                        self._graphs_read[id(value)] = value
                    return value
        if self._capture == "skip":
            return None
        why = ("it is an inference tensor (made under torch.inference_mode), whose changes cannot be seen, so nothing "
               "is kept for it: make it outside inference mode" if t.is_inference() else
               "run the captured code once first, outside the capture (the warm-up torch.cuda.graph asks for)")
        raise RuntimeError("vlmo_fast: a CUDA graph capture met an index tensor (or a new version of one) whose "
                           f"checked device copy no call before it made, which needs the host: {why}")
