"""Cross-age verification over every young x adult photo pair of a labelled set, with intervals
that resample identities.

The held-out sets this toolkit is judged on pair a person's childhood photos with their adult
ones; this is that measurement on any cache with ages: every photo taken at `young_max` or
younger against every photo taken at `adult_min` or older, genuine when the identity is the
same. The score is the ROC AUC over all those pairs.

An identity bootstrap draws identities with replacement; a pair between photos of identities
drawn c_i and c_j times then occurs c_i * c_j times in the resampled set (copies of one person
are the same person, so genuine pairs multiply the same way), which is the weight given to
it here instead of building the resampled set.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.metrics import roc_auc_score


def cross_age_pairs_all(identity: np.ndarray, age: np.ndarray, young_max: float,
                        adult_min: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the young photos and of the adult photos (ages known), and whether each
    young x adult pair is genuine (young rows, adult columns)."""
    if young_max >= adult_min:
        raise ValueError(f"young_max {young_max} must be below adult_min {adult_min}")
    age = np.asarray(age, np.float64)
    young = np.flatnonzero(np.isfinite(age) & (age <= young_max))
    adult = np.flatnonzero(np.isfinite(age) & (age >= adult_min))
    same = np.asarray(identity)[young][:, None] == np.asarray(identity)[adult][None]
    if not same.any() or same.all():
        raise ValueError(f"no genuine or no impostor pair between photos aged <= {young_max} "
                         f"and >= {adult_min}")
    return young, adult, same


def _scores(features: np.ndarray, young: np.ndarray, adult: np.ndarray) -> np.ndarray:
    """Cosine similarity of every young x adult pair, flattened as `same.ravel()`."""
    f = _unit(features)
    return (f[young] @ f[adult].T).ravel()


def cross_age_auc(features: np.ndarray, identity: np.ndarray, age: np.ndarray, *,
                  young_max: float = 10, adult_min: float = 18) -> float:
    """ROC AUC of cosine similarity over all young x adult pairs."""
    young, adult, same = cross_age_pairs_all(identity, age, young_max, adult_min)
    return float(roc_auc_score(same.ravel(), _scores(features, young, adult)))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def bootstrap_cross_age_auc(features: Mapping[str, np.ndarray], identity: np.ndarray,
                            age: np.ndarray, *, young_max: float = 10, adult_min: float = 18,
                            resamples: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Per model (same photos in every model), the AUC in each of `resamples` identity
    bootstrap replicates, shared across models so differences are paired. Replicates without
    a genuine or an impostor pair are redrawn."""
    identity = np.asarray(identity)
    young, adult, same = cross_age_pairs_all(identity, age, young_max, adult_min)
    same = same.ravel()
    ids, inv = np.unique(identity, return_inverse=True)
    iy, ia = inv[young], inv[adult]
    scores = {k: _scores(f, young, adult) for k, f in features.items()}
    rng = np.random.default_rng(seed)
    out = {k: np.empty(resamples) for k in scores}
    r = 0
    while r < resamples:
        count = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))
        w = (count[iy][:, None] * count[ia][None]).ravel().astype(np.float64)
        if not (w[same] > 0).any() or not (w[~same] > 0).any():
            continue
        keep = w > 0
        for k, s in scores.items():
            out[k][r] = roc_auc_score(same[keep], s[keep], sample_weight=w[keep])
        r += 1
    return out
