"""Where the fused attention's time goes on a GPU: the same case (VLMo-base fusion, B=128, N=237, bf16) with no bias,
a dense bias, and the table (gathered into a dense bias first, the default; or gathered per score in the kernel, with
the index computed or loaded); forward and forward+backward, with the autotuner's choice. One line per case.

    python benchmarks/profile/attention_forms.py     (on a GPU; results/gpu_suite_20261205T194632_h100 has a run)"""
import sys
import torch
import triton
import triton.testing

sys.path.insert(0, ".")
from vlmo_fast import ops  # noqa: E402
from vlmo_fast.model import relpos  # noqa: E402
from vlmo_fast.ops import triton_attention as ta  # noqa: E402

b, h, n, d = 128, 12, 237, 64
dev = "cuda"
q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
index = relpos.fusion_relative_position_index(40, 14).to(dev)
table = (torch.randn(relpos.num_table_rows(14), h, device=dev) * 0.5).requires_grad_()
dense = torch.randn(h, n, n, device=dev, requires_grad=True)
keep = torch.ones(b, n, dtype=torch.bool, device=dev)
keep[:, 30:40] = False
flops = 4 * b * h * n * n * d
g = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
cases = {"none": {}, "none+mask": dict(key_padding_mask=keep), "dense+mask": dict(bias=dense, key_padding_mask=keep),
         "table(dense gather)+mask": dict(bias_table=table, bias_index=index, key_padding_mask=keep),
         "table(in-kernel index)+mask": dict(bias_table=table, bias_index=index, key_padding_mask=keep),
         "table(loaded index)+mask": dict(bias_table=table, bias_index=index, key_padding_mask=keep)}
for name, kw in cases.items():
    ta.STRUCTURED_INDEX = "loaded" not in name
    ta.TABLE_BIAS = "dense" if "dense gather" in name else "in-kernel"
    leaves = [q, k, v] + [t for t in (kw.get("bias"), kw.get("bias_table")) if t is not None]
    fwd = lambda: ops.rel_pos_attention(q, k, v, backend="triton", **kw)  # noqa: E731

    def both():
        out = fwd()
        return torch.autograd.grad(out, leaves, g)

    with torch.no_grad():
        t_f = triton.testing.do_bench(fwd, warmup=50, rep=200)
    t_b = triton.testing.do_bench(both, warmup=50, rep=200)
    cfg = {kn: str(getattr(ta, kn).best_config) for kn in ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned")}
    print(f"{name:<30} fwd {t_f:.3f} ms {flops / t_f / 1e9:6.1f} TFLOP/s | fwd+bwd {t_b:.3f} ms "
          f"{3.5 * flops / t_b / 1e9:6.1f} TFLOP/s | {cfg}", flush=True)
