"""The native extension: built by pip install, CUDA kernels compiled whenever nvcc is present (issue: the CUDA sources
must compile in CI), importable without a driver."""

import shutil

import pytest
import torch

import vlmo_fast


def test_extension_is_built_and_reports():
    info = vlmo_fast.build_info()
    assert info["native"], info.get("native_error")
    assert isinstance(info["openmp"], bool)


@pytest.mark.skipif(shutil.which("nvcc") is None and not __import__("os").path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="no nvcc on this machine")
def test_cuda_kernels_compiled_when_nvcc_present():
    info = vlmo_fast.build_info()
    assert info["cuda"] is True
    assert "90" in info["cuda_archs"] and "80" in info["cuda_archs"]
    # statically linked runtime: the module imported; without a driver the device query reports an error, not a crash
    assert info["cuda_runtime_version"] > 0
    if not __import__("torch").cuda.is_available():
        assert info["cuda_device_count"] == 0


def test_launchers_are_bound():
    """Every op has its CPU launchers, and its CUDA launchers whenever the CUDA kernels were compiled."""
    from vlmo_fast import _native

    ops = ("masked_softmax", "multiway_layernorm", "rel_pos_gather")
    names = [f"{op}_{d}" for op in ops for d in ("forward", "backward")]
    assert all(hasattr(_native._C, f"{n}_cpu") for n in names)
    if _native.cuda_kernels_compiled():
        assert all(hasattr(_native._C, f"{n}_cuda") for n in names)
        assert hasattr(_native._C, "multiway_layernorm_backward_workspace_cuda")


def test_ops_import_and_fall_back_without_the_extension():
    """With vlmo_fast._C missing, vlmo_fast.ops still imports, the native backend says why it cannot run, and "auto"
    takes the PyTorch paths."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "vlmo_fast._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch
        from vlmo_fast import ops
        from vlmo_fast.ops import native
        s = torch.randn(1, 2, 5, 5)
        reason = native._softmax_unsupported(s, None, None, None, None, torch.float32)
        assert "not built" in reason, reason
        assert ops.masked_softmax(s).shape == s.shape
        try:
            ops.masked_softmax(s, backend="cuda")
        except ValueError as e:
            assert "not built" in str(e)
        else:
            raise AssertionError("backend='cuda' should refuse without the extension")
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_cuda_kernels_that_cannot_run_here_are_declined_with_the_reason(monkeypatch):
    """The extension's CUDA code runs only where its static runtime meets a new enough driver and the GPU's
    architecture was compiled (sm_80/sm_90 + compute_90 PTX by default): otherwise "auto" takes PyTorch and an
    explicit backend="cuda" names the reason, instead of a launch failure (e.g. a T4, sm_75, or a driver older than
    the nvcc that built it)."""
    from vlmo_fast.ops import native

    default = "80-real,90-real,90-virtual"
    assert native.arch_mismatch((8, 0), default) is None and native.arch_mismatch((8, 6), default) is None
    assert native.arch_mismatch((9, 0), default) is None and native.arch_mismatch((12, 0), default) is None  # PTX
    assert "sm_75" in native.arch_mismatch((7, 5), default) and "VLMO_FAST_CUDA_ARCHS" in native.arch_mismatch(
        (7, 5), default)
    assert native.arch_mismatch((10, 0), "80-real;90-real") is not None  # machine code only: no newer major
    assert native.arch_mismatch((8, 9), "86-real") is None and native.arch_mismatch((8, 0), "86-real") is not None

    class FakeC:
        def __init__(self, status):
            self.status = status

        def build_info(self):
            return {"cuda_device_status": self.status, "cuda_archs": default}

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(native, "_C", FakeC("cudaErrorInsufficientDriver: CUDA driver version is insufficient"))
    assert "driver" in native._cuda_unusable.__wrapped__(0)
    monkeypatch.setattr(native, "_C", FakeC("ok"))
    assert "sm_75" in native._cuda_unusable.__wrapped__(0)


def test_the_source_distribution_holds_what_the_build_needs(tmp_path):
    """A wheel built from the sdist (python -m build, pip install vlmo_fast-*.tar.gz) compiles csrc/ through
    CMakeLists.txt: the sdist held neither (setuptools packs only the Python packages and tests by default)."""
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "setup.py").is_file():
        pytest.skip("not run from a source tree")
    tree = tmp_path / "tree"
    shutil.copytree(root, tree, ignore=shutil.ignore_patterns(
        ".git", ".ci-venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "results", ".gpu_carry"))
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=tree,
                   check=True, capture_output=True)
    (archive,) = (tmp_path / "dist").glob("vlmo_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "benchmarks/run.py",
              "benchmarks/gpu_suite.sh"}
    needed |= {str(p.relative_to(root)) for p in (root / "csrc").rglob("*") if p.is_file()}
    assert any(n.startswith("csrc/cuda/") for n in needed) and "csrc/bindings.cpp" in needed
    assert needed <= packed, sorted(needed - packed)
