"""Alignment geometry against independent computations, the detector on a real face, and
align_dataset (statuses, fallbacks, resume, shards + merge) on generated photo trees."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from mtmim_cli.data.align import (
    TEMPLATE_112,
    align_dataset,
    align_photo,
    center_crop,
    estimate_similarity,
    pad_resize,
    shard_slice,
    warp_affine,
    warp_face,
)
from mtmim_cli.data.cache import CENTER, DETECTED, ERROR, MISS, PREALIGNED, Cache
from mtmim_cli.data.detect import Prepared, choose_face, downscale_for_detection, to_source
from mtmim_cli.errors import MtmimError
from tests.faces import bad_files, face_variants, write_jpeg


def similarity(s: float, theta: float, tx: float, ty: float) -> np.ndarray:
    c, d = s * math.cos(theta), s * math.sin(theta)
    return np.array([[c, -d, tx], [d, c, ty]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


# ------------------------------------------------------------------------------ geometry

def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(1)
    for _ in range(20):
        m = similarity(rng.uniform(0.1, 5), rng.uniform(-math.pi, math.pi), *rng.uniform(-200, 200, 2))
        src = rng.uniform(0, 500, (5, 2))
        assert np.allclose(estimate_similarity(src, apply(m, src)), m, atol=1e-9)


def test_similarity_matches_skimage_umeyama_on_noisy_points():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(2)
    for _ in range(20):
        src = rng.uniform(0, 300, (5, 2))
        dst = apply(similarity(0.4, 0.3, 10, -5), src) + rng.normal(0, 3, (5, 2))
        if hasattr(SimilarityTransform, "from_estimate"):
            ref = SimilarityTransform.from_estimate(src, dst)
        else:
            ref = SimilarityTransform()
            ref.estimate(src, dst)
        assert np.allclose(estimate_similarity(src, dst), ref.params[:2], atol=1e-8)


def test_similarity_is_the_least_squares_optimum_and_never_reflects():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 100, (5, 2))
    dst = src * [-1, 1] + rng.normal(0, 1, (5, 2))  # a mirrored set: the best fit would reflect
    m = estimate_similarity(src, dst)
    assert np.linalg.det(m[:, :2]) > 0

    def cost(p):
        return ((apply(similarity(*p), src) - dst) ** 2).sum()

    s = math.sqrt(np.linalg.det(m[:, :2]))
    best = np.array([s, math.atan2(m[1, 0], m[0, 0]), m[0, 2], m[1, 2]])
    for _ in range(200):  # no nearby similarity does better
        assert cost(best + rng.normal(0, [0.01, 0.01, 0.5, 0.5])) >= cost(best) - 1e-9


def test_warp_matches_skimage_warp():
    from skimage.transform import AffineTransform, warp

    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(small).resize((400, 300), Image.Resampling.BICUBIC))
    m = similarity(0.6, 0.4, -20, 30)
    ours = warp_affine(image, m, 112).astype(float)
    ref = warp(image, AffineTransform(matrix=np.vstack([m, [0, 0, 1]])).inverse,
               output_shape=(112, 112), order=1, preserve_range=True)
    inside = np.ones((112, 112), bool)
    inside[:2], inside[-2:], inside[:, :2], inside[:, -2:] = False, False, False, False
    assert np.abs(ours - ref)[inside].mean() < 1.0  # same pixel-centre convention, bilinear


def blob_image(h: int, w: int, centres: np.ndarray, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w))
    for cx, cy in centres:
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return np.repeat((255 * img / img.max()).astype(np.uint8)[:, :, None], 3, axis=2)


def peak(img: np.ndarray, around: np.ndarray, r: int = 5) -> np.ndarray:
    """Intensity-weighted centre of the blob near `around`."""
    x0, y0 = int(round(around[0])), int(round(around[1]))
    win = img[y0 - r:y0 + r + 1, x0 - r:x0 + r + 1, 0].astype(float)
    yy, xx = np.mgrid[y0 - r:y0 + r + 1, x0 - r:x0 + r + 1]
    return np.array([(win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()])


@pytest.mark.parametrize("scale", [2.5, 9.0])  # 9: the warp box-reduces first (antialiasing)
def test_warp_face_puts_landmarks_on_the_template(scale):
    """Blobs drawn at five landmarks of a synthetic photo land on the template's points."""
    m = similarity(scale, 0.35, 60 * scale, 40 * scale)  # template -> photo
    landmarks = apply(m, TEMPLATE_112)
    h, w = int(200 * scale), int(220 * scale)
    photo = blob_image(h, w, landmarks, sigma=2.0 * scale)
    face = warp_face(photo, landmarks)
    assert face.shape == (112, 112, 3) and face.dtype == np.uint8
    for p in TEMPLATE_112:
        assert np.linalg.norm(peak(face, p) - p) < 0.35


