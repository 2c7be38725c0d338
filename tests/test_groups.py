"""Equal-frequency age groups against a brute-force search over every cut."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mtmim_cli.data.groups import assign_groups, equal_frequency_groups, group_table


def brute_force_cost(ages: np.ndarray, k: int) -> float:
    """The least sum of squared deviations from N/k over every split of the distinct ages."""
    values, counts = np.unique(ages, return_counts=True)
    target = len(ages) / k
    best = math.inf
    for cuts in itertools.combinations(range(1, len(values)), k - 1):
        edges = (0, *cuts, len(values))
        sizes = [counts[a:b].sum() for a, b in zip(edges[:-1], edges[1:], strict=True)]
        best = min(best, sum((s - target) ** 2 for s in sizes))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_dp_matches_brute_force(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    ages = rng.integers(0, 12, size=rng.integers(15, 60)).astype(float)  # many ties
    b = equal_frequency_groups(ages, k)
    assert len(b) == k - 1 and np.all(np.diff(b) > 0)
    sizes = np.bincount(assign_groups(ages, b), minlength=k)
    assert sizes.min() > 0
    got = float(((sizes - len(ages) / k) ** 2).sum())
    assert got == pytest.approx(brute_force_cost(ages, k))


def test_boundaries_sit_between_distinct_ages() -> None:
    ages = np.array([1, 1, 2, 2, 3, 3, 4, 4], float)
    b = equal_frequency_groups(ages, 4)
    np.testing.assert_allclose(b, [1.5, 2.5, 3.5])
    assert assign_groups([1, 1.5, 1.49, 4, 100, -3], b).tolist() == [0, 1, 0, 3, 3, 0]


def test_continuous_ages_give_exactly_equal_groups() -> None:
    ages = np.random.default_rng(0).uniform(0, 80, 8000)  # > DP limit: position cuts
    b = equal_frequency_groups(ages, 8)
    assert np.bincount(assign_groups(ages, b)).tolist() == [1000] * 8


def test_unknown_ages_are_ignored_and_map_to_minus_one() -> None:
    ages = np.array([np.nan, 10, 20, 30, 40, np.nan, 50, 60])
    b = equal_frequency_groups(ages, 3)
    g = assign_groups(ages, b)
    assert g[0] == -1 and g[5] == -1
    assert np.bincount(g[g >= 0]).tolist() == [2, 2, 2]


def test_too_few_distinct_ages() -> None:
    with pytest.raises(ValueError, match="3 distinct known ages"):
        equal_frequency_groups([1, 1, 2, 3, np.nan], 4)
    with pytest.raises(ValueError):
        equal_frequency_groups([1, 2, 3], 0)


def test_group_table_counts() -> None:
    ages = np.random.default_rng(1).integers(0, 70, 500).astype(float)
    b = equal_frequency_groups(ages, 8)
    rows = group_table(ages, b)
    assert sum(r["count"] for r in rows) == 500
    assert rows[0]["from"] == -math.inf and rows[-1]["to"] == math.inf
    for r in rows:
        assert r["from"] <= r["min_age"] <= r["max_age"] < r["to"]
