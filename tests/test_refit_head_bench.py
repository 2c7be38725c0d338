"""bench/refit_head_modes.py runs end to end on synthetic features (a smoke test: its
timings are printed, never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_prints_each_mode_against_age() -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "refit_head_modes.py"),
                          "--synthetic", "--rounds", "2", "--epochs", "1", "--repeat", "1",
                          "--threads", "1"], capture_output=True, text=True, check=True).stdout
    lines = [ln.strip() for ln in out.splitlines()]
    assert lines[0].startswith("synthetic: 1002 images x 2 views, 128-d; 2 rounds x 1 epochs; options {}")
    for mode in ("baseline", "age", "mtmim"):
        assert any(ln.startswith(f"{mode}: ") and "vs age:" in ln for ln in lines), out
    assert lines[-1].startswith("load average")


def test_bench_needs_features() -> None:
    run = subprocess.run([sys.executable, str(REPO / "bench" / "refit_head_modes.py")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "--synthetic" in run.stderr