def test_pad_resize_and_center_crop():
    rng = np.random.default_rng(5)
    crop96 = rng.integers(0, 256, (112, 96, 3), dtype=np.uint8)
    out = pad_resize(crop96)
    assert out.shape == (112, 112, 3)
    assert (out[:, 8:104] == crop96).all() and (out[:, :8] == 0).all() and (out[:, 104:] == 0).all()
    sq = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    assert (pad_resize(sq) == sq).all()
    assert pad_resize(rng.integers(0, 256, (250, 200, 3), dtype=np.uint8)).shape == (112, 112, 3)
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 200  # the central square
    assert center_crop(img).min() == 200


def test_choose_face_prefers_large_and_central():
    boxes = np.array([[0, 0, 100, 100],       # large, in the corner
                      [200, 200, 280, 280],   # a bit smaller, central
                      [230, 230, 250, 250]])  # small, central
    assert choose_face(boxes, 480, 480) == 1
    # brute force of the documented rule: area - 2 * squared centre offset
    rng = np.random.default_rng(6)
    for _ in range(50):
        b = rng.uniform(0, 400, (6, 2))
        boxes = np.hstack([b, b + rng.uniform(10, 150, (6, 2))])
        score = [(x1 - x0) * (y1 - y0) - 2 * (((x0 + x1) / 2 - 250) ** 2 + ((y0 + y1) / 2 - 200) ** 2)
                 for x0, y0, x1, y1 in boxes]
        assert choose_face(boxes, 500, 400) == int(np.argmax(score))


def test_downscaled_points_map_back_to_source():
    centre = np.array([[611.0, 437.0]])
    big = blob_image(900, 1300, centre, sigma=8)
    small, scale = downscale_for_detection(big, 640)
    assert max(small.shape[:2]) == 640 and scale == pytest.approx(640 / 1300, rel=1e-3)
    found = peak(small, centre[0] * scale, r=8)
    back = to_source(found[None], Prepared(image=big, det_image=small, scale=scale))[0]
    assert np.linalg.norm(back - centre[0]) < 0.5
    same, s1 = downscale_for_detection(small, 640)
    assert same is small and s1 == 1.0


# ------------------------------------------------------------------------------ detector

@pytest.fixture(scope="module")
def detector():
    import torch

    from mtmim_cli.data.detect import FaceDetector

    torch.set_num_threads(1)
    return FaceDetector()


def test_detector_finds_the_astronaut(detector):
    from tests.faces import astronaut

    img = astronaut()
    det = detector.detect_one(img)
    assert det is not None and det.score > 0.99
    x0, y0, x1, y1 = det.box
    # her face: roughly x 160-260, y 50-170 in the 512x512 photo
    assert 140 < x0 < 200 and 220 < x1 < 280 and 30 < y0 < 100 and 130 < y1 < 200
    lm = det.landmarks5
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left eye and mouth corner first
    assert lm[0, 1] < lm[2, 1] < lm[3, 1]  # eyes above nose above mouth
    # detection on a 4x larger copy downscaled to det_size finds the same points, x4
    big = np.asarray(Image.fromarray(img).resize((2048, 2048), Image.Resampling.BICUBIC))
    det_big = detector.detect_one(big)
    assert np.abs(det_big.landmarks - (lm + 0.5) * 4 + 0.5).max() < 4 * 2.0


