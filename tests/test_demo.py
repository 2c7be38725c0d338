"""`make demo`'s chain at test size: synth -> align -> groups -> pretrain -> finetune x3 ->
evaluate -> calibrate/verify/export -> report, all real, in one subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


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
    rank1 = json.loads((out / "eval" / "rank1" / "results.json").read_text())
    assert len(json.dumps(rank1)) > 100
    verdicts = re.findall(r"cosine -?[\d.]+, threshold -?[\d.]+ .*: (same person|different people)",
                          res.stdout)
    assert len(verdicts) == 2
    assert (out / "mtmim.onnx").stat().st_size > 1000
