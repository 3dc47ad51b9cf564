"""Quick CPU check of the native C++ kernels against the PyTorch paths they replace, at VLMo sizes.

    python benchmarks/native_cpu_quick.py [--threads 1,2] [--reps 40]

Both sides go through the public ops (``backend="cuda"`` runs the C++ kernels on CPU tensors, ``backend="torch"``
the PyTorch path). Shared machines are noisy: each number is the best of ``--reps`` wall-clock runs after warm-up,
and torch/native alternate case by case. Not the benchmark harness (benchmarks/run.py); this is the kernel
engineer's sanity check behind the CPU policy in vlmo_fast/ops/native.py (CPU_AUTO_MIN_ELEMENTS).
"""

from __future__ import annotations

import argparse
import time

import torch

from vlmo_fast import ops
from vlmo_fast.model import relpos


def best_ms(fn, reps):
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def softmax_case(backend, grad, dtype=torch.float32, form="table", b=8, h=12, n=237):
    full = torch.randn(1126, 144) * 0.1
    index = relpos.fusion_relative_position_index(40, 14) if n == 237 else torch.randint(0, 1126, (n, n))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[:, n // 6 : n // 5] = False  # text padding
    scores = torch.randn(b, h, n, n).to(dtype).requires_grad_(grad)
    table = full.clone().requires_grad_(grad)
    dense = torch.randn(h, n, n).requires_grad_(grad)
    g = torch.randn(b, h, n, n)
    kw = dict(bias_table=table[:, h : 2 * h], bias_index=index) if form == "table" else dict(bias=dense)

    def fn():
        p = ops.masked_softmax(scores, scale=0.125, key_padding_mask=keep, backend=backend, **kw)
        if grad:
            p.backward(g.to(p.dtype))

    return fn


def layernorm_case(backend, grad, split=40, dtype=torch.float32, shape=(8, 237, 768)):
    d = shape[-1]
    experts = 1 if split is None else 2
    x = torch.randn(*shape).to(dtype).requires_grad_(grad)
    dy = torch.randn(*shape).to(dtype)
    w = [torch.randn(d, requires_grad=grad) for _ in range(experts)]
    b = [torch.randn(d, requires_grad=grad) for _ in range(experts)]

    def fn():
        y = ops.multiway_layernorm(x, w, b, split=split, backend=backend)
        if grad:
            y.backward(dy)

    return fn


def gather_case(backend, grad, heads=12, n=237):
    full = torch.randn(1126, 144, requires_grad=grad)
    index = relpos.fusion_relative_position_index(40, 14) if n == 237 else torch.randint(0, 1126, (n, n))
    g = torch.randn(heads, n, n)

    def fn():
        out = ops.rel_pos_bias_gather(full[:, 12 : 12 + heads], index, backend=backend)
        if grad:
            out.backward(g)

    return fn


CASES = [
    ("softmax fwd      B=8 H=12 N=237 fp32, table bias + padding", lambda be: softmax_case(be, False)),
    ("softmax fwd+bwd  B=8 H=12 N=237 fp32, table bias + padding", lambda be: softmax_case(be, True)),
    ("softmax fwd      B=8 H=12 N=237 fp32, dense bias + padding", lambda be: softmax_case(be, False, form="dense")),
    ("softmax fwd+bwd  B=8 H=12 N=237 fp32, dense bias + padding", lambda be: softmax_case(be, True, form="dense")),
    ("softmax fwd+bwd  B=8 H=12 N=237 bf16, table bias + padding", lambda be: softmax_case(be, True, torch.bfloat16)),
    ("softmax fwd+bwd  B=2 H=4 N=64 fp32 (small)", lambda be: softmax_case(be, True, b=2, h=4, n=64)),
    ("layernorm fwd     (8,237,768) split 40", lambda be: layernorm_case(be, False)),
    ("layernorm fwd+bwd (8,237,768) split 40", lambda be: layernorm_case(be, True)),
    ("layernorm fwd     (8,237,768) one expert", lambda be: layernorm_case(be, False, None)),
    ("layernorm fwd+bwd (8,237,768) one expert", lambda be: layernorm_case(be, True, None)),
    ("layernorm fwd+bwd (8,237,768) split 40 bf16", lambda be: layernorm_case(be, True, 40, torch.bfloat16)),
    ("gather fwd        H=12 N=237 from (1126,144)[:, 12:24]", lambda be: gather_case(be, False)),
    ("gather fwd+bwd    H=12 N=237 from (1126,144)[:, 12:24]", lambda be: gather_case(be, True)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads values")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; best of {args.reps} (ms)")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\nthreads={threads}")
        print(f"{'case':60s} {'torch':>9s} {'native':>9s} {'speedup':>8s}")
        for name, make in CASES:
            t_torch = best_ms(make("torch"), args.reps)
            t_native = best_ms(make("cuda"), args.reps)
            print(f"{name:60s} {t_torch:9.3f} {t_native:9.3f} {t_torch / t_native:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
