"""`mtmim report`: Markdown plus PNG figures from training runs and evaluation results.

Inputs are folders, recognised by what they hold:
- a training run (`metrics.csv`, `config.json`, `model.pt` from the training loop): its
  curves (losses, accuracy, lr, and every metric the objective logs), and for fine-tuning
  the CLUB estimate over training (the paper's Figure 6 analogue);
- an evaluation (`results.json`, `results.md`, `cmc.csv`, `roc.csv` from `mtmim evaluate`):
  its tables, CMC and ROC curves; and, when it was run with `--features`, its
  `features.npz`: the x_id and x_age of the scored faces under each fine-tuned model,
  projected to 2-D (PCA) and scored for disentanglement.
The report only reads these files: it runs no model and opens no cache.

Every figure is written atomically; the plotting functions return the matplotlib Figure so
tests can check that what is drawn is what the files say.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtmim_cli import __version__
from mtmim_cli.atomic import atomic_write, atomic_write_text
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.feature_file import FILE_NAME as FEATURE_FILE
from mtmim_cli.eval.feature_file import read_feature_file
from mtmim_cli.plot_style import Palette, fit_y, is_schedule, metric_label

IGNORED_COLUMNS = ("step", "epoch", "images_per_s")
MAX_CURVE_POINTS = 2000


@dataclass
class Run:
    """One training run folder."""

    path: Path
    label: str
    mode: str
    kind: str
    metrics: Any  # pandas.DataFrame
    config: dict = field(default_factory=dict)
    validation: Any | None = None  # DataFrame (step, accuracy, std, best_accuracy) or None

    @property
    def model(self) -> Path | None:
        for name in ("model.pt", "best.pt", "checkpoints/last.pt"):
            if (self.path / name).is_file():
                return self.path / name
        return None


@dataclass
class Evaluation:
    """One `mtmim evaluate` output (results.md and its siblings)."""

    path: Path
    results: dict
    markdown: str
    cmc: Any | None  # DataFrame (protocol, model, rank, rate)
    roc: Any | None  # DataFrame (protocol, model, far, tar)
    features: dict | None = None  # model label -> features.npz entry (evaluate --features)

    def test_faces(self, label: str) -> dict | None:
        """The evaluation's record of how `label`'s training data relates to its test faces."""
        for row in self.results.get("results", []):
            if row.get("model") == label:
                return row.get("test_faces")
        return None


def _read_csv(path: Path):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise MtmimError(f"{path}: not a readable CSV ({exc})") from None


def load_run(path: Path) -> Run:
    metrics_path = path / "metrics.csv"
    df = _read_csv(metrics_path)
    if "step" not in df.columns:
        raise MtmimError(f"{metrics_path}: no 'step' column (not written by the training loop)")
    config: dict = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise MtmimError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    extra = config.get("extra", {}) if isinstance(config.get("extra"), dict) else {}
    mode = str(extra.get("mode") or config.get("mode") or "")
    kind = "finetune" if mode else str(extra.get("kind") or config.get("kind") or "pretrain")
    label = path.name if not mode or mode in path.name else f"{path.name} ({mode})"
    val = _read_csv(path / "validation.csv") if (path / "validation.csv").is_file() else None
    if val is not None and not {"step", "accuracy"} <= set(val.columns):
        val = None
    return Run(path=path, label=label, mode=mode, kind=kind, metrics=df, config=config,
               validation=val if val is not None and len(val) else None)


def load_evaluation(path: Path) -> Evaluation:
    """`path` is the folder of results.json (or results.json / results.md itself)."""
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        stem = path.stem
    else:  # results.json, else the one <stem>.json beside a <stem>.md that evaluate wrote
        stems = [p.stem for p in sorted(folder.glob("*.json")) if (folder / f"{p.stem}.md").is_file()]
        stem = "results" if (folder / "results.json").is_file() or len(stems) != 1 else stems[0]
    rj = folder / f"{stem}.json"
    try:
        results = json.loads(rj.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MtmimError(f"{rj}: not a readable results file ({exc})") from None
    md = folder / f"{stem}.md"
    markdown = md.read_text() if md.is_file() else ""
    cmc = _read_csv(folder / "cmc.csv") if (folder / "cmc.csv").is_file() else None
    roc = _read_csv(folder / "roc.csv") if (folder / "roc.csv").is_file() else None
    feats = folder / FEATURE_FILE
    return Evaluation(path=folder, results=results, markdown=markdown,
                      cmc=cmc if cmc is not None and len(cmc) else None,
                      roc=roc if roc is not None and len(roc) else None,
                      features=read_feature_file(feats) if feats.is_file() else None)


def classify_inputs(paths: list[Path]) -> tuple[list[Run], list[Evaluation]]:
    runs, evals = [], []
    for p in paths:
        if not p.exists():
            raise MtmimError(f"{p}: no such file or folder")
        if p.is_dir() and (p / "metrics.csv").is_file():
            runs.append(load_run(p))
        elif (p.is_dir() and list(p.glob("*.json"))) or p.suffix in (".json", ".md"):
            evals.append(load_evaluation(p))
        else:
            raise MtmimError(f"{p}: neither a training run (metrics.csv) nor an evaluation "
                             "(results.json)")
    return runs, evals


# ------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` points, ignoring NaNs (NaN where all are)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1:
        return v
    ok = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    count = ccount[idx] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[idx] - csum[lo]) / np.maximum(count, 1), np.nan)


def _window(n: int) -> int:
    return max(1, n // 25)


def curve_columns(runs: list[Run]) -> list[str]:
    """The metrics to plot, in a fixed order: loss first, then the objective's, accuracy, lr."""
    seen: list[str] = []
    for r in runs:
        for c in r.metrics.columns:
            if c not in IGNORED_COLUMNS and c not in seen and _numeric(r.metrics[c]):
                seen.append(c)
    head = [c for c in ("loss",) if c in seen]
    tail = [c for c in ("accuracy", "lr") if c in seen]
    return head + [c for c in seen if c not in head + tail] + tail


