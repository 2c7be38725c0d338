"""The CACD-VS release in ../shared (folds 1-4 as shipped): the reader on all of it, and a
slice of 80 pairs from two folds through the two commands with the CASIA MobileFaceNet.
The four-fold figure is bench/cacd_vs.py's (README block cacd-vs)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mtmim_cli.data.cache import Cache
from mtmim_cli.data.readers import read_records
from mtmim_cli.eval.features import extract_features
from tests.conftest import run_cli
from tests.test_cacd_vs import brute_force, rule

pytestmark = pytest.mark.real

SLICE = [*range(0, 20), *range(200, 220), *range(400, 420), *range(600, 620)]


def test_the_shared_release_reads_as_four_folds(cacd_vs_dir: Path) -> None:
    records = read_records(cacd_vs_dir, "cacd-vs")
    assert len(records) == 3200
    assert Counter(r.split for r in records) == {f"fold{k}": 800 for k in (1, 2, 3, 4)}
    # 200 genuine pairs (one identity each) and 200 impostor pairs (two) per fold
    assert len({r.identity for r in records}) == 4 * (200 + 2 * 200)


@pytest.mark.slow
def test_a_slice_of_two_folds_through_align_and_evaluate(cacd_vs_dir: Path, tmp_path: Path,
                                                         mobilefacenet_ckpt: Path) -> None:
    from mtmim_cli.models.identity import load_identity_model

    src = tmp_path / "release" / "images"
    src.mkdir(parents=True)
    for p in SLICE:
        for k in (0, 1):
            (src / f"{p:04d}_{k}.jpg").symlink_to(cacd_vs_dir / "images" / f"{p:04d}_{k}.jpg")
    cache_path, out = tmp_path / "slice.h5", tmp_path / "eval" / "results.md"
    r = run_cli("align", str(src.parent), "--format", "cacd-vs", "--out", str(cache_path),
                "--workers", "1", "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("evaluate", "--protocol", "cacd-vs", "--cache", str(cache_path),
                "--model", f"casia={mobilefacenet_ckpt}", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.with_suffix(".json").read_text())["results"][0]["metrics"]

    cache = Cache(cache_path)
    assert cache.usable.all()
    pos = {p: k for k, p in enumerate(cache.paths)}
    i = np.array([pos[f"{p:04d}_0.jpg"] for p in SLICE])
    j = np.array([pos[f"{p:04d}_1.jpg"] for p in SLICE])
    f = extract_features(load_identity_model(mobilefacenet_ckpt), cache, np.arange(len(cache)))
    scores = np.sum(f[i].astype(np.float64) * f[j], axis=1)
    _, accs = brute_force(scores, np.array([rule(p)[1] for p in SLICE]),
                          np.array([rule(p)[0] for p in SLICE]))
    assert m["folds_used"] == 2 and m["pairs"] == len(SLICE)
    assert m["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert m["accuracy"] > 0.9
    assert "folds 1-2 of the release's 10 (not all 10)" in r.stdout
