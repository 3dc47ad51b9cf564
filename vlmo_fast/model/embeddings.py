"""Text and image embeddings (spec §3.1), with the parameter names of HF's BertEmbeddings and timm's PatchEmbed."""

from __future__ import annotations

import torch
import torch.nn as nn


class TextEmbeddings(nn.Module):
    """BERT embeddings as VLMo builds them: ``Dropout(LN_1e-12(word + bert_token_type[0] (+ position)))``.

    Absolute positions are added only with ``use_abs_pos`` (base_plus); base and large use the relative table, and
    their ``position_embeddings`` are dead parameters kept for the state dict (spec Q8). The dropout probability is the
    model's ``drop_path_rate`` (spec Q15).
    """

    def __init__(self, vocab_size: int, hidden: int, max_len: int, dropout: float, use_abs_pos: bool):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.use_abs_pos = use_abs_pos
        # persistent, as in transformers 4.8.1: part of the official state dict
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        if self.use_abs_pos:
            x = x + self.position_embeddings(self.position_ids[:, : input_ids.shape[1]])
        return self.dropout(self.LayerNorm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, S, S) -> (B, P, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.patch_shape = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)
