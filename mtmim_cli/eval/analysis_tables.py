"""Markdown for `eval.analysis`: the age-leakage columns of the main table, paired
comparisons, settings over seeds, the breakdowns by age and age gap and their per-bin
differences. Figures in percent (differences in percentage points) unless named otherwise."""

from __future__ import annotations

import math

FIGURE_NAMES = {"rank1": "rank-1", "accuracy": "accuracy"}


def _pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def _pp(v: float) -> str:
    return f"{100 * v:+.2f}"


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *["| " + " | ".join(r) + " |" for r in rows]]


# ---------------------------------------------------------------- main table columns
LEAKAGE_HEADERS = ["Age group acc. (chance)", "Age R² (chance 0)", "InfoNCE I(x_id;x_age)"]


def leakage_cells(metrics: dict) -> list[str] | None:
    """The age-leakage cells of one model's row; None when it has no age probe."""
    leak = metrics.get("age_leakage")
    if not leak:
        return None
    mi = f"{leak['infonce_lower']:.3f}" if "infonce_lower" in leak else "–"
    return [f"{_pct(leak['age_group_accuracy'], 1)} ({_pct(leak['age_group_chance'], 1)})",
            f"{leak['age_r2']:.3f}", mi]


def leakage_note(rows: list[dict]) -> list[str]:
    leak = next((r["metrics"]["age_leakage"] for r in rows if r["metrics"].get("age_leakage")), None)
    if leak is None:
        return []
    text = (f"Age leakage: linear probes of age from the identity features of the protocol's "
            f"{leak['images']} dated images ({leak['identities']} identities), "
            f"{leak['folds']}-fold cross-validated with folds split by identity: "
            f"{leak['probe']}. Age group accuracy over the groups "
            f"{', '.join(leak['age_groups'])}, chance = the majority group of each training fold; "
            f"R² of {leak['age_target']}, chance 0. Lower is less age in the identity features.")
    sources = sorted({r["metrics"]["age_leakage"]["features"] for r in rows
                      if r["metrics"].get("age_leakage")})
    text += " Features probed: " + "; ".join(sources) + "."
    if any("infonce_lower" in (r["metrics"].get("age_leakage") or {}) for r in rows):
        text += (" InfoNCE: a lower bound on I(x_id; x_age) in nats for factorized models "
                 "(fresh estimator, cross-fitted halves; capped at log(images/2)); "
                 "– for models without a factorization unit.")
    elif any((r["metrics"].get("age_leakage") or {}).get("infonce_skipped") for r in rows):
        text += (" InfoNCE I(x_id; x_age) of the factorized models: not estimated (it trains "
                 "a critic, about a minute per model on two cores); --mi-steps 2000 adds it.")
    return ["", text]


# ---------------------------------------------------------------- comparisons
def comparison_section(c: dict) -> list[str]:
    fig = FIGURE_NAMES.get(c["figure"], c["figure"])
    how = (f"{c['clusters']} identities resampled (a person's probes move together)"
           if c.get("clusters") else f"{c['units']} {c['resampling']} resampled")
    lines = [f"### Paired comparisons ({fig}, A − B in points)", "",
             f"Intervals: {int(100 * c['level'])}% percentile bootstrap, {c['resamples']} "
             f"resamples, {how}, seed {c['seed']}; all models on the same {c['units']} units. "
             "McNemar: exact two-sided binomial test on the units only one model gets right "
             "(it treats units as independent). With few such units the bootstrap interval is "
             "too narrow (it cannot draw outcomes it never saw); read the exact p there."]
    if c.get("grouped_by_setting"):
        lines[-1] += (" Labels SETTING@SEED are grouped: a setting's figure is the mean over "
                      "its checkpoints, and the bootstrap also draws seeds.")
    if c.get("pairs"):
        rows = [[r["a"], r["b"], _pct(r["mean_a"]), _pct(r["mean_b"]), _pp(r["diff"]),
                 f"[{_pp(r['low'])}, {_pp(r['high'])}]",
                 "–" if r["a_only"] is None else f"{r['a_only']} / {r['b_only']}",
                 _p(r["p_mcnemar"])] for r in c["pairs"]]
        lines += ["", *_table(["A", "B", f"A {fig}", f"B {fig}", "A − B", "95% interval",
                               "only A / only B right", "McNemar p"], rows)]
    for key, pairs in (c.get("other_figures") or {}).items():
        rows = [[r["a"], r["b"], _pct(r["mean_a"]), _pct(r["mean_b"]), _pp(r["diff"]),
                 f"[{_pp(r['low'])}, {_pp(r['high'])}]"] for r in pairs]
        lines += ["", f"{key} (mean average precision over the queries with a match):", "",
                  *_table(["A", "B", "A", "B", "A − B", "95% interval"], rows)]
    if c.get("settings"):
        rows = [[s["setting"], ", ".join(s["members"]), _pct(s["mean"]),
                 "–" if s["sd"] is None else _pct(s["sd"])] for s in c["settings"]]
        lines += ["", f"Settings over seeds ({fig}, %):", "",
                  *_table(["Setting", "Checkpoints", "Mean", "SD"], rows)]
    return lines