def test_align_photo(detector, tmp_path):
    img = face_variants(1)[0]
    face, det = align_photo(img, detector)
    assert face.shape == (112, 112, 3) and det is not None
    # the warped landmarks sit near the template (a real face is not the template: a few px)
    m = estimate_similarity(det.landmarks, TEMPLATE_112)
    assert np.sqrt(((apply(m, det.landmarks) - TEMPLATE_112) ** 2).sum(1).mean()) < 6
    face2, _ = align_photo(write_jpeg(tmp_path / "a.png", img), detector)  # a path works too
    assert np.array_equal(face, face2)
    grey_face, _ = align_photo(img[:, :, 1], detector)
    assert grey_face is not None
    assert align_photo(np.full((200, 200, 3), 128, np.uint8), detector) == (None, None)
    assert align_photo(np.zeros((1, 1, 3), np.uint8), detector) == (None, None)
    (tmp_path / "t.jpg").write_text("text")
    with pytest.raises(MtmimError, match="t.jpg: not an image file"):
        align_photo(tmp_path / "t.jpg", detector)


def test_retries_after_a_miss_search_finer_then_padded_and_map_back(monkeypatch):
    """The retry chain on a 100x100 photo (first search at 15 px, below the 20-px retry):
    the padded retry still runs, and what it finds comes back in the photo's pixels."""
    from mtmim_cli.data.detect import RETRY_PAD, Detection, FaceDetector, box_overflow, pad_image

    photo = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    framed, px = pad_image(photo, RETRY_PAD)
    assert px == 50 and framed.shape == (200, 200, 3)
    assert np.array_equal(framed[px:px + 100, px:px + 100], photo)
    assert np.array_equal(framed[0, 0], photo.reshape(-1, 3).mean(0).round().astype(np.uint8))
    lm = np.array([[80, 90], [120, 90], [100, 110], [85, 125], [115, 125]], float)
    calls = []

    def fake_run(self, det_image, min_face_px):
        calls.append((det_image.shape[:2], round(min_face_px, 3)))
        if det_image.shape[:2] == (100, 100):
            return []
        return [Detection(box=np.array([60.0, 60, 140, 150]), score=0.99, landmarks=lm)]

    monkeypatch.setattr(FaceDetector, "_run", fake_run)
    det = FaceDetector(retry=True).detect_one(photo)
    assert calls == [((100, 100), 15.0), ((200, 200), 15.0)]
    np.testing.assert_allclose(det.landmarks, lm - 50)
    np.testing.assert_allclose(det.box, [10, 10, 90, 100])
    calls.clear()
    assert FaceDetector(retry=False).detect_one(photo) is None and len(calls) == 1
    calls.clear()  # --pad: the first search is already framed
    det = FaceDetector(retry=False, pad=0.25).detect_one(photo)
    assert calls == [((150, 150), 15.0)]
    np.testing.assert_allclose(det.landmarks, lm - 25)
    # a box past the photo's edge (a tight crop) is re-searched framed
    assert box_overflow(np.array([-20.0, 5, 90, 95]), 100, 100) == pytest.approx(20 / 110)
    assert box_overflow(np.array([10.0, 10, 90, 90]), 100, 100) < 0


# ------------------------------------------------------------------------------ datasets

def make_tree(root: Path, n_faces: int = 6) -> Path:
    """An fgnet-layout tree: n_faces real faces plus one of each bad kind."""
    for k, img in enumerate(face_variants(n_faces)):
        write_jpeg(root / f"{k % 3 + 1:03d}A{10 + k:02d}.JPG", img)
    bad_files(root, {"corrupt": "010A01.JPG", "text": "010A02.JPG", "pixel": "010A03.JPG",
                     "blank": "010A04.JPG", "grey": "010A05.JPG"})
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


def read_all(path: Path) -> dict:
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}


def assert_same_cache(a: Path, b: Path) -> None:
    da, db = read_all(a), read_all(b)
    assert da.keys() == db.keys()
    for k in da:
        assert np.array_equal(da[k], db[k], equal_nan=da[k].dtype.kind == "f"), k


