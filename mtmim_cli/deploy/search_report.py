"""What `mtmim search` writes: its results as Markdown, CSV or JSON (one row per probe and
rank; a faceless probe one row with its reason), and the contact sheet: each probe beside its
top-K gallery crops with cosine, age and the decision in colour."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from mtmim_cli.atomic import atomic_write, atomic_write_text
from mtmim_cli.errors import MtmimError

COLUMNS = ("probe", "rank", "identity", "photo", "age", "cosine", "decision")


def decision_text(accepted: bool | None) -> str:
    return "n/a" if accepted is None else ("accept" if accepted else "reject")


def result_rows(results) -> list[dict]:
    rows = []
    for r in results:
        if not r.hits:
            rows.append({"probe": r.probe, "rank": "", "identity": "", "photo": "", "age": "",
                         "cosine": "", "decision": r.reason or "no match"})
        for h in r.hits:
            rows.append({"probe": r.probe, "rank": h.rank, "identity": h.identity,
                         "photo": h.path, "age": "" if math.isnan(h.age) else f"{h.age:g}",
                         "cosine": f"{h.score:.4f}", "decision": decision_text(h.accepted)})
    return rows


def write_results(out: str | os.PathLike, results, meta: dict) -> Path:
    """`out` by its suffix: .md, .csv or .json (with the gallery and threshold in `meta`)."""
    out = Path(out)
    rows = result_rows(results)
    suffix = out.suffix.lower()
    if suffix == ".json":
        payload = {**meta, "results": [
            {"probe": r.probe, "reason": r.reason, "hits": [
                {"rank": h.rank, "identity": h.identity, "photo": h.path,
                 "age": None if math.isnan(h.age) else h.age, "cosine": h.score,
                 "decision": decision_text(h.accepted)} for h in r.hits]} for r in results]}
        atomic_write_text(out, json.dumps(payload, indent=1) + "\n")
    elif suffix == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, COLUMNS)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(out, buf.getvalue())
    elif suffix == ".md":
        lines = [f"Gallery `{meta['gallery']}`: {meta['faces']} faces of {meta['identities']} "
                 f"identities, index {meta['index']}; threshold {meta['threshold']}.", "",
                 "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in COLUMNS) + " |"
                  for r in rows]
        atomic_write_text(out, "\n".join(lines) + "\n")
    else:
        raise MtmimError(f"--out {out}: write .md, .csv or .json")
    return out


def write_sheet(out: str | os.PathLike, results, faces: np.ndarray, top: int) -> Path:
    """A PNG grid: a row per probe (its aligned face, then its hits' gallery crops titled
    identity, cosine and age; framed green accept, red reject, grey undecided)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise MtmimError(f"--sheet {out}: write a .png")
    cols = top + 1
    n = max(len(results), 1)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.95 * n), squeeze=False)
    colour = {True: "#1a9641", False: "#d7191c", None: "#888888"}
    for i, r in enumerate(results):
        ax = axes[i][0]
        if r.face is not None:
            ax.imshow(r.face)
        else:
            ax.text(0.5, 0.5, r.reason or "no face", ha="center", va="center", fontsize=7,
                    wrap=True)
        ax.set_title(f"probe\n{Path(r.probe).name[-22:]}", fontsize=7)
        for j in range(1, cols):
            a = axes[i][j]
            if j - 1 < len(r.hits):
                h = r.hits[j - 1]
                a.imshow(faces[h.row])
                age = "" if math.isnan(h.age) else f", {h.age:g}y"
                a.set_title(f"{h.identity[:16]}\n{h.score:.3f}{age} {decision_text(h.accepted)}",
                            fontsize=7,
                            color=colour[h.accepted])
                for side in a.spines.values():
                    side.set_edgecolor(colour[h.accepted])
                    side.set_linewidth(3)
            else:
                a.axis("off")
        for a in axes[i]:
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    with atomic_write(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
