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
from mtmim_cli.eval.flip import check_flip
from mtmim_cli.eval.trunk_memo import shared_views
from mtmim_cli.eval.views import forward_views, read_images
from mtmim_cli.progress import make_progress


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def combine_views(feats: np.ndarray, feats_flip: np.ndarray | None, flip: str) -> np.ndarray:
    """Join the image and mirror features as `flip` says, then L2-normalise (float32)."""
    check_flip(flip)
    if flip == "none":
        return l2_normalise(feats)
    if feats_flip is None:
        raise ValueError(f"flip={flip!r} needs the mirror features")
    if flip == "concat":
        return l2_normalise(np.concatenate([feats, feats_flip], axis=1))
    return l2_normalise(np.asarray(feats, np.float64) + feats_flip)


def _image_batches(source: Cache | np.ndarray, indices: np.ndarray, batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield read_images(source, indices[start:start + batch_size])


# Rows (images and mirrors together) per forward pass on the CPU: as many as keep the
# largest activation of the pass under ROW_BUDGET bytes. Past that the convolutions stream
# their activations through memory instead of cache: on 2 cores (bench/extract_speed.py)
# SFace (3.2 MB per row, 112x112x64) ran 54 / 51 / 28 / 18 img/s at 32 / 64 / 128 / 256 rows
# and MobileFaceNet (1.4 MB) 143 / 163 / 156 / 78 img/s.
ROW_BUDGET = 128 << 20
MIN_ROWS, MAX_ROWS, DEVICE_ROWS = 8, 256, 256


def _peak_row_bytes(model: torch.nn.Module, width: int) -> int:
    """Bytes of the largest output of any leaf module for one input row (one forward pass)."""
    peak = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal peak
        if isinstance(output, torch.Tensor):
            peak = max(peak, output.numel() * output.element_size())

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        model(torch.zeros(1, 3, 112, width))
    finally:
        for h in handles:
            h.remove()
    return max(peak, 1)


def rows_per_pass(model: torch.nn.Module, width: int, device: str | torch.device) -> int:
    """How many rows one forward pass takes when the caller does not say (see ROW_BUDGET);
    on an accelerator a fixed large batch. The model must be in eval mode."""
    if torch.device(device).type != "cpu":
        return DEVICE_ROWS
    memo = model.__dict__.setdefault("_mtmim_row_bytes", {})
    if width not in memo:   # a model's shapes do not change, so it is probed once per width
        memo[width] = _peak_row_bytes(model, width)
    rows = MIN_ROWS
    while rows * 2 <= MAX_ROWS and rows * 2 * memo[width] <= ROW_BUDGET:
        rows *= 2
    return rows


def images_per_pass(model: torch.nn.Module, width: int, device: str | torch.device,
                    mirror: bool, batch_size: int | None) -> int:
    """Images per forward pass: `batch_size` when given, else as many as `rows_per_pass`
    holds with the mirror of each image in the same pass."""
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        return int(batch_size)
    return max(1, rows_per_pass(model, width, device) // (2 if mirror else 1))


@torch.no_grad()
def extract_views(model: torch.nn.Module, source: Cache | np.ndarray,
                  indices: Sequence[int] | np.ndarray | None = None, *, mirror: bool = True,
                  batch_size: int | None = None, device: str | torch.device = "cpu",
                  progress: bool = False, description: str = "features"
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw model outputs (float32, not normalised) for the image and, when `mirror`, its
    horizontal flip. `source` is a Cache or a uint8 (N,112,112,3) array; `model` must take
    the crop width in its `input_width` attribute (default 112). `batch_size` is images per
    forward pass (None: sized to the model, `images_per_pass`)."""
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
    batch_size = images_per_pass(model, width, device, mirror, batch_size)
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
            y, y_flip = forward_views(model, x, mirror)
            out.append(y.float().cpu().numpy())
            if mirror:
                out_flip.append(y_flip.float().cpu().numpy())
            bar.advance(task, len(images))
    model.train(was_training)
    dim = int(out[0].shape[1]) if out else 0
    feats = np.concatenate(out) if out else np.zeros((0, dim), np.float32)
    flipped = (np.concatenate(out_flip) if out_flip else np.zeros((0, dim), np.float32)) \
        if mirror else None
    return feats.astype(np.float32), (flipped.astype(np.float32) if flipped is not None else None)


def extract_features(model: torch.nn.Module, cache: Cache | np.ndarray,
                     indices: Sequence[int] | np.ndarray | None = None, flip: str = "concat",
                     batch_size: int | None = None, *, device: str | torch.device = "cpu",
                     progress: bool = False) -> np.ndarray:
    """L2-normalised float32 identity features (image and mirror combined as `flip` says)."""
    check_flip(flip)
    f, ff = extract_views(model, cache, indices, mirror=flip != "none", batch_size=batch_size,
                          device=device, progress=progress)
    return combine_views(f, ff, flip)
