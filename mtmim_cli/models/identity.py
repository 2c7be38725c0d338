"""`load_identity_model`: any supported weights file -> a model in eval mode that maps
normalised images (B, 3, 112, input_width) to identity features.

Accepted: our checkpoints (pretrain: x; finetune: x_id from the factorization unit), the shared
MobileFaceNet checkpoint (`{'epoch', 'net_state_dict'}`), a plain encoder state dict such as
insightface's `backbone.pth` (the iresnet depth is read from the keys when `backbone` is None),
and an ONNX face encoder (`*.onnx`; `backbone` may be `onnx:SPEC` for its input convention),
which becomes a trainable torch module (models/backbones/onnx_encoder.py); checkpoints made
from one carry its graph and convention.
Any of these may carry an `age_subspace` entry (written by `mtmim remove-age`): an orthonormal
basis that the model's output is then projected off (eval/age_subspace.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtmim_cli.data.dataset import NORMALISATION
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.backbones import (
    BACKBONES,
    build_backbone,
    extract_backbone_state,
    input_width,
)

_IRESNET_DEPTH = {(2, 2, 2, 2): "iresnet18", (3, 4, 6, 3): "iresnet34",
                  (3, 4, 14, 3): "iresnet50", (3, 13, 30, 3): "iresnet100"}


class IdentityModel(nn.Module):
    def __init__(self, encoder: nn.Module, meta: dict[str, Any],
                 factorize: nn.Module | None = None,
                 age_basis: torch.Tensor | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.factorize = factorize
        self.meta = meta
        self.input_width = int(meta["input_width"])
        self.embedding_size = int(meta["embedding_size"])
        self.age_basis: torch.Tensor | None
        self.register_buffer("age_basis", age_basis)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.after_encoder(self.encoder(images))

    def after_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output x to the model's output: x_id of the factorization unit, then
        the age subspace projected off (each when present)."""
        x = x if self.factorize is None else self.factorize(x)[0]
        if self.age_basis is not None:
            b = self.age_basis.to(x.dtype)
            x = x - (x @ b) @ b.T
        return x

    def encoder_view(self) -> nn.Module:
        """The encoder alone (x, before the factorization unit), carrying this model's input
        width, so feature extraction cuts the crop the encoder was built for."""
        return _WidthView(self.encoder, self.input_width, self.meta.get("frozen_through"))


class _WidthView(nn.Module):
    """`module` with an `input_width` attribute, as `extract_views` reads it, and what the
    shared-trunk extraction reads (eval/trunk_memo.py): `encoder`, `after_encoder`, and the
    stage its model froze through."""

    def __init__(self, module: nn.Module, input_width: int,
                 frozen_through: str | None = None) -> None:
        super().__init__()
        self.module = module
        self.input_width = int(input_width)
        self.meta = {"frozen_through": frozen_through}
        # A new nn.Module is in training mode; a view must not switch the encoder it wraps to
        # training mode when a caller restores the view's mode (extract_views does).
        self.train(module.training)

    @property
    def encoder(self) -> nn.Module:
        return self.module

    def after_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


def _guess_backbone(state: dict, path: Path) -> str:
    if "linear7.conv.weight" in state:
        return "mobilefacenet"
    if "layer1.0.bn1.weight" in state and "prelu.weight" in state:
        counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
                       for i in range(1, 5))
        if counts in _IRESNET_DEPTH:
            return _IRESNET_DEPTH[counts]
    raise MtmimError(f"{path}: cannot tell the backbone from the weights; pass it "
                     f"(one of {', '.join(BACKBONES)})")


def _embedding_size(state: dict, name: str) -> int:
    key = "linear1.conv.weight" if name == "mobilefacenet" else "fc.weight"
    if key not in state:
        raise MtmimError(f"weights do not fit backbone {name} (no {key})")
    return int(state[key].shape[0])


def _load_strict(module: nn.Module, state: dict, path: Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise MtmimError(f"{path}: {what} weights do not fit ({first})") from None


def load_identity_model(path: str | os.PathLike, backbone: str | None = None) -> IdentityModel:
    from mtmim_cli.models.onnx_graph import is_onnx_path, is_onnx_spec, parse_spec
    from mtmim_cli.models.weights_io import load_weights_file

    path = Path(path)
    obj = load_weights_file(path, backbone)
    if isinstance(obj, dict) and "meta" in obj and "objective" in obj:
        meta = dict(obj["meta"])
        name = meta["backbone"]
        if name == "onnx" and is_onnx_spec(backbone) and parse_spec(backbone) and not is_onnx_path(path):
            raise MtmimError(f"{path}: records its own input convention; --backbone "
                             f"{backbone} applies to .onnx files only")
        if backbone and backbone != name and not (name == "onnx" and is_onnx_spec(backbone)):
            raise MtmimError(f"{path}: a {name} checkpoint, not {backbone}")
    else:
        meta = {}
        name = backbone
        if is_onnx_spec(backbone):
            raise MtmimError(f"{path}: --backbone {backbone} is for .onnx files; this is not one")
    state = extract_backbone_state(obj, path)
    name = name or _guess_backbone(state, path)
    if name == "onnx":
        from mtmim_cli.models.backbones.onnx_encoder import encoder_from_state

        encoder = encoder_from_state(state, str(path))
        dim = encoder.embedding_size
    else:
        dim = _embedding_size(state, name)
        encoder = build_backbone(name, dim)
        _load_strict(encoder, state, path, name)
    factorize = None
    if meta.get("kind") == "finetune":
        from mtmim_cli.models.factorize import FactorizationUnit  # developer C's module

        factorize = FactorizationUnit(int(meta["factorize_dim"]))
        fstate = {k[len("factorize."):]: v for k, v in obj["objective"].items()
                  if k.startswith("factorize.")}
        _load_strict(factorize, fstate, path, "factorization unit")
    if not meta:
        meta = {"kind": "external", "source": str(path)}
    width = encoder.input_width if name == "onnx" else input_width(name)
    meta = {**meta, "backbone": name, "input_width": meta.get("input_width", width),
            "embedding_size": dim, "normalisation": meta.get("normalisation", NORMALISATION)}
    if name == "onnx":
        meta["onnx"] = encoder.describe()
    basis = _age_basis(obj, dim, path)
    if basis is not None:
        meta["age_subspace"] = {k: v for k, v in obj["age_subspace"].items() if k != "basis"}
    return IdentityModel(encoder, meta, factorize, basis).eval()


def _age_basis(obj: Any, dim: int, path: Path) -> torch.Tensor | None:
    entry = obj.get("age_subspace") if isinstance(obj, dict) else None
    if entry is None:
        return None
    basis = entry.get("basis") if isinstance(entry, dict) else None
    if not isinstance(basis, torch.Tensor) or basis.ndim != 2 or basis.shape[0] != dim:
        raise MtmimError(f"{path}: its age_subspace entry is not a ({dim}, k) basis")
    if not torch.isfinite(basis).all():
        raise MtmimError(f"{path}: its age_subspace basis holds non-finite values")
    return basis.to(torch.float32)
