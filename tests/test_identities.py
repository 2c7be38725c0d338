"""One label per identity across caches: shards of one align job share names, other
datasets keep theirs apart, ambiguous folders are refused (data/identities.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtmim_cli.data.cache import DETECTED, CacheWriter, records_digest
from mtmim_cli.data.dataset import CacheDataset
from mtmim_cli.data.records import Record
from mtmim_cli.errors import MtmimError


def _cache(path: Path, names: list[str], job: list[str], root: str, shard: str = "") -> Path:
    """A cache holding records `names`; `job` is the whole align job's identity list (its
    digest marks caches of one job, as `align --shard` writes it)."""
    recs = [Record(f"{path.stem}/{i}.jpg", n) for i, n in enumerate(names)]
    job_recs = [Record(f"j/{i}.jpg", n) for i, n in enumerate(job)]
    w = CacheWriter(path, recs, {"reader": "folder", "source_root": root, "shard": shard,
                                 "all_records_sha1": records_digest(job_recs)})
    for i in range(len(recs)):
        w.write(i, np.zeros((112, 112, 3), np.uint8), DETECTED)
    return w.finish()


def _people(ds: CacheDataset) -> dict[tuple[int, int], int]:
    """label of each (cache, record): checked against a plain grouping below."""
    return {(int(c), int(r)): int(lab) for c, r, lab in zip(ds.cache_of, ds.record, ds.labels,
                                                            strict=True)}


def test_shards_of_one_job_share_identities(tmp_path: Path) -> None:
    job = ["ann", "ann", "bob", "bob", "bob", "cy"]          # bob straddles the boundary
    a = _cache(tmp_path / "s0.h5", job[:3], job, "/data/ms1m", "0/2")
    b = _cache(tmp_path / "s1.h5", job[3:], job, "/data/ms1m", "1/2")
    ds = CacheDataset([a, b], train=False)
    assert ds.num_classes == 3
    got = _people(ds)
    names = [(0, k, n) for k, n in enumerate(job[:3])] + [(1, k, n) for k, n in enumerate(job[3:])]
    # independent: two records are one class exactly when they carry the same name
    for c1, r1, n1 in names:
        for c2, r2, n2 in names:
            assert (got[(c1, r1)] == got[(c2, r2)]) == (n1 == n2)
    assert ds.class_names == ["s0.h5:ann", "s0.h5:bob", "s0.h5:cy"]
    assert CacheDataset([a, b], train=False, identities="per-cache").num_classes == 4


def test_other_datasets_keep_their_names_apart(tmp_path: Path) -> None:
    celeba = _cache(tmp_path / "celeba.h5", ["7201", "7201", "9"], ["7201", "7201", "9"], "/d/celeba")
    ms1m = _cache(tmp_path / "ms1m.h5", ["7201", "5"], ["7201", "5"], "/d/ms1m")
    ds = CacheDataset([celeba, ms1m], train=False)
    assert ds.num_classes == 4                               # the two 7201s are two people
    assert CacheDataset([celeba, ms1m], train=False, identities="by-name").num_classes == 3


def test_two_runs_over_one_folder_sharing_a_name_are_refused(tmp_path: Path) -> None:
    a = _cache(tmp_path / "a.h5", ["x", "y"], ["x", "y"], "/d/casia")
    b = _cache(tmp_path / "b.h5", ["y", "z"], ["y", "z"], "/d/casia")
    with pytest.raises(MtmimError, match=r"b.h5: made by another align run than .*a.h5.*'y'.*--identities"):
        CacheDataset([a, b], train=False)
    assert CacheDataset([a, b], train=False, identities="by-name").num_classes == 3
    assert CacheDataset([a, b], train=False, identities="per-cache").num_classes == 4
    c = _cache(tmp_path / "c.h5", ["q"], ["q"], "/d/casia")   # same folder, no shared name
    assert CacheDataset([a, c], train=False).num_classes == 3
    with pytest.raises(MtmimError, match="--identities sometimes"):
        CacheDataset([a], train=False, identities="sometimes")
