"""Paired comparisons: the exact McNemar p against scipy's binomial test, bootstrap intervals
against closed-form standard errors and a plain loop bootstrap, seed summaries."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from mtmim_cli.eval.compare import (
    bootstrap_difference,
    group_labels,
    mcnemar_exact,
    pairwise_differences,
    seed_summary,
    split_group,
)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (1, 0), (3, 3), (5, 0), (2, 9), (17, 4),
                                 (40, 60), (0, 30), (250, 310), (1200, 1111)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    ref = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-9, abs=1e-300)


def test_mcnemar_small_case_by_hand():
    # b=0, c=4: P(X <= 0) = 1/16, two-sided 2/16.
    assert mcnemar_exact(0, 4) == 0.125
    assert mcnemar_exact(4, 0) == 0.125
    assert mcnemar_exact(1, 1) == 1.0


def test_discordant_counts_and_p_in_difference():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], bool)
    b = np.array([1, 0, 0, 0, 1, 1, 0, 0], bool)
    d = bootstrap_difference(a, b, resamples=200)
    assert (d.a_only, d.b_only) == (3, 1)
    assert d.p_mcnemar == pytest.approx(binomtest(1, 4, 0.5).pvalue)
    assert d.diff == pytest.approx(a.mean() - b.mean())
    assert d.resampling == "probes" and d.clusters == 8


def test_identical_models_give_zero_interval_and_p_one():
    a = np.random.default_rng(0).random(300) < 0.8
    d = bootstrap_difference(a, a.copy(), resamples=500)
    assert d.diff == 0 and d.low == 0 and d.high == 0 and d.p_mcnemar == 1.0


def test_probe_bootstrap_width_matches_closed_form_standard_error():
    rng = np.random.default_rng(1)
    n = 1000
    a = rng.random(n) < 0.9
    b = np.where(rng.random(n) < 0.85, a, ~a)  # correlated, as two models on one probe set are
    d = bootstrap_difference(a, b, resamples=10_000, seed=3)
    diff = a.astype(float) - b
    se = diff.std(ddof=0) / np.sqrt(n)
    half = (d.high - d.low) / 2
    assert half == pytest.approx(1.959964 * se, rel=0.06)
    assert d.low < d.diff < d.high


def test_probe_bootstrap_agrees_with_a_plain_loop_bootstrap():
    rng = np.random.default_rng(2)
    a = rng.random(400) < 0.7
    b = rng.random(400) < 0.6
    d = bootstrap_difference(a, b, resamples=10_000, seed=0)
    loop_rng = np.random.default_rng(123)
    reps = []
    for _ in range(10_000):
        i = loop_rng.integers(0, 400, 400)
        reps.append(a[i].mean() - b[i].mean())
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert d.low == pytest.approx(lo, abs=0.008)
    assert d.high == pytest.approx(hi, abs=0.008)


def test_cluster_bootstrap_matches_cluster_robust_standard_error_and_is_wider():
    rng = np.random.default_rng(4)
    k, per = 80, 12
    clusters = np.repeat(np.arange(k), per)
    # A person-level effect: some people are hard for model A only, so errors cluster.
    hard = rng.random(k) < 0.25
    p_a = np.where(hard[clusters], 0.5, 0.95)
    a = rng.random(k * per) < p_a
    b = rng.random(k * per) < 0.85
    dc = bootstrap_difference(a, b, clusters=clusters, resamples=10_000, seed=5)
    dp = bootstrap_difference(a, b, resamples=10_000, seed=5)
    diff = a.astype(float) - b
    n = len(diff)
    resid = np.bincount(clusters, weights=diff - diff.mean())
    se_cluster = np.sqrt(np.sum(resid**2)) / n  # the cluster-robust (sandwich) s.e. of a mean
    assert (dc.high - dc.low) / 2 == pytest.approx(1.959964 * se_cluster, rel=0.1)
    assert dc.high - dc.low > 1.2 * (dp.high - dp.low)
    assert dc.resampling == "clusters" and dc.clusters == k and dc.units == n


def test_seeded_and_reproducible():
    rng = np.random.default_rng(6)
    a, b = rng.random(100) < 0.5, rng.random(100) < 0.5
    d1 = bootstrap_difference(a, b, seed=7, resamples=1000)
    d2 = bootstrap_difference(a, b, seed=7, resamples=1000)
    d3 = bootstrap_difference(a, b, seed=8, resamples=1000)
    assert d1 == d2
    assert (d1.low, d1.high) != (d3.low, d3.high)


def test_shape_mismatch_refused():
    with pytest.raises(ValueError, match="not the same probes"):
        bootstrap_difference(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="clusters"):
        bootstrap_difference(np.ones(5), np.ones(5), clusters=np.arange(4))


def test_settings_over_seeds():
    rng = np.random.default_rng(8)
    n = 500
    base = rng.random(n) < 0.8
    # Setting A: two seeds, each flips a few probes of the shared base; B: three seeds, worse.
    A = np.stack([np.where(rng.random(n) < 0.05, ~base, base) for _ in range(2)])
    B = np.stack([np.where(rng.random(n) < 0.2, False, base) for _ in range(3)])
    d = bootstrap_difference(A, B, resamples=5000, seed=0)
    assert d.diff == pytest.approx(A.mean() - B.mean())
    assert d.mean_a == pytest.approx(np.mean(A.mean(axis=1)))
    assert d.seeds_a == 2 and d.seeds_b == 3 and d.resampling == "probes+seeds"
    assert d.p_mcnemar is None  # several seeds: no single discordance table
    assert d.low < d.diff < d.high
    fixed = bootstrap_difference(A, B, resamples=5000, seed=0, resample_seeds=False)
    assert fixed.resampling == "probes"
    assert fixed.high - fixed.low <= d.high - d.low + 1e-9


def test_seed_summary_mean_and_sample_sd():
    s = seed_summary([0.90, 0.92, 0.91])
    assert s["mean"] == pytest.approx(0.91)
    assert s["sd"] == pytest.approx(np.std([0.90, 0.92, 0.91], ddof=1))
    assert seed_summary([0.5])["sd"] is None


def test_group_labels():
    assert split_group("mtmim@s1") == ("mtmim", "s1")
    assert split_group("casia") == ("casia", None)
    assert split_group("@x") == ("@x", None)
    assert split_group("x@") == ("x@", None)
    assert split_group("casia@s1/mtmim") == ("casia/mtmim", "s1")
    assert split_group("casia/mtmim") == ("casia/mtmim", None)
    assert group_labels(["mtmim@s0", "base@s0", "mtmim@s1", "casia"]) == {
        "mtmim": [0, 2], "base": [1], "casia": [3]}


def test_pairwise_differences_every_pair_once():
    rng = np.random.default_rng(9)
    outs = [rng.random(50) < p for p in (0.9, 0.7, 0.5)]
    rows = pairwise_differences(["x", "y", "z"], outs, resamples=200)
    assert [(r["a"], r["b"]) for r in rows] == [("x", "y"), ("x", "z"), ("y", "z")]
    assert all(r["p_mcnemar"] is not None for r in rows)


def test_bootstrap_mean_matches_binomial_standard_error_and_cluster_width():
    from mtmim_cli.eval.compare import bootstrap_mean

    rng = np.random.default_rng(10)
    a = rng.random(1000) < 0.8
    m = bootstrap_mean(a, resamples=10_000, seed=1)
    se = np.sqrt(a.mean() * (1 - a.mean()) / len(a))
    assert m["mean"] == pytest.approx(a.mean())
    assert (m["high"] - m["low"]) / 2 == pytest.approx(1.959964 * se, rel=0.06)
    assert m["low"] < m["mean"] < m["high"] and m["resampling"] == "probes"
    # All of a cluster succeed or fail together: the interval is that of 50 coin flips.
    clusters = np.repeat(np.arange(50), 20)
    b = np.repeat(rng.random(50) < 0.6, 20)
    mc = bootstrap_mean(b, clusters=clusters, resamples=10_000, seed=1)
    se_c = np.sqrt(b.mean() * (1 - b.mean()) / 50)
    assert (mc["high"] - mc["low"]) / 2 == pytest.approx(1.959964 * se_c, rel=0.12)


# ---------------------------------------------------------------- seeds drawn, paired or not
def _exact_replicates(A: np.ndarray, B: np.ndarray, clusters: list[int], paired: bool) -> np.ndarray:
    """Every equally likely replicate of the cluster + seed bootstrap of mean(A) - mean(B), by
    loops: each ordered draw of clusters, and of seed indices (one draw for both sides when
    paired, else one per side); a replicate's mean is over the drawn seeds' rows and the drawn
    clusters' units, copies counted."""
    import itertools

    names = sorted(set(clusters))
    out = []
    for draw in itertools.product(range(len(names)), repeat=len(names)):
        units = [i for c in draw for i in range(len(clusters)) if clusters[i] == names[c]]
        for sa in itertools.product(range(len(A)), repeat=len(A)):
            for sb in ([sa] if paired else itertools.product(range(len(B)), repeat=len(B))):
                ma = np.mean([A[s][i] for s in sa for i in units])
                mb = np.mean([B[s][i] for s in sb for i in units])
                out.append(ma - mb)
    return np.array(out)


