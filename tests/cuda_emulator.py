"""Build and load ``vlmo_fast._C`` with its CUDA kernels running in the CPU emulator of tests/cuda_emu/.

The CUDA sources of csrc/cuda are compiled by the host C++ compiler: each launch ``kernel<<<grid, block, smem,
stream>>>(args)`` is rewritten into a call of the emulator's launcher and each static ``__shared__`` array is poisoned
at block start; nothing else in the sources changes. The module also holds the CPU kernels and the real bindings
(csrc/bindings.cpp), so the ``*_cuda`` launchers take the same arguments as in the real build, only host pointers.

``route_native_to_emulator(monkeypatch)`` points vlmo_fast.ops.native at that module and makes it treat CPU tensors as
CUDA tensors, so the public ops run their CUDA branch (allocation, workspace query, launch) through the emulator.
The build needs g++, pybind11 and the CUDA headers (the toolkit's include directory); it is cached per source and
compiler in ~/.cache/vlmo_fast/cuda_emu (or $VLMO_CUDA_EMU_CACHE).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "cuda_emu"
_MODULE = None
_BUILD = None  # the build directory, or the exception the build raised


def unavailable() -> str | None:
    """Why the emulator cannot be built on this machine, or None. Without any CUDA toolkit (no headers, no nvcc) it
    is skipped; with nvcc present a missing piece is an error, as the CUDA sources must be checked there (CI)."""
    if cuda_include_dir() is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit (headers or nvcc) on this machine"
    if shutil.which("g++") is None:
        return "no g++ on this machine"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed (the [test] extra brings it)"
    return None


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c) / "include"
    return None


def _kernel_start(src: str, end: int) -> int:
    """Start of the kernel expression that ends just before src[end] (an identifier, maybe with template args)."""
    i = end
    while i > 0 and src[i - 1].isspace():
        i -= 1
    if src[i - 1] == ">":  # template arguments: skip to the matching '<'
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(src[i], 0)
            if depth == 0:
                break
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def rewrite(src: str) -> str:
    """Kernel launches into emulator calls; static __shared__ arrays poisoned at each block's start."""
    out = src
    while (pos := out.find("<<<")) >= 0:
        close = out.index(">>>", pos)
        start = _kernel_start(out, pos)
        kernel = out[start:pos].strip()
        config = out[pos + 3 : close]
        out = out[:start] + f"::cuda_emu::make_launch({kernel}, {config})" + out[close + 3 :]
    shared = re.compile(r"__shared__\s+([\w:<>]+)\s+(\w+)((?:\[[^\]]+\])+)\s*;")
    out = shared.sub(lambda m: f"{m.group(0)} ::cuda_emu::poison_shared({m.group(2)}, sizeof({m.group(2)}));", out)
    return out


def _sources() -> dict[str, str]:
    files = {}
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".cpp", ".h", ".cu", ".cuh"):
            text = path.read_text()
            files[str(path.relative_to(CSRC))] = rewrite(text) if path.suffix == ".cu" else text
    for path in sorted(EMU.iterdir()):
        files["emu/" + path.name] = rewrite(path.read_text()) if path.suffix == ".cu" else path.read_text()
    return files


def build() -> Path:
    """Compile (or reuse) the emulated module and the emulator's self-test library; returns their directory."""
    global _BUILD
    if _BUILD is None:
        try:
            _BUILD = _build()
        except Exception as e:  # one attempt per process: every later caller gets the same error at once
            _BUILD = e
    if isinstance(_BUILD, Exception):
        raise _BUILD
    return _BUILD


