"""The within-identity age subspace against a loop written from its definition, and on
synthetic faces whose ageing direction is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import orth, subspace_angles

from mtmim_cli.eval.age_subspace import fit_age_subspace, remove_subspace

EDGES = (0, 6, 11, 16, 21, 31)


def _group(a: float, edges=EDGES) -> int:
    g = -1
    for k, e in enumerate(edges):
        if np.floor(a) >= e:
            g = k
    return g


def reference_basis(x: np.ndarray, identity: np.ndarray, age: np.ndarray,
                    edges=EDGES) -> np.ndarray:
    """Plain loops: per photo, its normalised feature minus its identity's mean; per group,
    the mean of those; an orthonormal basis of their span (photos of unknown age or below
    the first edge left out)."""
    keep = [p for p in range(len(x)) if np.isfinite(age[p]) and _group(age[p], edges) >= 0]
    x, identity, age = x[keep], np.asarray(identity)[keep], np.asarray(age)[keep]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    resid = {}
    for p in range(len(x)):
        same = [q for q in range(len(x)) if identity[q] == identity[p]]
        if len(same) < 2:
            continue
        resid[p] = x[p] - np.mean([x[q] for q in same], axis=0)
    groups = sorted({_group(age[p], edges) for p in resid})
    means = [np.mean([resid[p] for p in resid if _group(age[p], edges) == g], axis=0)
             for g in groups]
    return orth(np.array(means).T, rcond=1e-6)


def _faces(n_ids: int = 30, per: int = 8, d: int = 16, seed: int = 0, strength: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, d))
    ageing = np.zeros(d)
    ageing[:2] = [1.0, -0.5]   # every face drifts this way as it ages
    identity = np.repeat(np.arange(n_ids), per)
    age = rng.uniform(0, 45, len(identity))
    x = centres[identity] + strength * np.outer(np.log1p(age) - 2, ageing) \
        + 0.05 * rng.normal(size=(len(identity), d))
    return x, identity, age, ageing


def test_matches_the_definition_computed_by_loops():
    x, identity, age, _ = _faces(n_ids=12, per=5, d=10, seed=3)
    identity[-1] = 99          # a lone photo: no residual, left out
    age[0] = np.nan            # unknown age: left out
    basis = fit_age_subspace(x, identity, age, EDGES)
    keep = np.isfinite(age)
    ref = reference_basis(x[keep], identity[keep], age[keep])
    assert basis.shape == ref.shape
    assert np.allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-10)
    assert np.max(subspace_angles(basis, ref)) < 1e-6


def test_finds_the_ageing_direction_and_removal_leaves_identity():
    x, identity, age, ageing = _faces(strength=3.0)
    basis = fit_age_subspace(x, identity, age, EDGES)
    assert 1 <= basis.shape[1] <= len(EDGES) - 1
    # the known ageing direction lies (almost) inside the fitted subspace
    u = ageing / np.linalg.norm(ageing)
    assert np.linalg.norm(basis.T @ u) > 0.95
    y = remove_subspace(x, basis)
    # removed: no component left along the basis; applying it again changes nothing
    assert np.abs(y @ basis).max() < 1e-10
    assert np.allclose(remove_subspace(y, basis), y)
    # the age trend is gone from the features: log-age no longer correlates along ageing
    before = abs(np.corrcoef(x @ u, np.log1p(age))[0, 1])
    after = abs(np.corrcoef(y @ u, np.log1p(age))[0, 1])
    assert before > 0.5 and after < 0.2


def _held_out_r2(features: np.ndarray, target: np.ndarray) -> float:
    """R^2 of a least-squares fit (with intercept) of `target` on `features`."""
    design = np.c_[np.ones(len(features)), features]
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return 1 - np.sum((target - design @ coef) ** 2) / np.sum((target - target.mean()) ** 2)


def test_no_age_effect_gives_the_definitions_noise_subspace_holding_no_age():
    """Without an age effect the fit still returns the span of the (noise) group means: the
    loop definition must agree, and on fresh faces those directions carry no age, while the
    same check finds age in the subspace fitted where there is an effect."""
    x, identity, age, _ = _faces(strength=0.0)
    basis = fit_age_subspace(x, identity, age, EDGES)
    ref = reference_basis(x, identity, age)
    assert basis.shape == ref.shape and np.max(subspace_angles(basis, ref)) < 1e-6
    fx, _, fage, _ = _faces(strength=0.0, seed=9)
    assert _held_out_r2(fx @ basis, np.log1p(fage)) < 0.08
    x3, id3, age3, _ = _faces(strength=3.0)
    fx3, _, fage3, _ = _faces(strength=3.0, seed=9)
    assert _held_out_r2(fx3 @ fit_age_subspace(x3, id3, age3, EDGES), np.log1p(fage3)) > 0.5


def test_bad_shapes_raise_and_a_lone_photo_gives_nothing():
    x, identity, age, _ = _faces(strength=0.0)
    with pytest.raises(ValueError, match="one row per photo"):
        fit_age_subspace(x[:-1], identity, age, EDGES)
    lone = fit_age_subspace(x[:3], np.arange(3), age[:3], EDGES)
    assert lone.shape == (x.shape[1], 0)
