"""`evaluate --refit full` and finetune's `exclude`: each round's held-out images never reach
its training batches. Real rounds (tiny backbone, tiny cache); every image read that feeds a
batch is logged where the dataset reads pixels (`Cache.image`), per round."""

from __future__ import annotations

from pathlib import Path

import pytest

import mtmim_cli.train.finetune as FT
from mtmim_cli.data.cache import Cache
from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.orchestration.evaluate import evaluate
from tests.conftest import write_cache
from tests.test_finetune import save_tiny_pretrain

N_IDS, PER_ID, FOLDS = 4, 4, 4


@pytest.mark.slow
def test_refit_full_rounds_never_train_on_their_held_out_images(tmp_path: Path,
                                                                monkeypatch) -> None:
    ids = [f"s{k}" for k in range(N_IDS) for _ in range(PER_ID)]
    cache = write_cache(tmp_path / "f.h5", ids, [float(5 * j + k) for k in range(N_IDS)
                                                 for j in range(PER_ID)], seed=3)
    _, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=0)
    n = N_IDS * PER_ID

    rounds: list[dict] = []   # per finetune call: its `exclude` and the records it read
    bulk = []                 # inside Cache.images (feature extraction, digests): not batches
    image, images, finetune = Cache.image, Cache.images, FT.finetune

    def logged_image(self, i):
        if rounds and not bulk:
            rounds[-1]["read"].append(int(i))
        return image(self, i)

    def bulk_images(self, indices):
        bulk.append(1)
        try:
            return images(self, indices)
        finally:
            bulk.pop()

    def logged_finetune(caches, init_, config=None, **options):
        rounds.append({"exclude": list((config or {}).get("exclude") or []), "read": []})
        return finetune(caches, init_, config, **options)

    monkeypatch.setattr(Cache, "image", logged_image)
    monkeypatch.setattr(Cache, "images", bulk_images)
    monkeypatch.setattr(FT, "finetune", logged_finetune)
    # workers 0: batches are read in this process, where the reads are logged
    opts = {"epochs": 1, "batch_size": 4, "age_groups": 2, "mode": "baseline", "workers": 0}
    got = evaluate(EvalConfig(protocol="fgnet-loo", models=[ModelArg("tiny", init)],
                              cache=cache, refit="full", folds=FOLDS, refit_options=opts,
                              rounds_dir=tmp_path / "rounds"), progress=False)
    assert got["results"][0]["metrics"]["rounds"] == FOLDS

    held_sets = [sorted(h.tolist()) for h in P.loo_rounds(n, FOLDS, 0)]
    assert [r["exclude"] for r in rounds] == held_sets   # each round is told its held images
    assert sorted(sum(held_sets, [])) == list(range(n))  # every image is held out once
    for r in rounds:
        read = set(r["read"])
        assert read and not read & set(r["exclude"]), r
        # an epoch of batches of 4: every image the round may train on is trained on
        assert read == set(range(n)) - set(r["exclude"]), r
    # the guard is live: without `exclude` the same run reads the held images
    rounds.clear()
    FT.finetune([cache], init, {"out": str(tmp_path / "all"), "progress": False, **opts})
    assert set(rounds[0]["read"]) == set(range(n))
