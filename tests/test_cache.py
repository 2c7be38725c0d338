from __future__ import annotations

import h5py
import numpy as np
import pytest

from mtmim_cli.data.cache import DETECTED, MISS, Cache, CacheWriter
from mtmim_cli.data.records import Record
from mtmim_cli.errors import MtmimError
from tests.conftest import write_cache


def test_roundtrip_and_layout(tmp_path):
    path = write_cache(tmp_path / "c.h5", ["b", "a", "b"], [1.0, float("nan"), 30.0], seed=3)
    c = Cache(path)
    assert len(c) == 3
    assert c.identity_names == ["a", "b"]
    assert list(c.identity) == [1, 0, 1]
    assert np.isnan(c.age[1]) and c.age[2] == 30.0
    with h5py.File(path) as f:
        assert f["images"].chunks == (1, 112, 112, 3)
        assert f["images"].compression is None
    imgs = c.images([2, 0, 2])
    assert np.array_equal(imgs[0], c.image(2)) and np.array_equal(imgs[1], c.image(0))


def test_partial_is_not_final_and_resumes(tmp_path):
    recs = [Record(f"{i}.jpg", "x", float(i)) for i in range(5)]
    final = tmp_path / "r.h5"
    w = CacheWriter(final, recs)
    img = np.full((112, 112, 3), 7, np.uint8)
    w.write(0, img, DETECTED)
    w.write(1, None, MISS, reason="no face")
    w.commit(2)
    w.close()
    assert not final.exists()
    w2 = CacheWriter(final, recs)
    assert w2.start == 2
    for i in range(2, 5):
        w2.write(i, img, DETECTED)
    w2.finish()
    c = Cache(final)
    assert list(c.usable) == [True, False, True, True, True]
    assert c.reason[1] == "no face"


def test_resume_refuses_other_records(tmp_path):
    final = tmp_path / "r.h5"
    w = CacheWriter(final, [Record("a.jpg", "x")])
    w.commit(1)
    w.close()
    w2 = CacheWriter(final, [Record("b.jpg", "x")])
    assert w2.start == 0


