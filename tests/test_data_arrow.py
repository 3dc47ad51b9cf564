"""Official arrow datasets (spec §7): round trip, index mapping, image_only, errors, corrupt images, VQA/NLVR2
extras, multi-dataset concat, and the loader."""

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import ConcatDataset

from vlmo_fast.data import (build_collate, build_dataset, build_loader, dataset_files, encode_image,
                            make_caption_arrow, make_caption_dataset, make_dataset, measure_loader, read_arrow,
                            set_epoch, write_arrow)
from vlmo_fast.data.arrow import ArrowDataset, write_arrow_batches
from vlmo_fast.tokenizer import CLS_ID, PAD_ID, SEP_ID

SIZE = 16


def _pixels(seed):
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _captions(n, offset=0):
    caps = []
    for i in range(n):
        row = [f"caption {j} of image {i + offset}" for j in range(1 + i % 3)]
        if i % 2 == 0:
            row.append(row[0])  # a duplicate: a sample of its own (VLMo keeps them: remove_duplicate=False)
        caps.append(row)
    return caps


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("arrow"))
    for split, n, off in (("train", 7, 0), ("val", 3, 100), ("test", 2, 200)):
        images = [encode_image(_pixels(i + off)) for i in range(n)]
        make_caption_dataset(root, "coco", split, images, _captions(n, off))
        make_caption_dataset(root, "f30k", split, images, _captions(n, off))
    return root


def _expected_samples(caps):
    return [(r, c) for r, row in enumerate(caps) for c in range(len(row))]


def test_files_have_official_names_and_columns(root):
    assert dataset_files("coco", "train") == ["coco_caption_karpathy_train", "coco_caption_karpathy_restval"]
    for stem in dataset_files("coco", "train") + dataset_files("coco", "val") + dataset_files("coco", "test"):
        table = read_arrow(os.path.join(root, f"{stem}.arrow"))
        assert table.schema.names[:4] == ["image", "caption", "image_id", "split"]
    with pa.memory_map(os.path.join(root, "coco_caption_karpathy_val.arrow")) as src:
        assert pa.ipc.open_file(src).num_record_batches >= 1  # an IPC *file*, as RecordBatchFileWriter writes


