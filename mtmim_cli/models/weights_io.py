"""Reading weight files (checkpoints, state dicts): `torch.load` with `weights_only=True`, so
no file runs code, and a missing or unreadable file is a one-line MtmimError. It sits in the
models layer because models load released weights; training writes its checkpoints through
`mtmim_cli.train.checkpoint`, which reads them back through here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mtmim_cli.errors import MtmimError


def load_weights_file(path: str | os.PathLike) -> Any:
    """`torch.load` with `weights_only=True` on the CPU; a missing or unreadable file (or one
    that would run code) is the user's input, so it becomes a one-line MtmimError."""
    path = Path(path)
    if not path.exists():
        raise MtmimError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's input
        raise MtmimError(f"{path}: cannot read weights ({str(exc).splitlines()[0]})") from None
