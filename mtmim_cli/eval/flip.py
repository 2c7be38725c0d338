"""How a face's image and mirror features are joined (`--flip`), by name, without torch: the
one list and the one check that evaluate, calibrate, embed, enroll and feature extraction
share, so `mtmim --help` can name them and every caller refuses alike."""

from __future__ import annotations

from mtmim_cli.errors import MtmimError

# concat (the paper) puts the two views side by side, sum adds them, none uses the image alone.
FLIP_MODES = ("concat", "sum", "none")


def check_flip(flip: str, option: str = "--flip") -> str:
    """`flip` when it names a way of joining the views, else a one-line MtmimError."""
    if flip not in FLIP_MODES:
        raise MtmimError(f"{option} {flip}: choose from {', '.join(FLIP_MODES)}")
    return flip
