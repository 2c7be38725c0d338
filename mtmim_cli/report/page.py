"""report.md: the tables of the runs, the sections of the figures, and `build_report`, which
reads the inputs, draws every figure and writes the page."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtmim_cli import __version__
from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.errors import MtmimError
from mtmim_cli.plot_style import Palette
from mtmim_cli.report.age import first_age_map, plot_age_map, plot_rank1_by_age
from mtmim_cli.report.figures import (
    club_column,
    plot_club,
    plot_cmc,
    plot_roc,
    plot_training_curves,
    save_figure,
)
from mtmim_cli.report.loading import Evaluation, Run, classify_inputs
from mtmim_cli.report.projection import disentanglement_scores, plot_projection, projected_features


def _synthetic_inputs(e: Evaluation) -> bool:
    """Whether an evaluation ran on a cache aligned from a `mtmim synth` folder (evaluate
    records it with its inputs)."""
    return any(item.get("synthetic") for item in e.results.get("inputs", []))

def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

def _final(df, col: str) -> float | None:
    """Mean of the last tenth of a column's logged values (one step is noisy)."""
    if col not in df.columns:
        return None
    v = df[col].dropna().to_numpy(float)
    if not len(v):
        return None
    return float(v[-max(1, len(v) // 10):].mean())

def run_table(runs: list[Run]) -> str:
    lines = ["| run | mode | steps | epochs | final loss | final accuracy | final CLUB |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        df = r.metrics
        club = club_column(df)
        lines.append("| " + " | ".join([
            r.label, r.mode or r.kind, _fmt(int(df["step"].max()) if len(df) else None),
            _fmt(int(df["epoch"].max()) if "epoch" in df.columns and len(df) else None),
            _fmt(_final(df, "loss")), _fmt(_final(df, "accuracy")),
            _fmt(_final(df, club) if club else None)]) + " |")
    return "\n".join(lines)

def _faces_words(named: list[tuple[str, dict, dict | None]]) -> str:
    """What the projected faces are, as the evaluation recorded it for every model."""
    from mtmim_cli.eval.heldout import section_words

    faces = {name: tf for name, _, tf in named if tf is not None}
    return section_words(faces) if len(faces) == len(named) else "faces with no training record checked"

def projection_section(named: list[tuple[str, dict, dict | None]]) -> list[str]:
    """The Markdown of the x_id / x_age section: title honest about the faces, the scores."""
    from mtmim_cli.eval.heldout import model_notes

    faces = {name: tf for name, _, tf in named if tf is not None}
    md = [f"## Identity and age features: {_faces_words(named)}\n",
          *[f"- {note}" for note in model_notes(faces)], "",
          f"{len(named[0][1]['age'])} scored faces per model, from `evaluate --features`. Age R^2: "
          "cross-validated ridge regression of age on the part; identity 1-NN: "
          "leave-one-out nearest neighbour (cosine) accuracy. A disentangled model "
          "has a low age R^2 on x_id and a low identity 1-NN on x_age.\n",
          "| model | age R^2 from x_id | age R^2 from x_age | identity 1-NN from x_id "
          "| identity 1-NN from x_age |", "|---|---|---|---|---|"]
    for name, f, _ in named:
        sc = disentanglement_scores(f)
        md.append(f"| {name} | {_fmt(sc.get('age_r2_x_id'))} | {_fmt(sc.get('age_r2_x_age'))} "
                  f"| {_fmt(sc['id_1nn_x_id'])} | {_fmt(sc['id_1nn_x_age'])} |")
    return md + ["", "![projection](projection.png)\n"]

def age_section(results: list[dict], out: Path, palette: Palette,
                age_map_model: str | None) -> list[str]:
    """Rank-1 by probe age and by age gap (every model), and one model's probe-age x
    gallery-age map, from evaluate's breakdowns; nothing when no evaluation has them."""
    md = []
    fig = plot_rank1_by_age(results, palette)
    if fig is not None:
        save_figure(fig, out / "rank1_by_age.png")
        md += ["### Where the models fail across age\n",
               "Rank-1 per probe age group and per age gap between the probe and its nearest "
               "same-identity gallery photo; bands are 95% bootstrap intervals (evaluate's "
               "resampling), ticks give the probes per bin.\n",
               "![rank-1 by age](rank1_by_age.png)\n"]
    found = first_age_map(results, age_map_model)
    if age_map_model is not None and found is None:
        raise MtmimError(f"--age-map-model {age_map_model}: no evaluation has a probe-age x "
                         "gallery-age map for that label")
    if found is not None:
        save_figure(plot_age_map(found[1], found[0]), out / "age_map.png")
        md += [f"### {found[0]}: probe age x gallery age\n",
               "Each cell: of the pairs (probe at this age, same-person gallery photo at that "
               "age), the share where that photo outscores every other person's photo, i.e. "
               "the probe would be found at rank 1 were it the person's only gallery photo.\n",
               "![probe age x gallery age](age_map.png)\n"]
    return md

def auto_section(runs: list[Run]) -> list[str]:
    """What `--recipe auto` searched, its validation table and its choice, per run."""
    md = []
    for r in runs:
        extra = r.config.get("extra") if isinstance(r.config.get("extra"), dict) else {}
        auto = extra.get("auto")
        if not isinstance(auto, dict):
            continue
        chosen = auto.get("chosen")
        choice = (f"chose {auto.get('chosen_label')}: " + ", ".join(
                  f"{k} {v}" for k, v in chosen.items() if v is not None) +
                  "; retrained on all training identities" if chosen else
                  "no candidate beat the init beyond its interval: model.pt equals the init")
        grid = "; ".join(f"{k} {', '.join(str(v) for v in vs)}"
                         for k, vs in (auto.get("grid") or {}).items())
        md += [f"### {r.label}: `--recipe auto`\n", f"Grid: {grid}.\n",
               f"{auto.get('summary', '')}.\n", str(auto.get("table", "")), "",
               f"Choice: {choice}.\n"]
    return md

def build_report(inputs: list[str | os.PathLike], out: str | os.PathLike,
                 max_images: int = 400, age_map_model: str | None = None,
                 echo: Callable[[str], None] | None = None) -> Path:
    """Write `out`/report.md and its figures from run folders and evaluate's outputs;
    returns the report's path. `echo` gets one line per evaluation file not attached."""
    say = echo or (lambda s: None)
    out = Path(out)
    runs, evals = classify_inputs([Path(p) for p in inputs])
    if not runs and not evals:
        raise MtmimError("report: give at least one run folder or evaluation")
    out.mkdir(parents=True, exist_ok=True)
    palette = Palette()   # one colour per mode in every figure
    md = ["# mtmim report\n",
          f"mtmim {__version__}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}. "
          f"Inputs: {', '.join(f'`{p}`' for p in inputs)}.\n"]
    if runs:
        md += ["## Training runs\n", run_table(runs), "",
               "Final values are means over the last tenth of the logged steps.\n"]
        md += auto_section(runs)
        # an auto run that kept its init logged no step (nothing to draw)
        curved = [r for r in runs if len(r.metrics)]
        if curved:
            save_figure(plot_training_curves(curved, palette), out / "training_curves.png")
            md += ["### Training curves\n", "![training curves](training_curves.png)\n"]
        fig = plot_club(runs, palette)
        if fig is not None:
            save_figure(fig, out / "club.png")
            md += ["### CLUB estimate over training (the paper's Figure 6 analogue)\n",
                   "The CLUB upper bound of I(x_id; x_age) on each training batch, per mode. "
                   "Under MT-MIM it is minimised; without the MI loss it is only measured.\n",
                   "![CLUB over training](club.png)\n"]
    named = projected_features(evals, max_images)
    if named:
        md += projection_section(named)
        save_figure(plot_projection([(name, f) for name, f, _ in named], palette,
                              _faces_words(named)), out / "projection.png")
    if evals:
        md.append("## Evaluation\n")
        for e in evals:
            body = e.markdown.strip()
            if body.startswith("# "):  # demote its title under ours
                body = "#" + body
            md += [f"From `{e.manifest or e.path}`:\n", body or "(no results.md)", ""]
            md += [f"- {line}" for line in e.ignored] + ([""] if e.ignored else [])
            for line in e.ignored:
                say(line)
            if _synthetic_inputs(e):
                md += ["*These faces come from `mtmim synth` (the embedded synthetic set): rows "
                       "marked reported are the paper's numbers on the real benchmark and are "
                       "not comparable with them.*\n"]
        for name, fig in (("cmc", plot_cmc(evals, palette)), ("roc", plot_roc(evals, palette))):
            if fig is not None:
                save_figure(fig, out / f"{name}.png")
                md.append(f"![{name.upper()}]({name}.png)\n")
        md += age_section([e.results for e in evals], out, palette, age_map_model)
    report = out / "report.md"
    atomic_write_text(report, "\n".join(md) + "\n")
    return report
