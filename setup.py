"""Build of the native extension ``vlmo_fast._C`` through CMake (pybind11; nvcc when found).

Environment variables:
    VLMO_FAST_CUDA        auto (default): build the CUDA kernels if nvcc is found; 0: skip CUDA; 1: require it.
    VLMO_FAST_CUDA_ARCHS  CMake CUDA_ARCHITECTURES (default "80-real;90-real;90-virtual": sm_80 and sm_90 machine
                          code plus compute_90 PTX).
    VLMO_FAST_BUILD_TYPE  CMake build type (default Release).
    VLMO_FAST_JOBS        parallel compile jobs (default: all cores).

The launchers take raw device pointers and the CUDA stream from Python, so neither a CUDA build of PyTorch nor the
PyTorch headers are needed to build: ``pip install .`` works against the CPU torch.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        # A cache from an earlier build can point at tools that no longer exist (pip's isolated build environments
        # are temporary): configure afresh every time. The compiled objects are reused when the build folder persists
        # (an editable or --no-build-isolation rebuild); a plain `pip install .` builds in a new one each time.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        cuda = os.environ.get("VLMO_FAST_CUDA", "auto").lower()
        if cuda not in ("auto", "0", "1"):
            raise RuntimeError(f"VLMO_FAST_CUDA must be auto, 0 or 1, got {cuda!r}")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('VLMO_FAST_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DVLMO_FAST_CUDA={cuda.upper() if cuda == 'auto' else ('ON' if cuda == '1' else 'OFF')}",
            f"-DVLMO_FAST_CUDA_ARCHS={os.environ.get('VLMO_FAST_CUDA_ARCHS', '80-real;90-real;90-virtual')}",
        ]
        if cuda != "0" and "CUDACXX" not in os.environ and shutil.which("nvcc") is None:
            for candidate in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
                if os.path.exists(candidate):
                    args.append(f"-DCMAKE_CUDA_COMPILER={candidate}")
                    break
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("VLMO_FAST_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("vlmo_fast._C")], cmdclass={"build_ext": CMakeBuild})
