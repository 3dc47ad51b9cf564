"""Register use of the CUDA kernels on sm_90, from ptxas's report (nvcc --resource-usage), without a GPU: no kernel
may spill registers to local memory beyond the spills measured and documented in csrc/README.md ("Register use"),
so a change that makes a kernel spill, or spill more, fails here instead of showing up as a slowdown on the GPU."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
MEASURED_WITH = "release 13.0"  # the nvcc the spill caps below were read from (another one allocates differently)


def _nvcc_release() -> str:
    if NVCC is None:
        return ""
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release \d+\.\d+", out)
    return m.group(0) if m else out

# (kernel, values per lane[, vector width]) -> largest spill in bytes per thread accepted (nvcc 13.0, sm_90); see
# csrc/README.md
KNOWN_SPILLS = {
    ("softmax_backward_rows", 32): 472,  # Nk 513..1024: scores, gradient, probabilities, bias and batch sums
    ("softmax_forward_rows", 4): 40,  # Nk 65..128: ptxas keeps these at 40-48 registers and spills a few words
}


def resource_usage(source: Path, arch: int = 90) -> dict:
    """{(kernel name, values per lane[, vector width]): (registers, spill store bytes, stack frame bytes)} for every
    kernel of ``source``, the worst over its dtype instantiations. The values per lane are the last template argument
    of the softmax and gather kernels, and the second of the LayerNorm kernels (<dtype, values per lane, width>)."""
    done = subprocess.run([NVCC, f"-arch=sm_{arch}", "-O3", "-std=c++17", "--resource-usage", f"-I{CSRC}", "-c",
                           str(source), "-o", "/dev/null"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    usage, kernel = {}, None
    for line in (done.stdout + done.stderr).splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            mangled = m.group(1)  # ..._<len><name>I<template args>E... : the kernel's name, then its last argument
            name = re.search(r"\d+((?:softmax|layernorm|gather)_[a-z0-9_]+?)[IE]", mangled)
            args = [int(a) for a in re.findall(r"Li(\d+)E", mangled)]
            kname = name.group(1) if name else mangled
            if kname.startswith("layernorm") and len(args) == 3:
                kernel = (kname, args[1], args[2])
            else:
                kernel = (kname, args[-1] if args else None)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if m and kernel:  # the worst over the dtype instantiations of the same kernel and tier
            regs, spill, stack = usage.get(kernel, (0, 0, 0))
            usage[kernel] = (regs, max(spill, int(m.group(2))), max(stack, int(m.group(1))))
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel:
            regs, spill, stack = usage.get(kernel, (0, 0, 0))
            usage[kernel] = (max(regs, int(m.group(1))), spill, stack)
            kernel = None
    return usage


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
@pytest.mark.skipif(NVCC is not None and _nvcc_release() != MEASURED_WITH,
                    reason=f"the spill caps were measured with nvcc {MEASURED_WITH}, this is {_nvcc_release()}")
@pytest.mark.parametrize("source", ["masked_softmax.cu", "masked_softmax_staged.cu", "multiway_layernorm.cu",
                                    "rel_pos_gather.cu"])
def test_no_kernel_spills_beyond_the_documented_ones(source):
    usage = resource_usage(CSRC / "cuda" / source)
    assert usage, "no kernel found in ptxas's report"
    over = {k: v for k, v in usage.items() if v[1] > KNOWN_SPILLS.get(k, 0)}
    assert not over, f"kernels spilling registers (registers, spill bytes, stack bytes): {over}"
    # a stack frame without spills is local memory too: an array indexed at run time, or a helper (a lambda, a
    # memcpy) left un-inlined
    stacked = {k: v for k, v in usage.items() if v[2] > 0 and k not in KNOWN_SPILLS}
    assert not stacked, f"kernels with a stack frame (registers, spill bytes, stack bytes): {stacked}"
