"""One look for every figure of a report: a fixed colour per fine-tuning mode (and for the
pretrained model), whatever figure or order it appears in; readable y-axis labels for the
metrics the training loop logs; sane limits for curves that do not move."""

from __future__ import annotations

import re

import numpy as np

MODE_COLOURS = {"pretrained": "#7f7f7f", "baseline": "#1f77b4", "age": "#ff7f0e",
                "mtmim": "#d62728"}
_ALIASES = {"pretrain": "pretrained"}
# For models that are none of the modes, in order of first appearance.
OTHER_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")

METRIC_LABELS = {
    "loss": "loss (total)", "l_id": "identity loss L_ID", "l_age": "age-group loss L_AGE",
    "accuracy": "identity accuracy (batch)", "age_accuracy": "age-group accuracy (batch)",
    "club": "CLUB estimate [nats]", "q_loglik": "q log-likelihood", "q_lr": "learning rate of q",
    "lr": "learning rate",
}


def mode_of(text: str | None) -> str | None:
    """The mode a run or model label names ('mtmim', 'runs/age-seed1' -> 'age'), or None."""
    if not text:
        return None
    for token in re.split(r"[^a-z0-9]+", text.lower()):
        token = _ALIASES.get(token, token)
        if token in MODE_COLOURS:
            return token
    return None


class Palette:
    """Colour of a run or model: its mode's colour, else the next free one (kept per name)."""

    def __init__(self) -> None:
        self._other: dict[str, str] = {}

    def __call__(self, name: str, mode: str | None = None) -> str:
        m = mode_of(mode) or mode_of(name)
        if m is not None:
            return MODE_COLOURS[m]
        if name not in self._other:
            self._other[name] = OTHER_COLOURS[len(self._other) % len(OTHER_COLOURS)]
        return self._other[name]


def metric_label(column: str) -> str:
    return METRIC_LABELS.get(column, column.replace("_", " "))


def is_schedule(column: str) -> bool:
    """Columns the schedule sets (learning rates): step functions, drawn as logged."""
    return column == "lr" or column.endswith("_lr")


def fit_y(ax, values: np.ndarray, log: bool) -> None:
    """Give the y axis room around curves that barely move (a constant learning rate would
    otherwise get a zero-height axis and unreadable ticks)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if not len(v):
        return
    lo, hi = float(v.min()), float(v.max())
    if log:
        if hi / lo < 10:
            mid = np.sqrt(lo * hi)
            ax.set_ylim(mid / 10, mid * 10)
        return
    span = hi - lo
    if span <= 1e-9 * max(1.0, abs(hi)):
        pad = max(abs(hi) * 0.1, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    ax.ticklabel_format(axis="y", useOffset=False)
