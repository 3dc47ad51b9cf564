"""Loading the native extension ``vlmo_fast._C`` and describing what this installation can run."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch  # noqa: F401  (loaded first, so the extension shares PyTorch's OpenMP runtime instead of loading a second)

try:
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # running from a source tree without a build, or a broken build
    _C = None
    _IMPORT_ERROR = str(exc)


def native_available() -> bool:
    return _C is not None


def cuda_kernels_compiled() -> bool:
    return _C is not None and bool(_C.build_info().get("cuda", False))


def build_info() -> Dict[str, Any]:
    """What was compiled and what is usable here: the native extension (C++ CPU kernels; CUDA kernels and their
    architectures when nvcc was found at build time), Triton, and the PyTorch build."""
    info: Dict[str, Any] = {"native": _C is not None}
    if _C is None:
        info["native_error"] = _IMPORT_ERROR
    else:
        info.update(_C.build_info())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info
