"""Atomic full-state checkpoints, loaded with `weights_only=True` (no arbitrary pickles).

Every checkpoint of ours holds `meta` (kind, backbone, input_width, embedding_size,
normalisation, ...) and `objective` (the Objective's state dict: `encoder.*`, `id_head.*`, ...),
so later commands never ask the user to repeat the backbone or the crop.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtmim_cli.atomic import atomic_write
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.weights_io import load_weights_file

REQUIRED_META = ("kind", "backbone", "input_width", "embedding_size", "normalisation")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to `path` via a temporary sibling and a rename: a reader never sees half a file."""
    meta = state.get("meta")
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META):
        raise ValueError(f"checkpoint meta must hold {REQUIRED_META}, got {meta!r}")
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    state = load_weights_file(path)
    if not isinstance(state, dict) or "meta" not in state or "objective" not in state:
        raise MtmimError(f"{path}: not an mtmim checkpoint (no meta/objective)")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG the training step may draw from, in a form `weights_only` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _py_state_to_plain(s: tuple) -> list:
    version, internal, gauss_next = s
    return [version, list(internal), gauss_next]
