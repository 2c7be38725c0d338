"""Shared-trunk extraction (eval/trunk_memo.py): models fine-tuned with a frozen trunk give
the features of their own full forward pass, the trunk runs once for all of them, and a
model whose trunk differs never reads another's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtmim_cli.data.cache import Cache
from mtmim_cli.eval import trunk_memo
from mtmim_cli.eval.features import extract_views
from mtmim_cli.models.identity import load_identity_model
from tests.conftest import write_cache


@pytest.fixture
def tuned(tmp_path: Path):
    """A tiny encoder checkpoint and two fine-tunes of it (two seeds) with its trunk frozen."""
    from mtmim_cli.train.finetune import finetune

    ids = [f"id{k}" for k in range(6) for _ in range(4)]
    ages = [float(3 + 11 * j + k) for k in range(6) for j in range(4)]
    cache = write_cache(tmp_path / "c.h5", ids, ages, seed=1)
    base = {"backbone": "tiny", "age_groups": 2, "batch_size": 8, "epochs": 1, "lr": 1e-2,
            "progress": False}
    init = finetune([cache], None, {**base, "out": str(tmp_path / "init"), "mode": "baseline"})
    runs = [finetune([cache], init / "model.pt",
                     {**base, "out": str(tmp_path / f"t{s}"), "seed": s, "mode": "mtmim",
                      "freeze_through": "last:2", "freeze_bn": "all"}) for s in (0, 1)]
    return cache, init / "model.pt", [r / "model.pt" for r in runs]


def _count_first_stage(model) -> list[int]:
    calls = [0]
    first = model.encoder.stages()[0][1]
    first.register_forward_hook(lambda m, i, o: calls.__setitem__(0, calls[0] + len(o)))
    return calls


def test_shared_trunk_equals_the_full_pass_and_runs_once(tuned, monkeypatch) -> None:
    cache_path, init_path, runs = tuned
    cache = Cache(cache_path)
    idx = np.arange(len(cache))
    models = [load_identity_model(p) for p in runs]
    assert models[0].meta["frozen_through"] == models[0].encoder.stages()[-3][0]
    monkeypatch.setenv("MTMIM_TRUNK_MEMO_MB", "0")
    full = [extract_views(m, cache, idx, batch_size=5) for m in models]
    monkeypatch.setenv("MTMIM_TRUNK_MEMO_MB", "64")
    trunk_memo.clear()
    counts = [_count_first_stage(m) for m in models]
    shared = [extract_views(m, cache, idx, batch_size=5) for m in models]
    # the first model ran its trunk on both views; the second ran none of it
    assert counts[0][0] == 2 * len(idx) and counts[1][0] == 0
    for (a, b), (c, d) in zip(full, shared, strict=True):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d, b, rtol=1e-5, atol=1e-5)
    # the two fine-tunes differ (their tails trained), so sharing did not merge them
    assert np.abs(shared[0][0] - shared[1][0]).max() > 1e-4
    # the init, evaluated afterwards, shares the kept trunk too; its encoder view as well
    init = load_identity_model(init_path)
    n = _count_first_stage(init)
    got = extract_views(init, cache, idx, batch_size=5)
    assert n[0] == 0
    monkeypatch.setenv("MTMIM_TRUNK_MEMO_MB", "0")
    want = extract_views(init, cache, idx, batch_size=5)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_a_different_trunk_never_reads_the_kept_one(tuned, monkeypatch) -> None:
    cache_path, _, runs = tuned
    cache = Cache(cache_path)
    idx = np.arange(len(cache))
    monkeypatch.setenv("MTMIM_TRUNK_MEMO_MB", "64")
    trunk_memo.clear()
    a = load_identity_model(runs[0])
    extract_views(a, cache, idx, mirror=False)
    b = load_identity_model(runs[1])
    with torch.no_grad():
        first = b.encoder.stages()[0][1]
        for p in first.parameters():
            p.add_(0.05)
    calls = _count_first_stage(b)
    got, _ = extract_views(b, cache, idx, mirror=False)
    assert calls[0] > 0          # its own trunk ran (in full or as a new kept trunk)
    monkeypatch.setenv("MTMIM_TRUNK_MEMO_MB", "0")
    want, _ = extract_views(b, cache, idx, mirror=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_entry_over_the_limit_is_not_kept(tuned, monkeypatch) -> None:
    cache_path, _, runs = tuned
    cache = Cache(cache_path)
    monkeypatch.setenv("MTMIM_TRUNK_MEMO_MB", "0.001")
    trunk_memo.clear()
    m = load_identity_model(runs[0])
    extract_views(m, cache, np.arange(len(cache)))
    assert not trunk_memo._MEMO
