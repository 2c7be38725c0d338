"""`mtmim subset`: the listed identities' records, images copied as they are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtmim_cli.data.cache import Cache
from mtmim_cli.data.provenance import cache_digests
from mtmim_cli.data.subset import subset_cache
from mtmim_cli.errors import MtmimError
from tests.conftest import run_cli, write_cache


def test_subset_keeps_the_listed_identities_records_and_pixels(tmp_path: Path) -> None:
    ids = ["001", "002", "010", "002", "001", "010", "011"]
    src = write_cache(tmp_path / "src.h5", ids, [1.0, 2, 3, 4, 5, 6, 7], seed=3)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"fg": {"test": [1, 10]}}))
    r = run_cli("subset", str(src), "--identities", f"@{split}:fg.test", "--out",
                str(tmp_path / "sub.h5"), "-q")
    assert r.returncode == 0, r.stderr
    a, b = Cache(src), Cache(tmp_path / "sub.h5")
    rows = np.array([0, 2, 4, 5])
    assert [b.identity_names[i] for i in b.identity] == [ids[k] for k in rows]
    assert b.paths == [a.paths[k] for k in rows] and list(b.age) == [1.0, 3.0, 5.0, 6.0]
    np.testing.assert_array_equal(b.images(np.arange(4)), a.images(rows))
    np.testing.assert_array_equal(cache_digests(b), cache_digests(a)[rows])


def test_subset_refuses_names_it_does_not_hold(tmp_path: Path) -> None:
    src = write_cache(tmp_path / "src.h5", ["a", "b", "b"])
    with pytest.raises(MtmimError, match="1 listed identities are not in it"):
        subset_cache(src, tmp_path / "x.h5", ["a", "zz"], progress=False)
    with pytest.raises(MtmimError, match="none of the"):
        subset_cache(src, tmp_path / "x.h5", ["q"], progress=False)
    assert not (tmp_path / "x.h5").exists()
