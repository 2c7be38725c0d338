"""Augmentation of aligned crops: each transform against a closed form, determinism per
(seed, epoch, index), and the dataset applying it only when training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtmim_cli.data.augment import LUMA, Augment, photometric, warp_similarity
from mtmim_cli.data.dataset import CacheDataset, _flip_bit
from mtmim_cli.errors import MtmimError

from .conftest import write_cache


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (112, 112, 3)).astype(np.uint8)


def test_warp_matches_exact_pixel_moves() -> None:
    img = _image()
    f = img.astype(np.float32)
    np.testing.assert_array_equal(warp_similarity(img, 0.0, 1.0, (0.0, 0.0)), f)
    # a quarter turn about the centre maps the pixel grid onto itself: np.rot90 (counter-clockwise)
    np.testing.assert_allclose(warp_similarity(img, 90.0, 1.0, (0.0, 0.0)), np.rot90(f), atol=1e-3)
    # an integer shift moves the content right/down; the uncovered border repeats the edge
    out = warp_similarity(img, 0.0, 1.0, (3.0, -2.0))
    np.testing.assert_array_equal(out[:-2, 3:], f[2:, :-3])
    np.testing.assert_array_equal(out[:-2, 0], f[2:, 0])


def test_warp_rotation_and_scale_against_pil() -> None:
    """PIL's affine transform (bilinear) with the same inverse map, away from the borders."""
    img = _image(1)
    angle, scale = 7.0, 1.04
    out = warp_similarity(img, angle, scale, (0.0, 0.0))
    c = 55.5
    a = np.radians(angle)
    cos, sin = np.cos(a) / scale, np.sin(a) / scale
    # PIL maps output (x, y) to input (a x + b y + c0, d x + e y + f0), pixel centres at +0.5
    ca, cb = cos, -sin
    cd, ce = sin, cos
    c0 = c + 0.5 - ca * (c + 0.5) - cb * (c + 0.5)
    f0 = c + 0.5 - cd * (c + 0.5) - ce * (c + 0.5)
    pil = np.stack([np.asarray(Image.fromarray(img[..., k]).convert("F").transform(
        (112, 112), Image.AFFINE, (ca, cb, c0, cd, ce, f0), resample=Image.BILINEAR))
        for k in range(3)], axis=2)
    np.testing.assert_allclose(out[12:-12, 12:-12], pil[12:-12, 12:-12], atol=0.05)


def test_photometric_closed_forms() -> None:
    img = _image(2).astype(np.float32) * 0.5 + 40
    np.testing.assert_allclose(photometric(img, brightness=1.2), np.clip(img * 1.2, 0, 255), rtol=1e-6)
    luma = img @ LUMA
    np.testing.assert_allclose(photometric(img, contrast=0.7), (img - luma.mean()) * 0.7 + luma.mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(photometric(img, saturation=0.0), np.repeat(luma[..., None], 3, 2), rtol=1e-5)
    grey = photometric(img, grey=True)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    np.testing.assert_allclose(grey[..., 0], luma, rtol=1e-5)
    assert photometric(img, brightness=9.0).max() == 255.0


def test_draws_are_a_function_of_seed_epoch_index() -> None:
    aug = Augment.parse("light")
    img = _image(3)
    a = aug(img, 0, 1, 5)
    np.testing.assert_array_equal(a, aug(img, 0, 1, 5))
    for other in [(1, 1, 5), (0, 2, 5), (0, 1, 6)]:
        assert not np.array_equal(a, aug(img, *other))
    assert not Augment.parse("none") and Augment.parse("none")(img, 0, 0, 0).dtype == np.float32
    np.testing.assert_array_equal(Augment.parse("none")(img, 0, 0, 0), img.astype(np.float32))


def test_parse_presets_overrides_and_bad_input() -> None:
    a = Augment.parse("light,grey=0.5,rotate=0")
    assert a.grey == 0.5 and a.rotate == 0 and a.brightness == 0.2
    assert Augment.parse("rotate=4").describe() == "rotate=4"
    for bad, msg in [("heavy", "unknown preset"), ("tilt=3", "unknown key"), ("rotate=x", "not a number"),
                     ("scale=1.5", "must be < 1"), ("rotate=-1", ">= 0")]:
        with pytest.raises(MtmimError, match=msg):
            Augment.parse(bad)


def test_dataset_augments_training_views_only(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", ["a", "a", "b", "b"])
    aug = Augment.parse("light")
    plain = CacheDataset([cache], train=True, crop_width=96, seed=4)
    ds = CacheDataset([cache], train=True, crop_width=96, seed=4, augment=aug)
    test = CacheDataset([cache], train=False, crop_width=96, seed=4, augment=aug)
    ds.set_epoch(2)
    x = ds.collate(ds.__getitems__([0, 1, 2, 3]))[0]
    assert tuple(x.shape) == (4, 3, 112, 96)
    assert not np.array_equal(x.numpy(), plain.collate(plain.__getitems__([0, 1, 2, 3]))[0].numpy())
    # item i of epoch 2: the augmented 112x112 image, cropped, flipped by the dataset's flip bit
    cached, rec = ds.source(1)
    view = aug(cached.image(rec), 4, 2, 1)[:, 8:104]
    if _flip_bit(4, 2, 1):
        view = view[:, ::-1]
    np.testing.assert_allclose(x[1].numpy(), (view.transpose(2, 0, 1) - 127.5) / 128, atol=1e-6)
    # evaluation views are never augmented
    np.testing.assert_array_equal(test[1][0].numpy(),
                                  CacheDataset([cache], train=False, crop_width=96)[1][0].numpy())
