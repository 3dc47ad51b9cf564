"""The built-in synthetic dataset: official coco files, captions that describe the drawn pixels, determinism,
reuse, the generator's options, and a collated batch that the model and the objectives accept end to end."""

import json
import os
from collections import deque

import numpy as np
import pytest
import torch

import vlmo_fast
from vlmo_fast.data import build_collate, build_dataset, build_loader, read_arrow, write_synthetic
from vlmo_fast.data import synthetic as S
from vlmo_fast.data.sample import decode_image
from vlmo_fast.objectives import compute_tasks, total_loss


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    write_synthetic(root, n_train=60, n_val=12, n_test=12, image_size=64, seed=0)
    return root


def test_official_coco_files(root):
    names = sorted(f for f in os.listdir(root) if f.endswith(".arrow"))
    assert names == ["coco_caption_karpathy_restval.arrow", "coco_caption_karpathy_test.arrow",
                     "coco_caption_karpathy_train.arrow", "coco_caption_karpathy_val.arrow"]
    train = read_arrow(os.path.join(root, "coco_caption_karpathy_train.arrow"))
    restval = read_arrow(os.path.join(root, "coco_caption_karpathy_restval.arrow"))
    assert train.num_rows + restval.num_rows == 60 and restval.num_rows == 6
    assert set(train.schema.names) >= {"image", "caption", "image_id", "split", "objects"}
    ds = build_dataset(root, ["coco"], "train", image_size=32, max_text_len=12, train=True)
    assert ds.num_rows() == 60 and len(ds) == 300  # five distinct captions per image


def _components(mask):
    """Number of 8-connected components of a boolean image."""
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + dy, cx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def test_captions_describe_the_pixels(root):
    """For every image: the palette colours present are exactly the colours the captions name; each group's pixels
    lie in the named cell and form as many blobs as the named count; every caption names each colour and shape."""
    table = read_arrow(os.path.join(root, "coco_caption_karpathy_test.arrow"))
    words = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
    for row in range(table.num_rows):
        pixels = np.asarray(decode_image(table.column("image")[row].as_py()))
        groups = S.scene_of(table.column("objects")[row].as_py())
        captions = table.column("caption")[row].as_py()
        present = {name for name, rgb in S.COLOURS.items() if (pixels == rgb).all(-1).sum() >= 4}
        assert present == {g.colour for g in groups}, (captions[0], present)
        for g in groups:
            for caption in captions:
                assert g.colour in caption and g.shape in caption
                assert any(f"{w} " in caption for w in words[g.count])
            mask = (pixels == S.COLOURS[g.colour]).all(-1)
            ys, xs = np.nonzero(mask)
            gx, gy = S.POSITIONS[g.position]
            cell = 64 / 3
            assert gx * cell - 1 <= xs.min() and xs.max() <= (gx + 1) * cell + 1, (captions[0], g)
            assert gy * cell - 1 <= ys.min() and ys.max() <= (gy + 1) * cell + 1, (captions[0], g)
            assert _components(mask) == g.count, (captions[0], g)
        assert captions[0].startswith(("a ", "one ", "two ", "three "))


def test_short_paraphrases_fit_the_tiny_text_length():
    tok = vlmo_fast.tokenizer.BertTokenizer()
    rng = np.random.default_rng(0)
    for _ in range(100):
        caps = S.scene_captions(S.sample_scene(rng))
        assert len(set(caps)) == 5
        assert sum(len(tok.tokenize(c)) <= 10 for c in caps) >= 3


def test_deterministic_reused_and_regenerated(tmp_path):
    a = S.generate(20, 64, seed=5)
    b = S.generate(20, 64, seed=5)
    c = S.generate(20, 64, seed=6)
    assert a == b and a[0] != c[0]
    root = str(tmp_path)
    paths = write_synthetic(root, n_train=10, n_val=2, n_test=2)
    stamp = os.stat(paths["test"][0]).st_mtime_ns
    assert write_synthetic(root, n_train=10, n_val=2, n_test=2) == paths
    assert os.stat(paths["test"][0]).st_mtime_ns == stamp  # reused, not rewritten
    write_synthetic(root, n_train=10, n_val=2, n_test=3)
    assert read_arrow(paths["test"][0]).num_rows == 3
    with open(os.path.join(root, "synthetic.json")) as f:
        assert json.load(f)["n_test"] == 3
    with pytest.raises(ValueError, match="image_size"):
        write_synthetic(root, n_train=4, n_val=1, n_test=1, image_size=48)


def test_generation_options():
    """captions_per_image keeps the first captions of the same scenes; max_groups=1 draws one object group per scene;
    out-of-range options are refused."""
    images, captions, scenes = S.generate(40, 64, seed=1)
    few_images, few, _ = S.generate(40, 64, seed=1, captions_per_image=2)
    assert len(images) == len(captions) == len(scenes) == 40
    assert few_images == images and few == [c[:2] for c in captions] and all(len(c) == 5 for c in captions)
    assert any(len(json.loads(scene)) == 2 for scene in scenes)
    single_images, _, single = S.generate(40, 64, seed=1, max_groups=1)
    assert all(len(json.loads(scene)) == 1 for scene in single)
    assert all(np.asarray(decode_image(img)).shape == (64, 64, 3) for img in single_images)
    for bad in (dict(captions_per_image=0), dict(captions_per_image=6), dict(max_groups=3)):
        with pytest.raises(ValueError):
            S.generate(1, 64, **bad)


def test_collated_batch_runs_the_model_and_objectives(root):
    """The batch layout the model and vlmo_fast.objectives read, end to end on the tiny preset (64 px, Lt 12)."""
    ds = build_dataset(root, ["coco"], "train", image_size=64, max_text_len=12, train=True)
    loader = build_loader(ds, batch_size=6, collate=build_collate(), train=True, num_workers=0, seed=0)
    batch = next(iter(loader))
    assert isinstance(batch["image"], list) and len(batch["image"]) == 1
    assert batch["image"][0].shape == (6, 3, 64, 64) and batch["image"][0].dtype == torch.float32
    for key in ("text_ids", "text_masks", "text_labels", "text_ids_mlm", "text_labels_mlm"):
        assert batch[key].shape == (6, 12) and batch[key].dtype == torch.int64, key
    for key in ("img_index", "cap_index", "raw_index", "replica", "text"):
        assert isinstance(batch[key], list) and len(batch[key]) == 6, key
    assert batch["bad_samples"] == 0 and (batch["text_labels_mlm"] != -100).any()
    torch.manual_seed(0)
    model = vlmo_fast.VLMo(vlmo_fast.preset("vlmo_tiny_patch16"))
    out = model.infer(batch, mask_text=True)
    assert out["text_feats"].shape == (6, 12, 64) and out["cls_feats"].shape == (6, 64)
    ret = compute_tasks(model, batch, ["mlm", "itc", "itm"], generator=torch.Generator().manual_seed(0))
    loss = total_loss(ret)
    assert torch.isfinite(loss)
    loss.backward()
