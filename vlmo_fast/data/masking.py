"""MLM masking as the official collate does it (spec §5.2, quirk Q19): transformers 4.8.1's
``DataCollatorForWholeWordMask`` (every named pretraining config) and ``DataCollatorForLanguageModeling``.

Whole-word masking, per example of the padded batch (length ``Lt``):

1. Word groups from the WordPiece tokens: a token starting with "##" joins the previous group, any other token
   starts a new one. Only [CLS] and [SEP] are skipped, so every [PAD] is a one-token candidate group.
2. Budget ``min(512, max(1, round(mlm_prob * Lt)))`` tokens over the *padded* length (Python's round): 6 for
   Lt = 40, 29 for Lt = 196.
3. Groups in random order; a group that would exceed the budget is skipped, the loop stops once the budget is met.
4. Afterwards the special tokens ([PAD], [UNK], [CLS], [SEP], [MASK]: the tokenizer's ``all_special_ids``) and the
   pads are unselected, so real tokens are masked at about budget / #candidates.

Plain masking: Bernoulli(mlm_prob) per token, never on ``special_tokens_mask`` positions ([CLS], [SEP], [PAD]).

Both then replace the selected tokens: 80% -> [MASK] (103); of the rest half (10% overall) -> a uniform random id
in [0, 30522), special tokens included; the remaining 10% unchanged. Labels are the original ids on selected
positions and -100 elsewhere.

Randomness: every draw comes from the ``generator`` argument (a ``torch.Generator``) or torch's global RNG when it
is None. The official code shuffles the word groups with Python's ``random``; the statistics are the same, the
streams are not. Inside DataLoader workers leave ``generator`` as None: torch seeds each worker differently, while a
generator object would be copied into every worker with the same state.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, VOCAB_SIZE

# The tokenizer's all_special_ids: what DataCollatorForWholeWordMask unselects after choosing the groups.
SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)

__all__ = ["continuation_table", "whole_word_budget", "whole_word_select", "plain_select", "replace_selected",
           "whole_word_mask", "plain_mask"]


def continuation_table(tokenizer) -> np.ndarray:
    """(vocab_size,) bool: True for WordPiece continuation pieces (tokens starting with "##")."""
    table = np.zeros(tokenizer.vocab_size, dtype=bool)
    for token, idx in tokenizer.vocab.items():
        if token.startswith("##"):
            table[idx] = True
    return table


def whole_word_budget(length: int, mlm_prob: float = 0.15) -> int:
    """Tokens to mask per example: ``min(512, max(1, round(mlm_prob * length)))``."""
    return min(512, max(1, int(round(length * mlm_prob))))


def whole_word_select(input_ids: torch.Tensor, is_continuation: np.ndarray, mlm_prob: float = 0.15,
                      generator: Optional[torch.Generator] = None,
                      special_ids: Sequence[int] = SPECIAL_IDS) -> torch.Tensor:
    """(B, Lt) bool: the positions whole-word masking selects (before the 80/10/10 replacement)."""
    _check_ids(input_ids)
    ids = input_ids.detach().cpu().numpy()
    b_size, length = ids.shape
    budget = whole_word_budget(length, mlm_prob)
    cont = np.asarray(is_continuation, dtype=bool)[np.clip(ids, 0, len(is_continuation) - 1)]
    skip = (ids == CLS_ID) | (ids == SEP_ID)
    selected = np.zeros((b_size, length), dtype=bool)
    for b in range(b_size):
        groups = []
        for i in range(length):
            if skip[b, i]:
                continue
            if groups and cont[b, i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        count = 0
        for g in torch.randperm(len(groups), generator=generator).tolist():
            if count >= budget:
                break
            group = groups[g]
            if count + len(group) > budget:
                continue
            selected[b, group] = True
            count += len(group)
    selected &= ~np.isin(ids, np.asarray(list(special_ids)))
    selected &= ids != PAD_ID
    return torch.from_numpy(selected).to(input_ids.device)


def plain_select(input_ids: torch.Tensor, special_tokens_mask: Optional[torch.Tensor] = None, mlm_prob: float = 0.15,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, Lt) bool: Bernoulli(mlm_prob) per token, never where ``special_tokens_mask`` is 1.

    Without ``special_tokens_mask`` the [CLS], [SEP] and [PAD] positions are the special ones (what the tokenizer's
    ``return_special_tokens_mask=True`` gives for a padded text)."""
    _check_ids(input_ids)
    if special_tokens_mask is None:
        special_tokens_mask = (input_ids == CLS_ID) | (input_ids == SEP_ID) | (input_ids == PAD_ID)
    elif special_tokens_mask.shape != input_ids.shape:
        raise ValueError(f"special_tokens_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(special_tokens_mask.shape)}")
    prob = torch.full(input_ids.shape, float(mlm_prob))
    prob.masked_fill_(special_tokens_mask.bool().cpu(), 0.0)
    return torch.bernoulli(prob, generator=generator).bool().to(input_ids.device)


def replace_selected(input_ids: torch.Tensor, selected: torch.Tensor, generator: Optional[torch.Generator] = None,
                     vocab_size: int = VOCAB_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """80% [MASK], 10% random id in [0, vocab_size), 10% unchanged. Returns (masked ids, labels with -100)."""
    shape = input_ids.shape
    ids = input_ids.detach().cpu().clone()
    sel = selected.detach().cpu().bool()
    labels = ids.clone()
    labels[~sel] = -100
    to_mask = torch.bernoulli(torch.full(shape, 0.8), generator=generator).bool() & sel
    ids[to_mask] = MASK_ID
    to_random = torch.bernoulli(torch.full(shape, 0.5), generator=generator).bool() & sel & ~to_mask
    random_words = torch.randint(vocab_size, shape, dtype=torch.long, generator=generator)
    ids[to_random] = random_words[to_random]
    return ids.to(input_ids.device), labels.to(input_ids.device)


def whole_word_mask(input_ids: torch.Tensor, is_continuation: np.ndarray, mlm_prob: float = 0.15,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """DataCollatorForWholeWordMask: (text_ids_mlm, text_labels_mlm) for padded ``input_ids`` (B, Lt) int64."""
    selected = whole_word_select(input_ids, is_continuation, mlm_prob, generator)
    return replace_selected(input_ids, selected, generator)


def plain_mask(input_ids: torch.Tensor, special_tokens_mask: Optional[torch.Tensor] = None, mlm_prob: float = 0.15,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """DataCollatorForLanguageModeling: (text_ids_mlm, text_labels_mlm)."""
    selected = plain_select(input_ids, special_tokens_mask, mlm_prob, generator)
    return replace_selected(input_ids, selected, generator)


def _check_ids(input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be an int64 tensor (batch, max_text_len), got "
                         f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
