"""Loading the models `evaluate` scores. Everything goes through `MODEL_LOADER`
(`mtmim_cli.models.identity.load_identity_model` by default: our checkpoints, the shared
MobileFaceNet, an insightface backbone); tests swap it for a loader of small modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mtmim_cli.errors import MtmimError


def _default_loader(path: Path, backbone: str | None):
    from mtmim_cli.models.identity import load_identity_model

    return load_identity_model(path, backbone=backbone)


MODEL_LOADER: Callable = _default_loader


def load_model(path: Path, backbone: str | None, device: str):
    """The model at `path` on `device`, in eval mode."""
    if not Path(path).exists():
        raise MtmimError(f"{path}: no such model file")
    return MODEL_LOADER(Path(path), backbone).to(device).eval()
