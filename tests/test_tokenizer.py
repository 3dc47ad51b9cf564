"""The offline BERT uncased WordPiece tokenizer (spec §7)."""

import pytest
import torch



def test_vocabulary(tok):
    assert tok.vocab_size == 30522
    assert (tok.vocab["[PAD]"], tok.vocab["[UNK]"], tok.vocab["[CLS]"], tok.vocab["[SEP]"], tok.vocab["[MASK]"]) == (
        0, 100, 101, 102, 103)


def test_uncased_wordpiece(tok):
    assert tok.tokenize("Hello World") == ["hello", "world"]
    assert tok.tokenize("Unaffable") == ["una", "##ffa", "##ble"]
    assert tok.tokenize("Café") == ["cafe"]


def test_fixed_length_padding_and_truncation(tok):
    enc = tok(["a dog", "a very " + "long " * 100 + "caption"], max_length=40)
    ids, mask, special = enc["input_ids"], enc["attention_mask"], enc["special_tokens_mask"]
    assert ids.shape == mask.shape == special.shape == (2, 40) and ids.dtype == torch.int64
    assert ids[0, :4].tolist() == [101, tok.vocab["a"], tok.vocab["dog"], 102]
    assert ids[0, 4:].eq(0).all() and mask[0].tolist() == [1] * 4 + [0] * 36
    assert special[0].tolist() == [1, 0, 0] + [1] * 37
    assert mask[1].all() and ids[1, 0] == 101 and ids[1, -1] == 102  # truncated to exactly max_length
    assert tok("x", max_length=196)["input_ids"].shape == (1, 196)


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="max_length"):
        tok("x", max_length=1)
    with pytest.raises(TypeError, match="texts\\[1\\]"):
        tok(["ok", 3], max_length=8)
    for bad in (None, 5, b"bytes", {"a": 1}):
        with pytest.raises(TypeError, match="texts must be a str or a list of str"):
            tok(bad, max_length=8)
    with pytest.raises(ValueError, match="texts\\[0\\] cannot be tokenized"):
        tok(["a \ud800 dog"], max_length=8)
