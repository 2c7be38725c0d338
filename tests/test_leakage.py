"""Age leakage probes: a planted age direction is found (high R^2, accuracy far above chance)
and, projected out, leaves chance; folds split by identity keep a probe from scoring by
recognising people."""

from __future__ import annotations

import numpy as np
import pytest

from mtmim_cli.eval.agebins import FGNET_AGE_EDGES, assign_bins
from mtmim_cli.eval.leakage import age_probe, factor_mi, logistic_path, ridge_path


def _people(n_ids=30, per=8, d=16, seed=0):
    rng = np.random.default_rng(seed)
    identity = np.repeat(np.arange(n_ids), per)
    age = rng.integers(0, 70, n_ids * per).astype(float)  # independent of identity
    x = rng.normal(size=(n_ids, d))[identity] + 0.3 * rng.normal(size=(n_ids * per, d))
    return rng, identity, age, x


def _unit(rng, d):
    u = rng.normal(size=d)
    return u / np.linalg.norm(u)


@pytest.mark.parametrize("n,d", [(60, 10), (30, 80)])
def test_ridge_path_equals_sklearn_scaler_plus_ridge(n, d):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, d) + rng.normal(size=d)
    y = rng.normal(size=(n, 3))
    xt = rng.normal(size=(7, d))
    alphas = [0.01, 1.0, 100.0]
    got = ridge_path(x, y, xt, alphas)
    for k, a in enumerate(alphas):
        ref = make_pipeline(StandardScaler(), Ridge(alpha=a)).fit(x, y).predict(xt)
        np.testing.assert_allclose(got[k], ref, rtol=1e-7, atol=1e-9)


def test_logistic_path_in_the_row_span_predicts_as_sklearn_on_all_features():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 120))
    y = (x[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(int) + (x[:, 1] > 1)
    xt = rng.normal(size=(200, 120))
    got = logistic_path(x, y, xt, [0.01, 0.1])
    for k, c in enumerate([0.01, 0.1]):
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, tol=1e-10))
        ref_pred = ref.fit(x, y).predict(xt)
        assert np.mean(got[k] == ref_pred) >= 0.99


def test_planted_age_direction_is_found_and_removing_it_leaves_chance():
    rng, identity, age, x = _people()
    u = _unit(rng, x.shape[1])
    z = np.log1p(age)
    planted = x + 6.0 * np.outer((z - z.mean()) / z.std(), u)
    got = age_probe(planted, age, identity)
    assert got["age_r2"] > 0.8
    assert got["age_group_accuracy"] > got["age_group_chance"] + 0.15
    removed = planted - np.outer(planted @ u, u)
    gone = age_probe(removed, age, identity)
    assert abs(gone["age_r2"]) < 0.06
    assert gone["age_group_accuracy"] < gone["age_group_chance"] + 0.06
    assert gone["age_r2_chance"] == 0.0 and gone["age_target"] == "log(1+age)"


def test_chance_level_is_the_majority_group_of_each_training_fold():
    from sklearn.dummy import DummyClassifier
    from sklearn.model_selection import GroupKFold, cross_val_predict

    rng, identity, age, x = _people(seed=1)
    got = age_probe(x, age, identity)
    group = assign_bins(age, FGNET_AGE_EDGES)
    pred = cross_val_predict(DummyClassifier(strategy="most_frequent"), x, group,
                             groups=identity, cv=GroupKFold(5))
    assert got["age_group_chance"] == pytest.approx(np.mean(pred == group))
    assert (got["images"], got["identities"], got["folds"]) == (240, 30, 5)


def test_identity_grouped_folds_do_not_reward_recognising_people():
    """Each person photographed at one age, features carrying identity only: a probe with
    shuffled folds 'predicts' age by recognising the person; grouped folds give chance."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict

    rng = np.random.default_rng(2)
    identity = np.repeat(np.arange(30), 8)
    age = rng.integers(0, 70, 30).astype(float)[identity]
    # More dimensions than people: a linear map can recall every person's age.
    x = rng.normal(size=(30, 48))[identity] + 0.1 * rng.normal(size=(240, 48))
    leaky = cross_val_predict(RidgeCV(alphas=np.logspace(-3, 3, 13)), x, np.log1p(age),
                              cv=KFold(5, shuffle=True, random_state=0))
    assert r2_score(np.log1p(age), leaky) > 0.8  # the trap is real
    assert age_probe(x, age, identity)["age_r2"] < 0.1


def test_undated_images_are_left_out_and_one_identity_refused():
    rng, identity, age, x = _people(n_ids=10, per=6, seed=3)
    age[:7] = np.nan
    assert age_probe(x, age, identity)["images"] == 53
    with pytest.raises(ValueError, match="two identities"):
        age_probe(x[:6], age[:6] * 0 + 5, identity[:6])


@pytest.mark.slow
def test_factor_mi_lower_bound_sees_dependence():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(400, 4))
    dependent = factor_mi(a, a + 0.3 * rng.normal(size=(400, 4)), steps=200)
    independent = factor_mi(a, rng.normal(size=(400, 4)), steps=200)
    assert dependent["infonce_lower"] > 1.0
    assert independent["infonce_lower"] < 0.2
    assert dependent["infonce_cap"] == pytest.approx(np.log(200))


def test_softmax_objective_gradient_matches_finite_differences():
    from scipy.optimize import check_grad

    from mtmim_cli.eval.leakage import _softmax_objective

    rng = np.random.default_rng(3)
    x = rng.normal(size=(25, 4))
    onehot = np.eye(3)[rng.integers(0, 3, 25)]
    theta = rng.normal(size=(4 + 1) * 3)
    err = check_grad(lambda t: _softmax_objective(t, x, onehot, 0.7)[0],
                     lambda t: _softmax_objective(t, x, onehot, 0.7)[1], theta)
    assert err < 1e-6


@pytest.mark.parametrize("c", [0.01, 1.0, 10.0])
def test_logistic_path_fits_sklearns_model_when_both_converge(c):
    """Fitted to a tight tolerance, the same predictions as sklearn's LogisticRegression(C)
    on standardised features (three classes, labels not 0..k-1, features below the rows)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(11)
    x = rng.normal(size=(90, 6))
    y = np.array([3, 5, 9])[np.argmax(x[:, :3] + rng.normal(size=(90, 3)), axis=1)]
    xt = rng.normal(size=(300, 6))
    got = logistic_path(x, y, xt, [c], tol=1e-10)[0]
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=10000, tol=1e-12))
    np.testing.assert_array_equal(got, ref.fit(x, y).predict(xt))


def test_age_probe_is_fitted_once_per_content_and_returns_a_copy(monkeypatch):
    import mtmim_cli.eval.leakage as L

    calls = []
    real = L._age_probe
    monkeypatch.setattr(L, "_age_probe", lambda *a: calls.append(1) or real(*a))
    _, identity, age, x = _people(n_ids=12, per=5, seed=4)
    first = age_probe(x, age, identity)
    first["age_r2"] = 99.0                              # a caller's edit stays its own
    again = age_probe(x.copy(), age.copy(), identity.copy())
    assert len(calls) == 1 and again["age_r2"] != 99.0
    age_probe(x, age, identity, folds=3)                # other settings: probed again
    x2 = x.copy()
    x2[0, 0] += 1e-9                                    # other features: probed again
    age_probe(x2, age, identity)
    assert len(calls) == 3
