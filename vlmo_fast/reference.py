"""The official VLMo math, eager and unfused: the yardstick for tests and benchmarks.

The module tree mirrors the official classes and attribute names (``MultiWayTransformer``, ``Block``, ``Attention``,
``Mlp``, ``PatchEmbed``; ``drop_path`` a module; ``gamma_1 = 1.0`` without layer scale; ``mlp_vl = None`` below the
VL-FFN start) and their forward signatures, and computes what they compute (spec §3, §4):

- every layer's (H, N, N) bias gathered from the table at once per forward (``get_rel_pos_bias``);
- float32 QKᵀ on the pre-scaled q, bias add, ``masked_fill(-inf)`` on padded keys, softmax, ``type_as(x)``;
- the fused sequence sliced at ``max_text_len`` for the two FFN experts and concatenated again.

``ReferenceVLMo`` has the same parameters and state-dict keys as ``vlmo_fast.VLMo``, so one state dict runs through
both. It is deliberately slow; it is not used by the fast model.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VLMoConfig
from .model.vlmo import VLMo
from .ops._checks import fp32_or_wider
from .ops.droppath import drop_path as _drop_path


class DropPath(nn.Module):
    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, mask=None, relative_position_bias=None):
        B, N, C = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = fp32_or_wider(q) @ fp32_or_wider(k).transpose(-2, -1)  # official: q.float() @ k.float()ᵀ
        if relative_position_bias is not None:
            attn = attn + relative_position_bias.unsqueeze(0)
        if mask is not None:
            mask = mask.bool()
            attn = attn.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = attn.softmax(dim=-1).type_as(x)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    def __init__(self, config: VLMoConfig, drop_path: float, with_vlffn: bool):
        super().__init__()
        dim, hidden = config.embed_dim, config.mlp_hidden_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2_text = nn.LayerNorm(dim, eps=config.norm_eps)
        self.norm2_imag = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp_text = Mlp(dim, hidden)
        self.mlp_imag = Mlp(dim, hidden)
        self.mlp_vl = None
        if with_vlffn:
            self.mlp_vl = Mlp(dim, hidden)
            self.norm2_vl = nn.LayerNorm(dim, eps=config.norm_eps)
        init = config.layer_scale_init_values
        self.gamma_1 = nn.Parameter(init * torch.ones(dim)) if init is not None else 1.0
        self.gamma_2 = nn.Parameter(init * torch.ones(dim)) if init is not None else 1.0
        self.max_text_len = config.max_text_len

    def forward(self, x, mask=None, modality_type=None, relative_position_bias=None):
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), mask=mask, relative_position_bias=relative_position_bias))
        if modality_type == "image":
            x = x + self.drop_path(self.gamma_2 * self.mlp_imag(self.norm2_imag(x)))
        elif modality_type == "text":
            x = x + self.drop_path(self.gamma_2 * self.mlp_text(self.norm2_text(x)))
        elif self.mlp_vl is None:
            x_text = x[:, : self.max_text_len]
            x_imag = x[:, self.max_text_len :]
            x_text = x_text + self.drop_path(self.gamma_2 * self.mlp_text(self.norm2_text(x_text)))
            x_imag = x_imag + self.drop_path(self.gamma_2 * self.mlp_imag(self.norm2_imag(x_imag)))
            x = torch.cat([x_text, x_imag], dim=1)
        else:
            x = x + self.drop_path(self.gamma_2 * self.mlp_vl(self.norm2_vl(x)))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.patch_shape = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)


class MultiWayTransformer(nn.Module):
    def __init__(self, config: VLMoConfig):
        super().__init__()
        d = config.embed_dim
        self.num_features = self.embed_dim = d
        self.num_heads = config.num_heads
        self.patch_size = config.patch_size
        self.need_relative_position_embed = config.use_rel_pos
        self.use_abs_pos_emb = config.use_abs_pos_emb
        self.vlffn_start_layer_index = config.vlffn_start
        self.patch_embed = PatchEmbed(config.image_size, config.patch_size, config.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_image_tokens, d)) if config.use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(0.0)
        dpr = [x.item() for x in torch.linspace(0, config.drop_path_rate, config.depth, device="cpu")]
        self.blocks = nn.ModuleList(
            [Block(config, dpr[i], with_vlffn=i >= self.vlffn_start_layer_index) for i in range(config.depth)]
        )
        self.norm = nn.LayerNorm(d, eps=config.norm_eps)

    def visual_embed(self, _x):
        x = self.patch_embed(_x)
        x = x.flatten(2).transpose(1, 2)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        return x, torch.ones(x.shape[0], x.shape[1], device=x.device)


class ReferenceVLMo(VLMo):
    """The official math with the parameters, checks and batch interface of ``vlmo_fast.VLMo``."""

    def __init__(self, config: VLMoConfig):
        super().__init__(config, backend="torch")
        fast_backbone = self.transformer
        with torch.random.fork_rng(devices=[]):  # the same random stream afterwards as building vlmo_fast.VLMo
            self.transformer = MultiWayTransformer(config)
        self.transformer.load_state_dict(fast_backbone.state_dict())  # the same initial values

    def set_backend(self, backend: str) -> "ReferenceVLMo":
        self.backend = "torch"
        return self

    def get_rel_pos_bias(self, relative_position_index) -> List[Optional[torch.Tensor]]:
        """All layers' (H, N, N) biases, gathered at once (spec §2 "Gather", quirk Q4)."""
        if self.relative_position_bias_table is None:
            return [None] * self.num_layers
        bias = F.embedding(relative_position_index.long(), self.relative_position_bias_table)
        bias = bias.permute(2, 0, 1).contiguous()
        return list(torch.chunk(bias, self.num_layers, dim=0))

    def _index(self, name: str):
        return getattr(self, name) if self.relative_position_bias_table is not None else None

    def embed_image(self, image, image_token_type_idx: int = 1):
        x, masks = self.transformer.visual_embed(image)
        masks = masks.long()
        return x + self.token_type_embeddings(torch.full_like(masks, image_token_type_idx))

    def embed_text(self, text_ids):
        return self.text_embeddings(text_ids) + self.token_type_embeddings(torch.zeros_like(text_ids))

    def fusion(self, text_ids, text_masks, image, image_token_type_idx: int = 1):
        self._check_text(text_ids, text_masks, exact=True)
        image = self._check_image(image)
        if image.shape[0] != text_ids.shape[0]:
            raise ValueError(f"image batch ({image.shape[0]}) must match the text batch ({text_ids.shape[0]})")
        self._token_type(image_token_type_idx)
        text_embeds = self.embed_text(text_ids)
        image_embeds = self.embed_image(image, image_token_type_idx)
        x = torch.cat([text_embeds, image_embeds], dim=1)
        co_masks = torch.cat([text_masks.long(), torch.ones_like(image_embeds[..., 0], dtype=torch.long)], dim=1)
        bias = self.get_rel_pos_bias(self._index("text_imag_relative_position_index"))
        for i, blk in enumerate(self.transformer.blocks):
            x = blk(x, mask=co_masks, modality_type="vl", relative_position_bias=bias[i])
        return self.transformer.norm(x)

    def _official_unimodal(self, x, masks, modality: str, index_name: str, vlffn: bool):
        bias = self.get_rel_pos_bias(self._index(index_name))
        hidden = []
        for i, blk in enumerate(self.transformer.blocks):
            x = blk(x, mask=masks, modality_type=modality, relative_position_bias=bias[i])
            hidden.append(x)
        vl = None
        if vlffn:
            vl = hidden[self.vlffn_start_layer_index - 1]
            for i in range(self.vlffn_start_layer_index, self.num_layers):
                vl = self.transformer.blocks[i](vl, mask=masks, modality_type="vl", relative_position_bias=bias[i])
        return hidden[-1], vl

    def _text_hidden(self, text_ids, text_masks, vlffn: bool):
        self._check_text(text_ids, text_masks, exact=self.config.use_rel_pos)
        return self._official_unimodal(
            self.embed_text(text_ids), text_masks, "text", "text_relative_position_index", vlffn
        )

    def _image_hidden(self, image, image_token_type_idx: int, vlffn: bool):
        self._token_type(image_token_type_idx)
        x = self.embed_image(self._check_image(image), image_token_type_idx)
        masks = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        return self._official_unimodal(x, masks, "image", "relative_position_index", vlffn)
