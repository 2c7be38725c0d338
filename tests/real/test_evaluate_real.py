"""`mtmim evaluate` on a real slice of FG-NET with the shared CASIA MobileFaceNet.

Eight subjects (about 90 photos) are aligned by `align_dataset`, then evaluated through the
real CLI: fgnet-loo (refit none) and a cross-age pair list as an insightface .bin. The full
1002-image figures are in bench/fgnet_eval.py."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from mtmim_cli.data.cache import Cache
from mtmim_cli.eval import metrics as M
from mtmim_cli.eval.features import extract_features
from mtmim_cli.eval.pairs import cross_age_pairs
from tests.conftest import align_fgnet_subjects, run_cli

pytestmark = [pytest.mark.real, pytest.mark.slow]

SUBJECTS = ("001", "002", "003", "004", "005", "006", "007", "008")


@pytest.fixture(scope="module")
def fgnet_slice(fgnet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return align_fgnet_subjects(fgnet_dir, SUBJECTS, tmp_path_factory.mktemp("fgnet-slice"))


def test_fgnet_loo_and_pairs_real(fgnet_slice: Path, mobilefacenet_ckpt: Path, tmp_path: Path) -> None:
    from mtmim_cli.models.identity import load_identity_model

    cache = Cache(fgnet_slice)
    assert len(cache) > 60
    out = tmp_path / "loo" / "results.md"
    r = run_cli("evaluate", "--protocol", "fgnet-loo", "--cache", str(fgnet_slice),
                "--model", f"casia={mobilefacenet_ckpt}", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    got = json.loads(out.with_suffix(".json").read_text())["results"][0]["metrics"]
    model = load_identity_model(mobilefacenet_ckpt)
    feats = extract_features(model, cache, np.flatnonzero(cache.usable), "concat")
    ids = cache.identity[cache.usable]
    expected = M.rank1_dense(feats, ids, feats, ids, exclude_self=True)
    assert got["rank1"] == pytest.approx(expected)
    assert expected > 0.6  # eight subjects, 0-69 years: a real model, well above chance (~0.13)
    assert "casia" in r.stdout and "rank-1" in r.stdout

    # The same faces as an insightface .bin of cross-age pairs.
    from PIL import Image

    i, j, same = cross_age_pairs(cache.identity, cache.age, 120, seed=0, min_gap=5,
                                 usable=cache.usable)
    bins = []
    for a, b in zip(i, j, strict=True):
        for k in (a, b):
            buf = io.BytesIO()
            Image.fromarray(cache.image(k)).save(buf, "PNG")
            bins.append(buf.getvalue())
    pairs = tmp_path / "slice.bin"
    pairs.write_bytes(pickle.dumps((bins, [bool(s) for s in same]), protocol=2))
    out2 = tmp_path / "bin" / "results.md"
    r = run_cli("evaluate", "--protocol", "agedb30", "--pairs", str(pairs),
                "--model", str(mobilefacenet_ckpt), "--out", str(out2), "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads(out2.with_suffix(".json").read_text())["results"][0]["metrics"]
    pos = {k: n for n, k in enumerate(np.flatnonzero(cache.usable))}
    scores = np.sum(feats[[pos[a] for a in i]] * feats[[pos[b] for b in j]], axis=1)
    assert m["accuracy"] == pytest.approx(M.tenfold_verification(scores, same, 10)["accuracy"], abs=1e-9)
    assert m["accuracy"] > 0.7
    assert "96.10" in out2.read_text()  # the paper's AgeDB-30 row, labelled reported
