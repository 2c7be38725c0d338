"""`mtmim align / info / merge` as a user runs them: real subprocesses, a real SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import REPO, run_cli
from tests.faces import bad_files, face_variants, write_jpeg

N_FACES = 32


def datasets(path: Path) -> dict:
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}


def assert_same(a: Path, b: Path) -> None:
    da, db = datasets(a), datasets(b)
    assert da.keys() == db.keys()
    for k in da:
        assert np.array_equal(da[k], db[k], equal_nan=da[k].dtype.kind == "f"), k


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    for k, img in enumerate(face_variants(N_FACES, size=160)):
        write_jpeg(root / f"{k % 8 + 1:03d}A{k:02d}.JPG", img)
    bad_files(root, {"text": "020A01.JPG", "blank": "020A02.JPG"})
    return root


@pytest.fixture(scope="module")
def full(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "full.h5"
    r = run_cli("align", str(tree), "--format", "fgnet", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"{N_FACES + 2} records" in r.stdout and f"detected {N_FACES}" in r.stdout
    assert "020A01.JPG: not an image file" in r.stdout and "020A02.JPG: no face found" in r.stdout
    return out


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tree, full, tmp_path):
    out = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "mtmim_cli.cli", "align", str(tree), "--format", "fgnet",
           "--out", str(out), "--commit-every", "4"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    committed = 0
    deadline = time.monotonic() + 300
    try:
        for line in proc.stderr:  # one plain line per commit when stderr is not a terminal
            m = re.match(r"committed (\d+)/(\d+)", line)
            if m and int(m.group(1)) >= 8:
                committed = int(m.group(1))
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "align finished before it could be killed"
    assert 8 <= committed < N_FACES
    assert not out.exists() and out.with_name("killed.h5.partial").exists()

    r = run_cli("align", str(tree), "--format", "fgnet", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    m = re.search(r"aligned (\d+) in .*resumed after (\d+)", r.stdout)
    assert m, r.stdout
    resumed = int(m.group(2))
    assert resumed >= committed and int(m.group(1)) == N_FACES + 2 - resumed
    assert not out.with_name("killed.h5.partial").exists()
    assert_same(full, out)


@pytest.fixture(scope="module")
def aligned(tree, tmp_path_factory) -> Path:
    """--aligned runs need no detector (no torch import): quick CLI runs for info and merge."""
    out = tmp_path_factory.mktemp("aligned") / "all.h5"
    r = run_cli("align", str(tree), "-f", "fgnet", "--aligned", "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"prealigned {N_FACES + 1}" in r.stdout and "error 1" in r.stdout
    assert "020A01.JPG: not an image file" in r.stdout
    return out


@pytest.mark.slow
def test_shards_and_merge_cli(tree, aligned, tmp_path):
    """The shard logic is the same with detection, which tests/test_align.py checks in-process."""
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}.h5"
        r = run_cli("align", str(tree), "-f", "fgnet", "--aligned", "-q", "-o", str(p),
                    "--shard", f"{i}/3")
        assert r.returncode == 0, r.stderr
        parts.append(str(p))
    r = run_cli("merge", str(tmp_path / "merged.h5"), *parts)
    assert r.returncode == 0, r.stderr
    assert_same(aligned, tmp_path / "merged.h5")
    r = run_cli("merge", str(tmp_path / "bad.h5"), *parts[:2])
    assert r.returncode == 2 and "shard(s) 2/3 missing" in r.stderr


@pytest.mark.slow
def test_encoded_image_formats(tree, aligned, tmp_path):
    """--image-format png stores the same pixels (lossless), jpeg close ones, in fewer bytes."""
    import numpy as np

    from mtmim_cli.data.cache import Cache

    raw = Cache(aligned)
    idx = np.flatnonzero(raw.usable)
    for fmt, worst in (("png", 0), ("jpeg", 40)):
        out = tmp_path / f"{fmt}.h5"
        r = run_cli("align", str(tree), "-f", "fgnet", "--aligned", "-q", "-o", str(out),
                    "--image-format", fmt)
        assert r.returncode == 0, r.stderr
        c = Cache(out)
        assert c.image_format == fmt and np.array_equal(c.status, raw.status)
        diff = np.abs(c.images(idx).astype(int) - raw.images(idx))
        assert diff.max() <= worst and diff.mean() < 3
        assert out.stat().st_size < aligned.stat().st_size
        r = run_cli("info", str(out))
        assert f"image_format: {fmt}" in r.stdout
    r = run_cli("align", str(tree), "-f", "fgnet", "--aligned", "-q", "-o", str(tmp_path / "x.h5"),
                "--image-format", "webp")
    assert r.returncode == 2 and "--image-format webp" in r.stderr


def test_info(aligned, tmp_path):
    r = run_cli("info", str(aligned))
    assert r.returncode == 0, r.stderr
    assert f"records      {N_FACES + 2}  (usable {N_FACES + 1})" in r.stdout
    assert "020A01.JPG: not an image file" in r.stdout and "schema_version: 1" in r.stdout
    r = run_cli("info", str(aligned), "--json")
    info = json.loads(r.stdout)
    assert info["status"]["prealigned"] == N_FACES + 1 and info["identities"] == 9
    assert sum(info["age_histogram"].values()) == N_FACES + 1  # every usable photo's age
    assert info["schema"]["settings"]["aligned"] is True
    (tmp_path / "x.h5").write_text("not hdf5")
    r = run_cli("info", str(tmp_path / "x.h5"))
    assert r.returncode == 2 and "x.h5: not an mtmim cache" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_align_bad_input_fails_in_one_line(tmp_path):
    r = run_cli("align", str(tmp_path), "--format", "fgnet", "--out", str(tmp_path / "c.h5"))
    assert r.returncode == 2 and "no photos found; --format fgnet expects" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run_cli("align", str(tmp_path), "--format", "vggface", "--out", str(tmp_path / "c.h5"))
    assert r.returncode == 2 and "unknown format" in r.stderr
    r = run_cli("align", str(tmp_path), "-f", "fgnet", "-o", str(tmp_path / "c.h5"), "--shard", "3/2")
    assert r.returncode == 2 and "--shard 3/2" in r.stderr
    assert not (tmp_path / "c.h5").exists()


# `mtmim align` whose detector breaks at its 6th photo (no memory left), as a user would
# meet it: the real command line, in a real process.
BROKEN_ALIGN = """
import itertools, sys
from mtmim_cli.data import detect
calls, real = itertools.count(), detect.FaceDetector.detect_prepared
def broken(self, prepared):
    if next(calls) >= 5:
        raise MemoryError()
    return real(self, prepared)
detect.FaceDetector.detect_prepared = broken
from mtmim_cli.cli import main
sys.argv = ["mtmim", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_broken_detector_exits_non_zero_unfinished_and_the_rerun_resumes(tree, full, tmp_path):
    out = tmp_path / "c.h5"
    args = ["align", str(tree), "--format", "fgnet", "--out", str(out), "--quiet",
            "--workers", "1", "--commit-every", "1"]
    r = subprocess.run([sys.executable, "-c", BROKEN_ALIGN, *args], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tree / '002A09.JPG'}: "), r.stderr
    assert "(MemoryError()); stopped without finishing" in lines[0]
    assert not out.exists() and out.with_name("c.h5.partial").exists()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"aligned {N_FACES + 2 - 5} in" in r.stdout and "resumed after 5" in r.stdout
    assert_same(full, out)
