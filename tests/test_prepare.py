"""Raw datasets -> official arrow files (vlmo_fast.data.prepare): tiny fake COCO/F30K/NLVR2/web-caption layouts are
written, read back through the arrow datasets, and compared with the files on disk (bytes, captions, answers, ids,
split routing, grouping); missing images are skipped and counted; missing or malformed inputs raise clear errors;
the `vlmo-fast prepare` command writes the files and ends configuration errors in one line with exit status 2."""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, UnidentifiedImageError

from vlmo_fast import cli
from vlmo_fast.data import build_dataset, make_dataset, read_arrow, write_arrow_batches
from vlmo_fast.data import prepare as prep
from vlmo_fast.data.prepare import prepare_captions, prepare_coco, prepare_f30k, prepare_nlvr2, read_pairs

SIZE = 16


def _image(path, fmt="PNG"):
    """A small random image file; returns its bytes as stored on disk."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.randint(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    with open(path, "rb") as f:
        return f.read()


def _karpathy_entry(filename, split, captions, filepath=None):
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


@pytest.fixture
def coco_raw(tmp_path):
    """train2014/ + val2014/ + karpathy/dataset_coco.json: one image per Karpathy split, two test images, and a val
    image that is not on disk."""
    root = tmp_path / "coco"
    files = {}
    specs = [("train2014", "COCO_train2014_000000000009.jpg", "train", ["a cat on a mat", "a cat sleeping"]),
             ("val2014", "COCO_val2014_000000000042.jpg", "restval", ["a dog runs", "a dog in a park", "grass"]),
             ("val2014", "COCO_val2014_000000000073.jpg", "val", ["a red bus"]),
             ("val2014", "COCO_val2014_000000000074.jpg", "test", ["two birds", "birds on a wire"]),
             ("val2014", "COCO_val2014_000000000133.jpg", "test", ["a boat at sea"])]
    entries = []
    for folder, name, split, caps in specs:
        files[name] = _image(str(root / folder / name), "JPEG")
        entries.append(_karpathy_entry(name, split, caps, folder))
    entries.append(_karpathy_entry("COCO_val2014_000000000999.jpg", "val", ["not on disk"], "val2014"))
    (root / "karpathy").mkdir()
    (root / "karpathy" / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return root, files, specs


def _column(path, name):
    return read_arrow(str(path)).column(name).to_pylist()


def test_coco_files_route_splits_and_read_back(coco_raw, tmp_path, tok):
    raw, files, specs = coco_raw
    out = tmp_path / "arrows"
    summary = prepare_coco(str(raw), str(out))
    stems = [f"coco_caption_karpathy_{s}" for s in ("train", "restval", "val", "test")]
    assert [os.path.basename(p) for p in summary.files] == [f"{s}.arrow" for s in stems]
    assert list(summary.files.values()) == [1, 1, 1, 2] and summary.rows == 5
    assert list(summary.samples.values()) == [2, 3, 1, 3]
    assert summary.missing_images == 1 and summary.unreadable_images == 0 and summary.skipped_rows == 1
    assert summary.examples == [str(raw / "val2014" / "COCO_val2014_000000000999.jpg")]
    assert "1 image(s) missing" in summary.report()
    # columns as official: the bytes on disk, all captions of the image, image_id = file name, the Karpathy split
    for folder, name, split, caps in specs:
        path = out / f"coco_caption_karpathy_{split}.arrow"
        row = _column(path, "image_id").index(name)
        assert _column(path, "image")[row] == files[name]
        assert _column(path, "caption")[row] == caps and _column(path, "split")[row] == split
    assert read_arrow(str(out / "coco_caption_karpathy_test.arrow")).schema.field("caption").type == \
        pa.list_(pa.string())
    # restval is read in train; one sample per caption
    train = make_dataset("coco", str(out), "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert len(train) == 5 and train.num_rows() == 2
    assert [train.all_texts[r] for r in range(2)] == [specs[0][3], specs[1][3]]
    assert train[4]["text"] == "grass" and train[4]["image"].shape == (3, SIZE, SIZE)
    test = build_dataset(str(out), ["coco"], "test", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert len(test) == 3 and test[2]["text"] == "a boat at sea" and test[2]["img_index"] == 1
    images = make_dataset("coco", str(out), "test", image_size=SIZE, image_only=True)
    assert len(images) == 2
    val = make_dataset("coco", str(out), "val", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert len(val) == 1 and val.cell("image_id", 0) == "COCO_val2014_000000000073.jpg"  # the missing one left out


def test_coco_splits_subset_and_explicit_json(coco_raw, tmp_path):
    raw, files, _ = coco_raw
    moved = tmp_path / "elsewhere.json"
    os.replace(raw / "karpathy" / "dataset_coco.json", moved)
    out = tmp_path / "arrows"
    summary = prepare_coco(str(raw), str(out), karpathy_json=str(moved), splits=["test"])
    assert sorted(os.listdir(out)) == ["coco_caption_karpathy_test.arrow"] and summary.rows == 2
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        prepare_coco(str(raw), str(out))  # neither RAW_ROOT/ nor RAW_ROOT/karpathy/ has it now
    with pytest.raises(ValueError, match="non-empty subset"):
        prepare_coco(str(raw), str(out), karpathy_json=str(moved), splits=["testing"])


def test_coco_input_errors_name_the_path(coco_raw, tmp_path):
    raw, _, _ = coco_raw
    out = tmp_path / "arrows"
    with pytest.raises(FileNotFoundError, match=f"raw coco folder.*{tmp_path / 'nope'}"):
        prepare_coco(str(tmp_path / "nope"), str(out))
    os.rename(raw / "train2014", raw / "train2014_old")
    with pytest.raises(FileNotFoundError, match=f"image folder 'train2014'.*{raw / 'train2014'}"):
        prepare_coco(str(raw), str(out))
    assert not out.exists()  # nothing written before the inputs were checked
    prepare_coco(str(raw), str(out), splits="val,test")  # train2014 is not needed for these
    assert sorted(os.listdir(out)) == ["coco_caption_karpathy_test.arrow", "coco_caption_karpathy_val.arrow"]
    bad = raw / "karpathy" / "dataset_coco.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        prepare_coco(str(raw), str(out))
    bad.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "val", "sentences": []}]}))
    with pytest.raises(ValueError, match=r"images\[0\].*filepath"):
        prepare_coco(str(raw), str(out))
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="'images' list"):
        prepare_coco(str(raw), str(out))
    bad.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="not an annotation file \\(JSON nested too deeply"):
        prepare_coco(str(raw), str(out))


@pytest.mark.parametrize("field, value", [("filename", "../../secret.jpg"), ("filename", "/etc/hostname"),
                                          ("filepath", "/etc"), ("filepath", "val2014/../.."),
                                          ("filename", "..\\..\\secret.jpg")])
def test_annotation_names_outside_raw_root_are_refused(coco_raw, tmp_path, field, value):
    """A hostile (or broken) annotation file naming files outside RAW_ROOT must not have prepare copy them (a private
    key, /etc/...) into arrow files that people publish."""
    raw, _, _ = coco_raw
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"private")
    bad = raw / "karpathy" / "dataset_coco.json"
    entries = json.loads(bad.read_text())["images"]
    entries[2][field] = value
    bad.write_text(json.dumps({"images": entries}))
    out = tmp_path / "arrows"
    with pytest.raises(ValueError, match=rf"images\[2\] {field} .* is not a relative name inside RAW_ROOT"):
        prepare_coco(str(raw), str(out))
    assert not out.exists()


def test_nlvr2_names_outside_the_image_folder_are_refused(nlvr2_raw, tmp_path):
    raw, _ = nlvr2_raw
    train = raw / "nlvr2" / "data" / "train.json"
    for rec, match in (({"identifier": "train-10-0-0", "sentence": "s", "label": "True", "directory": "../../x"},
                        "directory '../../x' is not a folder name inside images/train"),
                       ({"identifier": "../../x/train-10-0-0", "sentence": "s", "label": "True", "directory": 3},
                        "identifier .* is not of the form")):
        _jsonl(str(train), [rec])
        with pytest.raises(ValueError, match=rf"train.json:1: {match}"):
            prepare_nlvr2(str(raw), str(tmp_path / "arrows"), splits=["train"])


def test_f30k_drops_other_splits_as_official(tmp_path, tok):
    raw = tmp_path / "f30k"
    files = {}
    entries = []
    for i, split in enumerate(["train", "train", "val", "test", "restval"]):
        name = f"{1000 + i}.jpg"
        files[name] = _image(str(raw / "flickr30k-images" / name), "JPEG")
        entries.append(_karpathy_entry(name, split, [f"caption {i} a", f"caption {i} b"]))
    (raw / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))  # directly in RAW_ROOT
    out = tmp_path / "arrows"
    summary = prepare_f30k(str(raw), str(out))
    assert sorted(os.listdir(out)) == [f"f30k_caption_karpathy_{s}.arrow" for s in ("test", "train", "val")]
    assert list(summary.files.values()) == [2, 1, 1] and summary.missing_images == 0
    assert sum(summary.dropped.values()) == 1 and "restval" in next(iter(summary.dropped))
    train = make_dataset("f30k", str(out), "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert len(train) == 4 and train.all_texts == [["caption 0 a", "caption 0 b"], ["caption 1 a", "caption 1 b"]]
    assert train.cell("image", 1) == files["1001.jpg"] and train.cell("image_id", 1) == "1001.jpg"
    assert train.cell("split", 0) == "train"
    with pytest.raises(FileNotFoundError, match="flickr30k-images"):
        os.rename(raw / "flickr30k-images", raw / "images")
        prepare_f30k(str(raw), str(out))


# ---- NLVR2 -------------------------------------------------------------------------------------------------------


def _jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture
def nlvr2_raw(tmp_path):
    """The official layout: nlvr2/data/*.json, images/train/<directory>/, dev/, test1/. The dev pair dev-1-0 has no
    img1 on disk."""
    root = tmp_path / "nlvr2raw"
    images = {}
    train = [{"identifier": "train-10-0-0", "sentence": "one dog", "label": "True", "directory": 3},
             {"identifier": "train-11-2-0", "sentence": "two cats", "label": "False", "directory": 5},
             {"identifier": "train-10-0-1", "sentence": "one dog again", "label": "False", "directory": 3}]
    dev = [{"identifier": "dev-0-0-0", "sentence": "a bird", "label": "True"},
           {"identifier": "dev-1-0-0", "sentence": "lost", "label": "True"},
           {"identifier": "dev-0-0-1", "sentence": "no bird", "label": "False"}]
    test1 = [{"identifier": "test1-5-1-0", "sentence": "a fox", "label": "False"}]
    for split, recs in (("train", train), ("dev", dev), ("test1", test1)):
        _jsonl(str(root / "nlvr2" / "data" / f"{split}.json"), recs)
    for pair, folder in (("train-10-0", "images/train/3"), ("train-11-2", "images/train/5"), ("dev-0-0", "dev"),
                         ("test1-5-1", "test1")):
        for k in (0, 1):
            images[f"{pair}-img{k}"] = _image(str(root / folder / f"{pair}-img{k}.png"))
    _image(str(root / "dev" / "dev-1-0-img0.png"))
    return root, images


def test_nlvr2_groups_sentences_per_pair_and_reads_back(nlvr2_raw, tmp_path, tok):
    raw, images = nlvr2_raw
    out = tmp_path / "arrows"
    summary = prepare_nlvr2(str(raw), str(out))
    assert [os.path.basename(p) for p in summary.files] == ["nlvr2_train.arrow", "nlvr2_dev.arrow",
                                                            "nlvr2_test1.arrow"]
    assert list(summary.files.values()) == [2, 1, 1] and list(summary.samples.values()) == [3, 2, 1]
    assert summary.missing_images == 1 and summary.skipped_rows == 1 and sum(summary.dropped.values()) == 1
    assert summary.examples == [str(raw / "dev" / "dev-1-0-img1.png")]
    table = read_arrow(str(out / "nlvr2_train.arrow"))
    assert table.column_names == ["image_0", "image_1", "questions", "answers", "identifier"]
    assert table.column("identifier").to_pylist() == ["train-10-0", "train-11-2"]
    assert table.column("questions").to_pylist() == [["one dog", "one dog again"], ["two cats"]]
    assert table.column("answers").to_pylist() == [["True", "False"], ["False"]]
    assert table.column("image_0").to_pylist() == [images["train-10-0-img0"], images["train-11-2-img0"]]
    assert table.column("image_1").to_pylist() == [images["train-10-0-img1"], images["train-11-2-img1"]]
    train = make_dataset("nlvr2", str(out), "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert len(train) == 3 and [train[j]["answers"] for j in range(3)] == [1, 0, 0]
    assert train[1]["text"] == "one dog again" and train[1]["image_1"].shape == (3, SIZE, SIZE)
    val = build_dataset(str(out), ["nlvr2"], "val", image_size=SIZE, max_text_len=12, tokenizer=tok)
    items = [val[j] for j in range(len(val))]
    assert [(i["text"], i["answers"], i["table_name"]) for i in items] == [
        ("a bird", 1, "nlvr2_dev"), ("no bird", 0, "nlvr2_dev"), ("a fox", 0, "nlvr2_test1")]
    assert val.cell("image_1", 1) == images["test1-5-1-img1"] and val.cell("identifier", 1) == "test1-5-1"


def test_nlvr2_alternative_layout_and_errors(tmp_path):
    raw = tmp_path / "flat"
    _jsonl(str(raw / "dev.json"), [{"identifier": "dev-3-1-0", "sentence": "s", "label": True}])
    for k in (0, 1):
        _image(str(raw / "images" / "dev" / f"dev-3-1-img{k}.png"))
    out = tmp_path / "arrows"
    summary = prepare_nlvr2(str(raw), str(out), splits=["dev"])  # JSON in RAW_ROOT, images under images/dev
    assert summary.rows == 1 and _column(out / "nlvr2_dev.arrow", "answers") == [["True"]]
    with pytest.raises(FileNotFoundError, match="test1.json"):
        prepare_nlvr2(str(raw), str(out), splits=["dev", "test1"])
    with pytest.raises(FileNotFoundError, match="NLVR2 train images.*images/train"):
        _jsonl(str(raw / "train.json"), [{"identifier": "train-1-0-0", "sentence": "s", "label": "True",
                                          "directory": 0}])
        prepare_nlvr2(str(raw), str(out), splits=["train"])
    os.makedirs(raw / "images" / "train")
    _jsonl(str(raw / "train.json"), [{"identifier": "train-1-0-0", "sentence": "s", "label": "True"}])
    with pytest.raises(ValueError, match=r"train.json:1: .*directory"):
        prepare_nlvr2(str(raw), str(out), splits=["train"])
    _jsonl(str(raw / "dev.json"), [{"identifier": "dev-3-1-0", "sentence": "s", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"dev.json:1: label must be 'True' or 'False'"):
        prepare_nlvr2(str(raw), str(out), splits=["dev"])
    with pytest.raises(ValueError, match="subset"):
        prepare_nlvr2(str(raw), str(out), splits=["test2"])


# ---- web caption data --------------------------------------------------------------------------------------------


@pytest.fixture
def web_raw(tmp_path):
    """Images for web caption data: a/0.jpg has two captions, b/1.png one, c/2.jpg is not an image, 3.jpg is
    missing."""
    root = tmp_path / "web"
    files = {"a/0.jpg": _image(str(root / "a" / "0.jpg"), "JPEG"), "b/1.png": _image(str(root / "b" / "1.png"))}
    os.makedirs(root / "c")
    (root / "c" / "2.jpg").write_bytes(b"<html>404</html>")
    pairs = [("a/0.jpg", "a red car"), ("b/1.png", "a blue sky"), ("c/2.jpg", "broken"), ("3.jpg", "missing"),
             ("a/0.jpg", "a car parked")]
    return root, files, pairs


def test_captions_group_per_image_skip_bad_images_and_fill_the_official_files(web_raw, tmp_path, tok):
    raw, files, pairs = web_raw
    out = tmp_path / "arrows"
    summary = prepare_captions(pairs, str(out), "sbu", image_root=str(raw))
    assert [os.path.basename(p) for p in summary.files] == [f"sbu_{i}.arrow" for i in range(9)]  # official count
    assert summary.rows == 2 and sum(summary.samples.values()) == 3
    assert summary.missing_images == 1 and summary.unreadable_images == 1 and summary.skipped_rows == 2
    ds = make_dataset("sbu", str(out), "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert len(ds) == 3 and ds.all_texts == [["a red car", "a car parked"], ["a blue sky"]]
    assert [ds.cell("image", r) for r in range(2)] == [files["a/0.jpg"], files["b/1.png"]]
    assert [ds.cell("image_id", r) for r in range(2)] == ["0.jpg", "1.png"] and ds.cell("split", 0) == "train"
    assert ds[1]["text"] == "a car parked" and ds[1]["replica"] is True
    # without verification the HTML file is stored (a reader counts it as a bad sample later)
    unverified = prepare_captions(pairs, str(tmp_path / "unverified"), "sbu", image_root=str(raw), verify=False)
    assert unverified.rows == 3 and unverified.unreadable_images == 0 and unverified.missing_images == 1


def test_no_image_found_is_an_error_not_empty_files(web_raw, tmp_path):
    """A caption list with its columns the other way round (Google's GCC TSV: caption, URL) finds no image: an error
    naming the cause, and no empty official files left behind."""
    raw, _, pairs = web_raw
    tsv = raw / "gcc.tsv"
    tsv.write_text("".join(f"{caption}\t{path}\n" for path, caption in pairs))
    out = tmp_path / "arrows"
    with pytest.raises(FileNotFoundError, match="none of the images"):
        prepare_captions(str(tsv), str(out), "gcc", image_root=str(raw))
    assert os.listdir(out) == []  # no empty official files, no staging folder left
    # a good run's files survive a later run that finds nothing: the empty files never replace them
    good = prepare_captions(pairs, str(out), "gcc", image_root=str(raw))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert good.rows == 2 and len(before) == 30
    with pytest.raises(FileNotFoundError, match="none of the images"):
        prepare_captions(str(tsv), str(out), "gcc", image_root=str(raw))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_captions_shard_rows_and_gcc_val(web_raw, tmp_path, tok):
    raw, files, pairs = web_raw
    out = tmp_path / "arrows"
    summary = prepare_captions(pairs, str(out), "gcc", "train", shard_rows=1, image_root=str(raw))
    # 3 image paths on disk (the missing one is left out before the rows are spread), 1 row each
    names = [f"conceptual_caption_train_{i}" for i in range(3)]
    assert [os.path.basename(p) for p in summary.files] == [f"{n}.arrow" for n in names]
    assert list(summary.files.values()) == [1, 1, 0] and "training reads the ones there" in summary.notes[0]
    ds = make_dataset("gcc", str(out), "train", image_size=SIZE, max_text_len=12, tokenizer=tok, names=names)
    assert len(ds) == 3 and ds.table_index.tolist() == [0, 1]
    # without names: the official list, as far as its shards are there, with a warning naming the missing ones
    with pytest.warns(UserWarning, match=r"gcc train: reading the 3 of its 30 official files .* missing: "
                                         r"conceptual_caption_train_3, conceptual_caption_train_4, "
                                         r"conceptual_caption_train_5, \.\.\."):
        ds = make_dataset("gcc", str(out), "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert ds.names == names and len(ds) == 3
    for stem in names:  # none there: the error names the first missing file
        os.remove(out / f"{stem}.arrow")
    with pytest.raises(FileNotFoundError, match="conceptual_caption_train_0.arrow"):
        make_dataset("gcc", str(out), "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    many = tmp_path / "many"  # 10 images at 1 row a file: more files than sbu's official 9
    many.mkdir()
    for i in range(10):
        shutil.copy(raw / pairs[0][0], many / f"{i}.jpg")
    summary = prepare_captions([(f"{i}.jpg", "a caption") for i in range(10)], str(out), "sbu", "train", shard_rows=1,
                               image_root=str(many))
    assert len(summary.files) == 10 and "the official 9 only" in summary.notes[0]
    val = prepare_captions(pairs[:2], str(out), "gcc", "val", image_root=str(raw))
    assert [os.path.basename(p) for p in val.files] == ["conceptual_caption_val_0.arrow"] and val.rows == 2
    test = make_dataset("gcc", str(out), "test", image_size=SIZE, max_text_len=12, tokenizer=tok)  # test = val
    assert len(test) == 2 and test.cell("split", 0) == "val"


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl", ".json"])
def test_caption_list_files(web_raw, tmp_path, suffix, tok):
    raw, files, pairs = web_raw
    listing = raw / f"pairs{suffix}"  # relative paths are read from the list's folder by default
    if suffix == ".tsv":
        listing.write_text("image\tcaption\n" + "".join(f"{p}\t{c}\n" for p, c in pairs))
    elif suffix == ".jsonl":
        listing.write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in pairs))
    else:
        listing.write_text(json.dumps([[p, c] for p, c in pairs]))
    assert list(read_pairs(str(listing))) == pairs
    out = tmp_path / "arrows"
    summary = prepare_captions(str(listing), str(out), "mine")
    assert [os.path.basename(p) for p in summary.files] == ["mine_train_0.arrow"] and summary.rows == 2
    ds = make_dataset("gcc", str(out), "train", image_size=SIZE, max_text_len=12, tokenizer=tok,
                      names=["mine_train_0"])
    assert len(ds) == 3 and ds.cell("image", 1) == files["b/1.png"]


def test_caption_input_errors(web_raw, tmp_path):
    raw, _, pairs = web_raw
    out = str(tmp_path / "arrows")
    with pytest.raises(ValueError, match="not web caption data"):
        prepare_captions(pairs, out, "vqa")
    with pytest.raises(ValueError, match=r"sbu has official files for split\(s\) \['train'\]"):
        prepare_captions(pairs, out, "sbu", "val")
    with pytest.raises(ValueError, match="pair 1 must be"):
        prepare_captions([("a/0.jpg", "x"), ("b/1.png",)], out, "sbu", image_root=str(raw))
    with pytest.raises(FileNotFoundError, match="caption list not found"):
        prepare_captions(str(raw / "none.tsv"), out, "gcc")
    (raw / "bad.tsv").write_text("a/0.jpg no tab here\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: expected '<image path><TAB><caption>'"):
        list(read_pairs(str(raw / "bad.tsv")))
    # prepare skips and counts a malformed line; with nothing else in the list nothing is written, and it says why
    with pytest.raises(ValueError, match=r"no \(image, caption\) pair to write \(dropped 1 malformed caption-list "
                                         r"lines; .*bad.tsv:1: expected '<image path><TAB><caption>'\)"):
        prepare_captions(str(raw / "bad.tsv"), out, "gcc")
    with pytest.raises(FileNotFoundError, match="image folder"):
        prepare_captions(pairs, out, "gcc", image_root=str(raw / "nope"))
    assert not os.path.exists(out)


def test_caption_lists_skip_and_count_malformed_lines(web_raw, tmp_path, tok):
    """A 3M-line crawl list has a few bad lines: a carriage return inside a caption, bytes that are not UTF-8, a
    line without a TAB, a null caption. Each bad line is skipped, counted and named in the report (the run went on
    to write nothing before: one line aborted it, and the error named no line for bad UTF-8)."""
    raw, _, _ = web_raw
    tsv = raw / "crawl.tsv"
    tsv.write_bytes("\ufeffimage\tcaption\r\n".encode() + b"a/0.jpg\ta red\rcar\r\n" + b"b/1.png\tcaf\xe9 bad\n"
                    + b"no tab\n" + b"b/1.png\ta blue sky\n")
    with pytest.raises(ValueError, match=r"crawl.tsv:3: not UTF-8"):
        list(read_pairs(str(tsv)))
    seen = []
    assert list(read_pairs(str(tsv), lambda where, why: seen.append(where))) == [
        ("a/0.jpg", "a red\rcar"), ("b/1.png", "a blue sky")]
    assert seen == [f"{tsv}:3", f"{tsv}:4"]
    summary = prepare_captions(str(tsv), str(tmp_path / "t"), "mine")
    assert summary.rows == 2 and summary.dropped == {"malformed caption-list lines": 2}
    assert summary.notes[0].startswith(f"skipped {tsv}:3: not UTF-8") and "2 malformed" not in summary.report()
    assert "dropped 2: malformed caption-list lines" in summary.report()
    ds = make_dataset("gcc", str(tmp_path / "t"), "train", image_size=SIZE, max_text_len=12, tokenizer=tok,
                      names=["mine_train_0"])
    assert ds.all_texts == [["a red\rcar"], ["a blue sky"]]
    jsonl = raw / "crawl.jsonl"
    jsonl.write_text("\n".join([json.dumps({"image": "a/0.jpg", "caption": ["a red car", None]}),
                                json.dumps({"image": "b/1.png", "caption": []}), "{not json",
                                json.dumps({"image": "b/1.png", "caption": ["a blue sky"]})]) + "\n")
    summary = prepare_captions(str(jsonl), str(tmp_path / "j"), "mine")
    assert summary.rows == 1 and summary.dropped == {"malformed caption-list lines": 2, "empty captions": 1}
    # no image found: the error quotes the malformed lines, not the report's other notes
    lost = raw / "lost.tsv"
    lost.write_text("gone.jpg\ta caption\nno tab\n")
    with pytest.raises(FileNotFoundError) as err:
        prepare_captions(str(lost), str(tmp_path / "l"), "mine")
    assert f"1 malformed caption-list lines ({lost}:2: expected '<image path><TAB><caption>'))" in str(err.value)
    assert "make_dataset" not in str(err.value)


def test_verify_decodes_the_image(web_raw, tmp_path):
    """A partly downloaded JPEG has a valid header: PIL's verify() passed it and training then failed on it."""
    raw, files, _ = web_raw
    whole = files["a/0.jpg"]
    (raw / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    pairs = [("a/0.jpg", "whole"), ("cut.jpg", "cut")]
    checked = prepare_captions(pairs, str(tmp_path / "v"), "mine", image_root=str(raw), verify=True)
    assert checked.rows == 1 and checked.unreadable_images == 1 and checked.examples == [str(raw / "cut.jpg")]
    unchecked = prepare_captions(pairs, str(tmp_path / "u"), "mine", image_root=str(raw), verify=False)
    assert unchecked.rows == 2 and unchecked.unreadable_images == 0


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "TGA"])
def test_only_dataset_image_formats_are_decoded(web_raw, tmp_path, fmt):
    """Image bytes are opened as JPEG, PNG, WebP, BMP, GIF, TIFF or PPM only: PIL would hand PostScript (EPS) from a
    downloaded file to Ghostscript, and open other formats no dataset uses."""
    from vlmo_fast.data.sample import decode_image

    raw, files, _ = web_raw
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format=fmt)
    (raw / "odd.img").write_bytes(buf.getvalue())
    with pytest.raises(UnidentifiedImageError, match=r"not an image of a format read here \(JPEG, PNG, WEBP"):
        decode_image(buf.getvalue())
    checked = prepare_captions([("a/0.jpg", "whole"), ("odd.img", fmt)], str(tmp_path / "v"), "mine",
                               image_root=str(raw), verify=True)
    assert checked.rows == 1 and checked.unreadable_images == 1
    for other in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format=other)
        assert decode_image(buf.getvalue()).size == (8, 8), other


# ---- the streaming writer ----------------------------------------------------------------------------------------


def test_files_are_written_in_batches_and_atomically(coco_raw, tmp_path, monkeypatch):
    raw, _, _ = coco_raw
    out = tmp_path / "arrows"
    monkeypatch.setattr(prep, "BATCH_ROWS", 1)
    prepare_coco(str(raw), str(out), splits=["test"])
    path = str(out / "coco_caption_karpathy_test.arrow")
    assert pa.ipc.open_file(pa.memory_map(path)).num_record_batches == 2 and len(read_arrow(path)) == 2
    monkeypatch.setattr(prep, "BATCH_ROWS", 10)
    monkeypatch.setattr(prep, "BATCH_BYTES", 1)  # the byte budget also cuts a batch
    prepare_coco(str(raw), str(out), splits=["test"])
    assert pa.ipc.open_file(pa.memory_map(path)).num_record_batches == 2

    schema = pa.schema([("x", pa.int64())])

    def failing():
        yield pa.RecordBatch.from_pydict({"x": [1, 2]}, schema=schema)
        raise OSError("disk full")

    target = str(tmp_path / "t.arrow")
    assert write_arrow_batches(target, schema, [pa.table({"x": [5]}, schema=schema)]) == 1
    with pytest.raises(OSError, match="disk full"):
        write_arrow_batches(target, schema, failing())
    assert read_arrow(target).column("x").to_pylist() == [5]  # the old file is untouched, no temporary left over
    assert sorted(os.listdir(tmp_path)) == sorted(["arrows", "coco", "t.arrow"])


# ---- the command -------------------------------------------------------------------------------------------------


def test_cli_prepare_writes_and_reports(coco_raw, nlvr2_raw, web_raw, tmp_path, capsys):
    raw, _, _ = coco_raw
    out = tmp_path / "arrows"
    assert cli.main(["prepare", "coco", str(raw), str(out), "--splits", "train,restval"]) == 0
    captured = capsys.readouterr()
    assert sorted(os.listdir(out)) == ["coco_caption_karpathy_restval.arrow", "coco_caption_karpathy_train.arrow"]
    assert "coco: wrote 2 file(s)" in captured.out and "coco_caption_karpathy_train.arrow: 1 rows, 2 samples" in \
        captured.out
    nraw, _ = nlvr2_raw
    assert cli.main(["prepare", "nlvr2", str(nraw), str(out), "--splits", "dev"]) == 0
    captured = capsys.readouterr()
    assert "1 image(s) missing" in captured.out and (out / "nlvr2_dev.arrow").is_file()
    wraw, _, pairs = web_raw
    (wraw / "list.tsv").write_text("".join(f"{p}\t{c}\n" for p, c in pairs))
    assert cli.main(["prepare", "captions", str(wraw), str(out), "--pairs", str(wraw / "list.tsv"), "--name", "gcc",
                     "--split", "val"]) == 0
    captured = capsys.readouterr()
    assert "1 unreadable" in captured.out and _column(out / "conceptual_caption_val_0.arrow", "image_id") == [
        "0.jpg", "1.png"]


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_cli_prepare_errors_are_one_line(tmp_path, capsys):
    code, out, err = _exit(["prepare", "coco", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert code == 2 and out == "" and err.splitlines() == [
        f"vlmo-fast prepare: error: expected the raw coco folder (RAW_ROOT) at {tmp_path / 'nope'} (not a directory)"]
    (tmp_path / "raw").mkdir()
    code, _, err = _exit(["prepare", "nlvr2", str(tmp_path / "raw"), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("vlmo-fast prepare: error: expected the "
                                                                      "NLVR2 train annotations train.json")
    code, _, err = _exit(["prepare", "captions", str(tmp_path / "raw"), str(tmp_path / "out"), "--pairs", "x.csv"],
                         capsys)
    assert code == 2 and err.strip() == "vlmo-fast prepare: error: caption list not found: x.csv (expected a .tsv, " \
        ".jsonl or .json file)"
    code, _, err = _exit(["prepare", "vqav2", "a", "b"], capsys)
    assert code == 2 and "invalid choice" in err
    code, out, _ = _exit(["prepare", "--help"], capsys)
    assert code == 0 and "vqav2_{train,val,trainable_val,rest_val,test}.arrow" in out and "coco_caption_karpathy_" \
        in out
    code, out, _ = _exit(["prepare", "nlvr2", "--help"], capsys)
    assert code == 0 and "--splits" in out and "balanced_dev" in out


def test_prepared_files_fine_tune_and_evaluate(coco_raw, nlvr2_raw, tmp_path):
    """From raw files to a fine-tuned checkpoint and its metrics through the commands only: prepare COCO and NLVR2,
    fine-tune retrieval and NLVR2 for two steps on them, evaluate both."""
    from vlmo_fast.train.finetune import evaluate_main, finetune_main

    out = str(tmp_path / "arrows")
    assert cli.main(["prepare", "coco", str(coco_raw[0]), out]) == 0
    assert cli.main(["prepare", "nlvr2", str(nlvr2_raw[0]), out]) == 0
    common = ["--data-root", out, "--arch", "vlmo_tiny_patch16", "--per-device-batch-size", "2", "--batch-size", "2",
              "--max-steps", "2", "--num-workers", "0", "--tensorboard", "false", "--log-every", "1",
              "--image-size", "32"]
    evaluated = {}
    for task in ("irtr", "nlvr2"):
        run = str(tmp_path / task)
        assert finetune_main([task, "--out-dir", run] + common) == 0
        metrics = str(tmp_path / f"{task}.json")
        evaluate_main([task, "--load-path", os.path.join(run, "checkpoints", "step_00000002.pt"), "--data-root", out,
                       "--out", metrics, "--device", "cpu", "--num-workers", "0"]
                      + (["--split", "test"] if task == "irtr" else []))
        evaluated[task] = json.loads(Path(metrics).read_text())
    assert set(evaluated["irtr"]) >= {"tr_r1", "ir_r1", "r_mean"} and 0 <= evaluated["irtr"]["r_mean"] <= 1
    assert set(evaluated["nlvr2"]) >= {"dev_acc", "test_acc"}


def test_captions_as_webdataset_shards_train_from_the_command_line(web_raw, tmp_path, tok):
    """--format shards: tar shards of <shard-rows> images with all their captions (JSON), missing/unreadable images
    skipped, stale shards of an earlier run removed; the WebDataset reader reads them, and a pretraining run takes
    them with --datasets."""
    from vlmo_fast.data import WebDataset
    from vlmo_fast.data.webdataset import shard_counts
    from vlmo_fast.train import main as pretrain_main

    raw, files, pairs = web_raw
    tsv = raw / "pairs.tsv"
    tsv.write_text("".join(f"{path}\t{caption}\n" for path, caption in pairs))
    out = tmp_path / "shards"
    assert cli.main(["prepare", "captions", str(raw), str(out), "--pairs", str(tsv), "--format", "shards",
                     "--name", "web", "--shard-rows", "1"]) == 0
    assert sorted(os.listdir(out)) == ["web-train-000000.tar", "web-train-000001.tar", "web-train.shards.json"]
    # the index moved in with the shards lists them as they are (the readers split its sample counts evenly)
    assert shard_counts([str(out / "web-train-000000.tar"), str(out / "web-train-000001.tar")]) == ([1, 1], None)
    ds = WebDataset(str(out / "*.tar"), image_size=SIZE, max_text_len=12, tokenizer=tok, train=False)
    samples = [s for s in ds if s is not None]
    assert [s["text"] for s in samples] == ["a red car", "a blue sky"]  # eval: the first caption of each image
    import tarfile

    with tarfile.open(out / "web-train-000000.tar") as tar:  # every caption of the image is in its JSON
        (member,) = [m for m in tar.getmembers() if m.name.endswith(".json")]
        assert json.loads(tar.extractfile(member).read()) == {"caption": ["a red car", "a car parked"]}
    # a rerun with larger shards replaces the old ones: no stale shard left for the glob to pick up
    assert cli.main(["prepare", "captions", str(raw), str(out), "--pairs", str(tsv), "--format", "shards",
                     "--name", "web"]) == 0
    assert sorted(os.listdir(out)) == ["web-train-000000.tar", "web-train.shards.json"]
    assert shard_counts([str(out / "web-train-000000.tar")]) == ([2], None)
    assert [e["name"] for e in json.loads((out / "web-train.shards.json").read_text())["shards"]] == \
        ["web-train-000000.tar"]
    summary = prepare_captions(str(tsv), str(tmp_path / "s2"), "web", fmt="shards", image_root=str(raw))
    assert list(summary.files.values()) == [2] and list(summary.samples.values()) == [3]
    assert summary.missing_images == 1 and summary.unreadable_images == 1
    with pytest.raises(ValueError, match="fmt"):
        prepare_captions(str(tsv), str(tmp_path / "s3"), "web", fmt="zip")
    code = pretrain_main(["--datasets", str(out / "web-train-*.tar"), "--out-dir", str(tmp_path / "run"), "--max-steps", "1",
                          "--per-device-batch-size", "2", "--batch-size", "2", "--num-workers", "0",
                          "--tensorboard", "false", "--image-size", "32", "--final-eval", "false"])
    assert code == 0


def test_read_ahead_keeps_the_order(tmp_path, monkeypatch):
    """Files read by the thread pool, several rows ahead of the writer, land in the rows of their annotations, and
    missing ones are counted in annotation order."""
    monkeypatch.setattr(prep, "READ_AHEAD", 3)
    monkeypatch.setattr(prep, "READ_THREADS", 4)
    raw = tmp_path / "raw"
    files, pairs = {}, []
    for i in range(25):
        name = f"{i:03d}.png"
        if i % 7 != 3:  # 3, 10, 17, 24 are missing
            files[name] = _image(str(raw / name))
        pairs.append((name, f"caption {i}"))
    summary = prepare_captions(pairs, str(tmp_path / "out"), "web", image_root=str(raw), verify=False)
    assert summary.missing_images == 4 and summary.examples == [str(raw / f"{i:03d}.png") for i in (3, 10, 17, 24)]
    (path,) = summary.files
    assert _column(path, "image_id") == sorted(files) and _column(path, "image") == [files[n] for n in sorted(files)]
    assert _column(path, "caption") == [[f"caption {int(n[:3])}"] for n in sorted(files)]


def test_visual_genome_regions_per_image(tmp_path, tok):
    """region_descriptions.json + images/VG_100K{,_2}/ -> vg.arrow: one row per image (either folder) with all its
    region phrases and boxes, image_id the id; an image not on disk is skipped and counted; read back as the
    official vg dataset, one sample per phrase."""
    raw = tmp_path / "vg"
    files = {1: _image(str(raw / "images" / "VG_100K" / "1.jpg"), "JPEG"),
             7: _image(str(raw / "images" / "VG_100K_2" / "7.jpg"), "JPEG")}

    def region(iid, phrase, k):
        return {"region_id": 100 * iid + k, "image_id": iid, "phrase": phrase, "width": 10 + k, "height": 20 + k,
                "x": k, "y": 2 * k}

    regions = [{"id": 1, "regions": [region(1, "a tree", 0), region(1, "blue sky", 1)]},
               {"id": 7, "regions": [region(7, "a red door", 0)]},
               {"id": 9, "regions": [region(9, "not on disk", 0)]}]
    (raw / "annotations").mkdir()
    (raw / "annotations" / "region_descriptions.json").write_text(json.dumps(regions))
    out = tmp_path / "arrows"
    assert cli.main(["prepare", "vg", str(raw), str(out)]) == 0
    path = out / "vg.arrow"
    assert _column(path, "image_id") == ["1", "7"] and _column(path, "image") == [files[1], files[7]]
    assert _column(path, "caption") == [["a tree", "blue sky"], ["a red door"]]
    assert _column(path, "width") == [[10, 11], [10]] and _column(path, "y") == [[0, 2], [0]]
    ds = make_dataset("vg", str(out), "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert len(ds) == 3 and ds[2]["text"] == "a red door"
    summary = prep.prepare_vg(str(raw), str(tmp_path / "again"))
    assert summary.missing_images == 1 and summary.rows == 2 and list(summary.samples.values()) == [3]
    with pytest.raises(FileNotFoundError, match="region_descriptions.json"):
        prep.prepare_vg(str(tmp_path / "arrows"), str(tmp_path / "x"))


def test_plain_text_as_the_language_stage_data(tmp_path, tok):
    """*.txt lines -> the 50 official wikibk train files (rows spread in order, empty lines skipped, source = file
    name) that the text-only dataset reads, one sample per line; val -> wikibk_val_0."""
    raw = tmp_path / "text"
    raw.mkdir()
    (raw / "books.txt").write_text("\n".join(f"book sentence {i}" for i in range(60)) + "\n\n")
    (raw / "wiki.txt").write_text("\n".join(f"wiki sentence {i}" for i in range(45)) + "\n")
    out = tmp_path / "arrows"
    assert cli.main(["prepare", "text", str(raw), str(out)]) == 0
    assert sorted(os.listdir(out)) == sorted(f"wikibk_train_{i}.arrow" for i in range(50))
    texts = [c[0] for i in range(50) for c in _column(out / f"wikibk_train_{i}.arrow", "caption")]
    assert texts == [f"book sentence {i}" for i in range(60)] + [f"wiki sentence {i}" for i in range(45)]
    assert set(_column(out / "wikibk_train_0.arrow", "source")) == {"books"}
    assert set(_column(out / "wikibk_train_49.arrow", "source")) == {"wiki"}
    assert _column(out / "wikibk_train_0.arrow", "image") == ["None", "None"]
    ds = make_dataset("wikibk", str(out), "train", max_text_len=12, tokenizer=tok)
    assert len(ds) == 105 and ds[104]["text"] == "wiki sentence 44"
    summary = prep.prepare_text([str(raw / "wiki.txt")], str(tmp_path / "val"), "val")
    assert list(summary.files.values()) == [45] and os.path.basename(next(iter(summary.files))) == "wikibk_val_0.arrow"
    (raw / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no non-empty UTF-8 line"):
        prep.prepare_text([str(raw / "empty.txt")], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="split"):
        prep.prepare_text([str(raw / "wiki.txt")], str(tmp_path / "x"), "test")


def test_text_lines_that_are_not_utf8_are_skipped_and_named(tmp_path):
    """One bad byte in a multi-GB dump skipped and named by file and line, not the end of the run (it ended in a
    UnicodeDecodeError naming neither); a BOM is not part of the first line; CR and CRLF end lines as text mode."""
    raw = tmp_path / "dump.txt"
    raw.write_bytes(b"\xef\xbb\xbffirst line\r\nsecond caf\xe9 line\nthird\rfourth\n")
    out = tmp_path / "arrows"
    summary = prep.prepare_text([str(raw)], str(out), "val")
    assert [c[0] for c in _column(out / "wikibk_val_0.arrow", "caption")] == ["first line", "third", "fourth"]
    assert summary.dropped == {prep.NOT_UTF8: 1}
    assert any(f"{raw}:2: not UTF-8" in note for note in summary.notes), summary.notes


def test_a_rerun_writing_fewer_caption_files_removes_the_earlier_ones(web_raw, tmp_path, tok):
    """make_dataset reads every file of a name and split there: files left by an earlier run that wrote more of them
    were read as well, silently."""
    raw, _, pairs = web_raw
    out = tmp_path / "arrows"
    first = prepare_captions(pairs, str(out), "mine", shard_rows=1, image_root=str(raw))
    assert len(first.files) == 3
    again = prepare_captions(pairs[:2], str(out), "mine", shard_rows=10, image_root=str(raw))
    assert sorted(os.listdir(out)) == ["mine_train_0.arrow"]
    assert "removed mine_train_1.arrow, a file of an earlier run" in again.notes
    gcc = prepare_captions(pairs[:2], str(out), "gcc", shard_rows=1, image_root=str(raw))
    assert len(gcc.files) == 2 and "mine_train_0.arrow" in os.listdir(out)  # another name's files stay


def test_missing_images_are_left_out_before_the_rows_are_spread(web_raw, tmp_path):
    """A partial download (the images there first, in list order): the rows found are spread over the official
    files, not packed into the first ones with the rest empty."""
    raw, _, pairs = web_raw
    listed = [("a/0.jpg", "a red car"), ("b/1.png", "a blue sky")] + [(f"gone/{i}.jpg", "x") for i in range(16)]
    summary = prepare_captions(listed, str(tmp_path / "arrows"), "sbu", image_root=str(raw))
    assert len(summary.files) == 9 and summary.rows == 2 and max(summary.files.values()) == 1
    assert summary.missing_images == 16 and summary.skipped_rows == 16


def test_out_root_that_cannot_be_made_is_one_line(coco_raw, tmp_path, capsys):
    raw, _, _ = coco_raw
    (tmp_path / "afile").write_text("x")
    code, _, err = _exit(["prepare", "coco", str(raw), str(tmp_path / "afile" / "sub")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "error: cannot make OUT_ROOT" in err


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(coco_raw, tmp_path):
    """SIGKILL (or SIGTERM to a library caller) leaves the hidden staging folder, up to a whole dataset: the next
    run into OUT_ROOT removes one whose lock no process holds. A live run's is left alone, even when its name's pid
    means nothing here (another PID namespace, e.g. a container sharing the host's name); one without a lock file
    (an older version's) is named."""
    import subprocess
    import sys

    raw, _, _ = coco_raw
    out = tmp_path / "arrows"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = out / f".prepare-{prep._HOST}-{dead.pid}-abc123"  # a killed run's: its lock went with it
    leftover.mkdir()
    (leftover / prep._LOCK).write_text("")
    (leftover / "coco_caption_karpathy_test.arrow").write_bytes(b"partial")
    live = out / f".prepare-{prep._HOST}-{dead.pid}-live"  # a run still writing, its pid from another namespace
    live.mkdir()
    held, why = prep.try_lock(str(live / prep._LOCK))
    assert held is not None, why
    making = out / f".prepare-new-{prep._HOST}-{dead.pid}-made"  # a run making its folder: not yet locked
    making.mkdir()
    (making / prep._LOCK).write_text("")
    old = out / ".prepare-q1w2e3"  # an older version's: no lock file, cannot be checked
    old.mkdir()
    try:
        summary = prepare_coco(str(raw), str(out), splits=["test"])
    finally:
        os.close(held)
    assert not leftover.exists() and live.is_dir() and old.is_dir() and making.is_dir()
    assert any(leftover.name in note and "killed" in note for note in summary.notes)
    assert any(str(old) in note for note in summary.notes)
    assert not any(live.name in n or making.name in n for n in summary.notes)
    assert sorted(p for p in os.listdir(out) if p.startswith(".prepare-")) == sorted([live.name, making.name,
                                                                                      old.name])
    # the run's own folder was made under the "new" name, locked, renamed, and removed at the end
    assert not [n for n in os.listdir(out) if n.startswith(f".prepare-{prep._HOST}-{os.getpid()}-")]


def test_the_staging_scan_survives_folders_that_vanish_or_cannot_be_locked(tmp_path, monkeypatch):
    out = tmp_path / "arrows"
    gone = out / ".prepare-h-1-gone"
    gone.mkdir(parents=True)
    (gone / prep._LOCK).write_text("")
    real = prep.try_lock

    def vanishing(path, create=True):  # the folder removed between the listing and the lock (by its run or a scan)
        if gone.name in path:
            import shutil as sh
            sh.rmtree(gone)
        return real(path, create)

    monkeypatch.setattr(prep, "try_lock", vanishing)
    summary = prep.PrepareSummary("coco", str(out))
    prep._remove_dead_staging(summary, str(out))
    assert summary.notes == [] and not gone.exists()
    monkeypatch.setattr(prep, "try_lock", lambda path, create=True: (None, "No locks available"))  # (no flock there)
    (out / ".prepare-h-2-x").mkdir()
    prep._remove_dead_staging(summary, str(out))
    assert (out / ".prepare-h-2-x").is_dir() and "cannot be checked (No locks available)" in summary.notes[0]


def test_sigterm_to_the_command_removes_its_staging_folder(coco_raw, tmp_path, monkeypatch):
    """timeout, Slurm and Kubernetes end a run with SIGTERM: the command turns it into an exit (143) through the
    writers' cleanup, as Ctrl-C, instead of dying with a partial copy of the output in OUT_ROOT."""
    import signal

    raw, _, _ = coco_raw
    out = tmp_path / "arrows"
    write = prep.write_arrow_batches

    def write_then_terminated(path, schema, batches):
        write(path, schema, batches)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(prep, "write_arrow_batches", write_then_terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        cli.main(["prepare", "coco", str(raw), str(out)])
    assert info.value.code == 128 + signal.SIGTERM
    assert os.listdir(out) == [] and signal.getsignal(signal.SIGTERM) is before
