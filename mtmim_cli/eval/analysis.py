"""What `evaluate` derives from per-unit outcomes beyond the headline figure.

Per model: the figure broken down by probe age group and by age gap to the nearest
same-identity gallery photo (identification; each cell with a bootstrap interval), by pair
age gap (verification), the probe-age x gallery-age success map, and the age leakage of its
identity features (`eval.leakage`).

Across the models of one run (all scored on the same units): every pair's difference in the
figure with its paired bootstrap interval and exact McNemar p (`eval.compare`), and the same
per age bin. Labels 'SETTING@SEED' group checkpoints of one setting: then each setting's
figure is summarised as mean and sd over its seeds, and settings (not single checkpoints)
are compared, with seeds drawn in the bootstrap too.

Resampling: identification resamples identities (a cluster bootstrap: a person's probes are
not independent) unless `resample='probe'`; verification resamples pairs, or whole folds
with `resample='fold'`.

Everything takes a `Scored` per model (`eval.runners`) and the cache, and returns plain
dicts for results.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mtmim_cli.eval import agebins as AB
from mtmim_cli.eval import compare as C

RESAMPLE_UNITS = ("identity", "probe", "fold")


@dataclass(frozen=True)
class AnalysisOptions:
    age_edges: tuple[int, ...] = AB.FGNET_AGE_EDGES
    gap_edges: tuple[int, ...] = AB.GAP_EDGES
    resample: str = "identity"
    resamples: int = C.DEFAULT_RESAMPLES
    seed: int = 0
    age_probe: bool = True
    mi_steps: int = 0
    far: float = 1e-3


def figure_of(scored) -> tuple[str, np.ndarray] | None:
    """(figure name, per-unit outcome) compared across models."""
    o = scored.outcomes
    if "hit" in o:
        return "rank1", np.asarray(o["hit"], np.float64)
    if "correct" in o:
        return "accuracy", np.asarray(o["correct"], np.float64)
    return None


def _ages(cache) -> np.ndarray | None:
    if cache is None:
        return None
    age = np.asarray(cache.age, np.float64)
    return age if np.isfinite(age).any() else None


def _clusters(scored, cache, opts: AnalysisOptions) -> tuple[np.ndarray | None, str]:
    """Cluster per unit for the bootstrap: a probe's identity (identification, unless
    `resample='probe'`), a pair's fold (verification with `resample='fold'`)."""
    if scored.context.get("kind") == "verification" and opts.resample == "fold":
        return np.asarray(scored.context["fold"]), "folds"
    if scored.context.get("kind") != "identification" or opts.resample == "probe":
        return None, "probes"
    return np.asarray(cache.identity)[scored.context["probe"]], "identities"


def shared_bins(scored, cache, opts: AnalysisOptions) -> dict | None:
    """Age and gap bins of the units (the same for every model)."""
    age = _ages(cache)
    if age is None or scored.context.get("kind") != "identification":
        return None
    ctx = scored.context
    return AB.probe_bins(ctx["probe"], ctx["gallery"], cache.identity, age, opts.age_edges,
                         opts.gap_edges)


# ---------------------------------------------------------------- per model
def model_analysis(scored, cache, opts: AnalysisOptions, bins: dict | None) -> dict:
    """The per-model sections for its metrics: 'by_age', 'age_map', 'by_pair_gap',
    'age_leakage' (each only when the protocol's images carry ages)."""
    out: dict = {}
    age = _ages(cache)
    if bins is not None:
        out["by_age"] = _breakdown_with_intervals(scored, cache, bins, opts)
        if scored.mates is not None:
            mt = scored.mates
            out["age_map"] = AB.age_map(age[mt["probe"]], age[mt["mate"]], mt["success"],
                                        opts.age_edges)
    if (age is not None and scored.context.get("kind") == "verification"
            and scored.context.get("on_cache")):
        ctx = scored.context
        gap = np.abs(age[ctx["i"]] - age[ctx["j"]])
        if np.isfinite(gap).any():
            out["by_pair_gap"] = {"gap_edges": list(opts.gap_edges), "rows":
                                  AB.verification_breakdown(scored.outcomes["score"], ctx["same"],
                                                            scored.outcomes["correct"], gap,
                                                            edges=opts.gap_edges, far=opts.far)}
    leak = leakage(scored, cache, opts)
    if leak:
        out["age_leakage"] = leak
    return out


def _breakdown_with_intervals(scored, cache, bins: dict, opts: AnalysisOptions) -> dict:
    hit = np.asarray(scored.outcomes["hit"], bool)
    out = AB.identification_breakdown(hit, bins)
    clusters, name = _clusters(scored, cache, opts)
    for key, b in (("by_probe_age", bins["age_bin"]), ("by_gap", bins["gap_bin"])):
        for k, row in enumerate(out[key]):  # rows in bin order, 'unknown' (bin -1) last
            sel = b == (-1 if row["bin"] == AB.UNKNOWN else k)
            if row["n"] >= 2:
                ci = C.bootstrap_mean(hit[sel], clusters=None if clusters is None else clusters[sel],
                                      resamples=opts.resamples, seed=opts.seed, cluster_name=name)
                row.update(low=ci["low"], high=ci["high"], resampling=ci["resampling"])
    return out