def test_not_a_cache(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_text("hello")
    with pytest.raises(MtmimError, match="not an mtmim cache"):
        Cache(bad)
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["a"] = 1
    with pytest.raises(MtmimError, match="format attribute"):
        Cache(tmp_path / "y.h5")


@pytest.mark.parametrize("idx", [[3, 4, 5, 9, 10, 0], [0, 1, 2, 7, 8], [9, 2, 2, 5], [6], []])
def test_images_batch_equals_single_reads(tmp_path, idx):
    c = Cache(write_cache(tmp_path / "b.h5", [f"i{k % 3}" for k in range(12)], seed=1))
    batch = c.images(idx)
    assert batch.shape == (len(idx), 112, 112, 3)
    for k, i in enumerate(idx):
        assert np.array_equal(batch[k], c.image(i))


# ---------------------------------------------------------------- encoded images, growth
def _faces(n: int, seed: int = 0) -> np.ndarray:
    """Smooth images (JPEG-friendly, like faces) with some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112]
    base = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.float64)
    return np.stack([np.clip(base * rng.uniform(0.5, 1) + rng.normal(0, 4, base.shape), 0, 255)
                     for _ in range(n)]).astype(np.uint8)


def _write(path, faces, fmt, statuses=None, **kw):
    recs = [Record(f"{i}.jpg", f"id{i % 3}", float(i)) for i in range(len(faces))]
    w = CacheWriter(path, recs, image_format=fmt, **kw)
    for i, img in enumerate(faces):
        st = statuses[i] if statuses else DETECTED
        w.write(i, img if st == DETECTED else None, st, reason="" if st == DETECTED else "no face")
    return w.finish()


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_encoded_cache_reads_back(tmp_path, fmt):
    import io

    from PIL import Image

    faces = _faces(6)
    statuses = [DETECTED, DETECTED, MISS, DETECTED, DETECTED, DETECTED]
    c = Cache(_write(tmp_path / "e.h5", faces, fmt, statuses))
    assert c.image_format == fmt and c.attrs["schema_version"] == 2
    for i in range(6):
        got = c.image(i)
        if statuses[i] == MISS:
            assert not got.any() and c.encoded(i) == b""
            continue
        # an independent decoder (Pillow) of the stored bytes gives the same pixels
        ref = np.asarray(Image.open(io.BytesIO(c.encoded(i))).convert("RGB"))
        assert np.abs(got.astype(int) - ref).max() <= 1
        if fmt == "png":
            assert np.array_equal(got, faces[i])
        else:
            mse = np.mean((got.astype(float) - faces[i]) ** 2)
            assert 10 * np.log10(255 ** 2 / mse) > 35          # PSNR of quality 95
    batch = c.images([5, 0, 2])
    assert np.array_equal(batch[0], c.image(5)) and not batch[2].any()
    with h5py.File(c.path) as f:
        assert "images" not in f and f["image_offset"].shape == (7,)


def test_encoded_writes_out_of_order_resume_and_gaps(tmp_path):
    faces = _faces(5, seed=1)
    recs = [Record(f"{i}.jpg", "x") for i in range(5)]
    full = Cache(_write(tmp_path / "full.h5", faces, "jpeg"))
    w = CacheWriter(tmp_path / "r.h5", recs, image_format="jpeg")
    w.write(1, faces[1], DETECTED)
    w.write(0, faces[0], DETECTED)      # arrives late: bytes are still appended in index order
    w.commit(2)
    w.write(3, faces[3], DETECTED)
    with pytest.raises(ValueError, match="record 2 was not written"):
        w.commit(4)
    w.close()
    w = CacheWriter(tmp_path / "r.h5", recs, image_format="jpeg")
    assert w.start == 2
    for i in range(2, 5):
        w.write(i, faces[i], DETECTED)
    c = Cache(w.finish())
    assert [c.encoded(i) for i in range(5)] == [full.encoded(i) for i in range(5)]
    # another format does not resume a partial file: it starts over
    w = CacheWriter(tmp_path / "p.h5", recs, image_format="jpeg")
    w.write(0, faces[0], DETECTED)
    w.commit(1)
    w.close()
    assert CacheWriter(tmp_path / "p.h5", recs, image_format="png").start == 0


def test_caches_grow_as_they_fill(tmp_path):
    n = 400
    recs = [Record(f"{i}.jpg", "x") for i in range(n)]
    img = np.full((112, 112, 3), 9, np.uint8)
    w = CacheWriter(tmp_path / "g.h5", recs)
    for i in range(10):
        w.write(i, img, DETECTED)
    w.commit(10)
    with h5py.File(w.tmp_path, "r") as f:
        assert 10 <= f["images"].shape[0] < 20 and f["images"].maxshape[0] == n
    assert w.tmp_path.stat().st_size < 25 * 112 * 112 * 3          # not 400 images up front
    for i in range(10, n):
        w.write(i, img, DETECTED)
    c = Cache(w.finish())
    assert c.images(np.arange(n)).shape == (n, 112, 112, 3) and (c.image(n - 1) == 9).all()
    assert c.path.stat().st_size < n * 112 * 112 * 3 * 1.1
    enc = Cache(_write(tmp_path / "e.h5", _faces(40), "jpeg"))
    with h5py.File(enc.path) as f:
        used = int(f["image_offset"][-1])
        assert f["image_bytes"].shape == (used,)
    assert enc.path.stat().st_size < 2 * used + 300_000


def _shards(tmp_path, fmt):
    """Three shard caches of one job (as `align --shard i/3` writes them) and the unsharded one."""
    from mtmim_cli.data.cache import records_digest

    faces = _faces(10, seed=2)
    statuses = [DETECTED] * 10
    statuses[4] = MISS
    recs = [Record(f"{i}.jpg", f"id{i % 4}", float(i)) for i in range(10)]
    common = {"reader": "test", "source_root": ".", "settings": "{}", "template": "[]",
              "all_records_sha1": records_digest(recs)}
    parts = []
    for k, (lo, hi) in enumerate([(0, 3), (3, 7), (7, 10)]):
        w = CacheWriter(tmp_path / f"s{k}.h5", recs[lo:hi], {**common, "shard": f"{k}/3"},
                        image_format=fmt)
        for i in range(lo, hi):
            ok = statuses[i] == DETECTED
            w.write(i - lo, faces[i] if ok else None, statuses[i], reason="" if ok else "no face")
        parts.append(w.finish())
    w = CacheWriter(tmp_path / "full.h5", recs, {**common, "shard": ""}, image_format=fmt)
    for i in range(10):
        ok = statuses[i] == DETECTED
        w.write(i, faces[i] if ok else None, statuses[i], reason="" if ok else "no face")
    return parts, Cache(w.finish())


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
@pytest.mark.parametrize("copy", [False, True])
def test_merge_links_or_copies_the_shards(tmp_path, fmt, copy):
    import shutil

    from mtmim_cli.data.shards import merge_caches

    (tmp_path / "parts").mkdir()
    parts, full = _shards(tmp_path / "parts", fmt)
    out = tmp_path / "merged" / "m.h5"
    merged = Cache(merge_caches(out, parts[::-1], progress=False, copy=copy))
    assert merged.image_format == fmt and len(merged) == 10
    assert np.array_equal(merged.images(np.arange(10)), full.images(np.arange(10)))
    assert merged.paths == full.paths and merged.reason == full.reason
    assert np.array_equal(merged.identity, full.identity)
    with h5py.File(out) as f:
        name = "images" if fmt == "raw" else "image_bytes"
        assert f[name].is_virtual is (not copy)
    size = out.stat().st_size
    if not copy:   # no image copied: the merged file holds the per-record tables only
        assert size < 0.2 * sum(p.stat().st_size for p in parts)
        shutil.move(tmp_path / "parts", tmp_path / "moved")
        with pytest.raises(MtmimError, match="missing"):
            Cache(out)
    else:
        shutil.rmtree(tmp_path / "parts")
        assert np.array_equal(Cache(out).images(np.arange(10)), full.images(np.arange(10)))
