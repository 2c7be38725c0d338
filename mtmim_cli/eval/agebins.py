"""Results broken down by age: per probe age group and per age gap to the nearest same-identity
gallery image (identification), per pair age gap (verification), and a probe-age x
gallery-age map of success (which mates a probe would be found by).

Binning conventions: ages and gaps are in years and floored before binning (FG-NET ages are
whole years), so a bin written "6-10" holds [6, 11). Bins are given by their lower edges,
strictly increasing; the last bin is open ("31+"). Ages below the first edge or unknown (NaN)
fall in no bin and are counted in an "unknown" row, as are probes with no dated same-identity
gallery image for the gap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import metrics as M

FGNET_AGE_EDGES = (0, 6, 11, 16, 21, 31)   # 0-5, 6-10, 11-15, 16-20, 21-30, 31+
GAP_EDGES = (0, 6, 11, 21)                 # 0-5, 6-10, 11-20, 21+
MIN_PAIRS = 20                             # fewest pairs in a bin for a verification accuracy
UNKNOWN = "unknown"


def parse_edges(text: str, option: str = "--age-bins") -> tuple[int, ...]:
    """'0,6,11,16,21,31' -> lower edges (whole years, >= 0, strictly increasing)."""
    try:
        edges = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise MtmimError(f"{option} {text}: lower edges in whole years, e.g. 0,6,11,16,21,31") from None
    if not edges or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise MtmimError(f"{option} {text}: edges must be >= 0 and strictly increasing")
    return edges


def bin_labels(edges: Sequence[int]) -> list[str]:
    """Lower edges -> labels: (0, 6, 11) -> ['0-5', '6-10', '11+']."""
    out = [f"{a}-{b - 1}" if b - 1 > a else f"{a}" for a, b in zip(edges, edges[1:], strict=False)]
    return [*out, f"{edges[-1]}+"]


def assign_bins(values: np.ndarray | Sequence[float], edges: Sequence[int]) -> np.ndarray:
    """Bin index per value (floored to whole years), -1 when NaN or below the first edge."""
    v = np.asarray(values, dtype=np.float64)
    out = np.full(v.shape, -1, dtype=np.int64)
    ok = np.isfinite(v)
    fl = np.floor(v[ok])
    out[ok] = np.searchsorted(np.asarray(edges, np.float64), fl, side="right") - 1
    return out


def nearest_mate(probe: np.ndarray, gallery: np.ndarray, identity: np.ndarray,
                 age: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each probe record, the same-identity gallery record nearest in age (never the
    probe itself; ties: the lowest record index) and the absolute age gap to it. Records
    index `identity` and `age`. No dated mate (or an undated probe): index -1, gap NaN."""
    probe = np.asarray(probe, np.int64)
    gallery = np.asarray(gallery, np.int64)
    age = np.asarray(age, np.float64)
    identity = np.asarray(identity)
    dated = gallery[np.isfinite(age[gallery])]
    by_id: dict = {}
    for g in np.sort(dated):
        by_id.setdefault(identity[g].item(), []).append(g)
    mate = np.full(len(probe), -1, np.int64)
    gap = np.full(len(probe), np.nan)
    for k, p in enumerate(probe):
        if not np.isfinite(age[p]):
            continue
        cands = np.array([g for g in by_id.get(identity[p].item(), []) if g != p], np.int64)
        if len(cands) == 0:
            continue
        d = np.abs(age[cands] - age[p])
        j = int(np.argmin(d))  # cands are sorted: the first minimum is the lowest index
        mate[k], gap[k] = cands[j], d[j]
    return mate, gap


def rate_rows(outcome: np.ndarray, bins: np.ndarray, labels: Sequence[str],
              figure: str = "rank1") -> list[dict]:
    """One row per bin: units in it, successes and their rate (None for an empty bin);
    an 'unknown' row for units in no bin, only when there are any."""
    outcome = np.asarray(outcome, dtype=np.float64)
    rows = []
    for b, label in [*enumerate(labels), (-1, UNKNOWN)]:
        sel = bins == b
        n = int(sel.sum())
        if b == -1 and n == 0:
            continue
        rows.append({"bin": label, "n": n, "hits": int(outcome[sel].sum()),
                     figure: float(outcome[sel].mean()) if n else None})
    return rows