def leakage(scored, cache, opts: AnalysisOptions) -> dict:
    """Age probe of the identity features of the protocol's dated images; InfoNCE between
    x_id and x_age for a factorized model. Empty when there is nothing to measure."""
    from mtmim_cli.eval.leakage import age_probe, factor_mi

    age = _ages(cache)
    if not opts.age_probe or scored.rows is None or scored.features is None or age is None:
        return {}
    rows = np.asarray(scored.rows)
    a, ident = age[rows], np.asarray(cache.identity)[rows]
    known = np.isfinite(a)
    if len(np.unique(ident[known])) < 2:
        return {}
    out = {"features": scored.feature_source,
           **age_probe(scored.features, a, ident, edges=opts.age_edges)}
    if scored.factors is not None and opts.mi_steps > 0 and len(rows) >= 8:
        out.update(factor_mi(*scored.factors, steps=opts.mi_steps, seed=opts.seed))
    elif scored.factors is not None:
        # Training a critic costs more than the rest of evaluate (a minute per model on two
        # cores): opt-in, and the table says how to get it.
        out["infonce_skipped"] = True
    return out


# ---------------------------------------------------------------- across models
def _settings(labels: Sequence[str]) -> tuple[list[str], list[list[int]], bool]:
    groups = C.group_labels(labels)
    grouped = any(len(v) > 1 for v in groups.values())
    if not grouped:
        return list(labels), [[k] for k in range(len(labels))], False
    return list(groups), list(groups.values()), True


def cross_model_analysis(labels: Sequence[str], scored: Sequence, cache, opts: AnalysisOptions,
                         bins: dict | None) -> dict:
    """'comparisons' (pairwise differences), 'settings' (mean and sd over seeds, when labels
    group), 'bin_differences' (per age bin). Empty for a single model."""
    figs = [figure_of(s) for s in scored]
    if any(f is None for f in figs) or len(scored) < 2:
        return {}
    name = figs[0][0]
    names, members, grouped = _settings(labels)
    if len(names) < 2 and not grouped:
        return {}
    arrays = [np.stack([figs[k][1] for k in idx]) for idx in members]
    clusters, cname = _clusters(scored[0], cache, opts)
    unit = "probes" if name == "rank1" else "pairs"
    out: dict = {"figure": name, "level": C.DEFAULT_LEVEL, "resamples": opts.resamples,
                 "seed": opts.seed, "resampling": cname if clusters is not None else unit,
                 "clusters": int(len(np.unique(clusters))) if clusters is not None else None,
                 "units": int(arrays[0].shape[1]), "grouped_by_setting": grouped}
    if len(names) >= 2:
        out["pairs"] = C.pairwise_differences(names, arrays, clusters=clusters,
                                              resamples=opts.resamples, seed=opts.seed,
                                              unit_name=unit, cluster_name=cname)
    extra = _float_figures(scored, names, members, opts)
    if extra:
        out["other_figures"] = extra
    if grouped:
        out["settings"] = [{"setting": n, "members": [labels[k] for k in idx],
                            **C.seed_summary([headline(scored[k].metrics, name) for k in idx])}
                           for n, idx in zip(names, members, strict=True)]
    if bins is not None and len(names) >= 2:
        out["bin_differences"] = {
            key: AB.bin_differences(names, arrays, bins[b], AB.bin_labels(bins[e]),
                                    clusters=clusters, resamples=opts.resamples, seed=opts.seed,
                                    cluster_name=cname)
            for key, b, e in (("by_probe_age", "age_bin", "age_edges"),
                              ("by_gap", "gap_bin", "gap_edges"))}
    return out


def headline(metrics: dict, figure: str) -> float:
    """The table's figure of one model: rank-1 (FG-NET: over all photos) or accuracy."""
    return float(metrics[figure])


def _float_figures(scored: Sequence, names: list[str], members: list[list[int]],
                   opts: AnalysisOptions) -> dict:
    """Paired differences of the other per-unit float figures models share (CACD's average
    precision per database), over the units where every model has one."""
    keys = [k for k in scored[0].outcomes if k.startswith("ap ")]
    out = {}
    for key in keys:
        vals = [np.asarray(s.outcomes[key], np.float64) for s in scored]
        ok = np.logical_and.reduce([np.isfinite(v) for v in vals])
        if ok.sum() < 2:
            continue
        arrays = [np.stack([vals[k][ok] for k in idx]) for idx in members]
        out[key] = C.pairwise_differences(names, arrays, resamples=opts.resamples,
                                          seed=opts.seed, unit_name="queries")
    return out
