"""WebDataset-style tar shards: round trip, sharding across workers and ranks, shuffling, corrupt samples."""

import io
import json
import os
import pathlib
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vlmo_fast.data import WebDataset, build_collate, encode_image, write_shards, write_synthetic_shards

# These tests damage or rewrite shards after write_shards indexed them: the reader then names the stale index and
# takes whole shards, the behaviour tested here (tests/test_data_shard_index.py tests the index and its warnings).
pytestmark = pytest.mark.filterwarnings("ignore:WebDataset. not using the shard index")
from vlmo_fast.data.webdataset import expand_urls, iter_tar, split_key

SIZE = 16


def _pixels(i):
    return np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def tar_names(path):
    with tarfile.open(path) as tar:
        return tar.getnames()


def _samples(n, start=0):
    return [(f"{i:06d}", encode_image(_pixels(i)), f"caption number {i}") for i in range(start, start + n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    return write_shards(out, _samples(23), samples_per_shard=6)  # 4 shards: 6, 6, 6, 5


def _keys(ds, num_workers=0, tok=None):
    loader = DataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=build_collate(tok, mlm=False))
    keys, bad = [], 0
    for batch in loader:
        keys.extend(batch.get("key", []))
        bad += batch["bad_samples"]
    return keys, bad


def test_round_trip(shards, tok):
    assert [os.path.basename(p) for p in shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    ds = WebDataset(shards, image_size=SIZE, max_text_len=10, train=False, tokenizer=tok)
    items = list(ds)
    assert [it["key"] for it in items] == [f"{i:06d}" for i in range(23)]  # eval: file order, no shuffle
    for i, it in enumerate(items):
        assert it["text"] == f"caption number {i}" and it["text_ids"].shape == (10,)
        expected = (torch.from_numpy(_pixels(i)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        torch.testing.assert_close(it["image"], expected, rtol=0, atol=1e-6)
    batch = build_collate(tok)(items[:5])
    assert batch["image"][0].shape == (5, 3, SIZE, SIZE) and batch["text_ids_mlm"].shape == (5, 10)


def test_json_captions_and_extra_members(tmp_path, tok):
    paths = write_shards(str(tmp_path), [("a", encode_image(_pixels(0)), "red"), ("b", encode_image(_pixels(1)),
                                          ["blue", "green"])], caption_format="json")
    with tarfile.open(paths[0], "a") as tar:  # an unrelated member is ignored
        info = tarfile.TarInfo("b.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"3"))
    items = list(WebDataset(paths, image_size=SIZE, max_text_len=8, train=False, tokenizer=tok))
    assert [it["text"] for it in items] == ["red", "blue"]
    assert split_key("dir/000123.seg.JPG") == ("dir/000123", "seg.jpg")


def test_hidden_members_are_ignored_and_image_formats_go_by_content(tmp_path, tok):
    """macOS's tar puts a ``._<name>`` AppleDouble member before every file: read as members, each split its sample
    in two and every sample was lost. Images stored as .gif, .tif, .ppm, ... were dropped as having no image."""
    from PIL import Image

    path = tmp_path / "mac.tar"
    formats = [("0", "gif", "GIF"), ("1", "tif", "TIFF"), ("2", "ppm", "PPM"), ("3", "jfif", "JPEG"),
               ("4", "jpg", "JPEG")]
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(".DS_Store", b"\0" * 8)
        for key, ext, fmt in formats:
            buf = io.BytesIO()
            Image.fromarray(_pixels(int(key))).save(buf, format=fmt)
            for name, data in ((f"{key}.{ext}", buf.getvalue()), (f"{key}.txt", f"caption {key}".encode())):
                add(f"._{name}", b"\0\5\26\7 AppleDouble")
                add(name, data)
    items = list(WebDataset([str(path)], image_size=SIZE, max_text_len=8, train=False, tokenizer=tok))
    assert [it and it["text"] for it in items] == [f"caption {k}" for k, _, _ in formats]


@pytest.mark.parametrize("world_size,num_workers", [(2, 2), (3, 1), (8, 2)])
def test_every_sample_once_across_ranks_and_workers(shards, tok, world_size, num_workers):
    """4 shards over world_size x num_workers readers; (8, 2) has fewer shards than readers (sample striding)."""
    keys = []
    for rank in range(world_size):
        ds = WebDataset(shards, image_size=SIZE, max_text_len=8, train=True, tokenizer=tok, shuffle_buffer=5,
                        rank=rank, world_size=world_size)
        if num_workers > 1 and world_size == 2:
            k, _ = _keys(ds, num_workers=num_workers, tok=tok)  # real DataLoader workers
        else:
            k = []
            for wid in range(num_workers):
                shard_list, stride, offset = ds.assignment(0, rank, world_size, wid, num_workers)
                k.extend(raw["__key__"] for raw in ds._raw_stream(shard_list, stride, offset) if raw is not None)
        keys.extend(k)
    assert sorted(keys) == [f"{i:06d}" for i in range(23)]


def test_uneven_shard_shares_rotate_over_epochs(tok, tmp_path):
    """23 shards for 9 readers: in each epoch every shard goes to one reader, 5 readers read 3 shards and 4 read 2;
    which ones rotates, so that over 9 epochs every reader reads the same number (it was always the lowest readers:
    3 ranks x 3 workers got 9, 8 and 6 shards' samples a pass, every pass). A repeating stream warns about it."""
    urls = [str(tmp_path / f"s{i:02d}.tar") for i in range(23)]
    for u in urls:
        pathlib.Path(u).touch()  # (the assignment reads no shard)
    ds = WebDataset(urls, image_size=SIZE, max_text_len=8, train=True, tokenizer=tok)
    totals = np.zeros(9, dtype=int)
    for epoch in range(9):
        got = [ds.assignment(epoch, rank, 3, wid, 3) for rank in range(3) for wid in range(3)]
        assert all(stride == 1 and offset == 0 for _, stride, offset in got)
        assert sorted(u for shards_, _, _ in got for u in shards_) == urls
        counts = np.array([len(shards_) for shards_, _, _ in got])
        assert sorted(counts) == [2] * 4 + [3] * 5
        totals += counts
    assert (totals == 23).all()
    write_synthetic_shards(str(tmp_path / "w"), 5, samples_per_shard=1, image_size=SIZE)
    os.remove(tmp_path / "w" / "synthetic.shards.json")  # shards without an index, as other tools write them
    five = sorted(str(p) for p in (tmp_path / "w").glob("*.tar"))
    with pytest.warns(UserWarning, match="1 readers read 3 shards a pass and the others 2"):
        next(iter(WebDataset(five, image_size=SIZE, max_text_len=8, train=True, tokenizer=tok, world_size=2,
                             rank=0)))


def test_shuffle_is_seeded_and_changes_with_epoch(shards, tok):
    def order(epoch, seed=0):
        ds = WebDataset(shards, image_size=SIZE, max_text_len=8, train=True, tokenizer=tok, shuffle_buffer=8,
                        seed=seed)
        ds.set_epoch(epoch)
        return [it["key"] for it in ds]

    first = order(0)
    assert sorted(first) == [f"{i:06d}" for i in range(23)] and first != sorted(first)
    assert order(0) == first and order(1) != first and order(0, seed=1) != first
    ds = WebDataset(shards, image_size=SIZE, max_text_len=8, train=True, tokenizer=tok, shuffle_buffer=8)
    assert [it["key"] for it in ds] != [it["key"] for it in ds]  # a second pass reshuffles (persistent workers)


def test_repeat_loops(shards, tok):
    ds = WebDataset(shards[:1], image_size=SIZE, max_text_len=8, train=True, tokenizer=tok, repeat=True)
    it = iter(ds)
    keys = [next(it)["key"] for _ in range(15)]
    assert len(keys) == 15 and set(keys) == {f"{i:06d}" for i in range(6)}


def test_a_repeating_reader_reports_the_unreadable_samples_at_a_pass_end(tmp_path, tok):
    """With drop_bad, an unreadable sample's count rides on the next readable item; the ones after a pass's last
    readable sample were lost when the pass ended, also when a next pass followed (repeat)."""
    samples = _samples(3) + [("000bad", b"not an image", "broken")]
    paths = write_shards(str(tmp_path), samples, samples_per_shard=4)
    ds = WebDataset(paths, image_size=SIZE, max_text_len=8, train=False, tokenizer=tok, repeat=True, drop_bad=True)
    it = iter(ds)
    items = [next(it) for _ in range(7)]
    assert [x["key"] for x in items] == ["000000", "000001", "000002"] * 2 + ["000000"]
    assert [x.get("bad_samples", 0) for x in items] == [0, 0, 0, 1, 0, 0, 1]
    # a pass's end adds no count-only item unless asked (IterableStream does): torch's default_collate, or a loop
    # reading item["image"], would fail on it
    ds = WebDataset(paths, image_size=SIZE, max_text_len=8, train=False, tokenizer=tok, drop_bad=True)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=torch.utils.data.default_collate))
    assert [len(b["key"]) for b in batches] == [2, 1] and "bad_samples" not in batches[-1]
    ds.count_only_items = True
    assert list(ds)[-1] == {"bad_samples": 1, "_place": 3}


def test_corrupt_samples_are_skipped_and_counted(tmp_path, tok):
    good = _samples(5)
    samples = good[:2] + [("000bad", b"not an image at all", "broken")] + good[2:]
    paths = write_shards(str(tmp_path / "a"), samples, samples_per_shard=3)
    # a sample without caption
    with tarfile.open(str(tmp_path / "nocap.tar"), "w") as tar:
        data = encode_image(_pixels(9))
        info = tarfile.TarInfo("lonely.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    # a caption the tokenizer refuses: valid JSON holding a lone surrogate
    with tarfile.open(str(tmp_path / "surrogate.tar"), "w") as tar:
        for name, data in (("odd.png", encode_image(_pixels(8))), ("odd.json", b'{"caption": "a \\ud800 dog"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # a truncated shard: the first samples survive, the damage counts once
    whole = write_shards(str(tmp_path / "b"), _samples(6, start=100), samples_per_shard=6)[0]
    with open(whole, "rb") as f:
        data = f.read()
    cut = str(tmp_path / "cut.tar")
    with open(cut, "wb") as f:
        f.write(data[: int(len(data) * 0.6)])
    ds = WebDataset(paths + [str(tmp_path / "nocap.tar"), str(tmp_path / "surrogate.tar"), cut], image_size=SIZE,
                    max_text_len=8, train=False, tokenizer=tok)
    keys, bad = _keys(ds, tok=tok)
    assert [k for k in keys if not k.startswith("0001")] == [k for k, _, _ in good]
    survivors = [k for k in keys if k.startswith("0001")]
    assert 1 <= len(survivors) < 6 and survivors == [f"{i:06d}" for i in range(100, 100 + len(survivors))]
    assert bad == 4  # bad image + missing caption + untokenizable caption + truncated shard


def test_big_sparse_or_unused_members_are_never_read_whole(tmp_path, tok, monkeypatch, caplog):
    """A member is read whole into memory: one claiming gigabytes (a gzip bomb, or a sparse member whose holes cost
    a few bytes of tar) must make its sample a bad one, not kill the worker; members the sample is not made of are
    not read at all."""
    import shutil
    import subprocess

    from vlmo_fast.data import webdataset as wds

    img = encode_image(_pixels(0))
    with tarfile.open(str(tmp_path / "a.tar"), "w") as tar:
        for name, data in (("ok.png", img), ("ok.txt", b"fine"), ("ok.bin", b"x" * 5000),
                           ("big.png", img + b"\0" * 4000), ("big.txt", b"too big")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(wds, "MAX_MEMBER_BYTES", 4000)
    raws = list(iter_tar(str(tmp_path / "a.tar")))
    assert raws[0]["bin"] is None and raws[0]["png"] == img  # (not one of READ_EXTS)
    assert raws[1]["png"] is None and raws[1]["__bad__"] == [f"big.png is {len(img) + 4000} bytes (a member is read "
                                                             f"whole, up to 0 MiB)"]
    ds = WebDataset([str(tmp_path / "a.tar")], image_size=SIZE, max_text_len=8, train=False, tokenizer=tok)
    keys, bad = _keys(ds, tok=tok)
    assert keys == ["ok"] and bad == 1 and "skipping unreadable sample big in" in caplog.text
    assert f"ValueError: big.png is {len(img) + 4000} bytes" in caplog.text
    tar_bin = shutil.which("tar")
    if tar_bin is None:  # (GNU tar writes the sparse member; the size limit above holds without it)
        return
    folder = tmp_path / "sparse"
    folder.mkdir()
    (folder / "s.txt").write_text("holes")
    with open(folder / "s.png", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB of holes: a tar of a few KiB
    subprocess.run([tar_bin, "--sparse", "-cf", str(tmp_path / "s.tar"), "s.png", "s.txt"], cwd=folder, check=True)
    assert os.path.getsize(tmp_path / "s.tar") < 1 << 20
    monkeypatch.setattr(wds, "MAX_MEMBER_BYTES", 1 << 31)  # (the sparse member is refused whatever its size)
    (raw,) = list(iter_tar(str(tmp_path / "s.tar")))
    assert raw["png"] is None and raw["__bad__"] == ["s.png is a sparse file (a member is read whole, up to 2048 MiB)"]


def test_expand_urls_and_missing_shards(shards, tmp_path):
    folder = os.path.dirname(shards[0])
    assert expand_urls(folder) == shards
    assert expand_urls(os.path.join(folder, "shard-{000001..000002}.tar")) == shards[1:3]
    assert expand_urls(os.path.join(folder, "shard-*.tar")) == shards
    with pytest.raises(FileNotFoundError, match="nothere"):
        WebDataset(str(tmp_path / "nothere.tar"))
    with pytest.raises(FileNotFoundError):
        expand_urls(str(tmp_path / "x-*.tar"))
    assert expand_urls(pathlib.Path(folder)) == shards
    assert expand_urls(p for p in shards[:2]) == shards[:2]  # any iterable of paths
    for bad in (None, 3, b"shard.tar", {"a": 1}):
        with pytest.raises(TypeError, match="urls must be a path, a glob, a brace range or a list of them, got"):
            WebDataset(bad)


def test_synthetic_shards(tmp_path, tok):
    paths = write_synthetic_shards(str(tmp_path), n=12, samples_per_shard=5, image_size=32)
    assert len(paths) == 3
    raws = [r for p in paths for r in iter_tar(p)]
    assert len(raws) == 12 and all(set(r) == {"__key__", "__url__", "png", "json"} for r in raws)
    assert isinstance(json.loads(raws[0]["json"])["caption"], str)
    items = list(WebDataset(paths, image_size=SIZE, max_text_len=12, train=True, tokenizer=tok))
    assert len(items) == 12 and items[0]["image"].shape == (3, SIZE, SIZE)


def test_write_shards_streams_atomically(tmp_path):
    """Shards of exactly samples_per_shard (the last one shorter), files with a normal mode; a sample that fails
    midway leaves the shards written so far and no partial shard or temporary file."""
    png = encode_image(np.zeros((4, 4, 3), np.uint8))
    paths = write_shards(str(tmp_path / "a"), ((f"k{i}", png, f"c{i}") for i in range(5)), samples_per_shard=2)
    assert [os.path.basename(p) for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [len(tar_names(p)) for p in paths] == [4, 4, 2]
    umask = os.umask(0)
    os.umask(umask)
    assert all(os.stat(p).st_mode & 0o777 == 0o666 & ~umask for p in paths)
    bad = [("k0", png, "c0"), ("k1", png, "c1"), ("k2", png, 3)]  # a non-str caption in the second shard
    with pytest.raises(TypeError, match="caption of k2"):
        write_shards(str(tmp_path / "b"), iter(bad), samples_per_shard=2)
    assert os.listdir(tmp_path / "b") == ["shard-000000.tar"]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """9 shards of 5, 5, ..., 1 samples, one holding an undecodable image and one cut short (bad samples)."""
    out = tmp_path_factory.mktemp("uneven")
    samples = _samples(41)
    samples[7] = ("000007", b"not an image", "caption number 7")
    paths = write_shards(str(out), samples, samples_per_shard=5)
    with tarfile.open(paths[3]) as tar:
        cut = tar.getmembers()[4].offset_data + 10  # inside the third sample's image
    with open(paths[3], "rb") as f:
        data = f.read()
    with open(paths[3], "wb") as f:
        f.write(data[:cut])
    return paths


def _stream(paths, tok, num_workers, batch_size=3, seed=3, world=1, rank=0):
    from vlmo_fast.train.data_setup import IterableStream
    from vlmo_fast.train.distributed import DistInfo

    ds = WebDataset(paths, image_size=SIZE, max_text_len=8, train=True, tokenizer=tok, shuffle_buffer=4, seed=seed,
                    rank=rank, world_size=world)
    return IterableStream(ds, build_collate(tok, mlm=True), batch_size, num_workers,
                          DistInfo(rank, world, 0, torch.device("cpu")))


def _signature(batch):
    """What the step sees: the samples, their augmented pixels, the MLM masking."""
    return (tuple(batch["key"]), batch["image"][0].sum().item(), tuple(batch["text_ids_mlm"].flatten().tolist()),
            batch["bad_samples"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # (3 workers on a 2-core machine: on purpose)
@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_a_resumed_shard_stream_yields_the_very_batches_it_would_have(uneven_shards, tok, num_workers):
    """The stream's position (per reader: batches taken; the reader due next; the epoch) resumes the same batches,
    augmentations and masks, at every point of an epoch: before and after readers run out (a DataLoader takes from
    the workers in turn, skipping those done), at the epoch's end and in the next epoch. It used to restart the
    epoch's shards."""
    full_stream = _stream(uneven_shards, tok, num_workers)
    full, epochs = [], []
    for _ in range(30):
        full.append(_signature(next(full_stream)))
        epochs.append(full_stream.epoch)
    assert epochs[-1] == 2 and all(len(b[0]) == 3 for b in full)  # full batches: unreadable samples left out
    # the unreadable image and the cut shard's rest are counted in every epoch, also when one is its reader's last
    # sample (a count rides on the next batch, and the counts of a reader's last, partial batch, which is left out,
    # ride on the one after it): those of epochs 0 and 1 by the first batch of epoch 2, and those of epoch 2 its 30
    # batches reach (one was lost before)
    assert sum(b[3] for b in full) == {0: 5, 2: 5, 3: 6}[num_workers]
    for k in (1, 4, 7, 9, 11, 12, 13, 14, 20, 26):
        first = _stream(uneven_shards, tok, num_workers)
        for _ in range(k):
            next(first)
        state = first.state()
        resumed = _stream(uneven_shards, tok, num_workers)
        resumed.restore(state)
        assert "continue where they were" in resumed.resume_note
        assert [_signature(next(resumed)) for _ in range(len(full) - k)] == full[k:], k


@pytest.mark.parametrize("bad_at", [6, 7])
def test_a_shard_stream_counts_the_unreadable_samples_at_a_readers_end(tmp_path, tok, bad_at):
    """An unreadable sample in a reader's last, partial batch (bad_at 6: its count rides on sample 7) or after its
    last readable sample (bad_at 7) was never counted: the DataLoader's drop_last dropped the one, the pass's end
    the other. The count now rides on the next epoch's first batch, and a resumed stream does not count it again."""
    from vlmo_fast.train.data_setup import IterableStream
    from vlmo_fast.train.distributed import DistInfo

    samples = _samples(8)
    samples[bad_at] = (samples[bad_at][0], b"not an image", "broken")
    paths = write_shards(str(tmp_path), samples, samples_per_shard=8)

    def stream():
        ds = WebDataset(paths, image_size=SIZE, max_text_len=8, train=True, tokenizer=tok, shuffle_buffer=1)
        return IterableStream(ds, build_collate(tok, mlm=False), 3, 0, DistInfo(0, 1, 0, torch.device("cpu")))

    full = stream()
    batches = [next(full) for _ in range(5)]
    assert [b["key"][0] for b in batches] == ["000000", "000003"] * 2 + ["000000"]  # the partial batch left out
    assert [b["bad_samples"] for b in batches] == [0, 0, 1, 0, 1]
    first = stream()
    next(first), next(first)
    state = first.state()
    resumed = stream()
    resumed.restore(state)
    assert [next(resumed)["bad_samples"] for _ in range(3)] == [1, 0, 1]


def test_a_shard_stream_on_another_layout_restarts_its_epoch_and_says_why(uneven_shards, tok):
    saved = _stream(uneven_shards, tok, 2)
    for _ in range(14):
        next(saved)
    state = saved.state()
    assert state["epoch"] == 1 and state["ranks"][0]["epoch"] == 1
    for stream, why in ((_stream(uneven_shards, tok, 1), "another --num-workers"),
                        (_stream(uneven_shards, tok, 2, batch_size=2), "another per-process batch"),
                        (_stream(uneven_shards, tok, 2, seed=4), "another --seed"),
                        (_stream(uneven_shards[:-1], tok, 2), "another shard list"),
                        (_stream(uneven_shards, tok, 2, world=2), "another number of processes")):
        stream.restore(state)
        assert stream.resume_note == f"the tar shards restart epoch 1 (samples of it are seen again): {why}"
        fresh = _stream(uneven_shards, tok, stream.readers if stream.readers > 1 else 0, batch_size=stream.batch_size,
                        seed=stream.dataset.seed, world=stream.info.world_size)
        fresh.dataset.urls = stream.dataset.urls
        fresh.epoch = 1
        assert [_signature(next(stream)) for _ in range(3)] == [_signature(next(fresh)) for _ in range(3)]
    old = _stream(uneven_shards, tok, 2)
    old.restore({"epoch": 1, "batch": 0})  # a checkpoint of an older version
    assert old.resume_note.endswith("the checkpoint has no position in them (an older version's)")
    assert old.epoch == 1 and old.taken == [0, 0]
    # a position from before the readers' shares rotated: the readers of epoch 1 have other shards now
    old = _stream(uneven_shards, tok, 2)
    old.restore(dict(state, layout=dict(state["layout"], position="places")))
    assert old.resume_note.endswith("another position format (an older version's)") and old.taken == [0, 0]


def test_set_position_checks_its_arguments(uneven_shards, tok):
    ds = WebDataset(uneven_shards, image_size=SIZE, max_text_len=8, train=True, tokenizer=tok)
    for skip, first in (([-1], 0), ([1, 2], 2), ([], -1)):
        with pytest.raises(ValueError, match="set_position: skip counts must be >= 0 and 0 <= first_worker"):
            ds.set_position(0, skip, first)
    ds.set_position(0, [3, 3], 1)
    with pytest.raises(ValueError, match="set_position gave 2 skip counts for a DataLoader with 1 readers"):
        next(iter(ds))
    ds.set_position(0, [2])  # without workers: one reader, its first two items left out
    everything = WebDataset(uneven_shards, image_size=SIZE, max_text_len=8, train=True, tokenizer=tok)
    assert [_item_key(it) for it in ds] == [_item_key(it) for it in everything][2:]


def _item_key(item):
    return None if item is None else (item["key"], item["_seed"], item["image"].sum().item())


def _tar(path, members):
    """A tar of (name, bytes) files, ("name", ("link"|"sym", target)) links, in the order given."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type = tarfile.LNKTYPE if data[0] == "link" else tarfile.SYMTYPE
                info.linkname = data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _read(paths, tok, caplog=None, **kw):
    ds = WebDataset(paths, image_size=SIZE, max_text_len=8, train=False, tokenizer=tok, **kw)
    return [None if it is None else (it["key"], it["text"]) for it in ds]


def test_shards_as_other_tools_write_them(tmp_path, tok, caplog):
    """A re-downloaded sample appended after its first copy (the same key, consecutive) was merged into one sample,
    losing the first; members stored apart (tar without --sort=name) failed with "no caption"/"no image" only;
    links were dropped with "no image"; an empty caption was trained on (prepare refuses one)."""
    img = encode_image(_pixels(0))
    dup = _tar(tmp_path / "dup.tar", [("a.jpg", img), ("a.txt", b"first"), ("a.jpg", img), ("a.txt", b"second"),
                                      ("b.jpg", img), ("b.txt", b"third")])
    assert _read([dup], tok) == [("a", "first"), ("a", "second"), ("b", "third")]
    assert not any("__split__" in raw for raw in iter_tar(dup))  # a copy right after the first is not "apart"
    apart = _tar(tmp_path / "apart.tar", [("a.jpg", img), ("b.jpg", img), ("a.txt", b"x"), ("b.txt", b"y")])
    assert _read([apart], tok) == [None] * 4
    apart2 = _tar(tmp_path / "apart2.tar", [("a.jpg", img), ("b.jpg", img), ("b.txt", b"y"), ("a.txt", b"x"),
                                            ("a.txt", b"z")])
    assert [raw.get("__split__", False) for raw in iter_tar(apart2)] == [False, False, True, True]
    assert "stores this sample's members apart, after other samples': write shards with each sample's files " \
           "together, e.g. tar --sort=name" in caplog.text
    links = _tar(tmp_path / "links.tar", [("a.png", img), ("a.txt", b"cat"), ("b.png", ("link", "a.png")),
                                          ("b.txt", b"dog"), ("c.png", ("sym", "a.png")), ("c.txt", b"cow")])
    assert _read([links], tok) == [("a", "cat"), None, None]
    assert "links are not followed in shards: b.png -> a.png; store the file itself" in caplog.text
    empty = _tar(tmp_path / "empty.tar", [("a.png", img), ("a.txt", b"  \n"), ("b.png", img),
                                          ("b.json", b'{"caption": ["", " ", "a dog "]}'), ("c.png", img),
                                          ("c.json", b'{"caption": " "}'), ("d.png", img),
                                          ("d.json", b'{"caption": ["", "  "]}')])
    assert _read([empty], tok) == [None, ("b", "a dog"), None, None]
    assert "a.txt is empty" in caplog.text and "holds empty strings only" in caplog.text


def test_a_shard_cut_at_a_header_is_damaged_not_finished(tmp_path, tok):
    """tarfile takes a file ending at, or inside, a member's header for the archive's end: the shard's rest was lost
    without a word. The end-of-archive block must be there."""
    path = write_shards(str(tmp_path), _samples(6), samples_per_shard=6)[0]
    with tarfile.open(path) as tar:
        third = tar.getmembers()[4].offset  # the header of the third sample's first member
    data = pathlib.Path(path).read_bytes()
    for cut in (third, third + 100):
        pathlib.Path(path).write_bytes(data[:cut])
        assert _read([path], tok) == [("000000", "caption number 0"), ("000001", "caption number 1"), None]
    with pytest.raises(tarfile.ReadError, match="truncated: the file ends at or inside a member's header"):
        list(iter_tar(path))


def test_compressed_shards_are_named_and_found(tmp_path, tok):
    """A .tar.gz or .tgz shard named directly was taken for a dataset key ("--data-root is required"), and a folder of
    them held "no .tar shards"."""
    import gzip

    from vlmo_fast.train.data_setup import _is_shards

    plain = write_shards(str(tmp_path / "p"), _samples(3), samples_per_shard=3)[0]
    (tmp_path / "z").mkdir()
    for name in ("a.tar.gz", "b.TGZ"):
        with open(plain, "rb") as src, gzip.open(tmp_path / "z" / name, "wb") as dst:
            dst.write(src.read())
    (tmp_path / "z" / "notes.txt").write_text("not a shard")
    found = expand_urls(str(tmp_path / "z"))
    assert [os.path.basename(p) for p in found] == ["a.tar.gz", "b.TGZ"]
    assert all(_is_shards(p) for p in found) and not _is_shards("coco")
    assert [k for k, _ in _read(found, tok)] == ["000000", "000001", "000002"] * 2


def test_a_training_stream_keeps_full_batches_and_stops_on_no_data(tmp_path, tok):
    """With unreadable samples dropped in the collate, one rank's batch was smaller than another's (the all-gathers
    of several processes then failed or hung) and could hold a single sample (ITM's negatives failed); shards
    without one readable sample made the stream search epochs forever."""
    samples = _samples(12)
    for i in (1, 2, 5):
        samples[i] = (samples[i][0], b"not an image", "broken")
    paths = write_shards(str(tmp_path / "s"), samples, samples_per_shard=4)
    for rank in (0, 1):
        stream = _stream(paths, tok, 0, batch_size=2, world=2, rank=rank)
        batches = [next(stream) for _ in range(8)]
        assert all(len(b["key"]) == 2 for b in batches)
        bad = sum(b["bad_samples"] for b in batches)
        assert bad >= 1
    broken = write_shards(str(tmp_path / "b"), [(f"{i}", b"junk", "c") for i in range(5)], samples_per_shard=5)
    with pytest.raises(ValueError, match=r"the tar shards gave no batch in a whole epoch on rank 0: no reader found 2 "
                                         r"readable samples among its shards \(1 shards"):
        next(_stream(broken, tok, 0, batch_size=2))


def test_shard_runs_refuse_epochs_and_keep_shuffling_without_augmentation(tmp_path):
    """--max-epochs on shards trained 0 steps and reported success (their length is unknown); --augment false turned
    off the shard and sample shuffle and the caption draw, not just the image transform."""
    from vlmo_fast.config import preset
    from vlmo_fast.data.transforms import EvalTransform
    from vlmo_fast.train import TrainConfig, train
    from vlmo_fast.train.data_setup import train_stream
    from vlmo_fast.train.distributed import DistInfo

    paths = write_shards(str(tmp_path / "s"), _samples(8), samples_per_shard=4)
    cfg = TrainConfig(datasets=[os.path.join(os.path.dirname(paths[0]), "*.tar")], max_steps=None, max_epochs=1,
                      out_dir=str(tmp_path / "run"), device="cpu")
    with pytest.raises(ValueError, match="max_epochs: tar shards have no length known in advance; give --max-steps"):
        train(cfg)
    cfg = TrainConfig(datasets=cfg.datasets, augment=False, out_dir=str(tmp_path / "run"), device="cpu",
                      num_workers=0, per_device_batch_size=2, batch_size=2, image_size=32)
    stream = train_stream(cfg, preset("vlmo_tiny_patch16", image_size=32), DistInfo(0, 1, 0, torch.device("cpu")))
    assert stream.dataset.train and stream.dataset.shuffle_buffer > 1
    assert isinstance(stream.dataset.transform, EvalTransform)