def probe_bins(probe: np.ndarray, gallery: np.ndarray, identity: np.ndarray, age: np.ndarray,
               age_edges: Sequence[int] = FGNET_AGE_EDGES,
               gap_edges: Sequence[int] = GAP_EDGES) -> dict:
    """Per probe: age bin, nearest same-identity gallery image and gap, gap bin. These depend
    on the protocol's images only, so every model evaluated on them shares them."""
    mate, gap = nearest_mate(probe, gallery, identity, age)
    return {"age_edges": list(age_edges), "gap_edges": list(gap_edges),
            "age_bin": assign_bins(np.asarray(age, np.float64)[probe], age_edges),
            "gap_bin": assign_bins(gap, gap_edges), "mate": mate, "gap": gap}


def identification_breakdown(hit: np.ndarray, bins: Mapping) -> dict:
    """Rank-1 and probes per probe age group and per age gap (see `probe_bins`)."""
    hit = np.asarray(hit, bool)
    if hit.shape != bins["age_bin"].shape:
        raise ValueError(f"{len(hit)} outcomes for {len(bins['age_bin'])} probes")
    return {"age_edges": list(bins["age_edges"]), "gap_edges": list(bins["gap_edges"]),
            "by_probe_age": rate_rows(hit, bins["age_bin"], bin_labels(bins["age_edges"])),
            "by_gap": rate_rows(hit, bins["gap_bin"], bin_labels(bins["gap_edges"]))}


def bin_differences(names: Sequence[str], outcomes: Sequence[np.ndarray], bins: np.ndarray,
                    labels: Sequence[str], *, clusters: np.ndarray | None = None,
                    resamples: int = 10_000, seed: int = 0, min_units: int = 2,
                    cluster_name: str = "clusters") -> list[dict]:
    """Per bin and per pair of models (i < j): the difference in rate with its paired
    interval (compare.bootstrap_difference, clusters resampled within the bin when given).
    A bin with fewer than `min_units` units says so instead of a figure."""
    from mtmim_cli.eval.compare import bootstrap_difference

    rows = []
    for b, label in enumerate(labels):
        sel = bins == b
        n = int(sel.sum())
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                row: dict = {"bin": label, "a": names[i], "b": names[j], "n": n}
                if n < min_units:
                    row["note"] = f"{n} probe{'s' if n != 1 else ''}: too few for an interval"
                else:
                    d = bootstrap_difference(
                        np.asarray(outcomes[i])[..., sel], np.asarray(outcomes[j])[..., sel],
                        clusters=None if clusters is None else np.asarray(clusters)[sel],
                        resamples=resamples, seed=seed, cluster_name=cluster_name)
                    row.update(d.to_dict())
                rows.append(row)
    return rows


