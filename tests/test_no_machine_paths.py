"""No committed file names a folder of one machine: defaults come from the repository root
(the walk-through's caches), `$MTMIM_SHARED` (mtmim_cli.paths) or the user's options."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Spelled in pieces so this file does not match itself.
MACHINE = re.compile("(?<![\\w.~-])/(" + "|".join(["wo" + "rk", "ro" + "ot", "ho" + "me",
                                                     "Us" + "ers", "tm" + "p"]) + ")/")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_no_committed_file_names_a_machine_path() -> None:
    r = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip("not a git checkout")
    hits = []
    for name in r.stdout.splitlines():
        path = REPO / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{name}:{k}: {line.strip()}" for k, line in enumerate(text.splitlines(), 1)
                 if MACHINE.search(line)]
    assert not hits, "\n".join(hits)


def test_the_pattern_sees_machine_paths_and_nothing_else() -> None:
    assert MACHINE.search("default=" + "/wo" + "rk/data/fgnet.h5")
    assert MACHINE.search("--out " + "/tm" + "p/x")
    assert not MACHINE.search("../shared/weights/x.ckpt")
    assert not MACHINE.search("docs/work/notes.md and eval/tmp/x")
