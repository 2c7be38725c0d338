"""Equal-frequency age groups: K contiguous age ranges holding about the same number of images.

Ages are often integers (FG-NET), so many images share an age and exact equal counts are
impossible; the cut points are chosen over the distinct ages by dynamic programming so that
the group sizes are as close as possible to N/K (least squares), and each boundary sits
half-way between the last age of one group and the first age of the next. A boundary list of
length K-1 maps an age to group ``g = #{boundaries <= age}``; unknown ages (NaN) map to -1.
"""

from __future__ import annotations

import numpy as np

# Above this many distinct ages the O(K*U^2) search is replaced by sorted-position cuts,
# which are equal-frequency up to ties (negligible once ages are that finely resolved).
_MAX_DP_UNIQUE = 3000


def equal_frequency_groups(ages: np.ndarray | list[float], k: int) -> np.ndarray:
    """K-1 increasing boundary ages splitting the known ages into K near-equal groups.

    Raises ValueError when there are fewer than K distinct known ages.
    """
    if k < 1:
        raise ValueError(f"number of age groups must be >= 1, got {k}")
    a = np.asarray(ages, dtype=np.float64).ravel()
    a = np.sort(a[np.isfinite(a)])
    values, counts = np.unique(a, return_counts=True)
    if len(values) < k:
        raise ValueError(f"{len(values)} distinct known ages ({len(a)} images) cannot form {k} groups")
    if k == 1:
        return np.zeros(0, dtype=np.float64)
    if len(values) <= _MAX_DP_UNIQUE:
        ends = _dp_cuts(counts, k)
    else:
        ends = _position_cuts(counts, k)
    # ends[g] = index (into values) of the first distinct age of group g+1
    return np.array([(values[e - 1] + values[e]) / 2.0 for e in ends], dtype=np.float64)


def _dp_cuts(counts: np.ndarray, k: int) -> list[int]:
    """Split the run of distinct ages into k non-empty contiguous blocks minimising
    sum_g (size_g - N/k)^2; returns the k-1 block starts (indices into `counts`)."""
    u = len(counts)
    cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    target = cum[-1] / k
    inf = np.inf
    # cost[g][j]: best cost of g+1 blocks covering the first j distinct ages
    cost = np.full((k, u + 1), inf)
    back = np.zeros((k, u + 1), dtype=np.int64)
    cost[0, 1:] = (cum[1:] - target) ** 2
    for g in range(1, k):
        prev = cost[g - 1]
        for j in range(g + 1, u + 1):
            i = np.arange(g, j)  # last block is [i, j)
            c = prev[i] + (cum[j] - cum[i] - target) ** 2
            best = int(np.argmin(c))
            cost[g, j] = c[best]
            back[g, j] = i[best]
    ends, j = [], u
    for g in range(k - 1, 0, -1):
        j = int(back[g, j])
        ends.append(j)
    return ends[::-1]


def _position_cuts(counts: np.ndarray, k: int) -> list[int]:
    cum = np.cumsum(counts)
    n = cum[-1]
    ends: list[int] = []
    for g in range(1, k):
        e = int(np.searchsorted(cum, g * n / k)) + 1
        lo = (ends[-1] + 1) if ends else 1
        e = min(max(e, lo), len(counts) - (k - g))
        ends.append(e)
    return ends


def assign_groups(ages: np.ndarray | list[float], boundaries: np.ndarray | list[float]) -> np.ndarray:
    """Group index of each age (int64), -1 where the age is unknown (NaN)."""
    a = np.asarray(ages, dtype=np.float64).ravel()
    b = np.asarray(boundaries, dtype=np.float64).ravel()
    out = np.searchsorted(b, a, side="right").astype(np.int64)
    out[~np.isfinite(a)] = -1
    return out


def group_table(ages: np.ndarray | list[float], boundaries: np.ndarray | list[float]) -> list[dict]:
    """One row per group: index, age range [lo, hi) from the boundaries, observed min/max, count."""
    a = np.asarray(ages, dtype=np.float64).ravel()
    b = np.asarray(boundaries, dtype=np.float64).ravel()
    g = assign_groups(a, b)
    edges = np.concatenate([[-np.inf], b, [np.inf]])
    rows = []
    for i in range(len(b) + 1):
        sel = a[g == i]
        rows.append({"group": i, "from": float(edges[i]), "to": float(edges[i + 1]),
                     "min_age": float(sel.min()) if sel.size else float("nan"),
                     "max_age": float(sel.max()) if sel.size else float("nan"),
                     "count": int(sel.size)})
    return rows
