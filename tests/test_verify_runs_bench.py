"""bench/verify_runs.py: its brute-force k-fold against `metrics.tenfold_verification`, and a
whole run on a small release-shaped cache with fixed pooling models: the printed figures
against evaluate's and against plain computations."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtmim_cli.eval.metrics import tenfold_verification
from tests.conftest import Pool
from tests.test_cacd_vs import _release_cache, pool_models  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("verify_runs", REPO / "bench" / "verify_runs.py")
VR = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(VR)


def test_brute_force_kfold_is_the_library_rule_and_the_other_placement_differs() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = 80
        same = rng.random(n) < 0.5
        scores = np.round(rng.normal(same * 1.0, 1.0), 1)   # many ties
        fold = rng.integers(1, 5, n)
        ref = tenfold_verification(scores, same, fold)
        acc, sd = VR.brute_force_kfold(scores, same, fold)
        assert acc == pytest.approx(ref["accuracy"]) and sd == pytest.approx(ref["std"])
    # training gap 0.2 .. 0.6: a test impostor at 0.5 is accepted midway (0.4), rejected at 0.6
    scores = np.array([0.1, 0.2, 0.6, 0.9, 0.5, 0.95])
    same = np.array([False, False, True, True, False, True])
    fold = np.array([1, 1, 1, 1, 2, 2])
    assert VR.brute_force_kfold(scores, same, fold)[0] != \
        VR.brute_force_kfold(scores, same, fold, at_score=True)[0]


def test_a_run_prints_evaluates_figures_and_paired_differences(
        tmp_path: Path, pool_models: dict, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture) -> None:
    pairs = [p for f in range(3) for p in (*range(400 * f, 400 * f + 6),
                                            *range(400 * f + 200, 400 * f + 206))]
    cache = _release_cache(tmp_path / "c.h5", pairs)
    runs = tmp_path / "runs"
    for name, k in (("coarse-s0", 16), ("coarse-s1", 14), ("fine-s0", 4), ("skipped-s0", 2)):
        (runs / name).mkdir(parents=True)
        torch.save(Pool(k).state_dict(), runs / name / "model.pt")
    out = tmp_path / "eval" / "results.md"
    monkeypatch.setattr(sys, "argv", ["verify_runs.py", "--cache", str(cache), "--runs",
                                      str(runs), "--settings", "coarse,fine", "--init",
                                      str(pool_models["pool8"]), "--out", str(out),
                                      "--resamples", "300"])
    VR.main()
    text = capsys.readouterr().out
    results = {r["model"]: r["metrics"] for r in json.loads(out.with_suffix(".json").read_text())
               ["results"]}
    assert list(results) == ["init", "coarse@s0", "coarse@s1", "fine@s0"]
    outcomes = json.loads((out.parent / "results.outcomes.json").read_text())["models"]
    init = np.array(outcomes["init"]["correct"], float)
    for label, m in results.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert f"{100 * m['accuracy']:.2f} ± {100 * m['std']:.2f}" in row
        if label != "init":
            diff = np.mean(outcomes[label]["correct"]) - init.mean()
            assert f"{100 * diff:+.2f} [" in row
    coarse = np.mean([results["coarse@s0"]["accuracy"], results["coarse@s1"]["accuracy"]])
    row = next(line for line in text.splitlines() if line.startswith("| coarse | 2 |"))
    assert f"{100 * coarse:.2f} ± " in row
    assert "Published rows beside it: no (3 of the release's 10 folds" in text
    assert f"brute-force k-fold over its scores {100 * results['init']['accuracy']:.2f}" in text
