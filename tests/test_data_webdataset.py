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
from vlmo_fast.data.webdataset import expand_urls, iter_tar, split_key

SIZE = 16


def _pixels(i):
    return np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


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
    assert [len(tarfile.open(p).getnames()) for p in paths] == [4, 4, 2]
    umask = os.umask(0)
    os.umask(umask)
    assert all(os.stat(p).st_mode & 0o777 == 0o666 & ~umask for p in paths)
    bad = [("k0", png, "c0"), ("k1", png, "c1"), ("k2", png, 3)]  # a non-str caption in the second shard
    with pytest.raises(TypeError, match="caption of k2"):
        write_shards(str(tmp_path / "b"), iter(bad), samples_per_shard=2)
    assert os.listdir(tmp_path / "b") == ["shard-000000.tar"]
