"""The official image transforms (spec §7 "Image transforms"), with PIL + numpy + torch only.

``train`` is the official ``square_transform_randaug``::

    RandomResizedCrop(S, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic)
    -> RandomHorizontalFlip(0.5)
    -> RandomAugment(N=2, M=7) with the ALBEF op list
    -> ToTensor -> Normalize(mean=0.5, std=0.5)            (values in [-1, 1])

``eval`` (val/test) is ``square_transform``: Resize((S, S), bicubic) -> ToTensor -> Normalize(0.5, 0.5), a square
resize without crop.

RandomAugment (ALBEF ``randaugment.py``, which VLMo imports): the ops are Identity, AutoContrast, Equalize,
Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Rotate. N=2 ops are drawn *with replacement*; each is
then applied with probability 0.5. Magnitudes at M=7 of MAX_LEVEL=10:

- Brightness, Sharpness: enhance factor 7/10 * 1.8 + 0.1 = 1.36. ALBEF draws no sign for the enhance ops (always
  1.36, i.e. always brighter / sharper); only the geometric ops get a random sign.
- ShearX/ShearY: ±0.21 (negative when a uniform draw is > 0.5).
- TranslateX/TranslateY: ±7 pixels (translate_const 10), absolute pixels whatever the image size.
- Rotate: ±21 degrees (negative when a uniform draw is < 0.5), about (W/2, H/2).
- Fill colour of the geometric ops: (128, 128, 128); bilinear sampling.
- AutoContrast (cutoff 0) and Equalize: per-channel lookup tables, as PIL defines them (see the deviations below).

The official ops are OpenCV ``warpAffine`` calls; here the same affine maps (in OpenCV's pixel-centre coordinates)
go through ``PIL.Image.transform``. Differences: at the image border PIL clamps the bilinear neighbours where OpenCV
blends with the fill colour (a one-pixel seam), and OpenCV's fixed-point interpolation rounds slightly differently.

Randomness (fix of quirk Q23): the official RandomAugment draws from ``np.random`` inside DataLoader workers, which
the pinned torch 1.8 does not reseed per worker, so workers can repeat the same augmentation choices. Here every call
builds its own ``numpy.random.Generator`` from a seed drawn from torch's global generator, which DataLoader seeds
differently in every worker (base_seed + worker_id) and ``torch.manual_seed`` makes deterministic; this holds whatever
the workers' numpy state is (newer torch also reseeds numpy per worker, but nothing here relies on it). The
crop/flip parameters come from the same generator (torchvision drew them from torch). Pass ``rng=`` to control it
directly (tests).

Two more deliberate deviations, both where ALBEF's numpy code wraps uint8 values around:
- Sharpness: ALBEF casts an out-of-range float to uint8, wrapping both ways (300 -> 44, -44 -> 212); here it is
  clipped to [0, 255] as PIL's ImageEnhance does.
- AutoContrast: ALBEF takes each channel's minimum as a numpy uint8 scalar and negates it, which wraps (-5 -> 251),
  so every channel whose minimum is above 0 maps to 255 (the channel turns white; only channels that already reach
  0 are stretched). Here each channel is stretched from [min, max] to [0, 255], as PIL's ImageOps.autocontrast.
  An official run's AutoContrast draws (2 draws of 10 ops, each applied with probability 0.5: about 1 image in 10)
  thus whitened the channels of most natural images that got one.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC if hasattr(Image, "Resampling") else Image.BICUBIC
BILINEAR = Image.Resampling.BILINEAR if hasattr(Image, "Resampling") else Image.BILINEAR
AFFINE = Image.Transform.AFFINE if hasattr(Image, "Transform") else Image.AFFINE
FLIP_LEFT_RIGHT = Image.Transpose.FLIP_LEFT_RIGHT if hasattr(Image, "Transpose") else Image.FLIP_LEFT_RIGHT

ALBEF_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
             "TranslateY", "Rotate")
MAX_LEVEL = 10
TRANSLATE_CONST = 10
FILL = (128, 128, 128)


def rng_from_torch() -> np.random.Generator:
    """A fresh numpy Generator seeded from torch's global RNG (per-worker in DataLoader workers)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


# ---- ops on uint8 (H, W, 3) arrays -------------------------------------------------------------------------------


def _lut(img: np.ndarray, tables: Sequence[np.ndarray]) -> np.ndarray:
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        out[..., c] = tables[c][img[..., c]]
    return out


def autocontrast(img: np.ndarray) -> np.ndarray:
    """Stretch each channel linearly so its min maps to 0 and its max to 255 (cutoff 0), as PIL (not ALBEF's uint8
    wrap-around, see the module docstring)."""
    tables = []
    for c in range(img.shape[2]):
        low, high = int(img[..., c].min()), int(img[..., c].max())
        if high <= low:
            tables.append(np.arange(256, dtype=np.uint8))
            continue
        scale = 255.0 / (high - low)
        table = np.arange(256) * scale - low * scale
        tables.append(table.clip(0, 255).astype(np.uint8))
    return _lut(img, tables)


