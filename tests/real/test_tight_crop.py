"""Tight face crops (100x100, all face) cut from real FG-NET photos, through real MTCNN.

Truth: the landmarks MTCNN finds on the uncropped photo, mapped into the crop. Without
padding one crop is missed and the other found with its landmarks far off; `--pad` (and the
retry that pads) aligns both, and the aligned face matches the one warped from the photo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

SIZE = 100
TIGHT = 0.7  # crop side as a fraction of MTCNN's box on the photo: a frame filled by the face
PHOTOS = {"009A11.JPG": "missed", "003A20.JPG": "misplaced"}


def _median_error(found: np.ndarray, truth: np.ndarray) -> float:
    """Median landmark distance in inter-ocular distances."""
    return float(np.median(np.linalg.norm(found - truth, axis=1)) /
                 np.linalg.norm(truth[0] - truth[1]))


def _aligned_mismatch(aligned: np.ndarray, photo: np.ndarray, landmarks: np.ndarray):
    """(share of the window the crop covers, mean absolute difference, correlation) between an
    aligned crop and the face warped from the uncropped photo, over the pixels the crop covers
    (the warp fills the rest black)."""
    from mtmim_cli.data.align import warp_face

    want = warp_face(photo, landmarks).astype(float)
    got = aligned.astype(float)
    inside = got.sum(2) > 0
    return (float(inside.mean()), float(np.abs(got - want)[inside].mean()),
            float(np.corrcoef(got[inside].ravel(), want[inside].ravel())[0, 1]))


@pytest.fixture(scope="module")
def crops(fgnet_dir, tmp_path_factory):
    """{name: (photo, crop, landmarks of the photo, landmarks mapped into the crop)}, and the
    folder (one identity) holding the crops as PNG."""
    import torch

    from mtmim_cli.data.detect import FaceDetector
    from mtmim_cli.data.readers import load_image

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tight") / "photos"
    (folder / "person").mkdir(parents=True)
    detector = FaceDetector()
    out = {}
    for name in PHOTOS:
        photo = load_image(fgnet_dir / "images" / name)
        det = detector.detect_one(photo)
        x0, y0, x1, y1 = det.box
        side = max(x1 - x0, y1 - y0) * TIGHT
        left, top = int((x0 + x1 - side) / 2), int((y0 + y1 - side) / 2)
        n = int((x0 + x1 + side) / 2) - left
        crop = np.asarray(Image.fromarray(photo).crop((left, top, left + n, top + n))
                          .resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        # resizing maps pixel edges onto edges; pixel centres sit on integers
        truth = (det.landmarks + 0.5 - [left, top]) * (SIZE / n) - 0.5
        Image.fromarray(crop).save(folder / "person" / f"{Path(name).stem}.png")
        out[name] = (photo, crop, det.landmarks, truth)
    return out, folder


@pytest.mark.real
@pytest.mark.slow
def test_tight_crops_fail_unpadded_and_align_with_pad(crops, tmp_path) -> None:
    from mtmim_cli.data.cache import DETECTED, MISS, Cache
    from mtmim_cli.data.detect import FaceDetector, box_overflow

    faces, folder = crops
    bare = FaceDetector(retry=False)
    for name, (_, crop, _, truth) in faces.items():
        found = bare.detect_one(crop)
        if PHOTOS[name] == "missed":
            assert found is None, name
        else:
            assert found is not None and _median_error(found.landmarks, truth) > 0.3, name
            assert box_overflow(found.box, SIZE, SIZE) > 0.1  # what sends it to the padded retry

    # the CLI without retry and padding: one miss, and a detection far off
    r = run_cli("align", str(folder), "--format", "folder", "--out", str(tmp_path / "bare.h5"),
                "--no-retry", "--quiet")
    assert r.returncode == 0, r.stderr
    c = Cache(tmp_path / "bare.h5")
    assert sorted(c.status.tolist()) == [DETECTED, MISS]
    k = int(np.flatnonzero(c.status == DETECTED)[0])
    photo, _, photo_landmarks, _ = faces[Path(c.paths[k]).stem + ".JPG"]
    cover, diff, corr = _aligned_mismatch(c.images([k])[0], photo, photo_landmarks)
    assert cover < 0.2 and diff > 25 and corr < 0.6, (cover, diff, corr)  # measured 0.14, 34, 0.42

    # --pad 0.5 (retry off, so the padding alone does it): both aligned, landmarks on target
    r = run_cli("align", str(folder), "--format", "folder", "--out", str(tmp_path / "pad.h5"),
                "--pad", "0.5", "--no-retry", "--quiet")
    assert r.returncode == 0, r.stderr
    padded = Cache(tmp_path / "pad.h5")
    # the default (retry: padded after a miss or a box past the edge) agrees with --pad
    r = run_cli("align", str(folder), "--format", "folder", "--out", str(tmp_path / "retry.h5"),
                "--quiet")
    assert r.returncode == 0, r.stderr
    retried = Cache(tmp_path / "retry.h5")
    for c in (padded, retried):
        assert (c.status == DETECTED).all()
        for k, path in enumerate(c.paths):
            name = Path(path).stem + ".JPG"
            photo, _, photo_landmarks, truth = faces[name]
            assert _median_error(c.landmarks[k], truth) < 0.06, (name, c.landmarks[k], truth)
            # the aligned crop shows the face the uncropped photo aligns to
            cover, diff, corr = _aligned_mismatch(c.images([k])[0], photo, photo_landmarks)
            assert cover > 0.3 and diff < 12 and corr > 0.9, (name, cover, diff, corr)  # 0.4, 6, 0.98
