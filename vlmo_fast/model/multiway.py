"""The Multiway Transformer backbone (spec §1.2, §3.2, §4): shared attention, per-modality FFN experts.

Parameter names and shapes are the official ones. The math goes through ``vlmo_fast.ops`` so the same module runs on
the PyTorch path or the kernels.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..ops.attention import split_qkv
from ..ops.ffn import ffn_checked
from ..ops.norm_linear import norm_linear_checked
from ..config import VLMoConfig
from .embeddings import PatchEmbed

# (table column slice (R, H), index (N, N)) for one layer, or None when the model has no relative position bias
RelPos = Optional[Tuple[torch.Tensor, torch.Tensor]]

MODALITIES = ("text", "image", "vl")


def attention_forward(attn: nn.Module, x: torch.Tensor, keep: Optional[torch.Tensor], bias: dict,
                      backend: str, norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
    """The attention sublayer of any module with the official ``Attention`` attributes (qkv without bias, q_bias and
    v_bias or None, proj, num_heads, scale): qkv projection (of ``norm(x)`` when a pre-norm is given, through
    ``norm_linear``, which does not keep the normalised rows), ``ops.rel_pos_attention`` with ``bias`` (keyword
    arguments: ``bias_table`` + ``bias_index`` or a dense ``bias``), output projection."""
    b, n, c = x.shape
    qkv_bias = None
    if attn.q_bias is not None:
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias, requires_grad=False), attn.v_bias))
    if norm is not None:
        qkv = norm_linear_checked(x, norm.weight, norm.bias, attn.qkv.weight, qkv_bias, norm.eps, backend)
    else:
        qkv = F.linear(x, attn.qkv.weight, qkv_bias)
    q, k, v = split_qkv(qkv, attn.num_heads)
    out = ops.rel_pos_attention(q, k, v, key_padding_mask=keep, scale=attn.scale, backend=backend, **bias)
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


def _expert(blk: nn.Module, name: str) -> ops.FFNExpert:
    norm, mlp = getattr(blk, f"norm2_{name}"), getattr(blk, f"mlp_{name}")
    return ops.FFNExpert(norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)


def block_forward(blk: nn.Module, x: torch.Tensor, keep: Optional[torch.Tensor], modality: str, bias: dict,
                  drop_prob: float, gamma_1: Optional[torch.Tensor], gamma_2: Optional[torch.Tensor],
                  backend: str) -> torch.Tensor:
    """One Multiway block (spec §3.2) for any module with the official ``Block`` attributes (norm1, attn, norm2_text,
    norm2_imag, mlp_text, mlp_imag, mlp_vl or None, norm2_vl, max_text_len):
    ``x += DropPath(γ1·Attn(LN1(x)))``, then the Multiway FFN of ``modality``. The model's ``Block`` and
    ``vlmo_fast.accelerate`` (official modules) both run through here."""
    y = attention_forward(blk.attn, x, keep, bias, backend, norm=blk.norm1)
    split = None
    if modality == "text":
        experts = [_expert(blk, "text")]
    elif modality == "image":
        experts = [_expert(blk, "imag")]
    elif blk.mlp_vl is not None:
        experts = [_expert(blk, "vl")]
    else:  # fused sequence below the VL-FFN start: split at the configured text length (spec Q1)
        experts, split = [_expert(blk, "text"), _expert(blk, "imag")], blk.max_text_len
    # the block's own tensors are consistent by construction: the ops' dispatch without the public argument checks;
    # the first residual, x + DropPath(γ1·y), is taken inside the FFN op (which then need not keep its result)
    return ffn_checked(x, experts, split, gamma_2, drop_prob, blk.training, blk.norm2_text.eps, backend,
                       attn_out=y, attn_gamma=gamma_1)


class Attention(nn.Module):
    """Multi-head self-attention with a q and v bias but no k bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)  # rows ordered [q; k; v]
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor], rel_pos: RelPos, backend: str) -> torch.Tensor:
        return attention_forward(self, x, keep, rel_pos_kwargs(rel_pos), backend)


