"""The one-line refusals of the settings layers (`finetune_options`, `pretrain_options`):
a choice out of a list, a number within a range. They run on the resolved settings before
any file is read, so a library call, `evaluate --refit full` and the command line refuse
alike; no torch here."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from mtmim_cli.errors import MtmimError


def choose(option: str, value: Any, choices: Sequence[str]) -> None:
    """Refuse `value` unless it is one of `choices`."""
    if value not in choices:
        raise MtmimError(f"{option} {value}: choose from {', '.join(choices)}")


def number(option: str, value: Any, *, low: float, high: float | None = None,
           low_open: bool = False, whole: bool = False) -> float:
    """`value` as a number within [low, high] ((low, high] with `low_open`), else a refusal
    naming the option and the range; `whole` asks for an integer."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and whole:
        ok = float(value).is_integer()
    if not ok:
        raise MtmimError(f"{option} {value!r}: must be a {'whole number' if whole else 'number'}")
    v = float(value)
    if v != v:
        raise MtmimError(f"{option} {value}: must be a number, not NaN")
    too_low = v <= low if low_open else v < low
    if too_low or (high is not None and v > high):
        if high is None:
            want = f"> {low:g}" if low_open else f">= {low:g}"
        else:
            want = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise MtmimError(f"{option} {value}: must be {want}")
    return v
