"""Where the project's shared data lives (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    """The shared data folder: $MTMIM_SHARED, else ../shared beside the working directory."""
    return Path(os.environ.get("MTMIM_SHARED", "../shared")).expanduser().resolve()


def shared_path(*parts: str) -> Path:
    return shared_dir().joinpath(*parts)
