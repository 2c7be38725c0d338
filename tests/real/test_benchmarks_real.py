"""The FG-NET names digest in mtmim_cli.eval.benchmarks is that of the real photo set."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtmim_cli.eval import benchmarks as B


@pytest.mark.real
def test_fgnet_digest_is_the_real_sets(fgnet_dir: Path) -> None:
    names = sorted(p.name for p in (fgnet_dir / "images").iterdir())
    assert len(names) == B.FGNET_PHOTOS
    assert B.names_sha256(names) == B.FGNET_NAMES_SHA256
    assert B.fgnet(names, "full", rounds=1000, n_ranked=1000).comparable
