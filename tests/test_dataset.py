"""CacheDataset: re-indexed labels across caches, misses left out, crop, flip, normalisation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtmim_cli.data.cache import DETECTED, MISS, CacheWriter
from mtmim_cli.data.dataset import CacheDataset, preprocess
from mtmim_cli.data.records import Record
from tests.conftest import write_cache


def _cache_with_a_miss(path: Path) -> Path:
    records = [Record(f"{i}.jpg", f"p{i % 3}", float(i)) for i in range(6)]
    w = CacheWriter(path, records, attrs={"reader": "test", "source_root": "."})
    for i in range(6):
        if i == 4:
            w.write(i, None, MISS, reason="no face")
        else:
            w.write(i, np.full((112, 112, 3), 10 * i, np.uint8), DETECTED)
    w.commit(6)
    return w.finish()


def test_labels_reindexed_across_caches_and_misses_excluded(tmp_path: Path) -> None:
    a = _cache_with_a_miss(tmp_path / "a.h5")
    b = write_cache(tmp_path / "b.h5", ["p0", "p0", "q"], [1.0, math.nan, 3.0])
    ds = CacheDataset([a, b], train=False)
    assert len(ds) == 5 + 3
    assert ds.num_classes == 3 + 2            # p0 of a and p0 of b are different people
    labels = [ds[i][1] for i in range(len(ds))]
    assert sorted(set(labels)) == list(range(5))
    assert labels[:5] == [0, 1, 2, 0, 2]      # a: records 0,1,2,3,5 (4 is the miss)
    assert labels[5] == labels[6] != labels[7]
    assert ds[5][2] == 1.0 and math.isnan(ds[6][2])
    assert ds.source(4)[1] == 5


def test_normalisation_crop_and_batch_path_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    c = write_cache(tmp_path / "c.h5", ["a", "a", "b", "b"], images=images)
    ds = CacheDataset([c], train=False, crop_width=96)
    x = ds[2][0]
    assert x.shape == (3, 112, 96)
    expected = (images[2, :, 8:104].astype(np.float64) - 127.5) / 128
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    batch = ds.__getitems__([3, 0])
    assert torch.equal(batch[0][0], ds[3][0]) and torch.equal(batch[1][0], ds[0][0])
    assert torch.equal(preprocess(images[:1], 96)[0], ds[0][0])


def test_flip_is_a_pure_function_of_seed_epoch_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (24, 112, 112, 3), dtype=np.uint8)
    c = write_cache(tmp_path / "c.h5", [f"i{k % 4}" for k in range(24)], images=images)
    plain = CacheDataset([c], train=False)
    ds = CacheDataset([c], train=True, seed=3)

    def flips(d: CacheDataset) -> list[bool]:
        out = []
        for i in range(len(d)):
            x, ref = d[i][0], plain[i][0]
            assert torch.equal(x, ref) or torch.equal(x, torch.flip(ref, dims=[2]))
            out.append(not torch.equal(x, ref))
        return out

    e0 = flips(ds)
    assert 5 <= sum(e0) <= 19
    assert flips(CacheDataset([c], train=True, seed=3)) == e0     # reproducible
    ds.set_epoch(1)
    assert flips(ds) != e0                                         # changes per epoch


@pytest.mark.slow
def test_worker_processes_see_the_same_items(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (24, 112, 112, 3), dtype=np.uint8)
    c = write_cache(tmp_path / "c.h5", [f"i{k % 4}" for k in range(24)], images=images)
    ds = CacheDataset([c], train=True, seed=3)
    one = [b[0] for b in DataLoader(ds, batch_size=8, num_workers=0)]
    two = [b[0] for b in DataLoader(ds, batch_size=8, num_workers=2)]
    assert all(torch.equal(p, q) for p, q in zip(one, two, strict=True))


def test_collate_of_prestacked_batch_equals_default(tmp_path: Path) -> None:
    from torch.utils.data import default_collate

    c = write_cache(tmp_path / "c.h5", ["a", "b", "a", "c"], [1.0, 2.0, math.nan, 4.0])
    ds = CacheDataset([c], train=True)
    items = ds.__getitems__([2, 0, 3])
    fast = CacheDataset.collate(items)
    slow = default_collate(list(items))
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert torch.equal(fast[3], slow[3])
    np.testing.assert_array_equal(fast[2].numpy(), slow[2].float().numpy())
    loader = DataLoader(ds, batch_size=2, collate_fn=CacheDataset.collate)
    x, y, a, i = next(iter(loader))
    assert x.shape == (2, 3, 112, 112) and y.dtype == torch.int64 and a.dtype == torch.float32