def test_round_trip_one_sample_per_caption(root, tok):
    ds = make_dataset("coco", root, "train", image_size=SIZE, max_text_len=12, tokenizer=tok, train=False)
    caps = _captions(7)
    assert ds.num_rows() == 7  # train + restval concatenated
    assert ds.index_mapper == _expected_samples(caps)
    assert len(ds) == len(_expected_samples(caps))
    for j in range(len(ds)):
        item = ds[j]
        row, cap = ds.index_mapper[j]
        assert item["img_index"] == row and item["cap_index"] == cap and item["raw_index"] == j
        assert item["text"] == caps[row][cap]
        assert item["replica"] == (cap > 0)
        expected = (torch.from_numpy(_pixels(row)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        torch.testing.assert_close(item["image"], expected, rtol=0, atol=1e-6)  # PNG lossless, no resize
        ids = tok(item["text"], max_length=12)["input_ids"][0]
        assert torch.equal(item["text_ids"], ids) and item["text_ids"].dtype == torch.int64
        assert item["text_ids"].shape == item["text_masks"].shape == item["special_tokens_mask"].shape == (12,)


def test_image_only_and_text_only(root, tok):
    ds = make_dataset("f30k", root, "val", image_size=SIZE, max_text_len=12, image_only=True)
    assert len(ds) == 3 and ds.index_mapper == [(0, None), (1, None), (2, None)]
    item = ds[2]
    assert set(item) == {"image", "img_index", "cap_index", "raw_index"} and item["cap_index"] is None
    batch = build_collate(mlm=False)([ds[i] for i in range(3)])
    assert batch["image"][0].shape == (3, 3, SIZE, SIZE) and batch["img_index"] == [0, 1, 2]
    txt = make_dataset("f30k", root, "val", image_size=SIZE, max_text_len=12, tokenizer=tok, text_only=True)
    assert len(txt) == len(_expected_samples(_captions(3, 100))) and "image" not in txt[0]


def test_long_captions_are_truncated(tmp_path, tok):
    long = " ".join(["circle"] * 100)
    make_caption_dataset(str(tmp_path), "f30k", "test", [encode_image(_pixels(0))], [[long]])
    item = make_dataset("f30k", str(tmp_path), "test", image_size=SIZE, max_text_len=12, tokenizer=tok)[0]
    assert item["text_ids"].shape == (12,) and item["text_ids"][0] == CLS_ID and item["text_ids"][-1] == SEP_ID
    assert (item["text_masks"] == 1).all() and (item["text_ids"] != PAD_ID).all()


def test_missing_root_and_file_name_the_path(root, tmp_path, tok):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_dataset("coco", missing, "train", tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="vqav2_train.arrow"):
        make_dataset("vqa", root, "train", tokenizer=tok)
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("cocoa", root, "train", tokenizer=tok)


def test_missing_column_names_file_and_column(tmp_path, tok):
    path = write_arrow(str(tmp_path / "f30k_caption_karpathy_val.arrow"),
                       [{"image": encode_image(_pixels(0)), "captions": ["a"]}])
    with pytest.raises(ValueError) as err:
        make_dataset("f30k", str(tmp_path), "val", tokenizer=tok)
    assert path in str(err.value) and "'caption'" in str(err.value)


def test_unreadable_or_corrupt_file_names_the_file(tmp_path, tok):
    """A damaged file is an error naming it at construction, never a crash: offsets past their buffers would be read
    through wild pointers (SIGSEGV) without the full validation."""
    name = str(tmp_path / "f30k_caption_karpathy_val.arrow")
    open(name, "wb").close()  # zero bytes
    with pytest.raises(ValueError, match="not a readable Arrow IPC file") as err:
        make_dataset("f30k", str(tmp_path), "val", tokenizer=tok)
    assert name in str(err.value)
    # a caption whose string offsets point far past the character data, as a flipped byte makes them
    write_arrow(name, {"image": [encode_image(_pixels(0))] * 2, "caption": [["abc"], ["def"]]})
    data = Path(name).read_bytes()
    offsets = np.array([0, 3, 6], dtype=np.int32).tobytes()  # the caption strings' offsets buffer
    assert data.count(offsets) == 1
    with open(name, "wb") as f:
        f.write(data.replace(offsets, np.array([0, 3, 1 << 24], dtype=np.int32).tobytes()))
    with pytest.raises(ValueError, match="not a readable Arrow IPC file") as err:
        make_dataset("f30k", str(tmp_path), "val", tokenizer=tok)
    assert name in str(err.value)


def test_caption_column_of_the_wrong_type_names_file_and_column(tmp_path, tok):
    path = write_arrow(str(tmp_path / "f30k_caption_karpathy_val.arrow"),
                       {"image": [encode_image(_pixels(0))], "caption": [7]})
    with pytest.raises(ValueError, match="must hold a list of strings") as err:
        make_dataset("f30k", str(tmp_path), "val", tokenizer=tok)
    assert path in str(err.value) and "'caption'" in str(err.value)


def test_corrupt_image_is_skipped_and_counted(tmp_path, tok, caplog):
    images = [encode_image(_pixels(i)) for i in range(4)]
    images[1] = b"\x89PNG\r\n\x1a\n garbage"
    images[3] = images[3][: len(images[3]) // 2]  # truncated file
    caps = [["a red circle", "a blue star"], ["broken one", "broken two", "broken three"], ["green"], ["cut"]]
    make_caption_dataset(str(tmp_path), "f30k", "train", images, caps)
    ds = make_dataset("f30k", str(tmp_path), "train", image_size=SIZE, max_text_len=8, tokenizer=tok)
    assert len(ds) == 7
    with caplog.at_level("WARNING", logger="vlmo_fast.data"):
        items = [ds[j] for j in range(len(ds))]
    # the log finds the image: its file, its row in that file, its image_id
    path = os.path.join(str(tmp_path), "f30k_caption_karpathy_train.arrow")
    assert f"sample 2 (row 1 of {path}, image_id 'f30k_train_1')" in caplog.text
    assert [it is None for it in items] == [False, False, True, True, True, False, True]
    collate = build_collate(tok, generator=torch.Generator().manual_seed(0))
    batch = collate(items)
    assert batch["bad_samples"] == 4 and batch["text_ids"].shape == (3, 8) and batch["image"][0].shape[0] == 3
    assert batch["img_index"] == [0, 0, 2]
    loader = build_loader(ds, batch_size=3, collate=collate, train=False, num_workers=0)
    assert sum(b["bad_samples"] for b in loader) == 4
    empty = collate([None, None])
    assert empty == {"bad_samples": 2}
    # official behaviour on request: retry with a random sample, still counted
    ds_r = make_dataset("f30k", str(tmp_path), "train", image_size=SIZE, max_text_len=8, tokenizer=tok,
                        on_error="resample")
    item = ds_r[2]
    assert item is not None and item["bad_samples"] >= 1 and item["img_index"] in (0, 2)
    assert collate([item, ds_r[0]])["bad_samples"] == item["bad_samples"]
    # a set with (almost) nothing readable: an error, not a None (several processes' batches then differed in size,
    # which aborted the all-gathers)
    ds_r.rows = ds_r.rows[2:5]  # (the unreadable ones only)
    ds_r.caps = ds_r.caps[2:5]
    with pytest.raises(ValueError, match=r"f30k/train: 100 random samples in a row could not be read"):
        ds_r[0]


def _vqa_rows(n_rows, with_labels=True):
    rows = []
    for r in range(n_rows):
        row = {"image": encode_image(_pixels(r)), "questions": [f"what colour is {r}?", "how many?"],
               "image_id": r, "question_id": [10 * r, 10 * r + 1], "split": "x"}
        if with_labels:
            row.update({"answers": [["red", "red"], ["2"]], "answer_labels": [[3], [7, 8]],
                        "answer_scores": [[0.6], [0.3, 1.0]]})
        rows.append(row)
    return rows


def test_vqa_items(tmp_path, tok):
    root = str(tmp_path)
    write_arrow(os.path.join(root, "vqav2_train.arrow"), _vqa_rows(2))
    write_arrow(os.path.join(root, "vqav2_trainable_val.arrow"), _vqa_rows(1))
    write_arrow(os.path.join(root, "vqav2_test.arrow"), _vqa_rows(1, with_labels=False))
    ds = make_dataset("vqa", root, "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert len(ds) == 6
    item = ds[1]
    assert item["qid"] == 1 and item["vqa_labels"] == [7, 8] and item["vqa_scores"] == [0.3, 1.0]
    assert item["vqa_answer"] == ["2"] and item["text"] == "how many?"
    batch = build_collate(tok)([ds[j] for j in range(len(ds))])
    assert batch["vqa_labels"][0] == [3] and batch["qid"] == [0, 1, 10, 11, 0, 1]
    images = make_dataset("vqa", root, "train", image_size=SIZE, max_text_len=12, image_only=True)
    assert len(images) == 3 and "qid" not in images[2] and images[2]["img_index"] == 2
    test = make_dataset("vqa", root, "test", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert test[0]["vqa_labels"] == [] and test[0]["qid"] == 0
    write_arrow(os.path.join(root, "vqav2_rest_val.arrow"), _vqa_rows(1, with_labels=False))
    with pytest.raises(ValueError, match="answer"):  # val needs the labels
        make_dataset("vqa", root, "val", tokenizer=tok)


def test_nlvr2_items(tmp_path, tok):
    root = str(tmp_path)
    # other tools' cases are read as `prepare` reads them (they were unreadable samples: a run of them never ended)
    for name, answers in (("nlvr2_dev", ["True", "true"]), ("nlvr2_test1", ["False", "FALSE"])):
        write_arrow(os.path.join(root, f"{name}.arrow"),
                    [{"image_0": encode_image(_pixels(1)), "image_1": encode_image(_pixels(2)),
                      "questions": ["the left image has two dogs"] * 2, "answers": answers, "identifier": name}])
    ds = make_dataset("nlvr2", root, "val", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert [ds[i]["answers"] for i in range(4)] == [1, 1, 0, 0]
    batch = build_collate(tok)([ds[0], ds[2]])
    assert batch["answers"] == [1, 0] and batch["table_name"] == ["nlvr2_dev", "nlvr2_test1"]
    assert batch["image_0"][0].shape == batch["image_1"][0].shape == (2, 3, SIZE, SIZE)
    assert not torch.equal(batch["image_0"][0], batch["image_1"][0])
    assert "image" not in batch


def test_build_dataset_concat_and_empty_splits(root, tok):
    ds = build_dataset(root, ["coco", "f30k"], "val", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert isinstance(ds, ConcatDataset) and len(ds) == 2 * len(_expected_samples(_captions(3, 100)))
    assert make_dataset("sbu", root, "val", tokenizer=tok).names == []
    assert len(make_dataset("vg", root, "test", tokenizer=tok)) == 0
    with pytest.raises(ValueError, match="no.*files|none of"):
        build_dataset(root, ["vg"], "val", tokenizer=tok)
    one = build_dataset(root, "coco", "test", image_size=SIZE, max_text_len=12, tokenizer=tok)
    assert not isinstance(one, ConcatDataset) and one.split == "test"


def test_pickled_dataset_reopens_the_files(root, tok):
    ds = make_dataset("coco", root, "val", image_size=SIZE, max_text_len=12, tokenizer=tok)
    clone = pickle.loads(pickle.dumps(ds))
    a, b = ds[3], clone[3]
    assert a["text"] == b["text"] and torch.equal(a["image"], b["image"])
    assert len(pickle.dumps(ds)) < 2_000_000  # no table copy (the tokenizer vocabulary is ~1 MB)


def _official_texts(column, remove_duplicate):
    """What the official dataset holds: every row's list of captions (a bare string is a list of one, a null row
    none), duplicates removed keeping the first (the official set() order is not reproducible)."""
    rows = []
    for t in column.to_pylist():
        t = [t] if isinstance(t, str) else (t or [])
        rows.append(list(dict.fromkeys(t)) if remove_duplicate else list(t))
    return rows


@pytest.mark.parametrize("kind", ["list", "large_list", "string"])
def test_caption_index_matches_the_official_lists(tmp_path, tok, kind):
    """The captions stay in the memory-mapped table; the index finds the same texts as the official Python lists,
    across record batches (chunks), null rows, null captions, duplicates and empty lists."""
    rng = np.random.default_rng(7)
    if kind == "string":
        typ = pa.string()
        rows = [None if rng.random() < 0.2 else f"c{rng.integers(0, 3)}" for _ in range(41)]
    else:
        typ = pa.list_(pa.string()) if kind == "list" else pa.large_list(pa.large_string())
        rows = [None if rng.random() < 0.1 else
                [None if rng.random() < 0.05 else f"c{rng.integers(0, 4)}" for _ in range(rng.integers(0, 6))]
                for _ in range(41)]
    schema = pa.schema([("image", pa.binary()), ("caption", typ)])
    image = encode_image(_pixels(0))
    cuts = [0, 5, 6, 23, 41]  # record batches of 5, 1, 17 and 18 rows
    batches = [pa.record_batch([pa.array([image] * (b - a), pa.binary()), pa.array(rows[a:b], typ)], schema=schema)
               for a, b in zip(cuts, cuts[1:])]
    write_arrow_batches(str(tmp_path / "mine.arrow"), schema, batches)
    for dedup in (True, False):
        ds = ArrowDataset(str(tmp_path), ["mine"], image_size=SIZE, max_text_len=12, tokenizer=tok,
                          remove_duplicate=dedup)
        expected = _official_texts(pa.chunked_array([b.column(1) for b in batches], typ), dedup)
        assert ds.table.column("caption").num_chunks == 4
        assert ds.all_texts == expected and ds.num_rows() == 41
        assert ds.index_mapper == [(r, c) for r, row in enumerate(expected) for c in range(len(row))]
        assert [ds.caption(j) for j in range(len(ds))] == [t for row in expected for t in row]
        clone = pickle.loads(pickle.dumps(ds))  # a spawned worker reopens the file and finds the same texts
        assert clone.all_texts == expected
        assert ds.captions(-1) == expected[-1] and ds.captions(-41) == expected[0]
        with pytest.raises(IndexError):
            ds.captions(41)
    good = next(j for j in range(len(ds)) if ds.caption(j) is not None)
    assert ds[good]["text"] == ds.caption(good)
    if any(t is None for row in expected for t in row):  # a null caption is a bad sample, skipped and counted
        bad = next(j for j in range(len(ds)) if ds.caption(j) is None)
        assert ds[bad] is None


@pytest.mark.parametrize("dedup", [True, False])
def test_caption_index_of_sliced_chunks_and_null_rows_spanning_values(dedup):
    """What a file never holds but Arrow allows (tables built in memory): chunks that are slices of a larger array,
    and null list rows whose offsets still span values (those values belong to no row)."""
    from vlmo_fast.data.arrow import _caption_index, _flat_values

    values = pa.array(["a", "b", "a", "c", "d", "d", "e"])
    offsets = pa.array([0, 3, 5, 7], pa.int32())
    lists = pa.ListArray.from_arrays(offsets, values, mask=pa.array([False, True, False]))  # row 1 null, spans c, d
    assert lists.to_pylist() == [["a", "b", "a"], None, ["d", "e"]]
    column = pa.chunked_array([lists.slice(1, 2), lists.slice(0, 1), lists.slice(0, 3)])
    row_start, cap_pos = _caption_index(column, dedup)
    flat = _flat_values(column)
    got = [[flat[int(p)].as_py() for p in cap_pos[row_start[r]:row_start[r + 1]]] for r in range(len(row_start) - 1)]
    assert got == _official_texts(column, dedup)


def test_dataset_keeps_no_python_object_per_caption(tmp_path, tok):
    """A DataLoader worker writes to every page of Python objects it touches (reference counts), so a list of a
    million captions becomes a private copy in each worker. The dataset keeps numpy arrays (24 bytes a caption)."""
    import tracemalloc

    n = 20_000
    caps = [[f"a caption about image {i} number {j} with some words" for j in range(3)] for i in range(n)]
    columns = {"image": pa.array([b"x"] * n, pa.binary()),
                               "caption": pa.array(caps, pa.list_(pa.string()))}
    write_arrow(str(tmp_path / "big.arrow"), columns)
    del caps, columns
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ds = ArrowDataset(str(tmp_path), ["big"], image_size=SIZE, max_text_len=12, tokenizer=tok)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(ds) == 3 * n and ds.caption(3 * n - 1) == f"a caption about image {n - 1} number 2 with some words"
    assert held < 40 * 3 * n, f"the dataset holds {held / (3 * n):.0f} bytes of Python memory per caption"


def test_write_arrow_is_atomic_and_checks_input(tmp_path):
    path = str(tmp_path / "t.arrow")
    write_arrow(path, {"a": [1, 2]})
    write_arrow(path, [{"a": 3}])
    assert read_arrow(path).column("a").to_pylist() == [3]
    assert os.listdir(tmp_path) == ["t.arrow"]
    with pytest.raises(ValueError, match="schema"):
        write_arrow(path, [])
    write_arrow(path, [], schema=pa.schema([("a", pa.int64())]))
    assert read_arrow(path).num_rows == 0


def test_loader_sampling_and_throughput(root, tok):
    ds = make_dataset("coco", root, "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    collate = build_collate(tok)
    seen = []
    for rank in (0, 1):
        loader = build_loader(ds, batch_size=2, collate=collate, train=True, distributed=True, world_size=2,
                              rank=rank, seed=3, drop_last=False)
        set_epoch(loader, 0)
        seen.append([r for b in loader for r in b["raw_index"]])
    # 17 samples (duplicate captions included) over 2 ranks: 9 each (DistributedSampler pads by repeating one),
    # together every sample
    assert len(ds) == 17 and len(seen[0]) == len(seen[1]) == 9
    assert set(seen[0]) | set(seen[1]) == set(range(len(ds)))
    loader = build_loader(ds, batch_size=2, collate=collate, train=True, distributed=True, world_size=2, rank=0,
                          seed=3)
    set_epoch(loader, 0)
    e0 = [r for b in loader for r in b["raw_index"]]
    set_epoch(loader, 1)
    e1 = [r for b in loader for r in b["raw_index"]]
    assert e0 != e1
    plain = build_loader(ds, batch_size=4, collate=collate, train=True, num_workers=1, seed=0)
    assert measure_loader(plain, batches=2) > 0
    with pytest.raises(ValueError, match="world_size"):
        build_loader(ds, batch_size=2, collate=collate, train=True, distributed=True)


_TRUNCATED_UNDER_A_RUN = """
import os, sys, torch
from vlmo_fast.data import build_collate, build_dataset
from vlmo_fast.data.arrow import changed_files
from vlmo_fast.train.data_setup import TrainStream
from vlmo_fast.train.distributed import DistInfo
root, workers = sys.argv[1], int(sys.argv[2])
ds = build_dataset(root, ["coco"], "train", image_size=16, max_text_len=12)
path = os.path.join(root, "coco_caption_karpathy_train.arrow")
assert changed_files(ds) == []
stream = TrainStream(ds, build_collate(), 4, workers, 0, DistInfo(0, 1, 0, torch.device("cpu")))
next(stream)
size = os.path.getsize(path)
os.truncate(path, size // 3)
assert changed_files(ds) == [f"{path} (size {size} -> {size // 3} bytes)"]
for _ in range(200):
    next(stream)
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_files_changed_under_a_run_are_named(tmp_path, tok, workers):
    """A memory-mapped arrow file truncated under a run kills its reader with SIGBUS, which torch reports as a lack
    of shared memory (a worker) or which ends the process with no message (no worker); the training stream names
    the file instead. In a process of its own: torch's SIGCHLD handler raises wherever the main process is when a
    worker dies. A file replaced by a rename is not a change: the mapping keeps the old one."""
    import subprocess
    import sys

    from vlmo_fast.data.arrow import changed_files

    n = 48
    root = tmp_path / "data"
    make_caption_dataset(str(root), "coco", "train", [encode_image(_pixels(i)) for i in range(n)],
                         [[f"caption {i}"] for i in range(n)])
    done = subprocess.run([sys.executable, "-c", _TRUNCATED_UNDER_A_RUN, str(root), str(workers)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]  # e.g. torch's SIGCHLD raising at exit
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"RuntimeError: arrow files changed on disk while this run reads them: .*"
                    r"coco_caption_karpathy_train\.arrow \(size \d+ -> \d+ bytes\).*SIGBUS", last), last
    if workers:
        return
    # replaced by a rename, or deleted: the mapping still reads the old file
    root = tmp_path / "renamed"
    make_caption_dataset(str(root), "coco", "train", [encode_image(_pixels(0))] * 2, [["a"], ["b"]])
    ds = build_dataset(str(root), ["coco"], "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    path = str(root / "coco_caption_karpathy_train.arrow")
    make_caption_arrow(path, [encode_image(_pixels(1))] * 3, [["c"], ["d"], ["e"]])  # atomic: temp file + rename
    assert changed_files(ds) == [] and ds.caption(1) == "b"
    os.remove(path)
    assert changed_files(ds) == [] and ds.caption(0) == "a"
    # touched, or grown: named after a failure, but no reason to stop a run that loads in the main process
    root = tmp_path / "touched"
    make_caption_dataset(str(root), "coco", "train", [encode_image(_pixels(0))] * 2, [["a"], ["b"]])
    ds = build_dataset(str(root), ["coco"], "train", image_size=SIZE, max_text_len=12, tokenizer=tok)
    path = str(root / "coco_caption_karpathy_train.arrow")
    os.utime(path, ns=(0, 10**9))
    assert changed_files(ds) == [f"{path} (modified in place)"] and changed_files(ds, shrunk_only=True) == []
    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    assert changed_files(ds, shrunk_only=True) == [] and "-> " in changed_files(ds)[0]