def test_align_dataset_statuses(tree, tmp_path, detector):
    s = align_dataset(tree, "fgnet", tmp_path / "c.h5", progress=False, detector=detector)
    c = Cache(s.out)
    by_path = dict(zip(c.paths, zip(c.status, c.reason, strict=True), strict=True))
    assert by_path["010A01.JPG"][0] == ERROR and "unreadable image" in by_path["010A01.JPG"][1]
    assert by_path["010A02.JPG"] == (ERROR, "not an image file")
    assert by_path["010A03.JPG"] == (MISS, "image too small (1x1) to hold a face")
    assert by_path["010A04.JPG"] == (MISS, "no face found")
    assert by_path["010A05.JPG"][0] == DETECTED  # greyscale becomes RGB and is detected
    assert (c.status[:6] == DETECTED).all()
    assert s.counts == {"detected": 7, "center": 0, "prealigned": 0, "miss": 2, "error": 2}
    assert [p for p, _, _ in s.problems] == ["010A01.JPG", "010A02.JPG", "010A03.JPG", "010A04.JPG"]
    text = s.format()
    assert "010A04.JPG: no face found" in text and "detected 7" in text
    assert c.attrs["reader"] == "fgnet" and c.attrs["source_root"] == str(tree.resolve())
    assert np.isfinite(c.landmarks[c.status == DETECTED]).all()
    assert np.isnan(c.landmarks[c.status != DETECTED]).all()
    assert (c.images(np.flatnonzero(c.status != DETECTED)) == 0).all()
    # stored images are the warp of the stored landmarks
    img = np.asarray(Image.open(tree / c.paths[0]).convert("RGB"))
    assert np.array_equal(c.image(0), warp_face(img, c.landmarks[0]))

    # an existing complete file with the same input is reused; other settings are refused
    again = align_dataset(tree, "fgnet", s.out, progress=False, detector=detector)
    assert again.reused and again.counts == s.counts
    with pytest.raises(MtmimError, match="exists and was made from other photos or settings"):
        align_dataset(tree, "fgnet", s.out, on_miss="center", progress=False, detector=detector)


def test_on_miss_center_fail_and_aligned_mode(tree, tmp_path, detector):
    s = align_dataset(tree, "fgnet", tmp_path / "c.h5", on_miss="center", progress=False,
                      detector=detector)
    c = Cache(s.out)
    blank = c.paths.index("010A04.JPG")
    assert c.status[blank] == CENTER and c.reason[blank] == "no face found"
    assert (c.image(blank) == 128).all()
    assert c.status[c.paths.index("010A03.JPG")] == MISS  # a 1-px photo gets no fallback
    with pytest.raises(MtmimError, match=r"010A03.JPG: image too small \(1x1\) to hold a face \(--on-miss fail\)"):
        align_dataset(tree, "fgnet", tmp_path / "f.h5", on_miss="fail", progress=False,
                      detector=detector)
    assert not (tmp_path / "f.h5").exists()
    s = align_dataset(tree, "fgnet", tmp_path / "p.h5", aligned=True, progress=False)
    c = Cache(s.out)
    assert s.counts["prealigned"] == 9 and s.counts["error"] == 2
    src = np.asarray(Image.open(tree / c.paths[0]).convert("RGB"))
    assert np.array_equal(c.image(0), pad_resize(src))


