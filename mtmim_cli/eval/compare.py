"""Comparing models scored on the same probes: paired bootstrap intervals, the exact McNemar
test, and summaries over seeds.

Inputs are per-unit outcomes on a shared set of units: for identification, one hit (0/1)
per probe; for verification, one correctness (0/1) per pair. The figure compared is the mean
outcome (rank-1, accuracy), and the difference is model A minus model B.

Intervals are percentile bootstrap intervals (seeded). Two resampling units are offered:
- probes (or pairs): every unit independent, the plain paired bootstrap;
- clusters (`clusters=` one label per unit, e.g. the probe's identity): whole clusters are
  drawn with replacement (a cluster bootstrap). Probes of one person are not independent (a
  model that fails on one child's photos tends to fail on all of them), so for FG-NET the
  identity cluster bootstrap is the honest interval; it is wider than the per-probe one.
The result records which was used (`resampling`).

McNemar: the exact two-sided binomial test on the discordant units (A right and B wrong
versus A wrong and B right), p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2);
the same figure as scipy.stats.binomtest(min(b, c), b + c, 0.5).pvalue. It treats units as
independent, so with clustered probes it is optimistic; the cluster interval is not.

Several checkpoints of one setting (seeds) evaluated on the same probes summarise as mean
and sample standard deviation over seeds; two settings compare by a bootstrap that draws
units (or clusters) and, when `resample_seeds`, the seeds of each setting too, so the
interval holds seed-to-seed variation as well as probe sampling. Each side's seeds are drawn
independently, unless `paired_seeds`: then seed k of A and seed k of B belong together (two
modes scored in one run, which share its folds and seed; one model before and after a
change) and one draw of seed indices serves both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_LEVEL = 0.95
_CHUNK = 500  # bootstrap replicates drawn at a time (memory: chunk x clusters weights)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts: b = units only A gets
    right, c = units only B gets right. Computed in exact integer arithmetic."""
    if a_only < 0 or b_only < 0:
        raise ValueError("discordant counts must be >= 0")
    n = a_only + b_only
    k = min(a_only, b_only)
    if n == 0 or 2 * k == n:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int true division: exact quotient, then rounded


def _as_outcomes(x: np.ndarray | Sequence, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected outcomes per unit, shape (units,) or (seeds, units)")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: outcomes must be finite")
    return a


def _cluster_index(clusters: np.ndarray | Sequence | None, n: int) -> tuple[np.ndarray, int]:
    if clusters is None:
        return np.arange(n), n
    c = np.asarray(clusters)
    if c.shape != (n,):
        raise ValueError(f"clusters has shape {c.shape}, expected ({n},)")
    _, inv = np.unique(c, return_inverse=True)
    return inv, int(inv.max()) + 1


@dataclass
class Difference:
    """A minus B on the same units, with its bootstrap interval."""

    mean_a: float            # mean outcome of A (over seeds, when several)
    mean_b: float
    diff: float              # mean_a - mean_b
    low: float               # percentile bootstrap interval of diff
    high: float
    level: float
    units: int               # probes or pairs
    clusters: int            # resampling units (== units for the per-probe bootstrap)
    resampling: str          # "probes", "clusters", plus "+seeds" when seeds were drawn too
    resamples: int
    seed: int
    seeds_a: int = 1
    seeds_b: int = 1
    a_only: int | None = None  # discordant counts (one seed per side only)
    b_only: int | None = None
    p_mcnemar: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _replicate_means(sides: list[np.ndarray], inv: np.ndarray, k: int, resamples: int,
                     seed: int, draw_seeds: bool, paired: bool = False) -> np.ndarray:
    """Bootstrap replicates of each side's mean outcome, shape (sides, resamples). Every
    replicate draws k clusters with replacement (shared by all sides: the pairing) and, with
    `draw_seeds`, each side's seeds with replacement (one draw for every side if `paired`)."""
    size = np.bincount(inv, minlength=k).astype(np.float64)
    # Per-cluster sums per seed: a replicate's mean is (seed weights) @ sums @ (cluster
    # counts) / (seeds drawn * units drawn), so no replicate touches the units themselves.
    sums = [np.stack([np.bincount(inv, weights=row, minlength=k) for row in x]) for x in sides]
    rng = np.random.default_rng(seed)
    out = np.empty((len(sides), resamples))
    for start in range(0, resamples, _CHUNK):
        m = min(_CHUNK, resamples - start)
        w = rng.multinomial(k, np.full(k, 1.0 / k), size=m).astype(np.float64)
        units = w @ size
        shared = _seed_weights(rng, len(sides[0]), m, draw_seeds) if paired else None
        for j, (x, sx) in enumerate(zip(sides, sums, strict=True)):
            u = shared if shared is not None else _seed_weights(rng, len(x), m, draw_seeds)
            out[j, start:start + m] = np.sum(u * (w @ sx.T), axis=1) / units
    return out


