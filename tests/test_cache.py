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
