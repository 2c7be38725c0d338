"""`make demo`'s chain at test size: synth -> align -> groups -> pretrain -> finetune x3 ->
evaluate -> calibrate/verify/export -> report, all real, in one subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtmim_cli.data.cache import Cache
from tests.conftest import REPO


def _features(model_path: Path, images: np.ndarray) -> np.ndarray:
    """Image and mirror through the model, concatenated, L2-normalised: plain torch."""
    from mtmim_cli.models.identity import load_identity_model

    model = load_identity_model(model_path)
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float()
    off = (112 - model.input_width) // 2
    x = (x[..., off:off + model.input_width] - 127.5) / 128
    with torch.no_grad():
        f = torch.cat([model(x), model(torch.flip(x, dims=[3]))], 1).double().numpy()
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _loo_rank1(feats: np.ndarray, identity: np.ndarray) -> float:
    """Each image against all the others: is the most similar one (lowest index on a tie)
    the same person?"""
    hits = 0
    for i in range(len(feats)):
        scores = [(-float(feats[i] @ feats[j]), j) for j in range(len(feats)) if j != i]
        hits += identity[min(scores)[1]] == identity[i]
    return hits / len(feats)


@pytest.mark.slow
def test_demo_chain_small(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--size", "small",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = out / "report" / "report.md"
    assert res.stdout.strip().splitlines()[-1] == f"report: {report}"
    text = report.read_text()
    for fig in ("training_curves.png", "club.png", "projection.png", "cmc.png", "roc.png"):
        assert f"]({fig})" in text and (out / "report" / fig).stat().st_size > 10_000, fig
    for mode in ("baseline", "age", "mtmim"):
        assert f"| {mode} |" in text
        assert (out / "runs" / mode / "model.pt").is_file()
    # the leave-one-out table, recomputed by brute force from each model and the test cache
    rank1 = json.loads((out / "eval" / "rank1" / "results.json").read_text())
    assert [r["model"] for r in rank1["results"]] == ["pretrained", "baseline", "age", "mtmim"]
    test = Cache(out / "test.h5")
    for row, m in zip(rank1["results"], rank1["models"], strict=True):
        feats = _features(Path(m["path"]), test.images(np.arange(len(test))))
        assert row["metrics"]["queries"] == len(test)
        assert row["metrics"]["rank1"] == _loo_rank1(feats, test.identity), row["model"]
    verdicts = re.findall(r"cosine -?[\d.]+, threshold -?[\d.]+ .*: (same person|different people)",
                          res.stdout)
    assert len(verdicts) == 2
    assert (out / "mtmim.onnx").stat().st_size > 1000
