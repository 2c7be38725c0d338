"""The run's DataLoader (persistent workers, the epoch carried with the indices), gradient
accumulation, warm-up in epochs and the arcface preset."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mtmim_cli.data.dataset import CacheDataset
from mtmim_cli.train.config import TrainConfig
from mtmim_cli.train.loader import TrainLoader, default_workers
from mtmim_cli.train.loop import EpochSampler, lr_factor, train
from mtmim_cli.train.objectives import PretrainObjective
from tests.conftest import run_cli, write_cache


class _Probe(Dataset):
    """Items tell which epoch the reading process had set and which process read them."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        return torch.tensor([i, self.epoch, os.getpid()])


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_persist_and_see_each_epoch(workers: int) -> None:
    ds = _Probe(24)
    sampler = EpochSampler(24, 8, 1, 0, seed=3)
    loader = TrainLoader(ds, sampler, 8, workers, pin_memory=False, seed=0)
    try:
        seen, pids = [], set()
        for epoch, start in ((0, 0), (1, 8), (2, 0)):
            got = torch.cat(list(loader.epoch(epoch, start)))
            sampler.set_epoch(epoch, start)
            assert got[:, 0].tolist() == list(sampler)              # order: the sampler's
            assert set(got[:, 1].tolist()) == {epoch}               # each batch knew its epoch
            pids |= set(got[:, 2].tolist())
            seen.append(got)
        assert len(pids) == max(1, workers)     # the same worker processes every epoch
        if workers:
            assert os.getpid() not in pids
    finally:
        loader.close()


def test_default_workers(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers() == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_workers() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == 8


class _Plain(PretrainObjective):
    """No BatchNorm, so micro-batches change nothing but the summation order."""

    def __init__(self, num_classes: int) -> None:
        torch.manual_seed(0)
        enc = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 14 * 14, 16))
        super().__init__(enc, num_classes, 16, s=16.0)


def test_accumulate_equals_the_whole_batch(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", [f"id{k}" for k in range(4) for _ in range(8)])
    weights = []
    for acc in (1, 2, 4):
        ds = CacheDataset([cache], train=True, seed=0)
        obj = _Plain(ds.num_classes)
        cfg = TrainConfig(out=str(tmp_path / f"a{acc}"), epochs=2, batch_size=8, optimizer="sgd",
                          lr=0.05, schedule="constant", accumulate=acc, workers=0, progress=False)
        res = train(obj, ds, cfg, meta={"kind": "pretrain", "backbone": "x", "input_width": 112,
                                        "embedding_size": 16})
        assert res.steps == 8
        weights.append({k: v.clone() for k, v in obj.state_dict().items()})
    for other in weights[1:]:
        for k, v in weights[0].items():
            torch.testing.assert_close(other[k], v, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="--accumulate 3"):
        train(_Plain(4), CacheDataset([cache], train=True),
              TrainConfig(out=str(tmp_path / "bad"), batch_size=8, accumulate=3, progress=False),
              meta={"kind": "pretrain", "backbone": "x", "input_width": 112, "embedding_size": 16})


def test_warmup_in_epochs() -> None:
    cfg = TrainConfig(schedule="poly", warmup_epochs=2)
    # 10 steps an epoch: 20 warm-up steps, then (1 - p)^2 to 0 at step 100
    assert lr_factor(cfg, 0, 100, warmup=20) == pytest.approx(1 / 20)
    assert lr_factor(cfg, 19, 100, warmup=20) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 100, warmup=20) == pytest.approx((1 - 40 / 80) ** 2)
    assert lr_factor(cfg, 99, 100, warmup=20) == pytest.approx((1 - 79 / 80) ** 2)


@pytest.mark.slow
def test_arcface_preset_fills_only_options_not_given(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c.h5", [f"id{k}" for k in range(4) for _ in range(8)])
    r = run_cli("pretrain", str(cache), "--backbone", "tiny", "--batch-size", "16",
                "--max-steps", "1", "--preset", "arcface", "--epochs", "3", "--workers", "0",
                "--no-progress", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["optimizer"], cfg["momentum"], cfg["weight_decay"]) == ("sgd", 0.9, 5e-4)
    assert math.isclose(cfg["lr"], 0.1 * 16 / 512)
    assert (cfg["schedule"], cfg["poly_power"], cfg["warmup_epochs"]) == ("poly", 2.0, 2.0)
    assert (cfg["clip_grad"], cfg["epochs"]) == (5.0, 3)        # --epochs given: it wins
    assert cfg["extra"]["m"] == 0.5 and cfg["extra"]["preset"] == "arcface"
    r = run_cli("pretrain", str(cache), "--preset", "insightface", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--preset insightface" in r.stderr
    assert np.isfinite(float((tmp_path / "r" / "metrics.csv").read_text().splitlines()[1].split(",")[2]))
