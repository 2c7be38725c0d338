"""A model on images and their mirrors: the forward pass and the image reads that both the
plain extraction (eval/features.py) and the shared-trunk one (eval/trunk_memo.py) make.
Kept under both, so that features.py imports trunk_memo.py and never the other way round."""

from __future__ import annotations

import numpy as np
import torch

from mtmim_cli.data.cache import Cache


def forward_views(model, x: torch.Tensor, mirror: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`model` on the image rows and, when `mirror`, their horizontal flips, in one pass (one
    pass of 2B rows runs faster than two of B). The crop is symmetric, so flipping the
    crop equals cropping the flip."""
    if not mirror:
        return model(x), None
    y = model(torch.cat([x, torch.flip(x, dims=[3])]))
    return y[:len(x)], y[len(x):]


def read_images(source: Cache | np.ndarray, idx: np.ndarray) -> np.ndarray:
    """uint8 (n,112,112,3) images `idx` of a Cache or an array, in the given order."""
    return source.images(idx) if isinstance(source, Cache) else np.asarray(source[idx])
