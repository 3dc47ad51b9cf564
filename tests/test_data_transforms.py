"""The official train/eval transforms and ALBEF's RandomAugment (spec §7), and per-worker augmentation randomness
(quirk Q23, fixed)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, Dataset

from vlmo_fast.data import encode_image
from vlmo_fast.data import transforms as T


def _image(h=37, w=53, seed=None):
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) ** 2 * 200 + 20).astype(np.uint8)


@pytest.mark.parametrize("size,shape", [(32, (50, 80)), (64, (64, 64)), (48, (97, 31))])
def test_train_output_shape_range_dtype(size, shape):
    img = Image.fromarray(_image(*shape))
    out = T.TrainTransform(size)(img)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.is_contiguous()


def test_eval_is_square_resize_then_normalize():
    arr = _image(40, 40)
    out = T.EvalTransform(40)(Image.fromarray(arr))
    expected = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    non_square = Image.fromarray(_image(30, 70))
    resized = np.asarray(non_square.resize((24, 24), Image.BICUBIC))
    torch.testing.assert_close(T.EvalTransform(24)(non_square), T.to_normalized_tensor(resized))
    assert torch.equal(T.EvalTransform(24)(non_square), T.EvalTransform(24)(non_square))


def test_train_deterministic_given_seed():
    img = Image.fromarray(_image(64, 64))
    tf = T.TrainTransform(32)
    a = tf(img, rng=np.random.default_rng(3))
    b = tf(img, rng=np.random.default_rng(3))
    c = tf(img, rng=np.random.default_rng(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d = tf(img)
    torch.manual_seed(11)
    e = tf(img)
    f = tf(img)
    assert torch.equal(d, e) and not torch.equal(e, f)


def test_random_resized_crop_params_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = T.random_resized_crop_params(200, 120, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 120 - h and 0 <= left <= 200 - w
        assert 0.5 * 200 * 120 * 0.97 <= h * w <= 200 * 120
    # the crop's aspect ratio w/h is drawn log-uniformly from [3/4, 4/3] (within the rounding of w and h to pixels):
    # not always square, nor always at a bound
    ratios = []
    for _ in range(400):
        top, left, h, w = T.random_resized_crop_params(200, 160, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3, (w, h)
        ratios.append(w / h)
    logs = np.log(ratios) / np.log(4 / 3)  # in [-1, 1]
    assert logs.min() < -0.8 and logs.max() > 0.8
    assert np.mean(np.abs(logs) < 0.2) < 0.35 and np.mean(logs < 0) > 0.25 and np.mean(logs > 0) > 0.25
    # an extreme aspect ratio falls back to the largest centre crop within the ratio range
    top, left, h, w = T.random_resized_crop_params(1000, 10, (0.99, 1.0), (3 / 4, 4 / 3), rng)
    assert (h, w) == (10, 13) and left == (1000 - 13) // 2


def _is_mirrored(out):
    """For the left-to-right ramp of test_train_flips_half_the_images: the left third brighter than the right."""
    third = out.shape[2] // 3
    return bool(out[:, :, :third].mean() > out[:, :, -third:].mean())


def test_train_flips_half_the_images():
    """RandomHorizontalFlip(0.5) (spec §7): an image dark on the left and bright on the right comes out mirrored
    about half the time through the whole train transform (crop, flip, RandomAugment; none of which but the flip
    turns the ramp around), never with flip_prob 0, always with 1."""
    ramp = np.repeat(np.repeat(np.linspace(20, 230, 64)[None, :, None], 64, 0), 3, 2).astype(np.uint8)
    img = Image.fromarray(ramp)
    rng = np.random.default_rng(0)
    mirrored = [_is_mirrored(T.TrainTransform(32)(img, rng=rng)) for _ in range(300)]
    assert 0.35 < np.mean(mirrored) < 0.65, np.mean(mirrored)
    assert not any(_is_mirrored(T.TrainTransform(32, flip_prob=0.0)(img, rng=rng)) for _ in range(50))
    assert all(_is_mirrored(T.TrainTransform(32, flip_prob=1.0)(img, rng=rng)) for _ in range(50))


def test_train_applies_randaugment_to_the_cropped_image():
    """RandomAugment runs once per image, on the (flipped) S x S crop, and its output is what is normalised."""
    seen = []

    def spy(img, rng=None):
        arr = np.asarray(img)
        seen.append(arr.shape)
        return np.full_like(arr, 255)

    tf = T.TrainTransform(24)
    tf.randaug = spy
    for seed in range(5):
        out = tf(Image.fromarray(_image(50, 70, seed=seed)), rng=np.random.default_rng(seed))
        assert torch.equal(out, torch.ones(3, 24, 24))
    assert seen == [(24, 24, 3)] * 5
    assert isinstance(T.TrainTransform(24).randaug, T.RandomAugment)
    assert (T.TrainTransform(24).randaug.n, T.TrainTransform(24).randaug.m) == (2, 7)


def test_ops_match_pil_definitions():
    arr = _image(seed=1)
    pil = Image.fromarray(arr)
    np.testing.assert_array_equal(T.equalize(arr), np.asarray(ImageOps.equalize(pil)))
    np.testing.assert_array_equal(T.autocontrast(arr), np.asarray(ImageOps.autocontrast(pil)))
    sharp = T.sharpness(arr, 1.36)
    np.testing.assert_array_equal(sharp[1:-1, 1:-1], np.asarray(ImageEnhance.Sharpness(pil).enhance(1.36))[1:-1, 1:-1])
    np.testing.assert_array_equal(sharp[0], arr[0])  # the border is left as is (ALBEF)
    expected = np.clip(np.floor(arr.astype(np.float32) * np.float32(1.36)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(T.brightness(arr, 1.36), expected)


def test_geometric_ops_follow_opencv_conventions():
    arr = _image(seed=2)
    h, w = arr.shape[:2]
    out = T.translate_x(arr, 7.0)
    np.testing.assert_array_equal(out[:, : w - 7], arr[:, 7:])
    assert (out[:, w - 7 :] == 128).all()
    out = T.translate_y(arr, -7.0)
    np.testing.assert_array_equal(out[7:], arr[: h - 7])
    assert (out[:7] == 128).all()
    out = T.shear_x(arr, 0.21)
    np.testing.assert_array_equal(out[0], arr[0])  # dst(x, y) = src(x - 0.21 y, y): row 0 unchanged
    # row 10: dst(x) = src(x - 2.1) = 0.1 src(x - 3) + 0.9 src(x - 2) (bilinear)
    src = arr[10].astype(np.float64)
    expected = 0.1 * src[: w - 3] + 0.9 * src[1 : w - 2]
    assert np.abs(out[10, 3:].astype(np.float64) - expected).max() <= 1.0
    np.testing.assert_array_equal(T.rotate(arr, 0.0), arr)
    # counter-clockwise: a dot right of the centre goes to the top
    dot = np.zeros((41, 41, 3), np.uint8)
    dot[20, 35] = 255
    moved = T.rotate(dot, 90.0, fill=(0, 0, 0))
    ys, xs = np.nonzero(moved[..., 0] > 100)
    assert ys.mean() < 10 and abs(xs.mean() - 20.5) < 2


class _Recorder(T.RandomAugment):
    def __init__(self):
        super().__init__(2, 7)
        self.calls = []
        self.draws = 0

    def __call__(self, img, rng=None):
        self.draws += 1
        return super().__call__(img, rng)

    def apply(self, name, img, rng):
        self.calls.append(name)
        return super().apply(name, img, rng)


def test_randaugment_two_ops_with_replacement_each_half_the_time():
    aug = _Recorder()
    rng = np.random.default_rng(0)
    arr = _image(24, 24, seed=3)
    n = 2000
    for _ in range(n):
        out = aug(arr, rng)
        assert out.shape == arr.shape and out.dtype == np.uint8
    assert set(aug.calls) == set(T.ALBEF_OPS)
    # 2 ops per call, each applied with probability 0.5 -> 1 applied op per call on average
    assert abs(len(aug.calls) / n - 1.0) < 0.08
    counts = np.array([aug.calls.count(op) for op in T.ALBEF_OPS]) / len(aug.calls)
    assert np.all(np.abs(counts - 0.1) < 0.03)


def test_randaugment_magnitudes_at_m7():
    seen = {}

    def spy(name):
        def fn(img, value, fill=T.FILL):
            seen.setdefault(name, set()).add(round(value, 6))
            assert fill == (128, 128, 128)
            return img

        return fn

    aug = T.RandomAugment(2, 7)
    rng = np.random.default_rng(0)
    orig = {n: getattr(T, n) for n in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
                                        "sharpness")}
    try:
        for n in orig:
            setattr(T, n, spy(n))
        for name in T.ALBEF_OPS:
            for _ in range(40):
                aug.apply(name, _image(8, 8), rng)
    finally:
        for n, fn in orig.items():
            setattr(T, n, fn)
    assert seen["shear_x"] == seen["shear_y"] == {0.21, -0.21}
    assert seen["translate_x"] == seen["translate_y"] == {7.0, -7.0}
    assert seen["rotate"] == {21.0, -21.0}
    assert seen["brightness"] == seen["sharpness"] == {1.36}  # no random sign on the enhance ops (ALBEF)


class _SameImage(Dataset):
    def __init__(self):
        self.img = Image.fromarray(_image(48, 48, seed=5))
        self.tf = T.TrainTransform(32)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.tf(self.img)


def _same_numpy_state(worker_id):
    np.random.seed(0)  # what every worker inherited under the official torch 1.8 (Q23)


def test_dataloader_workers_draw_different_augmentations():
    """Items 0 and 1 are the first call in worker 0 and worker 1 respectively. Every worker gets the *same* numpy
    global state, as under the official torch 1.8 (modern torch reseeds numpy itself): a transform drawing from
    np.random would repeat its augmentation across workers; the torch-seeded draw must not."""
    kwargs = dict(batch_size=1, num_workers=2, worker_init_fn=_same_numpy_state)
    loader = DataLoader(_SameImage(), generator=torch.Generator().manual_seed(0), **kwargs)
    outs = [b[0] for b in loader]
    assert not torch.equal(outs[0], outs[1])
    again = [b[0] for b in DataLoader(_SameImage(), generator=torch.Generator().manual_seed(0), **kwargs)]
    assert all(torch.equal(a, b) for a, b in zip(outs, again))  # and reproducible from the loader's seed


def test_arrays_other_than_uint8_images_are_refused():
    """A float image in [0, 1] or a 16-bit one was cast to uint8: black, or wrapped values, silently."""
    ev, tr = T.build_transform(32, train=False), T.build_transform(32, train=True)
    img = _image(20, 30, seed=1)
    want = ev(Image.fromarray(img))
    assert torch.equal(ev(img), want)
    assert torch.equal(ev(img[:, :, 0]), ev(Image.fromarray(img[:, :, 0])))  # (H, W): grey
    for bad, err, match in [(img.astype(np.float32) / 255, TypeError, "float32 array"),
                            (img.astype(np.uint16) * 256, TypeError, "uint16 array"),
                            (img.astype(np.int64), TypeError, "int64 array"),
                            (torch.from_numpy(img).permute(2, 0, 1), ValueError, r"got shape \(3, 20, 30\) \(channels first"),
                            (img[:, :, :2], ValueError, "got shape"), (img[:0], ValueError, "got shape")]:
        for t in (ev, tr, encode_image):  # encode_image: what arrow files and shards are written with
            with pytest.raises(err, match=match):
                t(bad)
    assert encode_image(img) == encode_image(Image.fromarray(img))
