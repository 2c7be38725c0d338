"""The margin heads by name and the margin each one's `m` sets, without torch: the settings
layers (`train/finetune_options.py`, `train/pretrain_options.py`) check `--margin` with it
before any data loads, and `mtmim --help` stays light."""

from __future__ import annotations

from mtmim_cli.errors import MtmimError

MARGIN_PRESETS: dict[str, dict[str, float]] = {
    # The paper's setting: s = 64, m = 0.35 as an additive angle.
    "arcface": {"m1": 1.0, "m2": 0.35, "m3": 0.0},
    "cosface": {"m1": 1.0, "m2": 0.0, "m3": 0.35},
    # SphereFace-style multiplicative angle (insightface's combined-margin value for m1).
    "sphereface": {"m1": 1.35, "m2": 0.0, "m3": 0.0},
}
MARGINS = tuple(MARGIN_PRESETS)
# Which of m1, m2, m3 a head's single margin `m` replaces.
MARGIN_KEY = {"arcface": "m2", "cosface": "m3", "sphereface": "m1"}


def check_margin(name: str, option: str = "--margin") -> str:
    """`name` when it is a margin head's name, else a one-line MtmimError listing them."""
    if name not in MARGIN_PRESETS:
        raise MtmimError(f"{option} {name}: choose from {', '.join(MARGINS)}")
    return name
