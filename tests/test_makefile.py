"""`make clean` removes the build, the venv and the outputs of the demo, evaluate and the
benches (demo_out/, eval/, runs/) in the repository root, wherever make is called from."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_clean_removes_the_outputs_in_the_repository_root_only(tmp_path: Path) -> None:
    r = subprocess.run(["make", "-n", "-f", str(REPO / "Makefile"), "clean"], cwd=tmp_path,
                       capture_output=True, text=True, check=True)
    (line,) = [ln for ln in r.stdout.splitlines() if "rm -rf" in ln]
    cd, _, rm = line.partition(" && ")
    assert Path(cd.removeprefix("cd ").strip()) == REPO        # not the caller's folder
    removed = rm.split()[2:]
    assert {"demo_out", "eval", "runs", ".venv", "build"} <= set(removed)
    assert not [p for p in removed if p.startswith(("/", "..")) or "*.h5" in p]
