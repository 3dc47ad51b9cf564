"""MLM masking (spec §5.2, Q19): transformers 4.8.1 whole-word masking with [PAD] candidates and the padded-length
budget, the plain per-token collator, and the 80/10/10 replacement."""

import numpy as np
import pytest
import torch

from vlmo_fast.data import masking as M
from vlmo_fast.data.collate import build_collate
from vlmo_fast.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, VOCAB_SIZE


@pytest.fixture(scope="module")
def cont(tok):
    return M.continuation_table(tok)


def _encode(tok, texts, length):
    return tok(texts, max_length=length)


def test_budget_over_padded_length():
    assert M.whole_word_budget(40) == 6
    assert M.whole_word_budget(196) == 29
    assert M.whole_word_budget(12) == 2
    assert M.whole_word_budget(3) == 1  # max(1, round(0.45))
    assert M.whole_word_budget(10000) == 512


def test_continuation_table(tok, cont):
    assert cont.shape == (VOCAB_SIZE,)
    assert cont[tok.vocab["##ization"]] and not cont[tok.vocab["token"]] and not cont[PAD_ID]


@pytest.mark.parametrize("length", [40, 196])
def test_full_rows_select_exactly_the_budget(tok, cont, length):
    """Rows of single-piece words and no padding: every candidate is a real one-token group, so exactly the budget
    is selected."""
    words = ["red", "blue", "circle", "square", "left", "top", "and", "a"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=length)) for _ in range(16)]
    ids = _encode(tok, texts, length)["input_ids"]
    assert (ids != PAD_ID).all()
    sel = M.whole_word_select(ids, cont, generator=torch.Generator().manual_seed(1))
    assert (sel.sum(1) == M.whole_word_budget(length)).all()
    assert not sel[:, 0].any() and not sel[:, -1].any()


def test_pads_are_candidates_and_then_dropped(tok, cont):
    """3 real tokens + 35 pads at Lt=40: budget 6 is spread over 38 candidates, then pads are unselected, so a real
    token is masked with probability 6/38. (If pads were not candidates all 3 would always be masked.)"""
    ids = _encode(tok, ["red blue circle"] * 3000, 40)["input_ids"]
    sel = M.whole_word_select(ids, cont, generator=torch.Generator().manual_seed(2))
    assert not sel[ids == PAD_ID].any()
    assert not sel[(ids == CLS_ID) | (ids == SEP_ID)].any()
    rate = sel[:, 1:4].float().mean().item()
    assert abs(rate - 6 / 38) < 0.015, rate
    # Q19: rows often get no real token at all
    assert (sel.sum(1) == 0).float().mean() > 0.5


def test_whole_words_masked_together_and_oversized_groups_skipped(tok, cont):
    text = "the antidisestablishmentarianism of tokenization unbelievably"
    pieces = tok.tokenize(text)
    ids = _encode(tok, [text] * 2000, 40)["input_ids"]
    sel = M.whole_word_select(ids, cont, generator=torch.Generator().manual_seed(3))
    # word groups by position: [CLS] the | anti ##... (8) | of | token ##ization | un ##bel ##ie ##va ##bly
    groups = []
    for i, p in enumerate(pieces, start=1):
        if not p.startswith("##"):
            groups.append([i])
        else:
            groups[-1].append(i)
    for g in groups:
        block = sel[:, g]
        assert (block.all(1) | ~block.any(1)).all(), f"group {g} partially masked"
    eight = next(g for g in groups if len(g) == 8)
    assert not sel[:, eight].any()  # 8 pieces > budget 6: always skipped
    five = next(g for g in groups if len(g) == 5)
    assert sel[:, five].all(1).any()  # 5 pieces fit


def test_unk_and_mask_never_selected(cont):
    ids = torch.full((500, 12), PAD_ID, dtype=torch.long)
    ids[:, 0], ids[:, 5] = CLS_ID, SEP_ID
    ids[:, 1:5] = torch.tensor([UNK_ID, MASK_ID, UNK_ID, MASK_ID])
    sel = M.whole_word_select(ids, cont, generator=torch.Generator().manual_seed(4))
    assert not sel.any()


def test_replacement_80_10_10_and_labels():
    n, length = 4000, 40
    ids = torch.randint(1000, VOCAB_SIZE, (n, length))
    ids[ids == MASK_ID] = 2000
    selected = torch.rand(n, length) < 0.5
    out, labels = M.replace_selected(ids, selected, generator=torch.Generator().manual_seed(5))
    assert torch.equal(labels[selected], ids[selected])
    assert (labels[~selected] == -100).all()
    assert torch.equal(out[~selected], ids[~selected])
    total = selected.sum().item()
    masked = (out[selected] == MASK_ID).sum().item() / total
    unchanged = (out[selected] == ids[selected]).sum().item() / total
    randomised = 1 - masked - unchanged
    assert abs(masked - 0.8) < 0.01 and abs(unchanged - 0.1) < 0.01 and abs(randomised - 0.1) < 0.01
    random_ids = out[selected & (out != MASK_ID) & (out != ids)]
    assert random_ids.min() >= 0 and random_ids.max() < VOCAB_SIZE
    # drawn from the whole vocabulary: ids below 1000 ([PAD], [unused*], [CLS], ...) appear at ~1000/30522
    low = (random_ids < 1000).float().mean().item()
    assert 0.015 < low < 0.055


