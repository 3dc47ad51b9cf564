"""The VQAv2 answer vocabulary and soft scores as the official VQA writer builds them (spec §5.5).

The official ``vqav2_*.arrow`` files (ViLT's ``write_vqa.py``, reused by VLMo) define the classifier's 3,129 classes:

- every question's ``multiple_choice_answer`` of the train2014 annotations, then of val2014, in file order, is
  normalised by the VQA evaluation's answer normalisation (``normalize_answer``);
- the normalised answers seen at least 9 times are the vocabulary, numbered in order of first appearance
  (``answer_vocabulary``);
- each question's ten annotator answers are counted **as written** (not normalised); an answer that is in the
  vocabulary becomes a label with the score of its count (``answer_score``: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1),
  in order of first appearance among the ten (``question_targets``). Questions left without a label are dropped.

A released VQA checkpoint's classifier rows follow this numbering, so it must be reproduced exactly: the quirks of
the normalisation below are kept on purpose (see ``normalize_answer``).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, List, Mapping, Sequence, Tuple

MIN_ANSWER_COUNT = 9  # normalised answers seen at least this often (train + val) are classes
OFFICIAL_VOCAB_SIZE = 3129  # what the rule gives on the VQAv2 release (vqav2_label_size)

# Punctuation the VQA normalisation removes (next to a space, or when the answer has a digit,digit) or turns into a
# space, in the order it is processed.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32  # the official call passes re.UNICODE (= 32) where ``count`` goes: at most 32 periods go
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
# Contractions written without (some of) their apostrophes -> the written form, as the VQA evaluation lists them;
# "word>replacement" pairs. The official table also has capitalised keys (Im, Ive, Id've, I'dve) that can never
# match a lowercased word, so they are left out; its oddities (let's and she's map to themselves, somebody'd ->
# somebodyd) are kept.
_CONTRACTIONS = dict(pair.split(">") for pair in """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've couldnt've>couldn't've
didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've hadn'tve>hadn't've hasnt>hasn't
havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's howd>how'd howll>how'll hows>how's isnt>isn't
itd>it'd itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't mightnt've>mightn't've
mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've neednt>needn't notve>not've oclock>o'clock
oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at shant>shan't shed've>she'd've
she'dve>she'd've she's>she's shouldve>should've shouldnt>shouldn't shouldnt've>shouldn't've
shouldn'tve>shouldn't've somebody'd>somebodyd somebodyd've>somebody'd've somebody'dve>somebody'd've
somebodyll>somebody'll somebodys>somebody's someoned>someone'd someoned've>someone'd've someone'dve>someone'd've
someonell>someone'll someones>someone's somethingd>something'd somethingd've>something'd've
something'dve>something'd've somethingll>something'll thats>that's thered>there'd thered've>there'd've
there'dve>there'd've therere>there're theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've
theyll>they'll theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've
werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's whered>where'd
wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll whos>who's whove>who've
whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't wouldnt've>wouldn't've
wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll yall'd've>y'all'd've y'alld've>y'all'd've
y'all'dve>y'all'd've youd>you'd youd've>you'd've you'dve>you'd've youll>you'll youre>you're youve>you've
""".split())


def normalize_answer(answer: str) -> str:
    """An answer as the VQA evaluation normalises it (the rule the official writer applies to
    ``multiple_choice_answer`` before counting):

    1. each punctuation mark is removed if it touches a space in the answer, or anywhere if the answer contains a
       digit-comma-digit; otherwise it becomes a space (the test looks at the answer as given, not as edited);
    2. a period not followed by a digit is removed (at most 32 of them, an official quirk);
    3. the answer is lowercased and split on white space; number words zero..ten and "none" become digits, the
       articles a/an/the are dropped, and contractions written without apostrophes get them back;
    4. the words are joined by single spaces and any comma left is removed.
    """
    if not isinstance(answer, str):
        raise TypeError(f"normalize_answer: answer must be a str, got {type(answer).__name__}")
    strip_all = _DIGIT_COMMA_DIGIT.search(answer) is not None
    text = answer
    for mark in _PUNCTUATION:
        touches_space = (mark + " ") in answer or (" " + mark) in answer
        text = text.replace(mark, "" if strip_all or touches_space else " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text, count=_PERIOD_LIMIT)
    words = (_NUMBER_WORDS.get(w, w) for w in text.lower().split())
    words = (_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)
    return " ".join(words).replace(",", "")


def answer_score(count: int) -> float:
    """The soft target of an answer given by ``count`` of the ten annotators: 0, 0.3, 0.6, 0.9, then 1.0."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def answer_vocabulary(major_answers: Iterable[str], min_count: int = MIN_ANSWER_COUNT) -> List[str]:
    """The classes: normalised ``major_answers`` (train then val ``multiple_choice_answer``s, in file order) seen at
    least ``min_count`` times, in order of first appearance. Label ``i`` is the ``i``-th answer of the list."""
    counts = Counter(normalize_answer(a) for a in major_answers)  # a Counter keeps first-appearance order
    return [answer for answer, n in counts.items() if n >= min_count]


def question_targets(answers: Sequence[str], label_of: Mapping[str, int]) -> Tuple[List[int], List[float]]:
    """(labels, scores) of one question from its annotators' answers, counted as written: the answers that are
    classes, in order of first appearance, each with the score of its count."""
    labels, scores = [], []
    for answer, n in Counter(answers).items():
        if answer in label_of:
            labels.append(label_of[answer])
            scores.append(answer_score(n))
    return labels, scores
