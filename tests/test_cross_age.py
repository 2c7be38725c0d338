"""Cross-age AUC over all young x adult pairs, and its identity bootstrap, against a brute
force that builds each resampled set of photos and its pairs explicitly."""

from __future__ import annotations

import numpy as np
import pytest

from mtmim_cli.eval.cross_age import bootstrap_cross_age_auc, cross_age_auc
from mtmim_cli.eval.metrics import roc_auc


def _set(seed: int = 0, n_ids: int = 7, per: int = 6, d: int = 8):
    rng = np.random.default_rng(seed)
    identity = np.repeat(np.arange(n_ids), per)
    age = rng.integers(0, 40, len(identity)).astype(float)
    x = rng.normal(size=(n_ids, d))[identity] + rng.normal(size=(len(identity), d))
    return x, identity, age


def _brute(x, identity, age, young_max=10, adult_min=18):
    f = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores, same = [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if age[i] <= young_max and age[j] >= adult_min:
                scores.append(f[i] @ f[j])
                same.append(identity[i] == identity[j])
    return roc_auc(np.array(scores), np.array(same))


def test_auc_is_the_mann_whitney_over_every_young_adult_pair():
    x, identity, age = _set()
    assert cross_age_auc(x, identity, age) == pytest.approx(_brute(x, identity, age), abs=1e-12)
    assert cross_age_auc(x, identity, age, young_max=5, adult_min=30) == pytest.approx(
        _brute(x, identity, age, 5, 30), abs=1e-12)


def test_bootstrap_replicates_equal_the_resampled_sets_built_by_hand():
    x, identity, age = _set(seed=1)
    reps = bootstrap_cross_age_auc({"m": x}, identity, age, resamples=5, seed=7)["m"]
    # the same draws, materialised: each drawn identity's photos copied in, same person
    ids = np.unique(identity)
    rng = np.random.default_rng(7)
    got = []
    while len(got) < 5:
        count = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))
        rows = np.concatenate([np.flatnonzero(identity == ids[k]) for k in range(len(ids))
                               for _ in range(count[k])])
        try:
            got.append(_brute(x[rows], identity[rows], age[rows]))
        except ValueError:      # no genuine or no impostor pair: redrawn, as the library does
            continue
    assert np.allclose(reps, got, atol=1e-12)


def test_no_genuine_cross_age_pair_is_a_clear_error():
    x, identity, age = _set()
    with pytest.raises(ValueError, match="no genuine or no impostor"):
        cross_age_auc(x, identity, np.full(len(age), 5.0))