def equalize(img: np.ndarray) -> np.ndarray:
    """PIL's ImageOps.equalize, channel by channel."""
    tables = []
    for c in range(img.shape[2]):
        hist = np.bincount(img[..., c].ravel(), minlength=256).astype(np.int64)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            tables.append(np.arange(256, dtype=np.uint8))
            continue
        n = np.empty_like(hist)
        n[0] = step // 2
        n[1:] = hist[:-1]
        tables.append((np.cumsum(n) // step).clip(0, 255).astype(np.uint8))
    return _lut(img, tables)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return table[img]


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the 3x3 smoothing kernel [[1,1,1],[1,5,1],[1,1,1]]/13; the one-pixel border stays unchanged."""
    if factor == 1.0 or img.shape[0] < 3 or img.shape[1] < 3:
        return img
    f = img.astype(np.float32)
    acc = 4.0 * f[1:-1, 1:-1]  # centre weight 5 = 1 (in the 3x3 sum below) + 4
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            acc += f[dy : dy + f.shape[0] - 2, dx : dx + f.shape[1] - 2]
    degenerate = np.rint(acc / 13.0).clip(0, 255)  # the uint8 result of the official filter2D
    out = f.copy()
    out[1:-1, 1:-1] = degenerate + factor * (f[1:-1, 1:-1] - degenerate)
    return out.clip(0, 255).astype(np.uint8)


def _warp(img: np.ndarray, forward: np.ndarray, fill=FILL) -> np.ndarray:
    """Apply the OpenCV-convention forward affine map ``forward`` (2x3, src -> dst, pixel centres at integers)."""
    a, t = forward[:, :2].astype(np.float64), forward[:, 2].astype(np.float64)
    inv = np.linalg.inv(a)
    inv_t = -inv @ t
    # PIL samples input point M @ (x + 0.5, y + 0.5) + c with pixel centres at +0.5; shift to OpenCV's convention.
    c0 = inv_t[0] + 0.5 - 0.5 * (inv[0, 0] + inv[0, 1])
    c1 = inv_t[1] + 0.5 - 0.5 * (inv[1, 0] + inv[1, 1])
    data = (inv[0, 0], inv[0, 1], c0, inv[1, 0], inv[1, 1], c1)
    h, w = img.shape[:2]
    pil = Image.fromarray(img)
    out = pil.transform((w, h), AFFINE, data, resample=BILINEAR, fillcolor=tuple(fill))
    return np.asarray(out)


def shear_x(img: np.ndarray, factor: float, fill=FILL) -> np.ndarray:
    return _warp(img, np.array([[1.0, factor, 0.0], [0.0, 1.0, 0.0]]), fill)


def shear_y(img: np.ndarray, factor: float, fill=FILL) -> np.ndarray:
    return _warp(img, np.array([[1.0, 0.0, 0.0], [factor, 1.0, 0.0]]), fill)


def translate_x(img: np.ndarray, offset: float, fill=FILL) -> np.ndarray:
    """Content moves left by ``offset`` pixels: out[:, x] = img[:, x + offset]."""
    return _warp(img, np.array([[1.0, 0.0, -offset], [0.0, 1.0, 0.0]]), fill)


def translate_y(img: np.ndarray, offset: float, fill=FILL) -> np.ndarray:
    return _warp(img, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -offset]]), fill)


def rotate(img: np.ndarray, degrees: float, fill=FILL) -> np.ndarray:
    """Counter-clockwise rotation about (W/2, H/2), as OpenCV's getRotationMatrix2D(centre, degrees, 1)."""
    h, w = img.shape[:2]
    cx, cy = w / 2, h / 2
    alpha, beta = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    forward = np.array([[alpha, beta, (1 - alpha) * cx - beta * cy], [-beta, alpha, beta * cx + (1 - alpha) * cy]])
    return _warp(img, forward, fill)


def _signed(value: float, rng: np.random.Generator, negative_if_above: bool = True) -> float:
    draw = rng.random()
    negative = draw > 0.5 if negative_if_above else draw < 0.5
    return -value if negative else value


class RandomAugment:
    """ALBEF's RandomAugment(N, M, isPIL=True, augs=...): PIL image or uint8 array in, uint8 (H, W, 3) array out."""

    def __init__(self, n: int = 2, m: int = 7, augs: Sequence[str] = ALBEF_OPS):
        unknown = set(augs) - set(ALBEF_OPS)
        if unknown:
            raise ValueError(f"RandomAugment: unknown op(s) {sorted(unknown)}; expected a subset of {list(ALBEF_OPS)}")
        self.n, self.m, self.augs = int(n), int(m), tuple(augs)

    def apply(self, name: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply op ``name`` at magnitude M (drawing its sign from ``rng`` where ALBEF does)."""
        level = self.m / MAX_LEVEL
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return autocontrast(img)
        if name == "Equalize":
            return equalize(img)
        if name == "Brightness":
            return brightness(img, level * 1.8 + 0.1)
        if name == "Sharpness":
            return sharpness(img, level * 1.8 + 0.1)
        if name == "ShearX":
            return shear_x(img, _signed(level * 0.3, rng))
        if name == "ShearY":
            return shear_y(img, _signed(level * 0.3, rng))
        if name == "TranslateX":
            return translate_x(img, _signed(level * float(TRANSLATE_CONST), rng))
        if name == "TranslateY":
            return translate_y(img, _signed(level * float(TRANSLATE_CONST), rng))
        if name == "Rotate":
            return rotate(img, _signed(level * 30.0, rng, negative_if_above=False))
        raise ValueError(f"RandomAugment: unknown op {name!r}")

    def __call__(self, img, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        rng = rng if rng is not None else rng_from_torch()
        arr = uint8_array(img)
        for idx in rng.choice(len(self.augs), self.n):  # with replacement, as np.random.choice(augs, N)
            if rng.random() > 0.5:
                continue
            arr = self.apply(self.augs[int(idx)], arr, rng)
        return arr


# ---- geometry, tensor conversion ----------------------------------------------------------------------------------


def random_resized_crop_params(width: int, height: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                               rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop.get_params: 10 tries, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_normalized_tensor(img) -> torch.Tensor:
    """ToTensor + Normalize(0.5, 0.5): uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    arr = uint8_array(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    # numpy, not torch: single-threaded, so it does not contend with the training process's intra-op threads
    out = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
    out /= 255.0
    out -= 0.5
    out /= 0.5
    return torch.from_numpy(out)


def uint8_array(img) -> np.ndarray:
    """``img`` as a numpy array that must be uint8: a float image in [0, 1] or a 16-bit one cast to uint8 would be
    silently black, or wrap around."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise TypeError(f"image: expected a PIL image or a uint8 array, got a {arr.dtype} array (scale it to 0..255 "
                        f"and convert to uint8 first)")
    return arr


def image_from_array(img) -> Image.Image:
    """A PIL image from a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4) (the layout PIL and numpy image
    libraries use); other arrays are refused, naming what they are."""
    arr = uint8_array(img)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or 0 in arr.shape:
        raise ValueError(f"image: expected a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4), got shape "
                         f"{tuple(arr.shape)}" + (" (channels first? permute to (H, W, C))"
                                                 if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) else ""))
    return Image.fromarray(arr)


def _check_rgb(img) -> Image.Image:
    """A PIL image in RGB, from a PIL image (converted as the official ``.convert("RGB")``) or an array
    (``image_from_array``)."""
    if not isinstance(img, Image.Image):
        img = image_from_array(img)
    return img if img.mode == "RGB" else img.convert("RGB")


class TrainTransform:
    """``square_transform_randaug``: PIL image -> (3, S, S) float tensor in [-1, 1]."""

    def __init__(self, size: int, scale: Tuple[float, float] = (0.5, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), randaug_n: int = 2, randaug_m: int = 7,
                 augs: Sequence[str] = ALBEF_OPS, flip_prob: float = 0.5):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"TrainTransform: size must be a positive int, got {size!r}")
        self.size, self.scale, self.ratio, self.flip_prob = size, tuple(scale), tuple(ratio), float(flip_prob)
        self.randaug = RandomAugment(randaug_n, randaug_m, augs)

    def __call__(self, img, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        rng = rng if rng is not None else rng_from_torch()
        img = _check_rgb(img)
        top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio, rng)
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), BICUBIC)
        if rng.random() < self.flip_prob:
            img = img.transpose(FLIP_LEFT_RIGHT)
        return to_normalized_tensor(self.randaug(img, rng))

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"randaug=(N={self.randaug.n}, M={self.randaug.m}, {list(self.randaug.augs)}))")


class EvalTransform:
    """``square_transform``: square bicubic resize, then (3, S, S) in [-1, 1]. Deterministic."""

    def __init__(self, size: int):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"EvalTransform: size must be a positive int, got {size!r}")
        self.size = size

    def __call__(self, img, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        img = _check_rgb(img)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), BICUBIC)
        return to_normalized_tensor(img)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"


def build_transform(image_size: int, train: bool) -> Callable:
    """The official transform for a split: train -> TrainTransform, val/test -> EvalTransform."""
    return TrainTransform(image_size) if train else EvalTransform(image_size)