# ---------------------------------------------------------------- probe age x gallery age
def mate_success(feats: np.ndarray, identity: np.ndarray, probe: np.ndarray,
                 gallery: np.ndarray, *, block: int = 256) -> dict:
    """For every probe and every same-identity gallery image (a mate; never the probe
    itself): whether that mate scores at least as high as the probe's best other-identity
    gallery image, i.e. whether the probe would be found at rank 1 were this mate the only
    photo of the person in the gallery. `feats` rows are L2-normalised features of records;
    `probe`, `gallery` index them. Returns flat arrays probe, mate (record indices), score,
    success."""
    feats = np.asarray(feats, np.float32)
    identity = np.asarray(identity)
    probe = np.asarray(probe, np.int64)
    gallery = np.asarray(gallery, np.int64)
    g = feats[gallery]
    gid = identity[gallery]
    out_p, out_m, out_s, out_ok = [], [], [], []
    for q0 in range(0, len(probe), block):
        q = probe[q0:q0 + block]
        s = feats[q] @ g.T
        same = identity[q][:, None] == gid[None, :]
        self_ = q[:, None] == gallery[None, :]
        imp = np.where(same | self_, -np.inf, s).max(axis=1)
        r, c = np.nonzero(same & ~self_)
        out_p.append(q[r])
        out_m.append(gallery[c])
        out_s.append(s[r, c])
        out_ok.append(s[r, c] >= imp[r])
    return {"probe": _cat(out_p, np.int64), "mate": _cat(out_m, np.int64),
            "score": _cat(out_s, np.float32), "success": _cat(out_ok, bool)}


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def age_map(probe_age: np.ndarray, mate_age: np.ndarray, success: np.ndarray,
            edges: Sequence[int] = FGNET_AGE_EDGES) -> dict:
    """Success rate per (probe age group, gallery age group) cell, with counts; NaN for an
    empty cell. Pairs with an age outside the bins are left out."""
    pa, ma = assign_bins(probe_age, edges), assign_bins(mate_age, edges)
    ok = (pa >= 0) & (ma >= 0)
    k = len(edges)
    n = np.zeros((k, k), np.int64)
    hits = np.zeros((k, k), np.int64)
    np.add.at(n, (pa[ok], ma[ok]), 1)
    np.add.at(hits, (pa[ok], ma[ok]), np.asarray(success, bool)[ok].astype(np.int64))
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n > 0, hits / np.maximum(n, 1), np.nan)
    return {"edges": list(edges), "labels": bin_labels(edges), "n": n.tolist(),
            "success": hits.tolist(), "rate": [[None if math.isnan(v) else float(v) for v in row]
                                              for row in rate]}


# ---------------------------------------------------------------- verification
def pair_correctness(scores: np.ndarray, same: np.ndarray, folds: int | np.ndarray,
                     thresholds: Sequence[float]) -> np.ndarray:
    """Per pair: whether the K-fold rule (each fold at its own threshold, as
    metrics.tenfold_verification chose them) classifies it right."""
    scores = np.asarray(scores, np.float64)
    same = np.asarray(same, bool)
    labels = (M.fold_labels(len(scores), int(folds)) if isinstance(folds, (int, np.integer))
              else np.asarray(folds))
    fold_ids = np.unique(labels)
    if len(fold_ids) != len(thresholds):
        raise ValueError(f"{len(thresholds)} thresholds for {len(fold_ids)} folds")
    thr = np.asarray(thresholds, np.float64)[np.searchsorted(fold_ids, labels)]
    return (scores >= thr) == same


def verification_breakdown(scores: np.ndarray, same: np.ndarray, correct: np.ndarray,
                           gap: np.ndarray, *, edges: Sequence[int] = GAP_EDGES,
                           far: float = 1e-3, min_pairs: int = MIN_PAIRS) -> list[dict]:
    """Per pair age gap bin: pairs (genuine, impostor), accuracy of the protocol's K-fold
    rule on them, and TAR at `far` within the bin (threshold set on the bin's own impostor
    pairs). A bin with fewer than `min_pairs` pairs gets no accuracy, one with fewer than
    `metrics.min_impostors(far)` impostors or no genuine pair no TAR; `note` says which and why."""
    scores = np.asarray(scores, np.float64)
    same = np.asarray(same, bool)
    correct = np.asarray(correct, bool)
    bins = assign_bins(gap, edges)
    need_imp = M.min_impostors(far)
    rows = []
    for b, label in [*enumerate(bin_labels(edges)), (-1, UNKNOWN)]:
        sel = bins == b
        n = int(sel.sum())
        if b == -1 and n == 0:
            continue
        gen, imp = int((sel & same).sum()), int((sel & ~same).sum())
        row: dict = {"bin": label, "n": n, "genuine": gen, "impostor": imp,
                     "accuracy": None, "tar_at_far": None, "far": far}
        notes = []
        if n >= min_pairs:
            row["accuracy"] = float(correct[sel].mean())
        else:
            notes.append(f"{n} pairs < {min_pairs}: no accuracy")
        if gen == 0:
            notes.append("no genuine pairs: no TAR")
        elif imp < need_imp:
            notes.append(f"{imp} impostors < {need_imp} needed for FAR {far:g}: no TAR")
        else:
            row["tar_at_far"] = M.tar_at_far(scores[sel], same[sel], far)
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)
    return rows
