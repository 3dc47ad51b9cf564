"""FLOP accounting for VLMo (standard conventions: matmul FLOPs, 2 per multiply-add; attention forward
4·B·H·N²·D, backward 2.5x forward; training = 3x forward). Used for TFLOP/s and MFU in benchmarks and training logs;
tests check it against torch's FLOP counter on the real forward."""

from __future__ import annotations

from typing import Optional

# Datasheet dense bf16 peaks (TFLOP/s), matched in order on the words of torch.cuda.get_device_name(): an SXM H100
# calls itself "NVIDIA H100 80GB HBM3", so any H100 that is not PCIe or NVL counts as SXM.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0),
                         ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))


def datasheet_peak(name: str) -> Optional[float]:
    """The dense bf16 datasheet peak of the GPU named ``name`` (TFLOP/s), or None when unknown."""
    words = name.replace("-", " ").split()
    for key, value in DATASHEET_BF16_TFLOPS:
        if all(part in words for part in key.split()):
            return value
    return None


def attention_flops(b: int, h: int, n: int, d: int, backward: bool = False) -> float:
    """Forward 4·B·H·N²·D (QKᵀ and PV); with ``backward``, forward + backward: 3.5x forward (the backward itself is
    2.5x: dV, dP, dQ, dK and the recomputed QKᵀ)."""
    fwd = 4.0 * b * h * n * n * d
    return fwd * (3.5 if backward else 1.0)


def layer_flops(tokens: int, seq: int, dim: int, hidden: int) -> float:
    """Matmul FLOPs of one Multiway block forward over ``tokens`` = B·N rows in sequences of length ``seq``:
    qkv (3D²), proj (D²), fc1 and fc2 (2·D·hidden), attention 4·N·D per token."""
    linear = 2.0 * tokens * (4 * dim * dim + 2 * dim * hidden)
    attn = 4.0 * tokens * seq * dim
    return linear + attn


def encoder_flops(config, batch: int, seq: int, layers: int) -> float:
    return layers * layer_flops(batch * seq, seq, config.embed_dim, config.mlp_hidden_dim)


def patch_embed_flops(config, batch: int) -> float:
    return 2.0 * batch * config.num_patches * config.in_chans * config.patch_size**2 * config.embed_dim


def forward_path_flops(config, batch: int, path: str) -> float:
    """Matmul FLOPs of one forward path of the model (embeddings' gathers and norms not counted)."""
    lt, ni, d = config.max_text_len, config.num_image_tokens, config.embed_dim
    L, F = config.depth, config.vlffn_start
    vl = L - F
    if path == "infer":
        return encoder_flops(config, batch, lt + ni, L) + patch_embed_flops(config, batch) + 2.0 * batch * d * d
    if path == "infer_text":
        return encoder_flops(config, batch, lt, L + vl) + 2 * 2.0 * batch * d * d
    if path == "infer_image":
        return encoder_flops(config, batch, ni, L + vl) + patch_embed_flops(config, batch) + 2 * 2.0 * batch * d * d
    if path == "infer_text_ft":
        return encoder_flops(config, batch, lt, L) + 2.0 * batch * d * d
    if path == "infer_image_ft":
        return encoder_flops(config, batch, ni, L) + patch_embed_flops(config, batch) + 2.0 * batch * d * d
    raise ValueError(f"unknown path {path!r}")


def pretrain_step_flops(config, batch: int) -> float:
    """One MLM + ITC + ITM step: 4 fusion passes (1 MLM + 3 ITM), infer_text and infer_image (each with the
    VL-FFN re-run), the MLM head on every text position, pooler/ITM heads; training = 3x forward."""
    d, lt = config.embed_dim, config.max_text_len
    fwd = 4 * forward_path_flops(config, batch, "infer")
    fwd += forward_path_flops(config, batch, "infer_text") + forward_path_flops(config, batch, "infer_image")
    fwd += 2.0 * batch * lt * (d * d + d * config.vocab_size)  # MLM transform + decoder
    fwd += 2.0 * 3 * batch * d * 2  # ITM head
    return 3.0 * fwd
