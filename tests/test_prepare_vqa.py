"""VQAv2 -> official arrow files: the answer normalisation, scores and class numbering of the official writer checked
by hand, then a tiny fake VQAv2 release written, read back through the arrow datasets and the evaluation's answer
map (classes, scores, dropped questions and images, the trainable_val / rest_val cut, missing images, a seeded
order), its input errors, and the `vlmo-fast prepare vqa` command."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vlmo_fast import cli
from vlmo_fast.data import make_dataset, prepare_vqa, read_arrow
from vlmo_fast.data.prepare import VQA_SCHEMA
from vlmo_fast.data.vqa_answers import (MIN_ANSWER_COUNT, answer_score, answer_vocabulary, normalize_answer,
                                        question_targets)
from vlmo_fast.evaluation import build_id2answer


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("the dog", "dog"), ("a", ""), ("An apple", "apple"),  # case, period, articles
    ("two", "2"), ("none", "0"), ("Ten dollars", "10 dollars"), ("twenty", "twenty"),  # number words 0..10 only
    ("3.5", "3.5"), ("3.", "3"), ("e.g. red", "eg red"),  # a period stays only before a digit
    ("hot-dog", "hot dog"), ("hot - dog", "hot dog"), ("hot -dog", "hot dog"),  # a mark becomes a space, or goes
    ("red, white", "red white"), ("red,white", "red white"),  # commas: the last step removes what is left
    ("1,000", "1000"), ("1,000 (x-y)", "1000 xy"),  # digit,digit: every mark is removed, none becomes a space
    ("a/b", "b"),  # "/" -> space, then the article a is dropped
    ("dont know", "don't know"), ("Im", "im"), ("somebody'd", "somebodyd"), ("yall'll", "y'all'll"),
    ("  many   spaces ", "many spaces"), ("what?!", "what"), ("", ""),
])
def test_normalize_answer_by_hand(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_quirks_and_errors():
    assert normalize_answer("." * 40 + "x") == "." * 8 + "x"  # at most 32 periods removed (the official count)
    # whether a mark goes or becomes a space is decided on the answer as given: "(" follows ";", not a space, here,
    # though it follows a space once ";" has become one (which would remove it: "ab c de")
    assert normalize_answer("ab;(c d(e") == "ab c d e"
    with pytest.raises(TypeError, match="answer must be a str"):
        normalize_answer(3)


def test_scores_vocabulary_and_targets():
    assert [answer_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    majors = ["two"] + ["yes"] * 9 + ["2"] * 8 + ["blue"] * 8 + ["Yes."]
    # normalised counts: "2" 9 (first seen), "yes" 10, "blue" 8 -> classes "2", "yes" in order of first appearance
    assert MIN_ANSWER_COUNT == 9 and answer_vocabulary(majors) == ["2", "yes"]
    assert answer_vocabulary(majors, min_count=8) == ["2", "yes", "blue"]
    label_of = {"2": 0, "yes": 1}
    # annotator answers are counted as written: "two" is not the class "2"
    assert question_targets(["yes"] * 3 + ["two"] * 5 + ["2"] * 2, label_of) == ([1, 0], [0.9, 0.6])
    assert question_targets(["no"] * 10, label_of) == ([], [])


# ---- a tiny VQAv2 release ----------------------------------------------------------------------------------------


def _jpeg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.randint(0, 256, (6, 7, 3), dtype=np.uint8)).save(path, format="JPEG")
    with open(path, "rb") as f:
        return f.read()


def _answers(*counts):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(a for a, n in counts for _ in range(n))]


@pytest.fixture
def vqa_raw(tmp_path):
    """train: 9 questions answered "two"/"2", then 10 "yes", then 8 "blue" (not a class) over 4 images, one of which
    has only "blue" questions; val: 4 images of one "yes" question each, one missing on disk; test: 2 images."""
    root = tmp_path / "vqa"
    images = {}
    questions = {s: [] for s in ("train2014", "val2014", "test2015", "test-dev2015")}
    annotations = {s: [] for s in ("train2014", "val2014")}
    qid = [0]

    def add(year, iid, text, major=None, answers=None, folder=None):
        qid[0] += 1
        questions[year].append({"image_id": iid, "question": text, "question_id": qid[0]})
        if major is not None:
            annotations[year].append({"question_id": qid[0], "image_id": iid, "question_type": "what",
                                      "answer_type": "other", "multiple_choice_answer": major, "answers": answers})
        return qid[0]

    for iid in (9, 25, 30):
        images[iid] = _jpeg(str(root / "train2014" / f"COCO_train2014_{iid:012d}.jpg"))
    images[77] = _jpeg(str(root / "train2014" / f"{77:012d}.jpg"))  # the other accepted file name
    for k in range(9):
        add("train2014", (25, 30)[k % 2], f"how many {k}?", "two" if k == 0 else "2", _answers(("2", 2), ("two", 8)))
    for k in range(10):
        add("train2014", (9, 25, 30)[k % 3], f"is it {k}?", "yes", _answers(("yes", 4), ("no", 6)))
    for k in range(8):
        add("train2014", 77, f"what color {k}?", "blue", _answers(("blue", 10)))
    add("train2014", 9, "not annotated?")  # a question the annotations leave out
    for iid in (42, 43, 44):
        images[iid] = _jpeg(str(root / "val2014" / f"COCO_val2014_{iid:012d}.jpg"))
        add("val2014", iid, f"val {iid}?", "yes", _answers(("yes", 1), ("nope", 9)))
    add("val2014", 46, "missing?", "yes", _answers(("yes", 10)))  # its image is not on disk
    for iid in (5, 6):
        images[iid] = _jpeg(str(root / "test2015" / f"COCO_test2015_{iid:012d}.jpg"))
        add("test2015", iid, f"test {iid}?")
    add("test-dev2015", 6, "test-dev 6?")
    (root / "annotations").mkdir()
    for year, qs in questions.items():
        (root / "annotations" / f"v2_OpenEnded_mscoco_{year}_questions.json").write_text(
            json.dumps({"questions": qs, "data_subtype": year}))
    for year, anns in annotations.items():
        (root / f"v2_mscoco_{year}_annotations.json").write_text(json.dumps({"annotations": anns}))
    return root, images, questions


def _table(path):
    return read_arrow(str(path)).to_pylist()


def test_vqa_files_classes_and_read_back(vqa_raw, tmp_path, tok):
    raw, images, questions = vqa_raw
    out = tmp_path / "arrows"
    summary = prepare_vqa(str(raw), str(out), rest_val_images=1)
    names = ["vqav2_train", "vqav2_val", "vqav2_trainable_val", "vqav2_rest_val", "vqav2_test"]
    assert [os.path.basename(p) for p in summary.files] == [f"{n}.arrow" for n in names]
    assert list(summary.files.values()) == [3, 3, 2, 1, 2] and list(summary.samples.values()) == [19, 3, 2, 1, 2]
    assert summary.missing_images == 1 and summary.skipped_rows == 1
    assert summary.dropped == {"VQAv2 train questions with no answer among the classes (as official)": 8,
                               "VQAv2 train questions without an annotation": 1,
                               "VQAv2 val questions of images that are missing or unreadable": 1}
    assert "answer vocabulary: 2 answers" in summary.report() and "checkpoint's classifier does not fit" in \
        summary.report()
    for name in names:
        assert read_arrow(str(out / f"{name}.arrow")).schema.equals(VQA_SCHEMA)

    train = _table(out / "vqav2_train.arrow")
    assert sorted(r["image_id"] for r in train) == [9, 25, 30]  # 77 had only "blue" questions: left out
    by_text = {q: (r, k) for r in train for k, q in enumerate(r["questions"])}
    row, k = by_text["is it 0?"]
    assert row["image"] == images[9] and row["split"] == "train"
    assert (row["answers"][k], row["answer_labels"][k], row["answer_scores"][k]) == (["yes"], [1], [1.0])
    row, k = by_text["how many 0?"]  # class 0 is "2" (first seen, as "two"); only the two raw "2" answers count
    assert (row["answers"][k], row["answer_labels"][k], row["answer_scores"][k]) == (["2"], [0], [0.6])
    ids = {q["question"]: q["question_id"] for q in questions["train2014"]}
    assert all(row["question_id"][k] == ids[q] for q, (row, k) in by_text.items())
    # questions of an image keep the questions file's order
    assert by_text["is it 0?"][0]["questions"][:2] == ["is it 0?", "is it 3?"]

    val = _table(out / "vqav2_val.arrow")
    assert _table(out / "vqav2_trainable_val.arrow") + _table(out / "vqav2_rest_val.arrow") == val
    assert sorted(r["image_id"] for r in val) == [42, 43, 44]
    assert all(r["answer_scores"] == [[0.3]] and r["split"] == "val" for r in val)
    test = _table(out / "vqav2_test.arrow")
    assert sorted((r["image_id"], r["questions"], r["answers"], r["answer_labels"]) for r in test) == [
        (5, ["test 5?"], [], []), (6, ["test 6?"], [], [])]

    ds = make_dataset("vqa", str(out), "train", image_size=16, max_text_len=12, tokenizer=tok)
    assert len(ds) == 19 + 2  # vqav2_train + vqav2_trainable_val
    item = next(ds[i] for i in range(len(ds)) if ds[i]["text"] == "how many 1?")
    assert item["vqa_labels"] == [0] and item["vqa_scores"] == [0.6] and item["qid"] == ids["how many 1?"]
    assert len(make_dataset("vqa", str(out), "val", image_size=16, max_text_len=12, tokenizer=tok)) == 1
    assert len(make_dataset("vqa", str(out), "test", image_size=16, max_text_len=12, tokenizer=tok)) == 2
    assert build_id2answer([read_arrow(str(out / f"{n}.arrow")) for n in names[:2]]) == {0: "2", 1: "yes"}


def test_vqa_order_is_seeded_and_splits_are_chosen(vqa_raw, tmp_path):
    raw, _, _ = vqa_raw
    ids = {}
    for seed in (0, 0, 1, 2, 3):
        out = tmp_path / f"s{seed}"
        prepare_vqa(str(raw), str(out), splits=["val"], seed=seed)
        assert sorted(os.listdir(out)) == ["vqav2_rest_val.arrow", "vqav2_trainable_val.arrow", "vqav2_val.arrow"]
        assert _table(out / "vqav2_trainable_val.arrow") == []  # fewer than 1000 images: all in rest_val
        ids.setdefault(seed, []).append([r["image_id"] for r in _table(out / "vqav2_val.arrow")])
    assert ids[0][0] == ids[0][1] and sorted(ids[0][0]) == [42, 43, 44]
    assert len({tuple(v[0]) for v in ids.values()}) > 1  # the seed changes the order
    out = tmp_path / "dev"
    summary = prepare_vqa(str(raw), str(out), splits="test,test-dev")
    assert sorted(os.listdir(out)) == ["vqav2_test-dev.arrow", "vqav2_test.arrow"]
    assert "answer vocabulary" not in summary.report()  # test splits need no annotations
    assert [(r["image_id"], r["questions"]) for r in _table(out / "vqav2_test-dev.arrow")] == [(6, ["test-dev 6?"])]


def test_vqa_input_errors(vqa_raw, tmp_path):
    raw, _, _ = vqa_raw
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="raw VQAv2 folder"):
        prepare_vqa(str(tmp_path / "nope"), out)
    with pytest.raises(ValueError, match=r"vqa splits must be a non-empty subset of \['train', 'val', 'test', "):
        prepare_vqa(str(raw), out, splits=["testdev"])
    with pytest.raises(ValueError, match="rest_val_images must be an int >= 1"):
        prepare_vqa(str(raw), out, rest_val_images=0)
    afile = raw / "v2_mscoco_train2014_annotations.json"
    good = afile.read_text()
    bad = json.loads(good)
    del bad["annotations"][3]["answers"]
    afile.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"annotations\[3\] must have 'answers', a list of objects with a string"):
        prepare_vqa(str(raw), out, splits=["val"])
    afile.write_text(good[:-5])
    with pytest.raises(ValueError, match="v2_mscoco_train2014_annotations.json: not valid JSON"):
        prepare_vqa(str(raw), out, splits=["val"])
    afile.write_text(good)
    os.unlink(raw / "v2_mscoco_val2014_annotations.json")
    with pytest.raises(FileNotFoundError, match="VQAv2 val annotations v2_mscoco_val2014_annotations.json .the "
                                                "answer vocabulary is counted over train and val"):
        prepare_vqa(str(raw), out, splits=["train"])
    qfile = raw / "annotations" / "v2_OpenEnded_mscoco_test2015_questions.json"
    qfile.write_text(json.dumps({"questions": [{"image_id": "5", "question": "?", "question_id": 1}]}))
    with pytest.raises(ValueError, match=r"questions\[0\] must be an object with image_id \(int\), question_id "):
        prepare_vqa(str(raw), out, splits=["test"])
    qfile.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object with a 'questions' list"):
        prepare_vqa(str(raw), out, splits=["test"])
    assert not os.path.exists(out) or os.listdir(out) == []


def test_cli_prepare_vqa(vqa_raw, tmp_path, capsys):
    raw, _, _ = vqa_raw
    out = tmp_path / "arrows"
    assert cli.main(["prepare", "vqa", str(raw), str(out), "--splits", "train,test", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert "vqa: wrote 2 file(s)" in captured.out and "vqav2_train.arrow: 3 rows, 19 samples" in captured.out
    assert "dropped 8: VQAv2 train questions with no answer among the classes" in captured.out
    with pytest.raises(SystemExit) as info:
        cli.main(["prepare", "vqa", str(tmp_path / "nope"), str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.splitlines() == [
        f"vlmo-fast prepare: error: expected the raw VQAv2 folder (RAW_ROOT) at {tmp_path / 'nope'} (not a directory)"]


def test_prepared_vqa_fine_tunes_and_writes_a_submission(vqa_raw, tmp_path):
    """From the raw release to a test submission through the commands only: prepare, two fine-tuning steps (which
    validate on rest_val), evaluate the test split."""
    from vlmo_fast.train.finetune import evaluate_main, finetune_main

    raw, _, questions = vqa_raw
    out = str(tmp_path / "arrows")
    assert cli.main(["prepare", "vqa", str(raw), out]) == 0
    run = tmp_path / "run"
    assert finetune_main(["vqa", "--out-dir", str(run), "--data-root", out, "--arch", "vlmo_tiny_patch16",
                          "--per-device-batch-size", "4", "--batch-size", "4", "--max-steps", "2", "--num-workers",
                          "0", "--tensorboard", "false", "--image-size", "32"]) == 0
    assert 0.0 <= json.loads((run / "summary.json").read_text())["metrics"]["val/vqa_score"] <= 1.0
    sub = tmp_path / "submission.json"
    evaluate_main(["vqa", "--load-path", str(run / "checkpoints" / "step_00000002.pt"), "--data-root", out,
                   "--split", "test", "--out", str(sub), "--device", "cpu", "--num-workers", "0"])
    rows = json.loads(sub.read_text())
    assert sorted(r["question_id"] for r in rows) == sorted(q["question_id"] for q in questions["test2015"])
    assert {r["answer"] for r in rows} <= {"2", "yes", "unknown"}
