"""The within-identity age subspace of a feature space, fitted in closed form, and its removal.

MT-MIM factorises a feature x into x_age = W x and x_id = x - x_age and learns W. When W is an
orthogonal projection onto a subspace, x_id is x with that subspace removed. Here the subspace is
estimated directly from labelled photos: centre each identity's (L2-normalised) features on
that identity's mean, so that what is left is how the person's features differ between their
photos, and average these residuals per age group. The span of the age-group means holds the
average change of a face's features with age; identity differences between people, which the
centring removed, do not enter it. Projecting it out removes the linearly readable age at the
cost of a few dimensions (at most one fewer than the number of age groups present).

It is the linear comparison point for any learnt age removal: no training, no q network,
nothing to tune but the age groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtmim_cli.eval.agebins import assign_bins


def fit_age_subspace(features: np.ndarray, identity: np.ndarray, age: np.ndarray,
                     edges: Sequence[float], *, min_photos: int = 2,
                     rtol: float = 1e-6) -> np.ndarray:
    """Orthonormal basis (d, k) of the within-identity age subspace (see the module's text).

    `edges` are the age groups' lower edges in years. Only identities with at least
    `min_photos` dated photos count (a lone photo has no within-identity residual). Directions
    whose singular value is below `rtol` times the largest are dropped, so k can be smaller
    than the number of groups; k is 0 when there is nothing to remove."""
    x = np.asarray(features, np.float64)
    identity = np.asarray(identity)
    age = np.asarray(age, np.float64)
    if x.ndim != 2 or len(x) != len(identity) or len(x) != len(age):
        raise ValueError(f"features {x.shape}, identity {identity.shape} and age {age.shape} "
                         "must have one row per photo")
    group = assign_bins(age, edges)
    keep = group >= 0
    x, identity, group = x[keep], identity[keep], group[keep]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    ids, inverse, counts = np.unique(identity, return_inverse=True, return_counts=True)
    use = counts[inverse] >= min_photos
    x, inverse, group = x[use], inverse[use], group[use]
    if len(x) == 0:
        return np.zeros((np.asarray(features).shape[1], 0))
    sums = np.zeros((len(ids), x.shape[1]))
    np.add.at(sums, inverse, x)
    resid = x - sums[inverse] / np.bincount(inverse, minlength=len(ids))[inverse, None]
    means = np.stack([resid[group == g].mean(0) for g in np.unique(group)])
    _, sv, vt = np.linalg.svd(means, full_matrices=False)
    if len(sv) == 0 or sv[0] <= 0:
        return np.zeros((x.shape[1], 0))
    return vt[sv > rtol * sv[0]].T.copy()


def remove_subspace(features: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """features minus their projection on the orthonormal `basis` (d, k)."""
    f = np.asarray(features, np.float64)
    return f - (f @ basis) @ basis.T