class Interrupting:
    """A detector that stops the process (KeyboardInterrupt) after `n` detections."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def prepare(self, image):
        return self.inner.prepare(image)

    def detect_prepared(self, prepared):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt
        return self.inner.detect_prepared(prepared)


def test_resume_equals_uninterrupted_run(tree, tmp_path, detector):
    full = align_dataset(tree, "fgnet", tmp_path / "full.h5", progress=False, detector=detector)
    out = tmp_path / "r.h5"
    with pytest.raises(KeyboardInterrupt):
        align_dataset(tree, "fgnet", out, progress=False, commit_every=3, workers=1,
                      detector=Interrupting(detector, 5))
    assert not out.exists()
    with h5py.File(out.with_name("r.h5.partial")) as f:
        # stopped at the 6th photo: committed after the 3rd, not after the 5 detected so far
        assert f.attrs["n_done"] == 3
    s = align_dataset(tree, "fgnet", out, progress=False, detector=detector)
    assert s.resumed_from == 3 and s.processed == 8
    assert_same_cache(full.out, out)


def test_a_partial_cache_from_a_build_that_detected_differently_is_refused(tree, tmp_path,
                                                                           detector):
    """A partial cache made before the detector's behaviour was recorded (no padded retry,
    no edge re-search) is not finished by this build: one line naming the partial file and
    the difference; --overwrite starts over with this build's settings."""
    import json

    from mtmim_cli.data.detect import BEHAVIOUR

    out = tmp_path / "old.h5"
    partial = out.with_name("old.h5.partial")
    with pytest.raises(KeyboardInterrupt):
        align_dataset(tree, "fgnet", out, progress=False, commit_every=1, workers=1,
                      detector=Interrupting(detector, 2))
    with h5py.File(partial, "r+") as f:
        settings = json.loads(f.attrs["settings"])
        assert settings["detector_behaviour"] == BEHAVIOUR == 2
        del settings["detector_behaviour"]   # as the build before the version was recorded
        f.attrs["settings"] = json.dumps(settings, sort_keys=True)
        done = int(f.attrs["n_done"])
    assert done == 2
    with pytest.raises(MtmimError) as err:
        align_dataset(tree, "fgnet", out, progress=False, detector=detector)
    assert str(err.value) == (
        f"{partial}: a partial cache of these photos made with other settings "
        "(detector_behaviour 1 (this run: 2)); finishing it would mix the two: remove it, or "
        "pass --overwrite to start over")
    with h5py.File(partial) as f:
        assert int(f.attrs["n_done"]) == done   # refused before anything was written
    with pytest.raises(KeyboardInterrupt):
        align_dataset(tree, "fgnet", out, progress=False, overwrite=True, commit_every=1,
                      workers=1, detector=Interrupting(detector, 1))
    with h5py.File(partial) as f:
        assert int(f.attrs["n_done"]) == 1
        assert json.loads(f.attrs["settings"])["detector_behaviour"] == 2


def test_settings_difference_reads_old_caches_as_the_old_behaviour():
    from mtmim_cli.data.align import settings_difference

    old = '{"aligned": false, "min_face": 0.15, "retry": true}'
    new = '{"aligned": false, "detector_behaviour": 2, "min_face": 0.15, "pad": 0.5, "retry": true}'
    assert settings_difference(old, new) == ("detector_behaviour 1 (this run: 2), "
                                              "pad 0.0 (this run: 0.5)")
    assert settings_difference(new, new) == ""
    assert settings_difference('{"aligned": true}', '{"aligned": true}') == ""


