"""bench/age_subspace.py's pure parts: seeds grouped into settings, and the share of young-adult
distances inside the age subspace against plain loops."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
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
