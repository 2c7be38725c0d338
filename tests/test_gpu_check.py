"""bench/gpu_check.py runs end to end on the CPU with --dry-run and prints its one table."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_gpu_check_dry_run_prints_the_table() -> None:
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("device cpu") and "dry run" in lines[0]
    table = dict((m.group(1).strip(), float(m.group(2).replace(",", "")))
                 for m in (re.match(r"(.+?)\s{2,}([\d,.]+)\s+(img/s|x time)", ln) for ln in lines[2:])
                 if m)
    assert set(table) == {"pretrain tiny bf16, train() loop", "pretrain tiny bf16, bare step",
                          "MT-MIM step / baseline step", "loader, raw cache", "loader, jpeg cache"}
    assert all(v > 0 for v in table.values())
    r = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode != 0 and "no CUDA device" in r.stderr