def _build() -> Path:
    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("the CUDA emulator needs the CUDA toolkit headers (cuda_runtime.h); none found")
    import pybind11

    files = _sources()
    flags = ["-std=c++17", "-O1", "-fPIC", "-w", "-DVLMO_FAST_WITH_CUDA=1", '-DVLMO_FAST_CUDA_ARCHS="emulated"',
             '-DVLMO_FAST_NVCC_VERSION="emulated"', f"-I{include}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    key = (sorted(files.items()), flags, sys.version, compiler, pybind11.__version__)
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("VLMO_CUDA_EMU_CACHE", Path.home() / ".cache" / "vlmo_fast" / "cuda_emu"))
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = cache / digest
    if (final / "done").is_file():
        return final
    # build in a private directory, then publish it under the hash with one rename: a concurrent run either finds
    # a complete build or builds its own
    work = Path(tempfile.mkdtemp(prefix=f"{digest}.", dir=cache))
    src = work / "src"
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    module = [src / "bindings.cpp", *sorted((src / "cpu").glob("*.cpp")), *sorted((src / "cuda").glob("*.cu"))]
    runtime, selftest = src / "emu" / "emu_runtime.cpp", src / "emu" / "selftest.cu"
    emu_header = src / "emu" / "emu.h"

    def compile_unit(unit: Path) -> Path:
        obj = unit.with_suffix(unit.suffix + ".o")
        cmd = ["g++", *flags, "-c", str(unit), "-o", str(obj)]
        if unit.suffix == ".cu":
            cmd[1:1] = ["-x", "c++", "-include", str(emu_header)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cuda emulator: compiling {unit.name} failed:\n{done.stderr[-4000:]}")
        return obj

    def link(objects: list[Path], out: Path) -> None:
        # -Bsymbolic: the module's own CUDA runtime stand-ins win over a real libcudart already loaded in the process
        # (CUDA builds of torch load one globally)
        done = subprocess.run(["g++", "-shared", "-Wl,-Bsymbolic", "-o", str(out), *map(str, objects)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cuda emulator: linking {out.name} failed:\n{done.stderr[-4000:]}")

    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = dict(zip([*module, runtime, selftest], pool.map(compile_unit, [*module, runtime, selftest])))
    link([objects[u] for u in module] + [objects[runtime]], work / ("_C" + sysconfig.get_config_var("EXT_SUFFIX")))
    link([objects[selftest], objects[runtime]], work / "selftest.so")
    (work / "done").write_text("ok\n")
    try:
        os.rename(work, final)
    except OSError:  # another run published the same build first: use it
        shutil.rmtree(work, ignore_errors=True)
        if not (final / "done").is_file():
            raise
    return final


def selftest_library() -> ctypes.CDLL:
    """The emulator's self-test kernels (tests/cuda_emu/selftest.cu) as a ctypes library."""
    return ctypes.CDLL(str(build() / "selftest.so"))


def load():
    """The emulated ``_C`` module (built on first use)."""
    global _MODULE
    if _MODULE is None:
        lib = build() / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
        spec = importlib.util.spec_from_file_location("vlmo_fast_cuda_emu._C", lib)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULE = module
    return _MODULE


def route_native_to_emulator(monkeypatch, device_index: int = 0) -> None:
    """Make vlmo_fast.ops.native run CPU tensors through its CUDA branch, on the emulated kernels.

    ``device_index`` picks the emulated device: device d has 2·(d + 1) SMs, which steers the launchers' grid planning
    (batch chunks of the softmax, stage-1 blocks of the LayerNorm backward).

    Every ``__ldg`` of a launcher call is checked against the storages of the tensors the public op handed over
    (through ``native._addr``): a read outside all of them fails the call (a kernel reading past an operand).
    """
    from vlmo_fast.ops import native

    module = load()
    lib = ctypes.CDLL(module.__file__)  # the loaded library itself: its read-check state
    lib.cuda_emu_add_readable.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
    lib.cuda_emu_clear_readable()
    real_addr, real_launcher = native._addr, native._launcher

    def addr(t):
        p = real_addr(t)
        if p:
            storage = t.untyped_storage()
            lib.cuda_emu_add_readable(storage.data_ptr(), storage.nbytes())
        return p

    def launcher(name, device):
        fn = real_launcher(name, device)

        def run(**kwargs):
            try:
                return fn(**kwargs)
            finally:  # the next call lists its own tensors
                lib.cuda_emu_clear_readable()

        return run

    monkeypatch.setattr(native, "_C", module)
    monkeypatch.setattr(native, "_CUDA_COMPILED", True)
    monkeypatch.setattr(native, "_runs_cuda", lambda device: True)
    monkeypatch.setattr(native, "_launch_args", lambda device: {"device": device_index, "stream": 0})
    monkeypatch.setattr(native, "_addr", addr)
    monkeypatch.setattr(native, "_launcher", launcher)


@contextlib.contextmanager
def reverse_order():
    """Within the block, the emulated module runs the blocks of each grid, and the threads of each block, in reverse
    order: a kernel whose bits change under it has a race or an accumulation in no fixed order (atomics)."""
    lib = ctypes.CDLL(load().__file__)  # the library already loaded: same handle, same scheduler state
    lib.cuda_emu_set_reverse_order(1)
    try:
        yield
    finally:
        lib.cuda_emu_set_reverse_order(0)