def _in_window(value: float, exact: np.ndarray, p: float, slack: float = 0.01) -> bool:
    """Whether a Monte Carlo quantile `value` lies between the exact distribution's
    quantiles at p - slack and p + slack (what 20,000 replicates reach with room to spare)."""
    lo, hi = np.quantile(exact, [p - slack, p + slack], method="inverted_cdf")
    return bool(lo - 1e-12 <= value <= hi + 1e-12)


@pytest.mark.parametrize("paired", [False, True])
def test_seed_draws_match_the_exact_bootstrap_of_a_tiny_case(paired: bool) -> None:
    clusters = [0, 0, 1, 2]
    # seed k of A goes with seed k of B: runs that are good or bad for both alike
    A = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], float)
    B = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], float)
    d = bootstrap_difference(A, B, clusters=clusters, resamples=20_000, seed=3,
                             paired_seeds=paired)
    exact = _exact_replicates(A, B, clusters, paired)
    assert d.resampling == ("clusters+paired seeds" if paired else "clusters+seeds")
    assert d.diff == pytest.approx(A.mean() - B.mean())
    assert _in_window(d.low, exact, 0.025) and _in_window(d.high, exact, 0.975)
    other = _exact_replicates(A, B, clusters, not paired)
    # the two resamplings really differ here, so the check above can tell them apart
    assert not (_in_window(d.low, other, 0.025) and _in_window(d.high, other, 0.975))


