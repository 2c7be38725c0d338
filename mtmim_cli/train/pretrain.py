"""The library function behind `mtmim pretrain`: margin-softmax training of an encoder on
general face data (caches), optionally from released weights, with FG-NET-style validation,
on the settings train/pretrain_options.py resolves and checks (defaults, preset, options)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtmim_cli.data.dataset import CacheDataset
from mtmim_cli.models.backbones import (
    build_backbone,
    default_embedding_size,
    input_width,
    load_backbone_weights,
)
from mtmim_cli.train import distributed as D
from mtmim_cli.train.config import TrainConfig
from mtmim_cli.train.lineage import run_record, saves_checkpoints
from mtmim_cli.train.loop import TrainResult, train
from mtmim_cli.train.objectives import PretrainObjective
from mtmim_cli.train.pretrain_options import resolve_settings


def pretrain(caches: Sequence[str | os.PathLike], config: TrainConfig | dict[str, Any] | None = None,
             **options: Any) -> TrainResult:
    """Margin-softmax training of an encoder on the caches; returns the loop's result (the run
    folder holds model.pt with meta kind "pretrain").

    `config` is a TrainConfig or a flat dict of TrainConfig fields and pretraining options
    (pretrain_options.DEFAULTS: backbone, embedding_size, init, margin, s, m, val_cache,
    val_pairs, partial_fc, identities, preset); `options` override both, and a `preset`
    fills the settings neither gives. Every setting is checked before any file is read."""
    config, o = resolve_settings(config, options)
    init, backbone, embedding_size = o["init"], o["backbone"], o["embedding_size"] or None
    margin, s, m, identities = o["margin"], o["s"], o["m"], o["identities"]
    val_cache, val_pairs, partial_fc = o["val_cache"], o["val_pairs"], o["partial_fc"]
    encoder = _onnx_init(init, backbone, embedding_size)
    if encoder is not None:
        backbone, width, dim = "onnx", encoder.input_width, encoder.embedding_size
    else:
        backbone = backbone or "iresnet50"
        width = input_width(backbone)
        dim = embedding_size or default_embedding_size(backbone)
    config.extra = {"caches": [str(Path(c)) for c in caches], "backbone": backbone,
                    "embedding_size": dim, "init": str(init) if init else None, "margin": margin,
                    "s": s, "m": m, "val_cache": str(val_cache) if val_cache else None,
                    "val_pairs": val_pairs, "partial_fc": partial_fc,
                    "identities": identities, "preset": o["preset"]}
    D.init_from_env()   # before the head: Partial FC splits its centres over the ranks
    dataset = CacheDataset(caches, train=True, crop_width=width, seed=config.seed,
                           identities=identities)
    # Same seed on every rank: the initial weights agree before DDP even broadcasts them.
    torch.manual_seed(config.seed)
    if encoder is None:
        encoder = build_backbone(backbone, dim)
        if init:
            load_backbone_weights(encoder, init)
    encoder.train()
    objective = PretrainObjective(encoder, dataset.num_classes, dim, margin=margin, s=s, m=m,
                                  partial_fc=partial_fc, seed=config.seed)
    validator = None
    if val_cache:
        from mtmim_cli.train.validate import PairValidator
        validator = PairValidator(val_cache, width, n_pairs=val_pairs, seed=config.seed)
    meta = {"kind": "pretrain", "backbone": backbone, "input_width": width, "embedding_size": dim,
            "num_classes": dataset.num_classes, "margin": margin, "s": s,
            "m": objective.id_head.extra_repr(), "init": str(init) if init else ""}
    if saves_checkpoints():
        meta["trained_on"] = run_record(dataset, init)
    return train(objective, dataset, config, meta=meta, validator=validator)


def _onnx_init(init: str | os.PathLike | None, backbone: str | None,
               embedding_size: int | None):  # -> OnnxEncoder | None
    """The encoder of an ONNX --init (or of a checkpoint made from one), else None: its graph
    fixes the architecture, so --backbone may only give its input convention (onnx:SPEC)."""
    from mtmim_cli.errors import MtmimError
    from mtmim_cli.models.onnx_graph import is_onnx_path, is_onnx_spec

    if not init:
        if is_onnx_spec(backbone):
            raise MtmimError(f"--backbone {backbone}: give the ONNX file as --init")
        return None
    if not is_onnx_path(init) and not is_onnx_spec(backbone):
        from mtmim_cli.models.weights_io import load_weights_file

        meta = load_weights_file(init)
        meta = meta.get("meta") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("backbone") != "onnx":
            return None
    if backbone and not is_onnx_spec(backbone):
        raise MtmimError(f"{init}: an ONNX model fixes its own architecture; drop --backbone "
                         f"{backbone} (or give onnx:SPEC for its input)")
    from mtmim_cli.models.identity import load_identity_model

    model = load_identity_model(init, backbone)
    if model.meta["backbone"] != "onnx":
        raise MtmimError(f"{init}: not an ONNX encoder or a checkpoint made from one")
    if embedding_size and embedding_size != model.embedding_size:
        raise MtmimError(f"{init}: a {model.embedding_size}-d encoder, not {embedding_size}-d")
    return model.encoder
