"""`torchrun --nproc_per_node 2` (gloo) pretraining with Partial FC and gradient accumulation:
it runs, resumes after a real SIGKILL of the whole process group to the same result, and
equals one process (loss, weights, validation)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, write_cache

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(run: Path, name: str = "metrics.csv") -> list[dict]:
    with open(run / name) as fh:
        return list(csv.DictReader(fh))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)["objective"]


@pytest.mark.slow
def test_torchrun_partial_fc_accumulate_resume_and_one_process(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "train.h5", [f"id{k}" for k in range(8) for _ in range(8)],
                        [float(i % 50) for i in range(64)])
    # 4 steps: longer, float rounding differences between 1 and 2 processes grow chaotically
    # (with or without Partial FC: ~1e-3 on the weights after 8 steps at this lr)
    common = [str(cache), "--backbone", "tiny", "--batch-size", "16", "--epochs", "1",
              "--optimizer", "sgd", "--lr", "0.02", "--scale", "16", "--partial-fc", "0.5",
              "--accumulate", "2", "--sync-bn", "--ckpt-every", "1", "--workers", "1",
              "--val-cache", str(cache), "--val-pairs", "40", "--val-every", "2", "--no-progress"]

    def torchrun(out: Path, *extra: str) -> subprocess.Popen:
        port = str(29500 + (os.getpid() + len(str(out))) % 2000)
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", port, "-m", "mtmim_cli.cli", "pretrain", *common, "--out",
             str(out), *extra], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    # uninterrupted, 2 processes
    full = torchrun(tmp_path / "full")
    out, _ = full.communicate(timeout=900)
    assert full.returncode == 0, out

    # killed (the launcher, both ranks and their loader workers at once), then resumed
    cut_dir = tmp_path / "cut"
    cut = torchrun(cut_dir)
    deadline = time.time() + 600
    while time.time() < deadline and cut.poll() is None:
        if (cut_dir / "metrics.csv").exists() and len(_rows(cut_dir)) >= 2:
            break
        time.sleep(0.05)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.wait()
    assert not (cut_dir / "model.pt").exists(), "the run ended before it could be killed"
    assert 2 <= len(_rows(cut_dir)) < 4
    resumed = torchrun(cut_dir, "--resume")
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out
    assert "resuming" in out
    a, b = _weights(tmp_path / "full"), _weights(cut_dir)
    assert a["id_head.weight"].shape == (8, 64)          # all centres, gathered from 2 ranks
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _rows(tmp_path / "full") == [
        {**r, "images_per_s": f["images_per_s"]}
        for r, f in zip(_rows(cut_dir), _rows(tmp_path / "full"), strict=True)]
    assert _rows(tmp_path / "full", "validation.csv") == _rows(cut_dir, "validation.csv")

    # one process: the same micro-batches (sync-bn), the same sampled classes
    one = subprocess.run([sys.executable, "-m", "mtmim_cli.cli", "pretrain", *common, "--out",
                          str(tmp_path / "one")], env=ENV, cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert one.returncode == 0, one.stderr
    c = _weights(tmp_path / "one")
    worst = max(float((a[k].double() - c[k].double()).abs().max()) for k in a
                if a[k].is_floating_point())
    assert worst < 2e-4, worst          # float32 sums in another order (5e-5 seen)
    for r2, r1 in zip(_rows(tmp_path / "full"), _rows(tmp_path / "one"), strict=True):
        assert float(r2["loss"]) == pytest.approx(float(r1["loss"]), rel=1e-6)
        assert r2["accuracy"] == r1["accuracy"]
    for v2, v1 in zip(_rows(tmp_path / "full", "validation.csv"),
                      _rows(tmp_path / "one", "validation.csv"), strict=True):
        assert v2["step"] == v1["step"]          # 40 pairs: a flipped pair moves it by 0.025
        assert float(v2["accuracy"]) == pytest.approx(float(v1["accuracy"]), abs=0.03)
