"""The shard index (each shard's sample count beside the shards): readers split each epoch's samples evenly, a stale
or partial index is named and ignored, and a stream's position stays exact."""

import gzip
import io
import json
import os
import shutil
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlmo_fast.data import WebDataset, build_collate, encode_image, write_shards
from vlmo_fast.data import webdataset as wds
from vlmo_fast.data.webdataset import count_samples, index_path, iter_tar, shard_counts, split_samples, \
    write_shard_index

SIZE = 16


def _pixels(i):
    return np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _samples(n, start=0):
    return [(f"{i:06d}", encode_image(_pixels(i)), f"caption number {i}") for i in range(start, start + n)]


def _write(folder):
    """9 shards of 5, 5, 5, 5, 3 (prefix a), 4, 4, 1 (b) and 11 (c) samples: 43, each prefix with its index."""
    os.makedirs(folder, exist_ok=True)
    samples = _samples(23)
    samples[7] = ("000007", b"not an image", "caption number 7")  # an unreadable sample: the index counts it
    return (write_shards(folder, samples, samples_per_shard=5, prefix="a")
            + write_shards(folder, _samples(9, start=100), samples_per_shard=4, prefix="b")
            + write_shards(folder, _samples(11, start=200), samples_per_shard=11, prefix="c"))


ALL_KEYS = sorted([f"{i:06d}" for i in range(23)] + [f"{i:06d}" for i in range(100, 109)]
                  + [f"{i:06d}" for i in range(200, 211)])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    return _write(str(tmp_path_factory.mktemp("indexed")))


def _dataset(paths, tok, rank=0, world=1, **kw):
    kw = dict(dict(image_size=SIZE, max_text_len=8, train=True, tokenizer=tok, shuffle_buffer=4, seed=5), **kw)
    return WebDataset(paths, rank=rank, world_size=world, **kw)


def _as_worker(monkeypatch, worker, workers):
    """Iterate as DataLoader worker ``worker`` of ``workers`` (the dataset asks get_worker_info who it is)."""
    info = SimpleNamespace(id=worker, num_workers=workers) if workers else None
    monkeypatch.setattr(wds, "get_worker_info", lambda: info)


