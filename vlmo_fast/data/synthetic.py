"""The built-in default dataset: procedurally drawn scenes with captions that describe them, in the official arrow
format, so ``vlmo-fast pretrain`` runs with no download and image-text learning is measurable within minutes.

Each image (default 64x64, PNG so colours are exact) has a dark grey background and one or two *groups* of
objects. A group is a count (one, two, three), a colour (red, green, blue, yellow, purple, white), a shape (circle,
square, triangle, star) and a position (left, right, top, bottom, center: five cells of a 3x3 grid, so groups never
overlap). Two groups of an image differ in position and in colour. Examples:

    "two red circles on the left"
    "two red circles on the left and a blue square at the top"
    "two red circles left and a blue square top"

Every image gets ``captions_per_image`` (up to 5) different paraphrases, like COCO's five captions. The short
paraphrases keep the content within 10 word pieces, so they survive a ``max_text_len`` of 12 (the tiny preset).

Why it is learnable: colour alone separates most pairs of a batch (6 colours; 1-2 groups per image), shape, count and
position add 4 x 3 x 5 more combinations; everything is encoded by plain pixels a 16x16 patch sees.

Measured on this repository's CPU machine (vlmo_tiny_patch16, 64 px, max_text_len 12, batch 32, AdamW lr 1e-4, no
warm-up, ITC only, 3000 training images, retrieval on 200 test images): in-batch ITC accuracy rises from 1/32 to
~0.15 within 300 steps, test IR@5 / TR@5 from 0.025 (chance) to ~0.17 / ~0.2 (about 25 s). Two conditions matter:

- Use the eval transform for training on this set (``build_dataset(..., "train", train=False)``). The official
  train augmentation is meant for photos: at 64 px its crops (scale 0.5-1) cut whole cells away, the flip swaps
  "left" and "right", Equalize/AutoContrast change the colours, and a 7 px translation is 11% of the image; with it
  the same run stays at chance for 300 steps.
- lr 1e-3 collapses the tiny model (all embeddings equal, loss stuck at ln(batch)); 1e-4 (the official default) works.

``write_synthetic(root, ...)`` writes ``coco_caption_karpathy_{train,restval,val,test}.arrow`` under ``root`` (train
rows split 90/10 between train and restval, as the official coco train split reads both) plus ``synthetic.json``,
the generation parameters. Called again with the same parameters it returns the existing files. The tables have the
official coco columns (image, caption, image_id, split) and one more, "objects": the scene as JSON.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..fileio import atomic_write_json
from .arrow import dataset_files, encode_image, make_caption_arrow

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 80, 235),
    "yellow": (235, 215, 30),
    "purple": (150, 40, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS: Dict[str, Tuple[int, int]] = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2),
                                         "center": (1, 1)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}
BACKGROUND_MAX = 70  # background grey level in [0, 70]: never equal to a colour of the palette
MANIFEST = "synthetic.json"
VERSION = 1


@dataclass(frozen=True)
class Group:
    count: int
    colour: str
    shape: str
    position: str


def sample_scene(rng: np.random.Generator, max_groups: int = 2) -> List[Group]:
    """One or ``max_groups`` groups with distinct positions and distinct colours."""
    n_groups = int(rng.integers(1, max_groups + 1))
    positions = rng.choice(list(POSITIONS), size=n_groups, replace=False)
    colours = rng.choice(list(COLOURS), size=n_groups, replace=False)
    return [Group(int(rng.integers(1, 4)), str(colour), str(rng.choice(SHAPES)), str(pos))
            for pos, colour in zip(positions, colours)]


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=colour)
    elif shape == "star":
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_scene(groups: Sequence[Group], size: int, rng: np.random.Generator) -> Image.Image:
    """The RGB image of ``groups`` on a random dark grey background (no anti-aliasing: exact palette colours)."""
    grey = int(rng.integers(0, BACKGROUND_MAX + 1))
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for g in groups:
        gx, gy = POSITIONS[g.position]
        x0, y0 = gx * cell, gy * cell
        colour = COLOURS[g.colour]
        if g.count == 1:
            jx, jy = rng.uniform(-0.04, 0.04, size=2) * cell
            _draw_object(draw, g.shape, x0 + cell / 2 + jx, y0 + cell / 2 + jy, cell * 0.46, colour)
            continue
        for q in rng.choice(4, size=g.count, replace=False):  # quadrants of the cell
            qx, qy = q % 2, q // 2
            jx, jy = rng.uniform(-0.01, 0.01, size=2) * cell  # small enough that objects never touch
            _draw_object(draw, g.shape, x0 + (qx + 0.5) * cell / 2 + jx, y0 + (qy + 0.5) * cell / 2 + jy,
                         cell * 0.19, colour)
    return img


def _noun(g: Group) -> str:
    return g.shape + ("s" if g.count > 1 else "")


def _article(g: Group) -> str:
    return "a" if g.count == 1 else COUNT_WORDS[g.count]


def _long(g: Group) -> str:
    return f"{_article(g)} {g.colour} {_noun(g)} {POSITION_PHRASES[g.position]}"


def _short(g: Group) -> str:
    return f"{_article(g)} {g.colour} {_noun(g)} {g.position}"


def scene_captions(groups: Sequence[Group]) -> List[str]:
    """Five paraphrases describing ``groups`` (the first is the canonical one)."""
    if len(groups) == 1:
        g = groups[0]
        return [
            _long(g),
            f"there {'is' if g.count == 1 else 'are'} {_long(g)}",
            f"{POSITION_PHRASES[g.position]}, {_article(g)} {g.colour} {_noun(g)}",
            f"a picture of {_long(g)}",
            f"{COUNT_WORDS[g.count]} {_noun(g)} in {g.colour} {POSITION_PHRASES[g.position]}",
        ]
    a, b = groups[0], groups[1]
    return [
        f"{_long(a)} and {_long(b)}",
        f"{_short(a)} and {_short(b)}",
        f"{_short(b)} and {_short(a)}",
        f"{_long(b)} and {_long(a)}",
        f"{_short(a)}, {_short(b)}",
    ]


def generate(n: int, image_size: int = 64, seed: int = 0, captions_per_image: int = 5, max_groups: int = 2,
             image_format: str = "PNG") -> Tuple[List[bytes], List[List[str]], List[str]]:
    """``n`` scenes: (encoded images, caption lists, scene JSON strings), deterministic in ``seed``."""
    if not 1 <= captions_per_image <= 5:
        raise ValueError(f"captions_per_image must be in 1..5, got {captions_per_image}")
    if max_groups not in (1, 2):
        raise ValueError(f"max_groups must be 1 or 2, got {max_groups}")
    rng = np.random.default_rng(seed)
    images, captions, scenes = [], [], []
    for _ in range(n):
        groups = sample_scene(rng, max_groups)
        images.append(encode_image(draw_scene(groups, image_size, rng), image_format))
        captions.append(scene_captions(groups)[:captions_per_image])
        scenes.append(json.dumps([asdict(g) for g in groups]))
    return images, captions, scenes


def write_synthetic(root: str, n_train: int = 4000, n_val: int = 500, n_test: int = 500, image_size: int = 64,
                    seed: int = 0, captions_per_image: int = 5, max_groups: int = 2, image_format: str = "PNG",
                    overwrite: bool = False) -> Dict[str, List[str]]:
    """Write the synthetic coco-like dataset under ``root``; returns {split: [paths]} (train: train + restval).

    Reuses the files when ``root/synthetic.json`` records the same parameters (unless ``overwrite``). Each split
    has its own random stream, so the test images do not depend on ``n_train``.
    """
    if image_size < 64:
        raise ValueError(f"write_synthetic: image_size must be >= 64 (smaller, the objects of a group touch), got "
                         f"{image_size}")
    params = dict(version=VERSION, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed,
                  captions_per_image=captions_per_image, max_groups=max_groups, image_format=image_format.upper())
    paths = {split: [os.path.join(root, f"{stem}.arrow") for stem in dataset_files("coco", split)]
             for split in ("train", "val", "test")}
    manifest = os.path.join(root, MANIFEST)
    if not overwrite and os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                existing = json.load(f)
        except (OSError, ValueError):
            existing = None
        if existing == params and all(os.path.isfile(p) for ps in paths.values() for p in ps):
            return paths
    os.makedirs(root, exist_ok=True)
    if os.path.exists(manifest):
        os.remove(manifest)
    for split_idx, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        images, captions, scenes = generate(n, image_size, seed=[seed, split_idx], captions_per_image=
                                            captions_per_image, max_groups=max_groups, image_format=image_format)
        ids = [f"synthetic_{split}_{i:06d}.{image_format.lower()}" for i in range(n)]
        if split == "train":
            cut = n - n // 10  # the last tenth goes to restval
            parts = [(paths["train"][0], slice(0, cut), "train"), (paths["train"][1], slice(cut, n), "restval")]
        else:
            parts = [(paths[split][0], slice(0, n), split)]
        for path, sl, name in parts:
            make_caption_arrow(path, images[sl], captions[sl], ids[sl], name, extra={"objects": scenes[sl]})
    atomic_write_json(manifest, params, indent=1)  # written last: its presence means complete
    return paths


def scene_of(objects_json: str) -> List[Group]:
    """The groups of one row's "objects" column."""
    return [Group(**g) for g in json.loads(objects_json)]