def test_paired_seeds_need_as_many_seeds_on_both_sides() -> None:
    with pytest.raises(ValueError, match="paired seeds"):
        bootstrap_difference(np.ones((2, 4)), np.ones((3, 4)), paired_seeds=True)


@pytest.mark.parametrize("paired", [False, True])
def test_seed_resampled_difference_matches_the_exact_mixture(paired: bool) -> None:
    """Replicate r takes every model's value in draw r and a draw of seeds: exactly, a mixture
    over r and over every ordered draw of seeds, enumerated here."""
    import itertools

    from mtmim_cli.eval.compare import seed_resampled_difference

    rng = np.random.default_rng(1)
    R = 4000
    base = np.array([0.60, 0.90])[:, None] + 0.02 * rng.normal(size=(2, R))
    reps_a = base + 0.01 + 0.005 * rng.normal(size=(2, R))   # seed k of A: seed k of B, moved
    reps_b = base
    got = seed_resampled_difference(reps_a, reps_b, paired=paired, seed=0)

    def exact(pair: bool) -> np.ndarray:
        out = []
        for r in range(R):
            for sa in itertools.product(range(2), repeat=2):
                for sb in ([sa] if pair else itertools.product(range(2), repeat=2)):
                    out.append(np.mean([reps_a[s, r] for s in sa])
                               - np.mean([reps_b[s, r] for s in sb]))
        return np.array(out)

    want, other = exact(paired), exact(not paired)
    for p, slack in ((0.025, 0.012), (0.5, 0.035), (0.975, 0.012)):
        assert _in_window(float(np.quantile(got, p)), want, p, slack)
    assert not _in_window(float(np.quantile(got, 0.025)), other, 0.025, 0.012)
