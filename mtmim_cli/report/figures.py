"""The report's figures of training runs and evaluation curves (training curves, CLUB over
training, CMC, ROC), and what every figure of the report uses: the Agg backend, the atomic
PNG write, the moving average."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mtmim_cli.atomic import atomic_write
from mtmim_cli.errors import MtmimError
from mtmim_cli.plot_style import Palette, fit_y, is_schedule, metric_label
from mtmim_cli.report.loading import Evaluation, Run

IGNORED_COLUMNS = ("step", "epoch", "images_per_s")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

def save_figure(fig, path: Path) -> Path:
    with atomic_write(path) as tmp:
        # every figure lays itself out (tight_layout), so no second draw to crop it
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
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
    plt = pyplot()
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
    plt = pyplot()
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

    plt = pyplot()
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
    plt = pyplot()
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