def _numeric(col) -> bool:
    return bool(np.isfinite(np.asarray(col, dtype=np.float64)).any()) if col.dtype.kind in "fiu" else False


def _run_colour(palette: Palette, run: Run) -> str:
    return palette(run.label, run.mode or ("pretrained" if run.kind == "pretrain" else None))


def plot_training_curves(runs: list[Run], palette: Palette | None = None):
    """One panel per logged metric, one line per run in its mode's colour (smoothed; raw in
    a faint line). Learning rates are drawn as logged (a step function, not smoothed), on a
    log axis, earlier runs wider so runs on the same schedule stay visible."""
    plt = _plt()
    palette = palette or Palette()
    cols = curve_columns(runs)
    if not cols:
        raise MtmimError(f"{runs[0].path}: metrics.csv holds no numeric metric to plot")
    with_val = [r for r in runs if r.validation is not None]
    panels = len(cols) + bool(with_val)
    ncol = min(3, panels)
    nrow = math.ceil(panels / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.2 * nrow), squeeze=False)
    for ax, col in zip(axes.flat, cols, strict=False):
        drawn = []
        schedule = is_schedule(col)
        for k, run in enumerate(runs):
            if col not in run.metrics.columns:
                continue
            df = run.metrics[["step", col]].dropna()
            if df.empty:
                continue
            x, y = df["step"].to_numpy(float), df[col].to_numpy(float)
            colour = _run_colour(palette, run)
            drawn.append(y)
            if schedule:
                ax.plot(x, y, color=colour, label=run.label, drawstyle="steps-post",
                        linewidth=1.4 + 1.6 * (len(runs) - 1 - k) / max(1, len(runs) - 1))
                continue
            w = _window(len(y))
            if w > 1:
                ax.plot(x, y, color=colour, alpha=0.2, linewidth=0.8)
            ax.plot(x, smooth(y, w), color=colour, label=run.label, linewidth=1.6)
        log = schedule and bool(drawn) and all((v > 0).all() for v in drawn)
        if log:
            ax.set_yscale("log")
        if drawn:
            fit_y(ax, np.concatenate(drawn), log)
        ax.set_title(col)
        ax.set_xlabel("step")
        ax.set_ylabel(metric_label(col))
        ax.grid(alpha=0.3)
    if with_val:
        ax = axes.flat[len(cols)]
        for run in runs:
            if run.validation is not None:
                v = run.validation
                ax.errorbar(v["step"], v["accuracy"], yerr=v["std"] if "std" in v.columns else None,
                            marker="o", capsize=3, color=_run_colour(palette, run), label=run.label)
        ax.set_title("validation (10-fold, held-out pairs)")
        ax.set_xlabel("step")
        ax.set_ylabel("verification accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Training curves (thick: moving average; faint: every step; learning rates as set)")
    fig.tight_layout()
    return fig


