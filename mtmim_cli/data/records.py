"""The record a dataset reader yields: one photo, its identity, and what else is known."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """One source photo. `path` is relative to the reader's source root."""

    path: str
    identity: str
    age: float = math.nan
    split: str = ""
