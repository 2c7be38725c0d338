"""Result tables: Markdown per protocol (our models beside the paper's reported numbers),
results.json with every figure (and the manifest of its siblings: `output_set`), and
<stem>.cmc.csv / <stem>.roc.csv for `mtmim report` to plot.

cmc.csv columns: protocol, model, rank, rate (identification rate at that rank).
roc.csv columns: protocol, model, far, tar.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.eval.output_set import write_output_set

# The paper's numbers (Hou et al., ICCV 2021, as restated in ../shared/docs/mtmim-method.md),
# in percent. Keyed by protocol, then row label, then metric column.
REPORTED: dict[str, list[tuple[str, dict[str, float]]]] = {
    # FG-NET: over all 1002 photos, as our FG-NET rank-1 is.
    "fgnet-loo": [("Baseline", {"rank1": 93.20}), ("+Age", {"rank1": 93.40}),
                  ("MT-MIM", {"rank1": 94.21}), ("DAL", {"rank1": 94.50}),
                  ("AIM", {"rank1": 93.20}), ("LF-CNN", {"rank1": 88.10}),
                  ("HFA", {"rank1": 69.00})],
    "morph-s1": [("DAL", {"rank1": 98.93}), ("AIM", {"rank1": 99.13}),
                 ("OE-CNN", {"rank1": 98.55})],
    "morph-s2": [("Baseline", {"rank1": 99.00}), ("+Age", {"rank1": 99.10}),
                 ("MT-MIM", {"rank1": 99.43}), ("DAL", {"rank1": 98.97}),
                 ("AIM", {"rank1": 98.81}), ("OE-CNN", {"rank1": 98.67})],
    "cacd-map": [("Baseline", {"2004-2006": 91.81, "2007-2009": 93.27, "2010-2012": 95.35}),
                 ("+Age", {"2004-2006": 91.87, "2007-2009": 93.15, "2010-2012": 95.44}),
                 ("MT-MIM", {"2004-2006": 92.63, "2007-2009": 93.95, "2010-2012": 96.09})],
    "agedb30": [("Baseline", {"accuracy": 95.11}), ("+Age", {"accuracy": 95.40}),
                ("MT-MIM", {"accuracy": 96.10})],
    "lfw": [("MT-MIM", {"accuracy": 99.25})],
    # Not in Hou et al.: CACD-VS accuracies as the DAL paper (Wang et al., CVPR 2019)
    # tabulates them, each on all 10 folds.
    "cacd-vs": [("LF-CNN", {"accuracy": 98.5}), ("OE-CNN", {"accuracy": 99.2}),
                ("DAL", {"accuracy": 99.4}), ("Human, voting", {"accuracy": 94.2})],
}
REPORTED_SOURCE = {
    "cacd-vs": "the published CACD-VS accuracies (all 10 folds) as the DAL paper (Wang et "
               "al., CVPR 2019) tabulates them",
}

TITLES = {
    "fgnet-loo": "FG-NET leave-one-out (rank-1 identification, %)",
    "morph-s1": "MORPH Album 2, Setting-1 (rank-1, %)",
    "morph-s2": "MORPH Album 2, Setting-2 (rank-1, %)",
    "cacd-map": "CACD retrieval (mean average precision per database, %)",
    "cacd-vs": "CACD-VS (verification, threshold from the other folds)",
    "agedb30": "AgeDB-30 (10-fold verification)",
    "lfw": "LFW (10-fold verification)",
    "calfw": "CALFW (10-fold verification)",
    "pairs": "Pair list (10-fold verification)",
}

# (json key, column header, scale to percent?)
COLUMNS: dict[str, list[tuple[str, str, bool]]] = {
    "identification": [("rank1", "Rank-1", True), ("queries", "Queries", False)],
    # FG-NET's figure (ours and the paper's) is over all photos: a photo without a detected
    # face cannot be ranked and counts as a failure (runners.with_all_images).
    "fgnet": [("rank1", "Rank-1 (all photos)", True), ("queries", "Queries", False),
              ("images_without_face", "No face (failures)", False)],
    "cacd-map": [("2004-2006", "2004-2006", True), ("2007-2009", "2007-2009", True),
                 ("2010-2012", "2010-2012", True), ("queries", "Queries", False)],
    "verification": [("accuracy", "Accuracy", True), ("std", "± std", True),
                     ("tar_at_far", "TAR@FAR=1e-3", True), ("auc", "ROC AUC", True),
                     ("pairs", "Pairs", False)],
    # CACD-VS: how many folds, the TARs its impostor count can resolve, the pairs left out
    "cacd-vs": [("accuracy", "Accuracy", True), ("std", "± std", True),
                ("folds_used", "Folds", False), ("tar@0.01", "TAR@FAR=1e-2", True),
                ("tar@0.001", "TAR@FAR=1e-3", True), ("auc", "ROC AUC", True),
                ("pairs", "Pairs", False), ("pairs_dropped", "Left out (no face)", False)],
}


def column_kind(protocol: str) -> str:
    if protocol == "fgnet-loo":
        return "fgnet"
    if protocol in ("morph-s1", "morph-s2"):
        return "identification"
    if protocol in ("cacd-map", "cacd-vs"):
        return protocol
    return "verification"


def flat_metrics(protocol: str, metrics: dict) -> dict[str, float | str]:
    """The table's figures for one model (CACD's nested per-database MAP flattened; a
    TAR@FAR the pairs cannot resolve replaced by the note saying so)."""
    if protocol == "cacd-map":
        out = {k: metrics[k]["map"] for k in ("2004-2006", "2007-2009", "2010-2012")}
        out["queries"] = metrics["queries"]
        return out
    out = dict(metrics)
    for e in metrics.get("tar_at_fars", []):
        out[f"tar@{e['far']:g}"] = e["tar_at_far"] if e["tar_at_far"] is not None else e["tar_at_far_note"]
    if protocol == "cacd-vs":
        out.setdefault("pairs_dropped", 0)
    if metrics.get("tar_at_far") is None and metrics.get("tar_at_far_note"):
        out["tar_at_far"] = metrics["tar_at_far_note"]
    return out


def _fmt(value: object, percent: bool) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{100 * value:.2f}" if percent else f"{value:.4g}"
    return str(value)


def markdown_table(protocol: str, rows: list[dict], variant: str = "",
                   benchmark: dict | None = None) -> str:
    """One protocol's table: our models (rows: {'model', 'metrics'[, 'test_faces']}), with
    the age-leakage columns when any model has them, then the paper's reported rows: in the
    same table only when `benchmark` ({'comparable', 'reason'}, from `eval.benchmarks`) says
    this run is the benchmark, else in their own table under "Not comparable: <reason>". The
    title says whose faces were tested."""
    from mtmim_cli.eval.analysis_tables import LEAKAGE_HEADERS, leakage_cells
    from mtmim_cli.eval.heldout import model_notes, section_words

    cols = COLUMNS[column_kind(protocol)]
    leak = [leakage_cells(row["metrics"]) for row in rows]
    extra = LEAKAGE_HEADERS if any(leak) else []
    head = ["Model", *[c[1] for c in cols], *extra]
    faces = {r["model"]: r["test_faces"] for r in rows if r.get("test_faces")}
    title = TITLES.get(protocol, protocol) + (f", {section_words(faces)}" if faces else "")
    lines = [f"### {title}", ""]
    if variant:
        lines += [f"Variant: {variant}", ""]
    notes = model_notes(faces) + stale_notes(rows)
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, lk in zip(rows, leak, strict=True):
        m = flat_metrics(protocol, row["metrics"])
        cells = [_fmt(m.get(k), p) for k, _, p in cols]
        if extra:
            cells += lk or ["–"] * len(extra)
        lines.append("| " + " | ".join([row["model"], *cells]) + " |")
    whose = "reported" if protocol in REPORTED_SOURCE else "reported, paper"
    reported = [("| " + " | ".join([f"{label} ({whose})",
                                    *[f"{vals[k]:.2f}" if k in vals else "" for k, _, _ in cols],
                                    *[""] * len(extra)])
                 + " |") for label, vals in REPORTED.get(protocol, [])]
    if not reported:
        return "\n".join(lines) + "\n"
    source = REPORTED_SOURCE.get(protocol, "the numbers printed in Hou et al., ICCV 2021 (or "
                                           "the peers it cites)")
    note = f"Rows marked *reported* are {source}, not measured by this run."
    benchmark = benchmark or {"comparable": False, "reason": "not checked against the benchmark"}
    if benchmark["comparable"]:
        lines += reported + ["", f"This run is the benchmark: {benchmark['reason']}. {note}"]
    else:
        lines += ["", f"#### Not comparable: {benchmark['reason']}", "",
                  ("The paper's" if protocol not in REPORTED_SOURCE else "Published") +
                  " figures on the real benchmark, for reference only:", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *reported, "", note]
    return "\n".join(lines) + "\n"


def source_words(record: dict | None) -> str:
    """The code a run came from, in words: its source digest and git state."""
    from mtmim_cli.source import short

    if not record:
        return "not recorded"
    git = record.get("git")
    where = ("no git checkout" if not git else
             f"git {git['commit'][:12]}" + (", with uncommitted changes" if git["dirty"] else ""))
    return f"mtmim_cli sha256 {short(record.get('sha256'))} ({where})"


def stale_notes(rows: list[dict]) -> list[str]:
    """One line per row whose stored rounds other code made (reused under --reuse-stale)."""
    return [f"{r['model']}: {r['metrics']['stale_rounds']} of {r['metrics']['rounds']} rounds "
            "were made by other code than this run's (reused with --reuse-stale): not this "
            "code's figures" for r in rows if r["metrics"].get("stale_rounds")]


def results_markdown(payload: dict) -> str:
    """results.md: the header (command, tool, source, caches), the protocol's table and the
    analyses. The report redraws it from a results.json whose own results.md it cannot
    verify."""
    from mtmim_cli.eval.analysis_tables import analysis_markdown

    protocol = payload["protocol"]
    md = [f"# mtmim evaluate: {protocol}", "",
          f"Command: `{payload.get('command', '')}`  ",
          f"Tool: mtmim {payload.get('tool_version', '?')}  ",
          f"Source: {source_words(payload.get('source'))}  ",
          "Caches: " + (", ".join(f"`{c['path']}` (sha256 {c['sha256'][:12]})"
                                  for c in payload.get("inputs", [])) or "none"), "",
          markdown_table(protocol, payload["results"], payload.get("variant_text", ""),
                         payload.get("benchmark")),
          analysis_markdown(payload)]
    return "\n".join(md)


def curve_csvs(payload: dict) -> tuple[str, str]:
    """The text of cmc.csv and roc.csv: every row's CMC and ROC as results.json holds them."""
    protocol = payload["protocol"]
    cmc_buf, roc_buf = io.StringIO(), io.StringIO()
    cw, rw = csv.writer(cmc_buf), csv.writer(roc_buf)
    cw.writerow(["protocol", "model", "rank", "rate"])
    rw.writerow(["protocol", "model", "far", "tar"])
    for row in payload["results"]:
        m = row["metrics"]
        for rank, rate in enumerate(m.get("cmc", []), 1):
            cw.writerow([protocol, row["model"], rank, f"{rate:.6f}"])
        roc = m.get("roc")
        if roc:
            for far, tar in zip(roc["far"], roc["tar"], strict=True):
                rw.writerow([protocol, row["model"], f"{far:.8g}", f"{tar:.6f}"])
    return cmc_buf.getvalue(), roc_buf.getvalue()


def write_results(out_md: Path, payload: dict,
                  siblings: dict[str, Callable[[Path], object]] | None = None) -> dict[str, Path]:
    """<stem>.md (tables), <stem>.cmc.csv / .roc.csv, then each of `siblings` (kind -> a
    function writing that file: outcomes, features), then, last, <stem>.json (everything,
    and the manifest of the others): `output_set.write_output_set`. Returns the paths by
    kind."""
    cmc, roc = curve_csvs(payload)
    md = results_markdown(payload)
    writers: dict[str, Callable[[Path], object]] = {
        "md": lambda p: atomic_write_text(p, md),
        "cmc": lambda p: atomic_write_text(p, cmc),
        "roc": lambda p: atomic_write_text(p, roc),
        **(siblings or {})}
    return write_output_set(out_md, payload, writers)
