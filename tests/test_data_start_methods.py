"""DataLoader workers started by "spawn" (macOS, Windows) or "forkserver" (Linux's default from Python 3.14) get the
dataset and the collate function pickled: they must read the very batches that "fork" workers read (the same random
crops, flips and MLM masks, drawn from the loader's seed), from the arrow files and from tar shards alike."""

import subprocess
import sys

import pytest
import torch

from vlmo_fast import data as vdata

# run in a fresh interpreter: the start method is process-wide and can be set once
_LOADER = r"""
import multiprocessing as mp
import os
import sys

import torch

if __name__ == "__main__":
    method, kind, root, out = sys.argv[1:5]
    mp.set_start_method(method)
    from vlmo_fast import data as vdata
    from vlmo_fast.tokenizer import BertTokenizer

    tok = BertTokenizer()
    if kind == "arrow":
        ds = vdata.build_dataset(root, ["coco"], "train", image_size=32, max_text_len=12, train=True, tokenizer=tok)
    else:
        ds = vdata.WebDataset(os.path.join(root, "*.tar"), image_size=32, max_text_len=12, tokenizer=tok, seed=0)
    loader = vdata.build_loader(ds, batch_size=4, collate=vdata.build_collate(tok), train=True, num_workers=2,
                                seed=0)
    batches = [{k: v for k, v in b.items() if isinstance(v, torch.Tensor) or k == "image"}
               for _, b in zip(range(3), loader)]
    torch.save(batches, out)
"""


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    arrow = str(tmp_path_factory.mktemp("arrow"))
    vdata.write_synthetic(arrow, n_train=24, n_val=4, n_test=4, image_size=64, seed=1)
    shards = str(tmp_path_factory.mktemp("shards"))
    vdata.write_synthetic_shards(shards, n=24, samples_per_shard=6, image_size=32, seed=1)
    return {"arrow": arrow, "shards": shards}


def _batches(tmp_path, method, kind, root):
    script = tmp_path / "loader.py"
    script.write_text(_LOADER)
    out = tmp_path / f"{method}_{kind}.pt"
    proc = subprocess.run([sys.executable, str(script), method, kind, root, str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("kind", ["arrow", "shards"])
def test_spawned_and_forkserver_workers_read_what_forked_ones_read(tmp_path, roots, kind):
    forked = _batches(tmp_path, "fork", kind, roots[kind])
    assert len(forked) == 3 and all(b["text_ids"].shape[0] == 4 for b in forked)
    for method in ("spawn", "forkserver"):
        got = _batches(tmp_path, method, kind, roots[kind])
        assert len(got) == len(forked)
        for a, b in zip(got, forked):
            assert a.keys() == b.keys()
            for key in a:
                xs, ys = (a[key], b[key]) if key == "image" else ([a[key]], [b[key]])
                assert all(torch.equal(x, y) for x, y in zip(xs, ys)), (method, key)
