"""The report's figures of results by age, drawn from evaluate's results.json:
rank-1 against probe age and against the age gap to the nearest same-identity gallery photo
(one line per model, its bootstrap interval as a band) and, for one model, the probe-age x
gallery-age map of success (which mates a probe would be found by)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mtmim_cli.report.figures import pyplot


def bin_series(results: dict, key: str) -> list[tuple[str, list[str], np.ndarray, np.ndarray,
                                                     np.ndarray, np.ndarray]]:
    """Per model with a breakdown: (label, bin labels, rank-1, low, high, probes) over the
    bins of `key` ('by_gap' or 'by_probe_age'), known bins only; NaN where a bin is empty or
    has no interval."""
    out = []
    for row in results.get("results", []):
        by_age = row.get("metrics", {}).get("by_age")
        if not by_age:
            continue
        rows = [r for r in by_age[key] if r["bin"] != "unknown"]
        val = np.array([np.nan if r["rank1"] is None else r["rank1"] for r in rows])
        low = np.array([r.get("low", np.nan) for r in rows], dtype=float)
        high = np.array([r.get("high", np.nan) for r in rows], dtype=float)
        out.append((row["model"], [r["bin"] for r in rows], val, low, high,
                    np.array([r["n"] for r in rows])))
    return out


PANELS = (("by_probe_age", "probe age (years)"),
          ("by_gap", "age gap to the nearest same-identity gallery photo (years)"))


def plot_rank1_by_age(results_list: list[dict], colour_of: Callable[[str], str] | None = None):
    """Two panels, rank-1 (%) by probe age group and by age gap, one line per model (and
    evaluation) with its 95% bootstrap band; the probes per bin under each tick. None when
    no evaluation holds a breakdown."""
    if not any(bin_series(res, "by_gap") for res in results_list):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12.0, 4.4))
    for ax, (key, xlabel) in zip(axes, PANELS, strict=True):
        series = [(res.get("protocol", ""), s) for res in results_list for s in bin_series(res, key)]
        labels, counts = series[0][1][1], series[0][1][5]
        x = np.arange(len(labels))
        for k, (protocol, (model, _, val, low, high, _)) in enumerate(series):
            colour = colour_of(model) if colour_of else f"C{k % 10}"
            name = model if len(results_list) == 1 else f"{model} ({protocol})"
            # Models side by side within a bin, so equal figures do not hide one another.
            xk = x + 0.08 * (k - (len(series) - 1) / 2)
            ax.plot(xk, 100 * val, marker="o", color=colour, label=name, linewidth=1.8)
            ok = np.isfinite(low) & np.isfinite(high)
            ax.fill_between(xk, np.where(ok, 100 * low, np.nan), np.where(ok, 100 * high, np.nan),
                            color=colour, alpha=0.15, linewidth=0)
        ax.set_xticks(x, [f"{b}\n({c})" for b, c in zip(labels, counts, strict=True)])
        ax.set_xlabel(f"{xlabel}; (probes)")
        ax.set_ylabel("rank-1 (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Rank-1 by probe age and by age gap (bands: 95% bootstrap intervals)")
    fig.tight_layout()
    return fig


def plot_age_map(amap: dict, model: str):
    """Heat map of success per (probe age group, gallery age group): the share of
    probe-mate pairs where the mate outscores every other-identity photo; cells show % and
    the number of pairs, empty cells are blank."""
    plt = pyplot()
    rate = np.array([[np.nan if v is None else v for v in row] for row in amap["rate"]], float)
    n = np.array(amap["n"])
    labels = amap["labels"]
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    im = ax.imshow(100 * rate, cmap="RdYlGn", vmin=0, vmax=100, origin="lower")
    for i in range(rate.shape[0]):
        for j in range(rate.shape[1]):
            if n[i, j]:
                ax.text(j, i, f"{100 * rate[i, j]:.0f}\n({n[i, j]})", ha="center", va="center",
                        fontsize=7, color="black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("gallery photo age (years)")
    ax.set_ylabel("probe age (years)")
    ax.set_title(f"{model}: probe found at rank 1 by a mate of that age (%, pairs)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="success (%)")
    fig.tight_layout()
    return fig


def first_age_map(results_list: list[dict], model: str | None = None) -> tuple[str, dict] | None:
    """(label, map) of the named model, or of the first model that has one."""
    for res in results_list:
        for row in res.get("results", []):
            amap = row.get("metrics", {}).get("age_map")
            if amap and (model is None or row["model"] == model):
                return row["model"], amap
    return None
