"""bench/age_subspace.py's pure parts: seeds grouped into settings, and the share of young-adult
distances inside the age subspace against plain loops."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.linalg import orth

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("age_subspace_bench",
                                               REPO / "bench" / "age_subspace.py")
AS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(AS)


def test_seeds_group_into_their_setting() -> None:
    assert AS._setting("mtmim-s2") == "mtmim" == AS._setting("mtmim@s0")
    assert AS._setting("g1e-1-s10") == "g1e-1" and AS._setting("pretrained") == "pretrained"


def test_share_of_young_adult_distance_in_the_subspace_matches_loops() -> None:
    rng = np.random.default_rng(4)
    d = 6
    identity = np.repeat(np.arange(5), 4)
    age = rng.integers(0, 40, len(identity)).astype(float)
    f = rng.normal(size=(len(identity), 2 * d))
    basis = orth(rng.normal(size=(d, 2)))
    gen, imp = AS._shares(f, basis, identity, age, 10, 18)
    proj = basis @ basis.T
    sums = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for i in range(len(f)):
        for j in range(len(f)):
            if age[i] <= 10 and age[j] >= 18:
                diff = f[i] - f[j]
                inside = diff[:d] @ proj @ diff[:d] + diff[d:] @ proj @ diff[d:]
                s = sums[bool(identity[i] == identity[j])]
                s[0] += inside
                s[1] += diff @ diff
    assert np.isclose(gen, sums[True][0] / sums[True][1])
    assert np.isclose(imp, sums[False][0] / sums[False][1])


def test_auc_interval_resamples_seeds_as_an_exact_enumeration_does() -> None:
    """auc_difference: replicate r of the identity bootstrap, and seeds drawn with
    replacement (one draw for a model as is and with age removed). Exactly: every identity
    replicate with every ordered draw of seeds, equally likely, enumerated by loops."""
    import itertools

    rng = np.random.default_rng(2)
    R = 4000
    seeds = ["m-s0", "m-s1"]
    level = {"m-s0": 0.70, "m-s1": 0.90}      # the seeds differ far more than removal moves them
    reps, auc = {}, {}
    for n in seeds:
        reps[f"{n}|as_is"] = level[n] + 0.01 * rng.normal(size=R)
        reps[f"{n}|removed"] = reps[f"{n}|as_is"] + 0.02 + 0.003 * rng.normal(size=R)
        auc[f"{n}|as_is"], auc[f"{n}|removed"] = level[n], level[n] + 0.02
    a = [f"{n}|removed" for n in seeds]
    b = [f"{n}|as_is" for n in seeds]

    def exact(paired: bool) -> np.ndarray:
        out = []
        for r in range(R):
            for sa in itertools.product(range(2), repeat=2):
                for sb in ([sa] if paired else itertools.product(range(2), repeat=2)):
                    out.append(np.mean([reps[a[k]][r] for k in sa])
                               - np.mean([reps[b[k]][r] for k in sb]))
        return np.array(out)

    def window(x: np.ndarray, q: float) -> tuple[float, float]:
        return tuple(np.quantile(x, [q - 0.012, q + 0.012], method="inverted_cdf"))

    for paired in (True, False):
        d, lo, hi = AS.auc_difference(auc, reps, a, b, paired=paired)
        assert d == pytest.approx(0.02)
        want = exact(paired)
        assert window(want, 0.025)[0] <= lo <= window(want, 0.025)[1]
        assert window(want, 0.975)[0] <= hi <= window(want, 0.975)[1]
    # the seeds are really drawn: averaging them (the old interval) is far narrower than
    # the independent draws, and the paired one holds the removal's effect above zero
    _, lo_p, hi_p = AS.auc_difference(auc, reps, a, b, paired=True)
    _, lo_i, hi_i = AS.auc_difference(auc, reps, a, b, paired=False)
    averaged = np.mean([reps[x] for x in a], 0) - np.mean([reps[x] for x in b], 0)
    assert hi_i - lo_i > 5 * np.ptp(np.quantile(averaged, [0.025, 0.975]))
    assert 0 < lo_p < 0.02 < hi_p
