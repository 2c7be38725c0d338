"""Reading weight files (checkpoints, state dicts, ONNX models): `torch.load` with
`weights_only=True`, so no file runs code, and a missing or unreadable file is a one-line
MtmimError. It sits in the models layer because models load released weights; training writes
its checkpoints through `mtmim_cli.train.checkpoint`, which reads them back through here.

An ONNX file (`*.onnx`) reads as the checkpoint of an external encoder: `meta` (kind
"external", backbone "onnx", its input size, embedding size and input convention) and
`objective` holding the converted encoder's state (`encoder.*`, the graph included), so every
command that takes a checkpoint takes it (models/backbones/onnx_encoder.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mtmim_cli.errors import MtmimError

_ONNX_CACHE: dict[tuple, dict] = {}


def load_weights_file(path: str | os.PathLike, backbone: str | None = None) -> Any:
    """`torch.load` with `weights_only=True` on the CPU; a missing or unreadable file (or one
    that would run code) is the user's input, so it becomes a one-line MtmimError. An ONNX
    file is converted (`backbone` may be `onnx:SPEC` to give its input convention)."""
    from mtmim_cli.models.onnx_graph import is_onnx_path

    path = Path(path)
    if not path.exists():
        raise MtmimError(f"{path}: no such file")
    if is_onnx_path(path):
        return onnx_checkpoint(path, backbone)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's input
        raise MtmimError(f"{path}: cannot read weights ({str(exc).splitlines()[0]})") from None


def onnx_checkpoint(path: str | os.PathLike, backbone: str | None = None) -> dict:
    """The ONNX file as an external checkpoint (see the module docstring). Converting takes
    seconds, so one process converts a file once (keyed by its size, mtime and the spec)."""
    from mtmim_cli.data.dataset import NORMALISATION
    from mtmim_cli.models.backbones.onnx_encoder import load_onnx_encoder

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, backbone or "")
    if key not in _ONNX_CACHE:
        enc = load_onnx_encoder(path, backbone)
        meta = {"kind": "external", "source": str(path), "backbone": "onnx",
                "input_width": enc.input_width, "embedding_size": enc.embedding_size,
                "normalisation": NORMALISATION, "onnx": enc.describe()}
        _ONNX_CACHE.clear()   # one model at a time is what commands load
        _ONNX_CACHE[key] = {"meta": meta,
                            "objective": {f"encoder.{k}": v for k, v in enc.state_dict().items()}}
    hit = _ONNX_CACHE[key]
    return {"meta": dict(hit["meta"]), "objective": dict(hit["objective"])}