def test_shards_merge_to_the_unsharded_cache(tree, tmp_path, detector):
    from mtmim_cli.data.shards import merge_caches

    full = align_dataset(tree, "fgnet", tmp_path / "full.h5", progress=False, detector=detector)
    n = len(Cache(full.out))
    assert [len(range(n)[shard_slice(n, (i, 3))]) for i in range(3)] == [3, 4, 4]
    parts = [align_dataset(tree, "fgnet", tmp_path / f"s{i}.h5", shard=(i, 3), progress=False,
                           detector=detector).out for i in (2, 0, 1)]
    merged = merge_caches(tmp_path / "m.h5", parts, progress=False)
    da, db = read_all(full.out), read_all(merged)
    for k in da:
        assert np.array_equal(da[k], db[k], equal_nan=da[k].dtype.kind == "f"), k
    with pytest.raises(MtmimError, match="missing"):
        merge_caches(tmp_path / "x.h5", parts[:2], progress=False)
    with pytest.raises(MtmimError, match="given twice"):
        merge_caches(tmp_path / "x.h5", parts + parts[:1], progress=False)
    with pytest.raises(MtmimError, match="not a shard"):
        merge_caches(tmp_path / "x.h5", [full.out], progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_align_dataset_bad_options(tree, tmp_path):
    with pytest.raises(MtmimError, match="--on-miss maybe"):
        align_dataset(tree, "fgnet", tmp_path / "c.h5", on_miss="maybe", progress=False)
    with pytest.raises(MtmimError, match="no photos found"):
        align_dataset(tmp_path, "fgnet", tmp_path / "c.h5", progress=False)


def test_prealigned_status_is_usable(tmp_path):
    from mtmim_cli.data.cache import USABLE

    assert PREALIGNED in USABLE and CENTER in USABLE and MISS not in USABLE


def test_rec_pack_aligns_as_prealigned(tmp_path):
    from tests.test_readers import write_rec

    faces = [np.asarray(Image.fromarray(f).resize((112, 112))) for f in face_variants(3)]
    write_rec(tmp_path / "pack", faces, [1, 2, 1], corrupt=2)
    s = align_dataset(tmp_path / "pack", "rec", tmp_path / "rec.h5", progress=False)
    c = Cache(s.out)
    assert list(c.status) == [PREALIGNED, PREALIGNED, ERROR] and c.identity_names == ["1", "2"]
    assert np.abs(c.image(0).astype(int) - faces[0]).mean() < 20  # JPEG round trip
    assert c.reason[2] == "not an image file"


def test_unavailable_device_is_a_user_error():
    import torch

    from mtmim_cli.data.detect import FaceDetector

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present here")
    with pytest.raises(MtmimError, match="--device cuda: no CUDA device"):
        FaceDetector(device="cuda")
    with pytest.raises(MtmimError, match="--device gpu7: not a torch device"):
        FaceDetector(device="gpu7")


def test_min_face_units_and_retry(detector):
    from tests.faces import astronaut

    p = Prepared(image=np.zeros((1000, 800, 3), np.uint8), det_image=np.zeros((640, 512, 3), np.uint8),
                 scale=0.64)
    saved = detector.min_face, detector.retry
    try:
        detector.min_face = 0.15  # a fraction of the shorter side of what MTCNN sees
        assert detector._min_face_px(p) == pytest.approx(0.15 * 512)
        detector.min_face = 100.0  # source pixels
        assert detector._min_face_px(p) == pytest.approx(64.0)
        # a face about 8% of the photo's side: below the relative minimum, found by the retry
        small = np.asarray(Image.fromarray(astronaut()[0:300, 80:380]).resize((120, 120)))
        photo = np.full((800, 800, 3), 90, np.uint8)
        photo[340:460, 340:460] = small
        detector.min_face = 0.3
        detector.retry = False
        assert detector.detect_one(photo) is None
        detector.retry = True
        det = detector.detect_one(photo)
        assert det is not None and 340 < det.box[0] < det.box[2] < 460
    finally:
        detector.min_face, detector.retry = saved


class Failing:
    """A detector whose detection raises `error` at the calls `fails(k)` picks (k from 0):
    an odd photo (a few calls) or a broken detector (every call from some k on). Count
    calls in order with workers=1."""

    def __init__(self, inner, fails=lambda k: True, error=RuntimeError("boom")):
        self.inner, self.fails, self.error, self.calls = inner, fails, error, 0

    def prepare(self, image):
        return self.inner.prepare(image)

    def detect_prepared(self, prepared):
        k, self.calls = self.calls, self.calls + 1
        if self.fails(k):
            raise self.error
        return self.inner.detect_prepared(prepared)


def test_a_photo_that_breaks_the_detector_is_a_row_not_a_stop(tree, tmp_path, detector):
    s = align_dataset(tree, "fgnet", tmp_path / "c.h5", progress=False, workers=1,
                      detector=Failing(detector, lambda k: k in (1, 3)))
    c = Cache(s.out)
    assert s.counts == {"detected": 5, "center": 0, "prealigned": 0, "miss": 2, "error": 4}
    assert [c.reason[i] for i in (1, 3)] == ["detection failed: RuntimeError('boom')"] * 2


@pytest.fixture(scope="module")
def long_tree(tmp_path_factory):
    """Twelve faces, with two unreadable files among them (records 5 and 6)."""
    root = tmp_path_factory.mktemp("long")
    faces = iter(face_variants(12))
    for k in range(14):
        if k not in (5, 6):
            write_jpeg(root / f"001A{k:02d}.JPG", next(faces))
    bad_files(root, {"corrupt": "001A05.JPG", "text": "001A06.JPG"})
    return root


@pytest.mark.parametrize("error, at, image_format", [
    (RuntimeError("boom"), 12, "raw"),   # 8 failures in a row (the unreadable files between
                                         # neither count nor break the run): stops at record 12
    (RuntimeError("boom"), 12, "jpeg"),  # the failures' bytes were written, not committed
    (MemoryError(), 3, "raw"),           # no photo causes it: stops at once
    (ImportError("libtorch_cpu.so: cannot open shared object file"), 3, "raw"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 9437184 bytes"), 3, "raw"),
])
def test_a_detector_that_fails_systematically_stops_unfinished_and_resumes(
        long_tree, tmp_path, detector, error, at, image_format):
    """A broken detector (failing from the 4th photo on): align stops with one line naming
    the photo and the exception, the cache is not finished under its name, the partial file
    keeps the three good records (never the failures, whatever commit_every) and the rerun
    after the fix resumes there and equals an uninterrupted run."""
    full = align_dataset(long_tree, "fgnet", tmp_path / "full.h5", progress=False,
                         detector=detector, image_format=image_format)
    out = tmp_path / "c.h5"
    with pytest.raises(MtmimError) as err:
        align_dataset(long_tree, "fgnet", out, progress=False, workers=1, commit_every=1,
                      detector=Failing(detector, lambda k: k >= 3, error),
                      image_format=image_format)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{long_tree / f'001A{at:02d}.JPG'}: ")
    assert repr(error) in msg and f"stopped without finishing {out}" in msg
    assert "keeps the first 3 of 14 records" in msg
    assert not out.exists()
    with h5py.File(out.with_name("c.h5.partial")) as f:
        assert int(f.attrs["n_done"]) == 3
    again = align_dataset(long_tree, "fgnet", out, progress=False, detector=detector,
                          image_format=image_format)
    assert (again.resumed_from, again.processed) == (3, 11) and not again.reused
    assert_same_cache(full.out, out)


def test_an_error_no_photo_causes_while_decoding_stops_too(long_tree, tmp_path, detector,
                                                            monkeypatch):
    """Decoding that runs out of memory (not a corrupt file) stops align at that photo."""
    from mtmim_cli.data import readers

    real = readers.image_loader

    def loader(src, fmt):
        load = real(src, fmt)

        def broken(rel):
            if rel == "001A04.JPG":
                raise MemoryError()
            return load(rel)
        return broken

    monkeypatch.setattr(readers, "image_loader", loader)
    out = tmp_path / "d.h5"
    with pytest.raises(MtmimError) as err:
        align_dataset(long_tree, "fgnet", out, progress=False, workers=1, detector=detector)
    assert str(err.value).startswith(f"{long_tree / '001A04.JPG'}: decoding failed with an "
                                     "error no photo causes (MemoryError()); stopped without "
                                     f"finishing {out} (")
    assert "keeps the first 4 of 14 records" in str(err.value) and not out.exists()


def test_is_systematic_tells_the_detectors_faults_from_the_photos():
    from mtmim_cli.data.align import is_systematic

    for exc in (MemoryError(), ImportError("x"), ModuleNotFoundError("facenet_pytorch"),
                AttributeError("'NoneType' object has no attribute 'pnet'"),
                RuntimeError("CUDA error: an illegal memory access was encountered"),
                RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB"),
                OSError("libcudnn.so.9: cannot open shared object file")):
        assert is_systematic(exc), exc
    for exc in (RuntimeError("boom"), ValueError("negative dimensions are not allowed"),
                RuntimeError("Calculated padded input size per channel: (2 x 2). Kernel size: "
                             "(3 x 3). Kernel size can't be greater than actual input size"),
                IndexError("index 0 is out of bounds")):
        assert not is_systematic(exc), exc
    assert not is_systematic(OSError("truncated file"), "decode")


def test_a_cache_of_failures_is_never_finished_nor_reused(tmp_path, tree, detector):
    """Three photos, a detector failing on each (fewer than the failures in a row that stop
    a run): no face at all, so the cache is not finished; the rerun after the fix redoes all.
    A complete cache whose records are all errors (an older build's) is refused on reuse."""
    small = tmp_path / "small"
    for k, img in enumerate(face_variants(3)):
        write_jpeg(small / f"001A{k:02d}.JPG", img)
    out = tmp_path / "s.h5"
    with pytest.raises(MtmimError) as err:
        align_dataset(small, "fgnet", out, progress=False, workers=1, commit_every=1,
                      detector=Failing(detector))
    assert str(err.value).startswith(f"{out.with_name('s.h5.partial')}: none of its 3 records "
                                     "holds a face (3 errors, the last: 001A02.JPG: detection "
                                     "failed: RuntimeError('boom'))")
    assert not out.exists()
    s = align_dataset(small, "fgnet", out, progress=False, detector=detector)
    assert s.resumed_from == 0 and s.counts["detected"] == 3

    done = align_dataset(tree, "fgnet", tmp_path / "t.h5", progress=False, detector=detector)
    with h5py.File(done.out, "r+") as f:   # as a build that kept a broken detector's rows left it
        f["status"][:] = ERROR
        f["reason"][:] = ["detection failed: RuntimeError('boom')"] * len(f["reason"])
    with pytest.raises(MtmimError) as err:
        align_dataset(tree, "fgnet", done.out, progress=False, detector=detector)
    assert str(err.value) == (
        f"{done.out}: none of its 11 records holds a face (11 errors, the last: 010A05.JPG: "
        "detection failed: RuntimeError('boom')); a failed run, not a cache: fix the cause, "
        "then pass --overwrite")
    redo = align_dataset(tree, "fgnet", done.out, progress=False, overwrite=True,
                         detector=detector)
    assert redo.counts["detected"] == 7


def test_unreadable_files_stay_rows_however_many_in_a_row(tmp_path, detector):
    """Ten corrupt or non-image files in a row are the files' fault: rows, never a stop."""
    root = tmp_path / "bad"
    for k in range(5):
        bad_files(root, {"corrupt": f"001A{k:02d}.JPG", "text": f"001A{5 + k:02d}.JPG"})
    write_jpeg(root / "001A10.JPG", face_variants(1)[0])
    s = align_dataset(root, "fgnet", tmp_path / "b.h5", progress=False, detector=detector)
    assert s.counts["error"] == 10 and s.counts["detected"] == 1


def test_align_restores_torchs_thread_count(tree, tmp_path, detector):
    """align --threads 1 inside a process using 3 threads: 3 again after it, after a stop too."""
    import torch

    torch.set_num_threads(3)
    try:
        align_dataset(tree, "fgnet", tmp_path / "a.h5", threads=1, progress=False,
                      detector=detector)
        assert torch.get_num_threads() == 3
        with pytest.raises(MtmimError):
            align_dataset(tree, "fgnet", tmp_path / "b.h5", threads=1, progress=False,
                          detector=Failing(detector, error=MemoryError()))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)


def test_worker_count_does_not_change_the_cache(tree, tmp_path, detector):
    one = align_dataset(tree, "fgnet", tmp_path / "w1.h5", workers=1, progress=False, detector=detector)
    three = align_dataset(tree, "fgnet", tmp_path / "w3.h5", workers=3, prefetch=5,
                          progress=False, detector=detector)
    assert_same_cache(one.out, three.out)


def test_detector_matches_facenet_detect(detector):
    """Our thread-safe call of facenet-pytorch's detect_face gives what its MTCNN.detect gives."""
    m = detector.mtcnn
    for img in face_variants(3):
        m.min_face_size = 0.15 * min(img.shape[:2])
        boxes, probs, points = m.detect(img, landmarks=True)
        ours = detector.detect_all(img)
        assert len(ours) == len(boxes)
        assert np.allclose(np.stack([d.box for d in ours]), boxes.astype(float), atol=1e-3)
        assert np.allclose(np.stack([d.landmarks for d in ours]), np.stack(points).astype(float), atol=1e-3)