def _seed_weights(rng: np.random.Generator, s: int, m: int, draw: bool) -> np.ndarray:
    """(m, s): each replicate's share of every seed: counts of s draws with replacement over
    s, or 1/s each when seeds are not drawn."""
    if not draw:
        return np.full((m, s), 1.0 / s)
    return rng.multinomial(s, np.full(s, 1.0 / s), size=m) / s


def seed_resampled_difference(reps_a: np.ndarray, reps_b: np.ndarray, *, paired: bool,
                              seed: int = 0) -> np.ndarray:
    """Replicates of (mean over A's seeds) - (mean over B's seeds) from per-seed bootstrap
    replicates (seeds, resamples) whose unit draws are shared (replicate r of every seed
    drew the same units, e.g. `cross_age.bootstrap_cross_age_auc`): replicate r also draws
    each side's seeds with replacement, one draw for both sides when `paired` (seed k of A
    belongs with seed k of B)."""
    A, B = np.atleast_2d(reps_a), np.atleast_2d(reps_b)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"{A.shape[1]} and {B.shape[1]} replicates: not the same draws")
    if paired and len(A) != len(B):
        raise ValueError(f"paired seeds: A has {len(A)} seeds, B has {len(B)}")
    rng = np.random.default_rng(seed)
    m = A.shape[1]
    ua = _seed_weights(rng, len(A), m, True)
    ub = ua if paired else _seed_weights(rng, len(B), m, True)
    return np.sum(ua * A.T, axis=1) - np.sum(ub * B.T, axis=1)


def _check(level: float, resamples: int) -> None:
    if not 0 < level < 1 or resamples < 1:
        raise ValueError("need 0 < level < 1 and resamples >= 1")


def bootstrap_difference(a: np.ndarray | Sequence, b: np.ndarray | Sequence, *,
                         clusters: np.ndarray | Sequence | None = None,
                         resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                         seed: int = 0, resample_seeds: bool = True, paired_seeds: bool = False,
                         unit_name: str = "probes", cluster_name: str = "clusters") -> Difference:
    """Difference of mean outcomes, A minus B, on shared units, with a paired percentile
    bootstrap interval. `a`, `b`: shape (units,) for one model each, or (seeds, units) for
    several checkpoints of a setting (then the figure is the mean over seeds, and with
    `resample_seeds` each replicate also draws seeds with replacement: each side's own, or
    with `paired_seeds` one draw of seed indices for both, row k of A going with row k of B).
    With one seed per side the exact McNemar p-value of binary outcomes is included."""
    A, B = _as_outcomes(a, "a"), _as_outcomes(b, "b")
    n = A.shape[1]
    if B.shape[1] != n:
        raise ValueError(f"a has {n} units, b has {B.shape[1]}: not the same probes")
    if paired_seeds and len(A) != len(B):
        raise ValueError(f"paired seeds: a has {len(A)} seeds, b has {len(B)}")
    _check(level, resamples)
    inv, k = _cluster_index(clusters, n)
    draw_seeds = resample_seeds and (len(A) > 1 or len(B) > 1)
    reps = _replicate_means([A, B], inv, k, resamples, seed, draw_seeds, paired_seeds)
    alpha = (1 - level) / 2
    low, high = np.quantile(reps[0] - reps[1], [alpha, 1 - alpha])
    ma, mb = float(A.mean()), float(B.mean())
    out = Difference(mean_a=ma, mean_b=mb, diff=ma - mb, low=float(low), high=float(high),
                     level=level, units=n, clusters=k,
                     resampling=_resampling(unit_name, cluster_name, clusters, draw_seeds,
                                            paired_seeds),
                     resamples=resamples, seed=seed, seeds_a=len(A), seeds_b=len(B))
    if len(A) == 1 and len(B) == 1 and _binary(A) and _binary(B):
        out.a_only = int(np.sum((A[0] == 1) & (B[0] == 0)))
        out.b_only = int(np.sum((A[0] == 0) & (B[0] == 1)))
        out.p_mcnemar = mcnemar_exact(out.a_only, out.b_only)
    return out


