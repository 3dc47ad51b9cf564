"""The test run's own guard: Triton's CPU interpreter before 3.7 cannot run with numpy >= 2.4."""

import numpy as np
import pytest

triton = pytest.importorskip("triton")
conftest = pytest.importorskip("conftest")


class _OneElementArray:
    """What ``np.array([1])`` gives to ``int()``: a value (numpy < 2.4) or a TypeError (numpy >= 2.4)."""

    def __init__(self, refuses):
        self.refuses = refuses

    def __int__(self):
        if self.refuses:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return 1


@pytest.mark.parametrize("refuses", [True, False])
@pytest.mark.parametrize("version", ["3.4.0", "3.6.0", "3.6.1+git1234"])
def test_interpreter_of_triton_3_4_to_3_6_with_numpy_2_4_stops_the_run(monkeypatch, version, refuses):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(np, "array", lambda *args, **kwargs: _OneElementArray(refuses))
    reason = conftest.interpreter_conflict()
    if refuses:
        assert reason is not None and version in reason and "numpy<2.4" in reason and "triton>=3.7" in reason
    else:
        assert reason is None


@pytest.mark.parametrize("version", ["3.0.0", "3.2.0", "3.7.0", "3.9.0", "4.0.0"])
def test_fixed_or_unused_interpreters_run(monkeypatch, version):
    """3.7 fixed it; below 3.4 the Triton kernels are off (MIN_TRITON), so the interpreter never runs them."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(np, "array", lambda *args, **kwargs: _OneElementArray(True))
    assert conftest.interpreter_conflict() is None


def test_compiled_triton_is_not_concerned(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "array", lambda *args, **kwargs: _OneElementArray(True))
    assert conftest.interpreter_conflict() is None


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
