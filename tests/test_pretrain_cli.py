"""`mtmim pretrain` as a user runs it: a real SIGKILL and --resume, two gloo processes under
torchrun against one process, and one-line errors."""

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

from tests.conftest import REPO, run_cli, write_cache

# One thread per process: bitwise-equal results need the same reduction order in every run,
# and two shared cores do not benefit from more.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mtmim_cli.cli", "pretrain", *args]


def _objective(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)["objective"]


def _losses(run: Path) -> list[tuple[str, str]]:
    with open(run / "metrics.csv") as fh:
        return [(r["step"], r["loss"]) for r in csv.DictReader(fh)]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return write_cache(tmp_path / "train.h5", [f"id{k}" for k in range(8) for _ in range(8)],
                       [float(i % 50) for i in range(64)])


@pytest.mark.slow
def test_real_kill_then_resume_equals_uninterrupted(tmp_path: Path, cache: Path) -> None:
    common = [str(cache), "--backbone", "tiny", "--batch-size", "16", "--epochs", "6",
              "--lr", "0.01", "--ckpt-every", "3", "--schedule", "cosine", "--no-progress"]
    full = subprocess.Popen(_cmd(*common, "--out", str(tmp_path / "full")), env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cut_dir = tmp_path / "cut"
    cut = subprocess.Popen(_cmd(*common, "--out", str(cut_dir)), env=ENV, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and cut.poll() is None:
        if (cut_dir / "metrics.csv").exists() and len(_losses(cut_dir)) >= 8:
            break
        time.sleep(0.05)
    cut.send_signal(signal.SIGKILL)
    assert cut.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (cut_dir / "model.pt").exists()
    done = len(_losses(cut_dir))
    assert 8 <= done < 24
    resumed = subprocess.run(_cmd(*common, "--out", str(cut_dir), "--resume"), env=ENV, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert full.wait(timeout=600) == 0, full.stderr.read()
    a, b = _objective(tmp_path / "full"), _objective(cut_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "full") == _losses(cut_dir)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path: Path, cache: Path) -> None:
    """Same global batch (16 = 2 x 8), synchronised BatchNorm, plain SGD, 2 steps.
    Tolerance: 1e-5 absolute on every weight, about 1e-3 of how far the weights moved
    (float32 sums in a different order; one process with 1 vs 2 threads differs by ~1e-7)."""
    common = [str(cache), "--backbone", "tiny", "--batch-size", "16", "--max-steps", "2",
              "--optimizer", "sgd", "--lr", "0.02", "--scale", "16", "--sync-bn", "--no-progress"]
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29500 + os.getpid() % 1000), "-m", "mtmim_cli.cli", "pretrain",
         *common, "--out", str(tmp_path / "ddp")],
        env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = subprocess.run(_cmd(*common, "--out", str(tmp_path / "one")), env=ENV, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    out, _ = ddp.communicate(timeout=600)
    assert one.returncode == 0, one.stderr
    assert ddp.returncode == 0, out
    a, b = _objective(tmp_path / "one"), _objective(tmp_path / "ddp")
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a
                if a[k].is_floating_point())
    assert worst < 1e-5, worst
    # only rank 0 wrote: one metrics row per step, not two
    assert [s for s, _ in _losses(tmp_path / "ddp")] == ["1", "2"]
    assert float(_losses(tmp_path / "ddp")[0][1]) == pytest.approx(float(_losses(tmp_path / "one")[0][1]), rel=1e-6)


def test_bad_input_is_one_line_exit_2(tmp_path: Path, cache: Path) -> None:
    r = run_cli("pretrain", str(tmp_path / "absent.h5"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "absent.h5: no such file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    from mtmim_cli.errors import MtmimError
    from mtmim_cli.train.config import TrainConfig
    from mtmim_cli.train.pretrain import pretrain

    with pytest.raises(MtmimError, match="unknown backbone"):
        pretrain([cache], TrainConfig(out=str(tmp_path / "r")), backbone="vgg")
    with pytest.raises(MtmimError, match="--optimizer"):
        pretrain([cache], TrainConfig(out=str(tmp_path / "r"), optimizer="lbfgs"), backbone="tiny")


@pytest.mark.slow
def test_init_from_a_mobilefacenet_style_checkpoint(tmp_path: Path, cache: Path) -> None:
    """--init takes the shared ckpt's layout ({'epoch', 'net_state_dict'}); the run trains the
    112x96 crop and records backbone, crop and embedding size in its checkpoints."""
    from mtmim_cli.errors import MtmimError
    from mtmim_cli.models.backbones import build_backbone
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.train.config import TrainConfig
    from mtmim_cli.train.pretrain import pretrain

    torch.manual_seed(5)
    released = build_backbone("mobilefacenet").state_dict()
    torch.save({"epoch": 3, "net_state_dict": released}, tmp_path / "mfn.ckpt")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = pretrain([cache], TrainConfig(out=str(tmp_path / "r"), batch_size=8, max_steps=1,
                                            lr=1e-7, progress=False),
                       backbone="mobilefacenet", init=tmp_path / "mfn.ckpt")
    finally:
        torch.set_num_threads(n)
    assert res.steps == 1
    model = load_identity_model(tmp_path / "r" / "model.pt")
    assert model.meta["input_width"] == 96 and model.meta["embedding_size"] == 128
    assert model.meta["normalisation"] == "(v-127.5)/128"
    trained = model.encoder.state_dict()
    weights = [k for k in released if k.endswith("weight")]
    assert max(float((trained[k] - released[k]).abs().max()) for k in weights) < 1e-5
    with pytest.raises(MtmimError, match="does not fit"):
        pretrain([cache], TrainConfig(out=str(tmp_path / "r2")), backbone="mobilefacenet",
                 embedding_size=64, init=tmp_path / "mfn.ckpt")
