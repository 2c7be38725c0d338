"""Every command that writes fails on one line, exit 2, naming the path, when it cannot write
(before any work: the inputs are valid, so the output is the only fault)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_cache
from tests.test_finetune import save_tiny_pretrain


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Valid inputs for every command, so that the only fault is the output path."""
    d = tmp_path_factory.mktemp("inputs")
    ids = [f"id{k}" for k in range(4) for _ in range(4)]
    cache = write_cache(d / "c.h5", ids, [float(10 * j + k) for k in range(4) for j in range(4)])
    _, ckpt = save_tiny_pretrain(d / "model.pt", seed=0)
    photos = d / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not decoded before the output is checked")
    return {"cache": cache, "ckpt": ckpt, "photos": photos}


def commands(i: dict[str, Path], bad: Path) -> dict[str, list[str]]:
    """One invocation per writing command, each with its output under `bad`."""
    c, m = str(i["cache"]), str(i["ckpt"])
    return {
        "align": ["align", str(i["photos"]), "--format", "folder", "--out", f"{bad}/a.h5"],
        "merge": ["merge", f"{bad}/m.h5", c],
        "pretrain": ["pretrain", c, "--backbone", "tiny", "--out", f"{bad}/pre"],
        "finetune": ["finetune", c, "--init", m, "--out", f"{bad}/ft"],
        "evaluate": ["evaluate", "--protocol", "fgnet-loo", "--cache", c, "--model", m,
                     "--out", f"{bad}/eval/results.md"],
        "evaluate --rounds-dir": ["evaluate", "--protocol", "fgnet-loo", "--cache", c,
                                  "--model", m, "--refit", "head", "--rounds-dir", f"{bad}/r"],
        "evaluate --split-out": ["evaluate", "--protocol", "morph-s2", "--cache", c,
                                 "--model", m, "--split-out", f"{bad}/split.json"],
        "report": ["report", str(i["cache"].parent), "--out", f"{bad}/report"],
        "calibrate": ["calibrate", m, "--cache", c, "--out", f"{bad}/cal.pt"],
        "embed": ["embed", c, "--model", m, "--out", f"{bad}/e.h5"],
        "export": ["export", m, "--onnx", f"{bad}/m.onnx"],
        "remove-age": ["remove-age", m, "--cache", c, "--out", f"{bad}/noage.pt"],
        "synth": ["synth", "--out", f"{bad}/synth"],
    }


def _blocked_by_a_file(tmp: Path) -> Path:
    (tmp / "blocker").write_text("a file where a folder should be")
    return tmp / "blocker" / "sub"


def _read_only_folder(tmp: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the file-blocked case covers this run")
    d = tmp / "readonly"
    d.mkdir()
    d.chmod(0o555)
    return d


@pytest.mark.parametrize("make_bad", [_blocked_by_a_file, _read_only_folder],
                         ids=["parent-is-a-file", "read-only-folder"])
def test_every_writing_command_names_the_unwritable_path_on_one_line(inputs, tmp_path,
                                                                     make_bad) -> None:
    bad = make_bad(tmp_path)
    for name, args in commands(inputs, bad).items():
        r = run_cli(*args, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
        assert len(lines) == 1, (name, r.stderr)
        assert "cannot write" in lines[0] and str(bad) in lines[0], (name, lines[0])
        assert "Traceback" not in r.stderr and not r.stdout.strip(), (name, r.stdout)
    if bad.is_dir():  # nothing, not even the write probe, was left behind
        assert list(bad.iterdir()) == []


def test_a_write_failing_mid_run_is_one_line_naming_the_file(tmp_path, monkeypatch,
                                                              capsys) -> None:
    """An OSError past the early check (the disk fills up during the run) ends as one line."""
    import errno
    import sys

    import mtmim_cli.demo.synth as synth
    from mtmim_cli.cli import main

    full = tmp_path / "synth" / "labels.csv"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(full))

    monkeypatch.setattr(synth, "synthesize", disk_full)
    monkeypatch.setattr(sys, "argv", ["mtmim", "synth", "--out", str(tmp_path / "synth")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip().splitlines() == [f"error: {full}: No space left on device"], err
