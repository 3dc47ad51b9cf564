"""Task heads with the official names (spec §1.3, §5)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Pooler(nn.Module):
    """tanh(W x[:, 0] + b): the pooled text [CLS] of the fused sequence (spec Q24)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class PredictionTransform(nn.Module):
    """BERT's prediction-head transform: dense -> GELU(erf) -> LayerNorm(eps 1e-12)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """Vocabulary logits; the decoder is not tied to the word embeddings."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.transform = PredictionTransform(dim)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class ITMHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ITCHead(nn.Module):
    """Bias-free projection for the contrastive features."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def classifier(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm(eps 1e-5) -> GELU -> Linear: the VQA (D -> 2D -> 3129) and NLVR2 (2D -> 2D -> 2) heads."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def init_weights(module: nn.Module) -> None:
    """The official init of the non-backbone parts: N(0, .02) for Linear and Embedding weights (the padding row of
    the word embeddings included), zero Linear biases, LayerNorm 1/0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
