"""Identity features for evaluation: image and mirror through the model, combined, L2-normalised.

`flip='concat'` (the paper) puts the two views side by side, `'sum'` adds them, `'none'`
uses the image alone. The views are combined before normalising (insightface's practice), so
a view with a larger norm weighs more; each view is the model's raw output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mtmim_cli.allocator import reuse_freed_memory
from mtmim_cli.data.cache import Cache
from mtmim_cli.data.dataset import preprocess
from mtmim_cli.progress import make_progress

FLIP_MODES = ("concat", "sum", "none")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def combine_views(feats: np.ndarray, feats_flip: np.ndarray | None, flip: str) -> np.ndarray:
    """Join the image and mirror features as `flip` says, then L2-normalise (float32)."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    if flip == "none":
        return l2_normalise(feats)
    if feats_flip is None:
        raise ValueError(f"flip={flip!r} needs the mirror features")
    if flip == "concat":
        return l2_normalise(np.concatenate([feats, feats_flip], axis=1))
    return l2_normalise(np.asarray(feats, np.float64) + feats_flip)


def _image_batches(source: Cache | np.ndarray, indices: np.ndarray, batch_size: int):
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        if isinstance(source, Cache):
            yield source.images(idx)
        else:
            yield np.asarray(source[idx])


@torch.no_grad()
def extract_views(model: torch.nn.Module, source: Cache | np.ndarray,
                  indices: Sequence[int] | np.ndarray | None = None, *, mirror: bool = True,
                  batch_size: int = 128, device: str | torch.device = "cpu",
                  progress: bool = False, description: str = "features"
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw model outputs (float32, not normalised) for the image and, when `mirror`, its
    horizontal flip. `source` is a Cache or a uint8 (N,112,112,3) array; `model` must take
    the crop width in its `input_width` attribute (default 112)."""
    if indices is None:
        n = len(source)
        indices = np.arange(n)
    indices = np.asarray(indices, dtype=np.int64)
    width = int(getattr(model, "input_width", 112))
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        reuse_freed_memory()  # else every batch page-faults its activations in again
    was_training = model.training
    model.eval()
    from mtmim_cli.eval.trunk_memo import shared_views

    shared = shared_views(model, source, indices, mirror=mirror, width=width,
                          batch_size=batch_size, device=device, progress=progress,
                          description=description)
    if shared is not None:
        model.train(was_training)
        return shared
    out, out_flip = [], []
    with make_progress("img", transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=len(indices))
        for images in _image_batches(source, indices, batch_size):
            x = preprocess(images, width).to(device)
            if on_cpu:
                # oneDNN's CPU convolutions run ~15% faster on channels-last tensors here
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu().numpy())
            if mirror:
                # The crop is symmetric, so flipping the crop equals cropping the flip.
                out_flip.append(model(torch.flip(x, dims=[3])).float().cpu().numpy())
            bar.advance(task, len(images))
    model.train(was_training)
    dim = int(out[0].shape[1]) if out else 0
    feats = np.concatenate(out) if out else np.zeros((0, dim), np.float32)
    flipped = (np.concatenate(out_flip) if out_flip else np.zeros((0, dim), np.float32)) \
        if mirror else None
    return feats.astype(np.float32), (flipped.astype(np.float32) if flipped is not None else None)


def extract_features(model: torch.nn.Module, cache: Cache | np.ndarray,
                     indices: Sequence[int] | np.ndarray | None = None, flip: str = "concat",
                     batch_size: int = 128, *, device: str | torch.device = "cpu",
                     progress: bool = False) -> np.ndarray:
    """L2-normalised float32 identity features (image and mirror combined as `flip` says)."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    f, ff = extract_views(model, cache, indices, mirror=flip != "none", batch_size=batch_size,
                          device=device, progress=progress)
    return combine_views(f, ff, flip)