def test_plain_never_masks_special_tokens(tok):
    enc = _encode(tok, ["two red circles on the left", "a blue square"] * 2000, 12)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    sel = M.plain_select(ids, special, generator=torch.Generator().manual_seed(6))
    assert not sel[special.bool()].any()
    rate = sel[~special.bool()].float().mean().item()
    assert abs(rate - 0.15) < 0.01
    # default special mask: [CLS], [SEP], [PAD]
    sel2 = M.plain_select(ids, None, generator=torch.Generator().manual_seed(6))
    assert torch.equal(sel, sel2)
    out, labels = M.plain_mask(ids, special, generator=torch.Generator().manual_seed(7))
    assert (labels[special.bool()] == -100).all() and torch.equal(out[special.bool()], ids[special.bool()])


def test_generator_makes_masking_reproducible(tok, cont):
    ids = _encode(tok, ["two red circles on the left and a blue square at the top"] * 8, 40)["input_ids"]
    a = M.whole_word_mask(ids, cont, generator=torch.Generator().manual_seed(9))
    b = M.whole_word_mask(ids, cont, generator=torch.Generator().manual_seed(9))
    c = M.whole_word_mask(ids, cont, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_bad_input_is_rejected(cont):
    with pytest.raises(ValueError, match="int64"):
        M.whole_word_select(torch.zeros(2, 4, dtype=torch.int32), cont)
    with pytest.raises(ValueError, match="shape"):
        M.plain_select(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))


def test_collate_text_keys(tok):
    items = []
    for text in ["two red circles on the left", "a blue square at the top and three green stars"]:
        enc = _encode(tok, text, 12)
        items.append({"text": text, "text_ids": enc["input_ids"][0], "text_masks": enc["attention_mask"][0],
                      "special_tokens_mask": enc["special_tokens_mask"][0]})
    for mode in (True, False):
        batch = build_collate(tok, whole_word_masking=mode, generator=torch.Generator().manual_seed(0))(items)
        assert set(batch) == {"text", "text_ids", "text_masks", "text_labels", "text_ids_mlm", "text_labels_mlm",
                              "bad_samples"}
        for key in ("text_ids", "text_masks", "text_labels", "text_ids_mlm", "text_labels_mlm"):
            assert batch[key].shape == (2, 12) and batch[key].dtype == torch.long
        assert (batch["text_labels"] == -100).all()
        sel = batch["text_labels_mlm"] != -100
        assert torch.equal(batch["text_labels_mlm"][sel], batch["text_ids"][sel])
    batch = build_collate(tok, mlm=False)(items)
    assert "text_ids_mlm" not in batch and batch["bad_samples"] == 0


def test_collate_whole_word_masking_option(tok):
    """whole_word_masking=True masks a word's "##" pieces together (spec §5.2); False is the plain collator, which
    selects token by token (so a word is often masked in part) at the rate 0.15 of the real tokens."""
    text = "the tokenization of red circles"
    enc = _encode(tok, text, 12)
    assert tok.tokenize(text)[1:3] == ["token", "##ization"]  # positions 2 and 3 after [CLS]
    item = {"text_ids": enc["input_ids"][0], "text_masks": enc["attention_mask"][0],
            "special_tokens_mask": enc["special_tokens_mask"][0]}
    real = enc["special_tokens_mask"][0] == 0
    rows = 600
    for wwm in (True, False):
        batch = build_collate(tok, whole_word_masking=wwm, generator=torch.Generator().manual_seed(1))([item] * rows)
        sel = batch["text_labels_mlm"] != -100
        assert not sel[:, ~real].any()  # never [CLS], [SEP] or [PAD]
        word = sel[:, 2:4]
        whole, part = word.all(1).sum().item(), (word.any(1) & ~word.all(1)).sum().item()
        if wwm:
            assert part == 0 and whole > 0.05 * rows, (whole, part)
        else:  # P(one piece of two) = 2 x 0.15 x 0.85 = 0.255; P(both) = 0.0225
            assert 0.18 * rows < part < 0.33 * rows and whole < 0.06 * rows, (whole, part)
            assert abs(sel[:, real].float().mean().item() - 0.15) < 0.03


@pytest.mark.parametrize("mlm_prob", [0.3, 0.05])
def test_collate_masks_at_the_given_mlm_prob(tok, mlm_prob):
    """mlm_prob reaches both collators (--mlm-prob reaches the training collate: test_train): whole-word masking
    selects round(mlm_prob x padded length) tokens of rows of single-piece words, the plain collator each real token
    with probability mlm_prob."""
    words = ["red", "blue", "circle", "square", "left", "top", "and", "a"]
    rng = np.random.default_rng(0)
    items = []
    for _ in range(400):
        enc = _encode(tok, " ".join(rng.choice(words, size=40)), 40)
        items.append({"text_ids": enc["input_ids"][0], "text_masks": enc["attention_mask"][0],
                      "special_tokens_mask": enc["special_tokens_mask"][0]})
    real = torch.stack([i["special_tokens_mask"] for i in items]) == 0
    for wwm in (True, False):
        batch = build_collate(tok, whole_word_masking=wwm, mlm_prob=mlm_prob,
                              generator=torch.Generator().manual_seed(4))(items)
        sel = batch["text_labels_mlm"] != -100
        if wwm:
            assert (sel.sum(1) == M.whole_word_budget(40, mlm_prob)).all()
        else:
            assert abs(sel[real].float().mean().item() - mlm_prob) < 0.015