def _bin_diff_tables(c: dict) -> list[str]:
    out = []
    titles = {"by_probe_age": "probe age", "by_gap": "age gap"}
    for key, rows in (c.get("bin_differences") or {}).items():
        body, same = [], 0
        for r in rows:
            if r["n"] == 0:
                continue  # the breakdown tables show the empty bins
            if r.get("a_only") == 0 and r.get("b_only") == 0:
                same += 1  # identical outcomes on every probe of the bin: nothing to show
                continue
            if "diff" in r:
                body.append([r["bin"], r["a"], r["b"], str(r["n"]), _pp(r["diff"]),
                             f"[{_pp(r['low'])}, {_pp(r['high'])}]", _p(r.get("p_mcnemar"))])
            else:
                body.append([r["bin"], r["a"], r["b"], str(r["n"]), "–", r.get("note", ""), "–"])
        out += ["", f"Per-bin differences by {titles.get(key, key)} (A − B, points):", ""]
        if body:
            out += _table(["Bin", "A", "B", "Probes", "A − B", "95% interval", "McNemar p"], body)
        if same:
            out += ["", f"{'All' if not body else 'The other'} {same} bin-and-pair cells: both "
                        "models right or wrong on every probe of the bin (difference 0)."]
    return out


# ---------------------------------------------------------------- breakdowns
def _cell(row: dict) -> str:
    v = row.get("rank1")
    if v is None:
        return "–"
    if "low" in row:
        return f"{_pct(v, 1)} ({_pct(row['low'], 1)}–{_pct(row['high'], 1)})"
    return _pct(v, 1)


def breakdown_section(results: list[dict]) -> list[str]:
    have = [r for r in results if r["metrics"].get("by_age")]
    if not have:
        return []
    first = have[0]["metrics"]["by_age"]
    lines = []
    titles = {"by_probe_age": "Rank-1 by probe age (years)",
              "by_gap": "Rank-1 by age gap to the nearest same-identity gallery photo (years)"}
    for key, title in titles.items():
        head = ["Bin", "Probes", *[r["model"] for r in have]]
        body = []
        for k, row in enumerate(first[key]):
            body.append([row["bin"], str(row["n"]),
                         *[_cell(r["metrics"]["by_age"][key][k]) for r in have]])
        lines += ["", f"### {title}", "", *_table(head, body)]
    resampling = next((row.get("resampling") for row in first["by_gap"] if "resampling" in row),
                      None)
    lines += ["", "Cells: rank-1 % (95% bootstrap interval" +
              (f", {resampling} resampled" if resampling else "") + "); – for an empty bin. "
              "'unknown': no age, or no dated same-identity photo in the gallery."]
    return lines


def age_map_section(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        amap = r["metrics"].get("age_map")
        if not amap:
            continue
        head = ["Probe age \\ gallery age", *amap["labels"]]
        body = [[lab, *[("–" if v is None else f"{_pct(v, 0)} ({n})")
                        for v, n in zip(rate_row, n_row, strict=True)]]
                for lab, rate_row, n_row in zip(amap["labels"], amap["rate"], amap["n"], strict=True)]
        lines += ["", f"### {r['model']}: probe age x gallery age", "",
                  "Share of probe-mate pairs where the mate outscores every other-identity "
                  "gallery photo (the probe would be found at rank 1 were that mate its "
                  "person's only photo); % (pairs).", "", *_table(head, body)]
    return lines


def pair_gap_section(results: list[dict]) -> list[str]:
    have = [r for r in results if r["metrics"].get("by_pair_gap")]
    if not have:
        return []
    first = have[0]["metrics"]["by_pair_gap"]["rows"]
    far = first[0]["far"] if first else 1e-3
    head = ["Pair age gap", "Pairs (genuine/impostor)",
            *[f"{r['model']} acc." for r in have], *[f"{r['model']} TAR@FAR={far:g}" for r in have]]
    body, notes = [], []
    for k, row in enumerate(first):
        cells = [row["bin"], f"{row['n']} ({row['genuine']}/{row['impostor']})"]
        cells += [_pct(r["metrics"]["by_pair_gap"]["rows"][k]["accuracy"]) for r in have]
        cells += [_pct(r["metrics"]["by_pair_gap"]["rows"][k]["tar_at_far"]) for r in have]
        body.append(cells)
        if row.get("note"):
            notes.append(f"{row['bin']}: {row['note']}")
    lines = ["", "### Verification by pair age gap (years)", "", *_table(head, body), "",
             "Accuracy: the K-fold thresholds of the whole protocol applied to the bin's pairs. "
             "TAR: at the threshold where the bin's own impostor pairs reach the FAR."]
    if notes:
        lines += ["", "Not enough pairs: " + "; ".join(notes) + "."]
    return lines


def analysis_markdown(payload: dict) -> str:
    """Everything `eval.analysis` added to a results payload, as Markdown ('' if nothing)."""
    results = payload.get("results", [])
    lines = leakage_note(results)
    c = payload.get("comparisons")
    if c:
        lines += ["", *comparison_section(c)]
    lines += breakdown_section(results)
    if c:
        lines += _bin_diff_tables(c)
    lines += age_map_section(results)
    lines += pair_gap_section(results)
    return "\n".join(lines).strip("\n") + "\n" if lines else ""
