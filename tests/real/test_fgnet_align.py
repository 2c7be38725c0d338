"""Every tenth FG-NET photo through `align_dataset`: detection rate and landmark accuracy
against FG-NET's hand-labelled points (the full set is bench/fgnet_align.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mtmim_cli.data.align import align_dataset
from mtmim_cli.data.cache import DETECTED, Cache
from mtmim_cli.data.landmarks import cache_landmark_errors, fgnet_five, normalised_error, read_pts


@pytest.mark.real
@pytest.mark.slow
def test_every_tenth_fgnet_photo(fgnet_dir, tmp_path):
    import torch

    torch.set_num_threads(1)
    photos = sorted((fgnet_dir / "images").iterdir())[::10]
    src = tmp_path / "images"
    src.mkdir()
    for p in photos:  # the fgnet reader on a slice: links, nothing copied
        (src / p.name).symlink_to(p)
    s = align_dataset(src, "fgnet", tmp_path / "fgnet10.h5", progress=False)
    c = Cache(s.out)
    assert len(c) == len(photos) == 101
    assert len(set(c.identity_names)) > 60 and np.nanmax(c.age) > 50
    detected = (c.status == DETECTED).mean()
    errors = cache_landmark_errors(s.out, fgnet_dir / "points")
    median = float(np.median(list(errors.values())))
    print(f"FG-NET every tenth photo: detected {detected:.1%}, median error / IOD {median:.4f}")
    assert detected >= 0.98
    assert len(errors) == (c.status == DETECTED).sum()
    assert median <= 0.08


@pytest.mark.real
def test_fgnet_points_file(fgnet_dir):
    pts = read_pts(fgnet_dir / "points" / "001a02.pts")
    assert pts.shape == (68, 2)
    five = fgnet_five(fgnet_dir / "points" / "001a02.pts")
    assert five[0, 0] < five[1, 0] and five[3, 0] < five[4, 0]  # image-left points first
    assert five[0, 1] < five[2, 1] < five[3, 1]  # eyes above nose above mouth
    assert normalised_error(five, five) == 0.0
    shifted = five + [np.linalg.norm(five[0] - five[1]) * 0.1, 0]
    assert normalised_error(shifted, five) == pytest.approx(0.1)
