"""The test run's own guard: Triton's CPU interpreter before 3.7 cannot run with numpy >= 2.4."""

import warnings

import numpy as np
import pytest
import triton
from conftest import interpreter_conflict


def numpy_refuses_sized_int():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            int(np.array([1]))
    except TypeError:
        return True
    return False


@pytest.mark.parametrize("version", ["3.0.0", "3.6.0", "3.6.1+git1234"])
def test_old_triton_with_new_numpy_stops_the_run_with_a_clear_reason(monkeypatch, version):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", version)
    reason = interpreter_conflict()
    if numpy_refuses_sized_int():
        assert reason is not None and version in reason and "numpy<2.4" in reason and "triton>=3.7" in reason
    else:
        assert reason is None


@pytest.mark.parametrize("version", ["3.7.0", "3.9.0", "4.0.0"])
def test_fixed_triton_runs(monkeypatch, version):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", version)
    assert interpreter_conflict() is None


def test_compiled_triton_is_not_concerned(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton, "__version__", "3.0.0")
    assert interpreter_conflict() is None


def test_custom_op_modules_keep_real_annotations():
    """torch 2.4's custom_op reads the schema from the function's annotations and cannot parse strings, so a module
    that registers custom ops must not postpone its annotations (importing vlmo_fast failed there when it did)."""
    import pathlib

    import vlmo_fast

    root = pathlib.Path(vlmo_fast.__file__).parent
    registering = [p for p in root.rglob("*.py") if "torch.library.custom_op(" in p.read_text()]
    assert len(registering) >= 3, registering  # native, triton_attention, triton_ffn
    for path in registering:
        assert "from __future__ import annotations" not in path.read_text(), path