def rel_pos_kwargs(rel_pos: RelPos) -> dict:
    return {} if rel_pos is None else {"bias_table": rel_pos[0], "bias_index": rel_pos[1]}


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: ``x += DropPath(γ1·Attn(LN1(x)))``, then the Multiway FFN of ``modality``."""

    def __init__(self, config: VLMoConfig, drop_path: float, with_vlffn: bool):
        super().__init__()
        dim, eps = config.embed_dim, config.norm_eps
        hidden = config.mlp_hidden_dim
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, config.num_heads)
        self.norm2_text = nn.LayerNorm(dim, eps=eps)
        self.norm2_imag = nn.LayerNorm(dim, eps=eps)
        self.mlp_text = Mlp(dim, hidden)
        self.mlp_imag = Mlp(dim, hidden)
        self.mlp_vl = Mlp(dim, hidden) if with_vlffn else None
        self.norm2_vl = nn.LayerNorm(dim, eps=eps) if with_vlffn else None
        init = config.layer_scale_init_values
        self.gamma_1 = nn.Parameter(init * torch.ones(dim)) if init is not None else None
        self.gamma_2 = nn.Parameter(init * torch.ones(dim)) if init is not None else None
        self.drop_path = drop_path
        self.max_text_len = config.max_text_len
        self.backend = "auto"

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor], modality: str, rel_pos: RelPos) -> torch.Tensor:
        if _submodule_hooked(self):
            return self.forward_calling_submodules(x, keep, modality, rel_pos)
        return block_forward(self, x, keep, modality, rel_pos_kwargs(rel_pos), self.drop_path, self.gamma_1,
                             self.gamma_2, self.backend)

    def forward_calling_submodules(self, x: torch.Tensor, keep: Optional[torch.Tensor], modality: str,
                                   rel_pos: RelPos) -> torch.Tensor:
        """The same block, unfused: the official ``Block.forward``, calling each submodule, so hooks on them run (the
        fused path reads their parameters instead). ``forward`` takes it while a submodule has hooks. DropPath draws
        in the official order: attention, then the FFN (text part before image part when split)."""
        x = x + self._branch(self.attn(self.norm1(x), keep, rel_pos, self.backend), self.gamma_1)
        if modality == "vl" and self.mlp_vl is None:  # split at the configured text length (spec Q1)
            text, imag = x[:, : self.max_text_len], x[:, self.max_text_len :]
            return torch.cat([text + self._ffn("text", text), imag + self._ffn("imag", imag)], dim=1)
        return x + self._ffn({"text": "text", "image": "imag"}.get(modality, "vl"), x)

    def _ffn(self, expert: str, x: torch.Tensor) -> torch.Tensor:
        return self._branch(getattr(self, f"mlp_{expert}")(getattr(self, f"norm2_{expert}")(x)), self.gamma_2)

    def _branch(self, y: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
        return ops.drop_path(y if gamma is None else gamma * y, self.drop_path, self.training)


def _submodule_hooked(block: nn.Module) -> bool:
    """Whether a submodule of ``block`` (not the block itself: its hooks run either way) has forward or backward
    hooks, or global module hooks are set (``nn.modules.module.register_module_forward_hook`` and the like, which
    run for every module called), which the fused path, reading parameters instead of calling modules, would not
    run."""
    if global_module_hooks():
        return True
    # A plain walk of the module tree: this runs for every block call, and ``modules()`` (a generator building each
    # submodule's dotted name) cost as much as the rest of a small block's Python.
    seen, stack = {id(block)}, list(block._modules.values())
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        if hooked(m):
            return True
        seen.add(id(m))
        stack.extend(m._modules.values())
    return False


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def global_module_hooks() -> bool:
    """Whether module hooks are registered for every module (torch.nn.modules.module's global hook dicts)."""
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


class MultiWayTransformer(nn.Module):
    """Patch embedding + CLS (+ absolute positions for base_plus), L Multiway blocks, the final norm."""

    def __init__(self, config: VLMoConfig):
        super().__init__()
        d = config.embed_dim
        self.num_heads = config.num_heads
        self.vlffn_start_layer_index = config.vlffn_start
        self.patch_embed = PatchEmbed(config.image_size, config.patch_size, config.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_image_tokens, d)) if config.use_abs_pos_emb else None
        # float32 linspace, as the official stochastic-depth rule (computed on the CPU even under a meta device)
        dpr = [float(r) for r in torch.linspace(0, config.drop_path_rate, config.depth, device="cpu")]
        self.blocks = nn.ModuleList(
            Block(config, dpr[i], with_vlffn=i >= self.vlffn_start_layer_index) for i in range(config.depth)
        )
        self.norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: trunc-normal(.02) for Linear weights, CLS and positions; zero biases; LayerNorm 1/0.
        The patch projection keeps PyTorch's default conv init."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def visual_embed(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1+P, D): CLS first, then the patches in row-major order."""
        x = self.patch_embed(image)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def run_blocks(
        self,
        x: torch.Tensor,
        keep: Optional[torch.Tensor],
        modality: str,
        rel_pos: List[RelPos],
        layers: range,
        keep_hidden: bool = False,
    ):
        """Run blocks ``layers`` in order; with ``keep_hidden`` also return every block's output."""
        hidden = []
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i in layers:
            if recompute:  # activations recomputed in the backward; the RNG state is replayed (same DropPath masks)
                x = checkpoint(self.blocks[i], x, keep, modality, rel_pos[i], use_reentrant=False)
            else:
                x = self.blocks[i](x, keep, modality, rel_pos[i])
            if keep_hidden:
                hidden.append(x)
        return (x, hidden) if keep_hidden else x
