"""Feature extraction: mirror views, concat/sum/none, L2 norm, batch-size invariance, crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtmim_cli.data.cache import Cache
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.features import combine_views, extract_features, extract_views


class _Linear(nn.Module):
    """A deterministic 'model': a fixed linear map of the pixels, recording input shapes."""

    def __init__(self, width: int, dim: int = 8) -> None:
        super().__init__()
        self.input_width = width
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3 * 112 * width, dim, generator=g) / 100)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return x.flatten(1) @ self.w


def _reference(model: _Linear, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    off = (112 - model.input_width) // 2
    crop = images[:, :, off:off + model.input_width].astype(np.float64)
    x = (crop - 127.5) / 128.0
    xf = x[:, :, ::-1]  # mirror of the crop
    w = model.w.detach().double().numpy()
    to_nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2)).reshape(len(a), -1)  # noqa: E731
    return to_nchw(x) @ w, to_nchw(xf) @ w


@pytest.mark.parametrize("width", [112, 96])
def test_views_and_modes_against_numpy(tiny_cache: Path, width: int) -> None:
    cache = Cache(tiny_cache)
    model = _Linear(width)
    idx = np.array([5, 0, 17, 3, 40])
    f_ref, ff_ref = _reference(model, cache.images(idx))
    f, ff = extract_views(model, cache, idx, batch_size=2)
    assert model.shapes[0][1:] == (3, 112, width)
    np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ff, ff_ref, rtol=1e-4, atol=1e-4)

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    cat = extract_features(model, cache, idx, flip="concat", batch_size=3)
    np.testing.assert_allclose(cat, unit(np.c_[f_ref, ff_ref]), atol=1e-5)
    summed = extract_features(model, cache, idx, flip="sum", batch_size=64)
    np.testing.assert_allclose(summed, unit(f_ref + ff_ref), atol=1e-5)
    plain = extract_features(model, cache, idx, flip="none")
    np.testing.assert_allclose(plain, unit(f_ref), atol=1e-5)
    assert cat.dtype == np.float32 and cat.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(cat, axis=1), 1.0, atol=1e-6)


def test_array_source_and_bad_mode() -> None:
    model = _Linear(112)
    imgs = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    f, _ = extract_views(model, imgs, mirror=False)
    assert f.shape == (4, 8)
    with pytest.raises(ValueError):
        combine_views(f, None, "concat")
    with pytest.raises(MtmimError, match="^--flip mean: choose from concat, sum, none$"):
        extract_features(model, imgs, flip="mean")


class _Wide(nn.Module):
    """A conv to `channels` maps at full resolution: its largest activation is known."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.input_width = 112
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return self.conv(x).mean(dim=(2, 3))


@pytest.mark.parametrize("channels", [1, 16, 64])
def test_rows_per_pass_is_the_largest_power_of_two_under_the_budget(channels: int) -> None:
    from mtmim_cli.eval import features as F

    model = _Wide(channels).eval()
    row = channels * 112 * 112 * 4   # float32 conv output for one row
    want = max(r for r in (2 ** k for k in range(3, 9))
               if r == F.MIN_ROWS or r * row <= F.ROW_BUDGET)
    assert F.rows_per_pass(model, 112, "cpu") == want
    assert F.rows_per_pass(model, 112, "cuda") == F.DEVICE_ROWS
    assert F.images_per_pass(model, 112, "cpu", True, None) == want // 2
    assert F.images_per_pass(model, 112, "cpu", False, 7) == 7
    with pytest.raises(ValueError):
        F.images_per_pass(model, 112, "cpu", True, 0)


def test_mirror_runs_in_the_same_pass_and_batching_changes_nothing(tiny_cache: Path,
                                                                    monkeypatch) -> None:
    from mtmim_cli.eval import features as F

    cache = Cache(tiny_cache)
    idx = np.arange(len(cache))[:21]
    model = _Wide(8)
    one = extract_views(model, cache, idx, batch_size=1)
    # a budget of 8 rows of this model: passes of 4 images and their 4 mirrors
    monkeypatch.setattr(F, "ROW_BUDGET", 8 * 8 * 112 * 112 * 4)
    model.calls.clear()
    auto = extract_views(model, cache, idx)
    assert model.calls == [1] + [8] * 5 + [2]   # the probe row, then image + mirror rows
    for a, b in zip(one, auto, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        x = torch.from_numpy((cache.images(idx[:3]).astype(np.float32) - 127.5) / 128.0)
        x = x.permute(0, 3, 1, 2)
        flipped = model(torch.flip(x, dims=[3])).numpy()
    np.testing.assert_allclose(auto[1][:3], flipped, rtol=1e-5, atol=1e-6)