def club_column(df) -> str | None:
    """The CLUB estimate column of a fine-tuning run's metrics.csv (named after CLUB)."""
    names = [c for c in df.columns if "club" in c.lower()]
    for preferred in ("club", "club_estimate", "mi_club", "l_mim"):
        if preferred in names:
            return preferred
    return names[0] if names else None


def plot_club(runs: list[Run], palette: Palette | None = None):
    """The CLUB estimate of I(x_id; x_age) over training, one line per mode: Figure 6 of the
    paper (the MI falls under MT-MIM and stays high without the MI loss). None if no run logs it."""
    plt = _plt()
    with_club = [(r, club_column(r.metrics)) for r in runs]
    with_club = [(r, c) for r, c in with_club if c is not None and r.metrics[c].notna().any()]
    if not with_club:
        return None
    palette = palette or Palette()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run, col in with_club:
        df = run.metrics[["step", col]].dropna()
        y = df[col].to_numpy(float)
        colour = _run_colour(palette, run)
        ax.plot(df["step"].to_numpy(float), smooth(y, _window(len(y))), linewidth=1.8,
                color=colour, label=run.mode or run.label)
        ax.plot(df["step"].to_numpy(float), y, color=colour, alpha=0.2, linewidth=0.8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("CLUB estimate of I(x_id; x_age) [nats]")
    ax.set_title("MI between identity and age features during fine-tuning")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_cmc(evals: list[Evaluation], palette: Palette | None = None):
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    palette = palette or Palette()
    frames = [e.cmc for e in evals if e.cmc is not None]
    if not frames:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for df in frames:
        for (protocol, model), g in df.groupby(["protocol", "model"], sort=False):
            g = g.sort_values("rank")
            ax.plot(g["rank"], g["rate"], marker="o", markersize=3, color=palette(str(model)),
                    label=f"{model} ({protocol})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ranks are whole numbers
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_title("CMC")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_roc(evals: list[Evaluation], palette: Palette | None = None):
    plt = _plt()
    palette = palette or Palette()
    frames = [e.roc for e in evals if e.roc is not None]
    if not frames:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for df in frames:
        for (protocol, model), g in df.groupby(["protocol", "model"], sort=False):
            g = g[g["far"] > 0].sort_values("far")  # FAR = 0 has no place on a log axis
            ax.plot(g["far"], g["tar"], color=palette(str(model)), label=f"{model} ({protocol})")
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("ROC")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------- x_id / x_age projection


def projected_features(evals: list[Evaluation], max_images: int = 400) -> list[tuple[str, dict, dict | None]]:
    """(label, features, test-faces record) of every factorized model in the evaluations'
    features files (the first evaluation that holds a label wins), thinned to an even
    spread of at most `max_images` faces."""
    out, seen = [], set()
    for e in evals:
        for label, f in (e.features or {}).items():
            if f["x_age"] is None or label in seen:
                continue
            seen.add(label)
            n = len(f["x_id"])
            if n > max_images:
                keep = np.linspace(0, n - 1, max_images).round().astype(int)
                f = {k: v[keep] for k, v in f.items()}
            out.append((label, f, e.test_faces(label)))
    return out


def pca_2d(x: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=0).fit_transform(np.asarray(x, dtype=np.float64))


def disentanglement_scores(feats: dict) -> dict:
    """How much identity and age each part carries, on held-out faces:
    age R^2 of a cross-validated ridge regression, identity leave-one-out 1-NN accuracy (cosine)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    out = {}
    age = feats["age"]
    known = np.isfinite(age)
    for part in ("x_id", "x_age"):
        x = feats[part]
        if known.sum() >= 10:
            pred = cross_val_predict(RidgeCV(alphas=np.logspace(-3, 3, 13)), x[known], age[known],
                                     cv=KFold(5, shuffle=True, random_state=0))
            resid = ((age[known] - pred) ** 2).sum()
            total = ((age[known] - age[known].mean()) ** 2).sum()
            out[f"age_r2_{part}"] = float(1 - resid / total) if total > 0 else float("nan")
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = xn @ xn.T
        np.fill_diagonal(sim, -np.inf)
        out[f"id_1nn_{part}"] = float((feats["identity"][sim.argmax(1)] == feats["identity"]).mean())
    return out


def plot_projection(named_feats: list[tuple[str, dict]], palette: Palette | None = None,
                    faces: str = "scored faces"):
    """Rows: models (titles in the model's colour); columns: x_id by identity, x_id by age,
    x_age by identity, x_age by age."""
    plt = _plt()
    palette = palette or Palette()
    n = len(named_feats)
    fig, axes = plt.subplots(n, 4, figsize=(15, 3.6 * n), squeeze=False)
    for row, (name, f) in enumerate(named_feats):
        for c, part in enumerate(("x_id", "x_age")):
            xy = pca_2d(f[part])
            ids = np.unique(f["identity"], return_inverse=True)[1]
            ax = axes[row, 2 * c]
            ax.scatter(xy[:, 0], xy[:, 1], c=ids % 20, cmap="tab20", s=12, vmin=0, vmax=19)
            ax.set_title(f"{name}: {part}, colour = identity", fontsize=9, color=palette(name))
            ax = axes[row, 2 * c + 1]
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=f["age"], cmap="viridis", s=12)
            ax.set_title(f"{name}: {part}, colour = age", fontsize=9, color=palette(name))
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02, label="age")
            for a in axes[row, 2 * c:2 * c + 2]:
                a.set_xticks([])
                a.set_yticks([])
                a.set_xlabel("PC 1")
                a.set_ylabel("PC 2")
    fig.suptitle(f"{faces[:1].upper()}{faces[1:]}: PCA of the identity part x_id and the age part x_age")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------- the report


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
    from mtmim_cli.report_age import first_age_map, plot_age_map, plot_rank1_by_age

    md = []
    fig = plot_rank1_by_age(results, palette)
    if fig is not None:
        _save(fig, out / "rank1_by_age.png")
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
        _save(plot_age_map(found[1], found[0]), out / "age_map.png")
        md += [f"### {found[0]}: probe age x gallery age\n",
               "Each cell: of the pairs (probe at this age, same-person gallery photo at that "
               "age), the share where that photo outscores every other person's photo, i.e. "
               "the probe would be found at rank 1 were it the person's only gallery photo.\n",
               "![probe age x gallery age](age_map.png)\n"]
    return md


def build_report(inputs: list[str | os.PathLike], out: str | os.PathLike,
                 max_images: int = 400, age_map_model: str | None = None) -> Path:
    """Write `out`/report.md and its figures from run folders and evaluate's outputs;
    returns the report's path."""
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
        _save(plot_training_curves(runs, palette), out / "training_curves.png")
        md += ["### Training curves\n", "![training curves](training_curves.png)\n"]
        fig = plot_club(runs, palette)
        if fig is not None:
            _save(fig, out / "club.png")
            md += ["### CLUB estimate over training (the paper's Figure 6 analogue)\n",
                   "The CLUB upper bound of I(x_id; x_age) on each training batch, per mode. "
                   "Under MT-MIM it is minimised; without the MI loss it is only measured.\n",
                   "![CLUB over training](club.png)\n"]
    named = projected_features(evals, max_images)
    if named:
        md += projection_section(named)
        _save(plot_projection([(name, f) for name, f, _ in named], palette,
                              _faces_words(named)), out / "projection.png")
    if evals:
        md.append("## Evaluation\n")
        for e in evals:
            body = e.markdown.strip()
            if body.startswith("# "):  # demote its title under ours
                body = "#" + body
            md += [f"From `{e.path}`:\n", body or "(no results.md)", ""]
            if _synthetic_inputs(e):
                md += ["*These faces come from `mtmim synth` (the embedded synthetic set): rows "
                       "marked reported are the paper's numbers on the real benchmark and are "
                       "not comparable with them.*\n"]
        for name, fig in (("cmc", plot_cmc(evals, palette)), ("roc", plot_roc(evals, palette))):
            if fig is not None:
                _save(fig, out / f"{name}.png")
                md.append(f"![{name.upper()}]({name}.png)\n")
        md += age_section([e.results for e in evals], out, palette, age_map_model)
    report = out / "report.md"
    atomic_write_text(report, "\n".join(md) + "\n")
    return report
