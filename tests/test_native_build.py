"""The native extension: built by pip install, CUDA kernels compiled whenever nvcc is present (issue: the CUDA sources
must compile in CI), importable without a driver."""

import shutil

import pytest

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
