"""Backend selection for the fused ops.

Every op has a pure-PyTorch implementation ("torch"). Kernel backends ("triton", "cuda": the native extension,
which also carries the C++ CPU kernels) register themselves per op with a predicate saying which inputs they take.

- ``"torch"``: always the PyTorch implementation.
- ``"triton"`` / ``"cuda"``: that backend where the op has one; an op without such an implementation runs its
  PyTorch path. If the op has the backend but cannot take these inputs, a ``ValueError`` says why (an explicit
  request is never silently ignored).
- ``"auto"``: the first registered backend, in priority order, that takes the inputs; else PyTorch.

Under ``torch.func`` transforms (vmap, grad, jacrev, ...) "auto" runs the PyTorch path and an explicit kernel
backend is refused: the kernels' autograd Functions have no vmap rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._memo import func_transforms_active

BACKENDS = ("auto", "torch", "triton", "cuda")


@dataclass
class _Impl:
    name: str
    fn: Callable
    # returns None when the inputs are supported, else a short reason
    unsupported: Callable[..., Optional[str]]
    priority: int
    # device types on which "auto" may pick it (an explicit request may use it anywhere it is supported)
    auto_devices: Tuple[str, ...]
    # extra conditions for "auto" only (e.g. inputs too small to win on CPU): None when "auto" may pick it
    auto_unsupported: Optional[Callable[..., Optional[str]]] = None


_REGISTRY: Dict[str, Dict[str, _Impl]] = {}
# (op, device type) -> the implementations "auto" may consider there, in priority order. Built at registration, never
# while ops run: filling it on first use inside a torch.compile trace changed the dict the trace's guards read, so the
# second call of a model compiled before any eager call recompiled.
_AUTO_CANDIDATES: Dict[Tuple[str, Optional[str]], List[_Impl]] = {}
# op -> the backend that ran its latest call ("torch" for the PyTorch path): what a benchmark row records
_LAST: Dict[str, str] = {}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


def register(op: str, backend: str, fn: Callable, unsupported: Callable[..., Optional[str]], priority: int,
             auto_devices: Tuple[str, ...] = ("cuda", "cpu"),
             auto_unsupported: Optional[Callable[..., Optional[str]]] = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``; lower priority numbers win under "auto", which
    only considers it for tensors on ``auto_devices`` (e.g. Triton's CPU interpreter is for tests, never "auto") and
    when ``auto_unsupported`` (if given) finds no reason against it (e.g. inputs too small to beat PyTorch)."""
    if backend not in BACKENDS[2:]:
        raise ValueError(f"register: backend must be one of {list(BACKENDS[2:])}, got {backend!r}")
    impls = _REGISTRY.setdefault(op, {})
    impls[backend] = _Impl(backend, fn, unsupported, priority, tuple(auto_devices), auto_unsupported)
    ranked = sorted(impls.values(), key=lambda impl: impl.priority)
    for key in [key for key in _AUTO_CANDIDATES if key[0] == op]:  # (a backend registered again may name fewer)
        del _AUTO_CANDIDATES[key]
    for device in {d for impl in ranked for d in impl.auto_devices}:
        _AUTO_CANDIDATES[(op, device)] = [impl for impl in ranked if device in impl.auto_devices]


def _device_type(args) -> Optional[str]:
    if args and isinstance(args[0], torch.Tensor):  # the common case: the op's first argument is its input
        return args[0].device.type
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)):
            found = _device_type(a)
            if found is not None:
                return found
    return None


def select(op: str, backend: str, *args, **kwargs) -> Optional[Callable]:
    """The kernel implementation to run for these inputs, or None for the PyTorch path (``last_selected`` then
    says which it was)."""
    impl = _select(op, backend, *args, **kwargs)
    if not torch.compiler.is_compiling():  # a traced graph carries no Python side effect
        _LAST[op] = "torch" if impl is None else impl.name
    return None if impl is None else impl.fn


def last_selected() -> Dict[str, str]:
    """A copy of op -> the backend ("torch", "triton" or "cuda") that ran the op's latest call in this process
    (``clear_selected`` forgets them)."""
    return dict(_LAST)


def clear_selected() -> None:
    _LAST.clear()


def _select(op: str, backend: str, *args, **kwargs) -> Optional[_Impl]:
    check_backend(backend)
    impls = _REGISTRY.get(op, {})
    if backend == "torch":
        return None
    if func_transforms_active():
        # torch.func.vmap / grad / jacrev: the kernels' autograd Functions take plain tensors (no vmap rule); the
        # PyTorch path is composed of ops that every transform knows
        if backend == "auto" or backend not in impls:
            return None
        raise ValueError(f"{op}: backend={backend!r} does not run under torch.func transforms (vmap, grad, jacrev, "
                         "...); use backend='auto' or 'torch' there")
    if backend == "auto":
        # This runs for every op call of every layer: the candidates per device are looked up, and the cheap "auto"
        # policy (e.g. a size threshold) is asked before the full support check.
        for impl in _AUTO_CANDIDATES.get((op, _device_type(args)), ()):
            if impl.auto_unsupported is not None and impl.auto_unsupported(*args, **kwargs) is not None:
                continue
            if impl.unsupported(*args, **kwargs) is None:
                return impl
        return None
    impl = impls.get(backend)
    if impl is None:
        return None
    reason = impl.unsupported(*args, **kwargs)
    if reason is not None:
        raise ValueError(f"{op}: backend={backend!r} cannot run these inputs: {reason}")
    return impl


def available(op: Optional[str] = None) -> Dict[str, List[str]]:
    """Registered kernel backends per op (every op also has "torch")."""
    ops = [op] if op is not None else sorted(_REGISTRY)
    return {name: ["torch"] + sorted(_REGISTRY.get(name, {}), key=lambda b: _REGISTRY[name][b].priority) for name in ops}