def test_the_writer_indexes_its_shards(indexed):
    assert [os.path.basename(index_path(p)) for p in indexed] == ["a.shards.json"] * 5 + ["b.shards.json"] * 3 + \
        ["c.shards.json"]
    assert shard_counts(indexed) == ([5, 5, 5, 5, 3, 4, 4, 1, 11], None)
    index = json.loads(Path(index_path(indexed[0])).read_text())
    assert index["format"] == "vlmo_fast shard index" and index["version"] == 1
    assert [(e["name"], e["samples"], e["bytes"]) for e in index["shards"]] == \
        [(os.path.basename(p), n, os.path.getsize(p)) for p, n in zip(indexed[:5], [5, 5, 5, 5, 3])]
    assert not [f for f in os.listdir(os.path.dirname(indexed[0])) if f.startswith(".tmp-")]  # (atomic writes)
    assert wds.expand_urls(os.path.join(os.path.dirname(indexed[0]), "*")) == sorted(indexed)  # not the indexes
    assert index_path("/d/00003.tar.gz") == "/d/shards.json"
    assert index_path("x/web_val_7.tgz") == "x/web_val.shards.json"


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_sample_once_and_every_reader_within_one_sample(indexed, tok, monkeypatch, world, workers):
    """43 samples in 9 uneven shards over world x workers readers, through the reader's own iteration: each epoch
    yields every sample once, and every reader yields N // T samples or one more (whole shards gave one reader 16
    samples and another 5)."""
    readers = world * max(workers, 1)
    for epoch in (0, 1):
        keys, sizes = [], []
        for rank in range(world):
            ds = _dataset(indexed, tok, rank, world)
            assert ds.balance is not None
            for worker in range(max(workers, 1)):
                _as_worker(monkeypatch, worker, workers)
                ds.set_epoch(epoch)
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # no warning: the split is even
                    items = list(ds)
                keys += [it["key"] for it in items if it is not None]
                sizes.append(len(items))
        assert sorted(keys) == [k for k in ALL_KEYS if k != "000007"]
        assert sum(sizes) == 43 and max(sizes) - min(sizes) <= 1, sizes
        assert sizes.count(43 // readers + 1) == 43 % readers


def test_the_readers_with_one_sample_more_rotate_and_few_shards_are_shared(indexed, tok):
    """Over T epochs every reader reads the same number of samples; with fewer shards than readers, the readers
    share shards by sample range (they used to stride over every shard, each reader scanning all of them)."""
    ds = _dataset(indexed, tok)
    counts = dict(zip(indexed, ds.counts))

    def sizes(pieces):
        return sum((counts[u] if stop is None else stop) - first for u, first, stop in pieces)

    totals = np.zeros(4, dtype=int)
    for epoch in range(4):  # 43 = 4 x 10 + 3
        got = [sizes(ds.pieces(epoch, rank, 2, worker, 2)) for rank in range(2) for worker in range(2)]
        assert sorted(got) == [10, 11, 11, 11]
        totals += got
    assert (totals == 43).all()
    few = _dataset(indexed[-2:], tok, train=False)  # 1 + 11 samples for 5 readers
    pieces = [few.pieces(0, 0, 1, worker, 5) for worker in range(5)]
    assert sorted(sizes(p) if p else 0 for p in pieces) == [2, 2, 2, 3, 3]
    assert sum(len(p) for p in pieces) == 6  # (each reader reads a range of the big shard; the small one goes whole)
    with pytest.warns(UserWarning, match="2 shards for 5 readers .* readers share shards by sample range"):
        _dataset(indexed[-2:], tok, world=5, train=False).__iter__().__next__()


def test_a_split_shard_is_read_through_as_little_as_possible():
    """At most T - 1 shards are split; a split shard's pieces go smallest first (a reader starting inside a shard
    reads through the samples before its range), its last piece runs to the shard's end, and a shard counted as
    empty is read whole. With the shard size prepare writes (5000) over 8 readers, the reading that splitting adds
    is a few percent of the epoch."""
    counts = [5000] * 37 + [1234]
    for places in (3, 8, 16, 32):
        split = split_samples(counts, places)
        pieces = [(j, first, stop) for share in split for j, first, stop in share]
        split_shards = {j for j, first, stop in pieces if first > 0 or stop is not None}
        assert len(split_shards) <= places - 1
        for j in split_shards:
            parts = sorted((first, stop) for jj, first, stop in pieces if jj == j)
            lengths = [(stop if stop is not None else counts[j]) - first for first, stop in parts]
            assert parts[0][0] == 0 and parts[-1][1] is None and lengths == sorted(lengths)
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        skipped = sum(first for _, first, _ in pieces)
        assert skipped <= (places - 1) * 2500
        if places == 8:
            assert skipped / sum(counts) < 0.05
    assert split_samples([3, 0, 2], 2) == [[(0, 0, None)], [(1, 0, None), (2, 0, None)]]
    assert split_samples([0, 0], 3) == [[], [], [(0, 0, None), (1, 0, None)]]


def test_stale_partial_or_broken_indexes_are_named_and_whole_shards_read(tmp_path, tok):
    """Whatever makes an index unusable is said in a warning, and the readers read whole shards exactly as without
    an index. A copy of the shards with new modification times keeps its index (same size and edge bytes)."""
    paths = _write(str(tmp_path / "s"))

    def check(paths_, why):
        with pytest.warns(UserWarning, match=f"not using the shard index \\({why}.*readers read whole shards, as "
                                             f"without one"):
            ds = _dataset(paths_, tok, train=False)
        assert ds.counts is None and ds.balance is None
        plain = _dataset(paths_, tok, train=False, use_index=False)
        assert [ds.assignment(0, 0, 2, w, 1) for w in range(2)] == [plain.assignment(0, 0, 2, w, 1) for w in range(2)]
        assert [it and it["key"] for it in ds] == [it and it["key"] for it in plain]

    # a copy (new times, same bytes) keeps its index
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "s", copy, copy_function=shutil.copyfile)
    copied = [str(copy / os.path.basename(p)) for p in paths]
    os.utime(copied[0], ns=(1, 1))
    assert shard_counts(copied)[0] == [5, 5, 5, 5, 3, 4, 4, 1, 11]
    # a shard rewritten with other samples (another size)
    write_shards(str(tmp_path / "other"), _samples(2), samples_per_shard=2, prefix="a")
    shutil.copyfile(tmp_path / "other" / "a-000000.tar", copied[0])
    check(copied, f"{copied[0]} changed since {index_path(copied[0])} was written \\(\\d+ bytes, the index says ")
    # a member appended in place: the same size (the tar's padding), another time and last bytes
    with tarfile.open(paths[1], "a") as tar:
        info = tarfile.TarInfo("000005.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"3"))
    assert os.path.getsize(paths[1]) == json.loads(Path(index_path(paths[1])).read_text())["shards"][1]["bytes"]
    check(paths, f"{paths[1]} changed since .* \\(another modification time, and its first or last 16 KiB differ")
    fresh = _write(str(tmp_path / "f"))
    # a shard of the same prefix that the index does not list; shards of which only some have an index
    shutil.copyfile(fresh[0], tmp_path / "f" / "a-000099.tar")
    check(fresh + [str(tmp_path / "f" / "a-000099.tar")], "\\S*a-000099.tar is not listed in \\S*a.shards.json")
    shutil.copyfile(fresh[0], tmp_path / "f" / "z.tar")
    check(fresh + [str(tmp_path / "f" / "z.tar")], "1 of the 10 shards have no index \\(e.g. \\S*z.tar: no ")
    # an index that is not one
    with open(index_path(fresh[0]), "w") as f:
        f.write('{"shards": []}')
    check(fresh, "\\S*a.shards.json is not a vlmo_fast shard index")
    with open(index_path(fresh[0]), "w") as f:
        f.write("{")
    check(fresh, "\\S*a.shards.json is unreadable \\(JSONDecodeError")
    # no index at all: no word, whole shards
    for p in fresh:
        if os.path.exists(index_path(p)):
            os.remove(index_path(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dataset(fresh, tok).balance is None


def test_shards_of_other_tools_are_indexed_as_the_reader_counts_them(tmp_path, tok):
    """write_shard_index counts samples as iter_tar groups members (hidden members ignored, a repeated extension
    starts a sample), reading headers only; iter_tar's skip leaves the data of the samples before it unread."""
    img = encode_image(_pixels(0))
    members = [(".DS_Store", b"x"), ("a.jpg", img), ("a.txt", b"first"), ("a.jpg", img), ("a.txt", b"second"),
               ("b.jpg", img), ("._b.txt", b"apple"), ("b.txt", b"third"), ("c.jpg", img), ("c.txt", b"fourth")]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(tmp_path / "00000.tar", "rb") as src, gzip.open(tmp_path / "00001.tar.gz", "wb") as dst:
        dst.write(src.read())
    paths = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar.gz")]
    assert [count_samples(p) for p in paths] == [4, 4]
    for p in paths:
        got = list(iter_tar(p, skip=2))
        assert [r["__key__"] for r in got] == ["a", "a", "b", "c"]
        assert got[1]["txt"] is None and got[2]["txt"] == b"third"
    assert write_shard_index(str(tmp_path)) == [str(tmp_path / "shards.json")]
    ds = _dataset(paths, tok, train=False)
    assert ds.counts == [4, 4]
    with pytest.raises(ValueError, match="write_shard_index: counts has 1 entries for 2 shards"):
        write_shard_index(paths, counts=[3])
    # shards indexed apart (a shard added later) join the index: the earlier entries stay, a missing file's go
    os.unlink(tmp_path / "shards.json")
    shutil.copy(tmp_path / "00000.tar", tmp_path / "00002.tar")
    write_shard_index(paths[0]), write_shard_index(paths[1]), write_shard_index(str(tmp_path / "00002.tar"))
    assert _dataset(paths + [str(tmp_path / "00002.tar")], tok, train=False).counts == [4, 4, 4]
    os.unlink(tmp_path / "00002.tar")
    write_shard_index(paths[0])
    listed = json.loads((tmp_path / "shards.json").read_text())["shards"]
    assert sorted(e["name"] for e in listed) == ["00000.tar", "00001.tar.gz"]


@pytest.mark.filterwarnings("ignore:WebDataset. 1 shards for 3 readers")  # (few shards, on purpose)
def test_damage_in_a_split_shard_counts_once(tmp_path, tok, monkeypatch):
    """A shard damaged in place after it was indexed (same size and time): the reader whose range holds the damage
    counts it once; the ones after it lose their range, each sample before the damage is read once."""
    (path,) = write_shards(str(tmp_path), _samples(12), samples_per_shard=12)
    with tarfile.open(path) as tar:
        header = tar.getmembers()[12].offset  # the first member of sample 6
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(header)
        f.write(b"garbage!" * 64)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds = _dataset([path], tok, train=False)
    assert ds.counts == [12]
    keys, bad = [], 0
    for worker in range(3):
        _as_worker(monkeypatch, worker, 3)
        items = list(ds)
        keys += [it["key"] for it in items if it is not None]
        bad += sum(it is None for it in items)
    assert sorted(keys) == [f"{i:06d}" for i in range(6)] and bad == 1


def _stream(paths, tok, num_workers, batch_size=3, use_index=True):
    from vlmo_fast.train.data_setup import IterableStream
    from vlmo_fast.train.distributed import DistInfo

    ds = _dataset(paths, tok, seed=3, use_index=use_index)
    return IterableStream(ds, build_collate(tok, mlm=True), batch_size, num_workers,
                          DistInfo(0, 1, 0, torch.device("cpu")))


def _signature(batch):
    return (tuple(batch["key"]), batch["image"][0].sum().item(), tuple(batch["text_ids_mlm"].flatten().tolist()),
            batch["bad_samples"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_balanced_stream_resumes_exactly(indexed, tok, num_workers):
    """The position (batches taken per reader, the reader due next, the epoch) resumes the very batches, masks and
    augmentations mid-epoch, at its end and in the next, with the readers' ranges cut from the index."""
    full_stream = _stream(indexed, tok, num_workers)
    assert full_stream.layout["balance"] == full_stream.dataset.balance is not None
    full = [_signature(next(full_stream)) for _ in range(22)]
    assert full_stream.epoch == 1 and all(len(b[0]) == 3 for b in full)
    for k in (1, 5, 9, 13, 14, 17):
        first = _stream(indexed, tok, num_workers)
        for _ in range(k):
            next(first)
        resumed = _stream(indexed, tok, num_workers)
        resumed.restore(first.state())
        assert "continue where they were" in resumed.resume_note
        assert [_signature(next(resumed)) for _ in range(len(full) - k)] == full[k:], k


def test_a_position_of_whole_shards_restarts_its_epoch_with_a_note(indexed, tok, monkeypatch):
    """A checkpoint whose readers took whole shards (an older version's, or one saved without an index) restarts
    its epoch where the readers now split the samples, and the other way round; without an index an older
    checkpoint's position still holds."""
    saved = _stream(indexed, tok, 2)
    for _ in range(16):
        next(saved)
    state = saved.state()
    assert state["epoch"] == 1 and any(state["ranks"][0]["taken"])
    older = dict(state, layout={k: v for k, v in state["layout"].items() if k != "balance"})
    now = _stream(indexed, tok, 2)
    now.restore(older)
    assert now.resume_note == ("the tar shards restart epoch 1 (samples of it are seen again): the readers now split "
                               "each epoch's samples evenly by the shard index; the checkpoint's took whole shards "
                               "(it was saved without an index, or by an older version)")
    assert now.epoch == 1 and now.taken == [0, 0]
    fresh = _stream(indexed, tok, 2)
    fresh.epoch = 1
    assert [_signature(next(now)) for _ in range(3)] == [_signature(next(fresh)) for _ in range(3)]
    whole = _stream(indexed, tok, 2, use_index=False)
    assert "balance" not in whole.layout
    whole.restore(state)
    assert whole.resume_note.endswith("the readers now take whole shards; the checkpoint's split the samples by a "
                                      "shard index that is missing, changed or not used now")
    whole = _stream(indexed, tok, 2, use_index=False)
    whole.restore(older)
    assert "continue where they were" in whole.resume_note and whole.taken == state["ranks"][0]["taken"]
    # processes that found different indexes all read whole shards
    from vlmo_fast.train import data_setup

    monkeypatch.setattr(data_setup, "gather_objects", lambda value: [value, None])
    monkeypatch.setattr(data_setup, "same_on_every_rank", lambda *args: None)  # (the same shard list, the index not)
    with pytest.warns(UserWarning, match="the processes found different shard indexes \\(rank 0: samples/v1:\\w+, "
                                         "rank 1: none;"):
        split = _stream(indexed, tok, 2)
    assert split.dataset.counts is None and "balance" not in split.layout


def test_processes_given_different_shard_lists_are_refused(indexed, tok, monkeypatch):
    """Each process splits the epoch over its own shard list: a node whose copy lacks shards made the ranks read some
    shards twice and others never, without a word. The processes compare their lists at start."""
    from vlmo_fast.train import data_setup

    monkeypatch.setattr(data_setup, "gather_objects", lambda value: [value, "7 shards, list digest 0123456789ab"])
    with pytest.raises(ValueError, match=r"the processes found different tar shards \(rank 0: 9 shards, list digest "
                                         r"\w{12}; rank 1: 7 shards, list digest 0123456789ab\): every process must "
                                         r"read the same shard list"):
        _stream(indexed, tok, 0)