def bootstrap_mean(a: np.ndarray | Sequence, *, clusters: np.ndarray | Sequence | None = None,
                   resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                   seed: int = 0, resample_seeds: bool = True,
                   unit_name: str = "probes", cluster_name: str = "clusters") -> dict:
    """One model's (or setting's) mean outcome with its percentile bootstrap interval, the
    same resampling as `bootstrap_difference`: {'mean', 'low', 'high', 'units', 'clusters',
    'resampling', ...}."""
    A = _as_outcomes(a, "a")
    _check(level, resamples)
    inv, k = _cluster_index(clusters, A.shape[1])
    draw_seeds = resample_seeds and len(A) > 1
    reps = _replicate_means([A], inv, k, resamples, seed, draw_seeds)[0]
    alpha = (1 - level) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return {"mean": float(A.mean()), "low": float(low), "high": float(high), "level": level,
            "units": int(A.shape[1]), "clusters": k,
            "resampling": _resampling(unit_name, cluster_name, clusters, draw_seeds),
            "resamples": resamples, "seed": seed, "seeds": len(A)}


def _resampling(unit_name: str, cluster_name: str, clusters: object, draw_seeds: bool,
                paired: bool = False) -> str:
    seeds = ("+paired seeds" if paired else "+seeds") if draw_seeds else ""
    return (unit_name if clusters is None else cluster_name) + seeds


def _binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0) | (x == 1)))


def seed_summary(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; None for a single seed) of one setting's
    figure over its checkpoints."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("seed_summary needs one value per seed")
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "seeds": int(len(v)), "values": v.tolist()}


def split_group(label: str) -> tuple[str, str | None]:
    """'setting@seed' -> ('setting', 'seed'); a label without '@' is its own setting. A
    re-fit mode evaluate appends ('casia@s0/mtmim') stays with the setting: ('casia/mtmim',
    's0')."""
    head, slash, mode = label.partition("/")
    setting, sep, member = head.rpartition("@")
    if not (sep and setting and member):
        return label, None
    return setting + slash + mode, member


def group_labels(labels: Sequence[str]) -> dict[str, list[int]]:
    """Settings in first-seen order, each with the positions of its labels ('mtmim@s0',
    'mtmim@s1' -> {'mtmim': [0, 1]})."""
    groups: dict[str, list[int]] = {}
    for k, label in enumerate(labels):
        groups.setdefault(split_group(label)[0], []).append(k)
    return groups


def pairwise_differences(names: Sequence[str], outcomes: Sequence[np.ndarray], *,
                         clusters: np.ndarray | None = None,
                         resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                         seed: int = 0, unit_name: str = "probes",
                         cluster_name: str = "clusters") -> list[dict]:
    """Every pair (i < j) of named outcome arrays ((units,) or (seeds, units)): the
    difference names[i] - names[j] with its interval (and McNemar p for single models)."""
    rows = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            d = bootstrap_difference(outcomes[i], outcomes[j], clusters=clusters,
                                     resamples=resamples, level=level, seed=seed,
                                     unit_name=unit_name, cluster_name=cluster_name)
            rows.append({"a": names[i], "b": names[j], **d.to_dict()})
    return rows
