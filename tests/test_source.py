"""Provenance that includes the code (mtmim_cli/source.py): the source digest sees a change
of a training file's text; stored re-fit rounds and a bench's finished runs made by other
code are refused (one line naming the folder and why), or with --reuse-stale used and
flagged; results.json and results.md record the code."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import mtmim_cli.orchestration.refit as RF
import mtmim_cli.source as S
import mtmim_cli.train.round_heads as H
from bench._runs import reusable, write_settings
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import loading as L
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.orchestration.evaluate import evaluate
from tests.test_refit import _cache, _identity_maps, _Pool

PACKAGE = Path(S.__file__).resolve().parent


@pytest.fixture()
def two_sources(tmp_path: Path) -> tuple[Path, Path]:
    """Two copies of the package: `old` as it is, `new` with one training file edited (a
    real change of its text: a new module-level line in train/round_heads.py)."""
    old, new = tmp_path / "src-old" / "mtmim_cli", tmp_path / "src-new" / "mtmim_cli"
    for d in (old, new):
        shutil.copytree(PACKAGE, d, ignore=shutil.ignore_patterns("__pycache__"))
    path = new / "train" / "round_heads.py"
    path.write_text(path.read_text() + "\nROUND_HEADS_EDITED = True\n")
    return old, new


def test_the_digest_sees_a_change_of_one_file_and_nothing_else(two_sources, tmp_path) -> None:
    old, new = two_sources
    assert S.package_digest(old) == S.package_digest(PACKAGE)    # a copy: same source
    assert S.package_digest(new) != S.package_digest(old)
    moved = tmp_path / "moved" / "mtmim_cli"                     # same bytes, other file name
    shutil.copytree(old, moved)
    (moved / "train" / "round_heads.py").rename(moved / "train" / "round_heads2.py")
    assert S.package_digest(moved) != S.package_digest(old)


def test_git_state_is_none_outside_a_work_tree_and_sees_a_dirty_tree(tmp_path) -> None:
    bare = tmp_path / "plain"
    bare.mkdir()
    assert S.git_state(bare) is None                               # never fails without git
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("x = 1\n")
    env = ["-c", "user.email=t@t", "-c", "user.name=t"]
    for args in (["init", "-q"], ["add", "a.py"], [*env, "commit", "-qm", "one"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    assert S.git_state(repo) == {"commit": commit, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    sub = repo / "sub"
    sub.mkdir()
    assert S.git_state(sub) == {"commit": commit, "dirty": True}   # a fresh folder: not memoised


def test_rounds_made_by_other_code_are_refused_or_reused_flagged(
        two_sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = two_sources
    cache_path = _cache(tmp_path)
    L_model = tmp_path / "pool.pt"
    L_model.write_bytes(b"weights")
    monkeypatch.setattr(L, "MODEL_LOADER", lambda p, b: _Pool())
    calls: list[int] = []
    monkeypatch.setattr(H, "fit_rounds", _identity_maps(calls))
    rounds = tmp_path / "rounds"

    def run(**kw) -> dict:
        cfg = EvalConfig(protocol="fgnet-loo", models=[ModelArg("pool", L_model)],
                         cache=cache_path, refit="head", rounds_dir=rounds,
                         refit_modes=("baseline",), out=tmp_path / "eval" / "results.md", **kw)
        return evaluate(cfg, progress=False)

    monkeypatch.setattr(S, "PACKAGE_DIR", old)
    first = run()
    assert len(calls) == 12
    assert json.loads((rounds / "pool" / "baseline" / "config.json").read_text())[
        "source_sha256"] == S.package_digest(old)
    assert first["source"]["sha256"] == S.package_digest(old)
    assert "stale_rounds" not in first["results"][0]["metrics"]

    monkeypatch.setattr(S, "PACKAGE_DIR", new)   # the training code changed; no option did
    with pytest.raises(MtmimError) as err:
        run()
    msg = str(err.value)
    assert "\n" not in msg and str(rounds / "pool") in msg and "made by other code" in msg
    assert S.short(S.package_digest(old)) in msg and S.short(S.package_digest(new)) in msg
    assert len(calls) == 12                    # nothing re-fitted, nothing merged

    again = run(reuse_stale=True)               # used, and said so
    assert len(calls) == 12
    row = again["results"][0]
    assert row["metrics"]["stale_rounds"] == 12 and row["metrics"]["rank1"] == \
        first["results"][0]["metrics"]["rank1"]
    assert again["source"]["sha256"] == S.package_digest(new)
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "12 of 12 rounds were made by other code" in md and "--reuse-stale" in md
    assert f"mtmim_cli sha256 {S.short(S.package_digest(new))}" in md


def test_reuse_stale_needs_stored_rounds(tmp_path: Path) -> None:
    from mtmim_cli.eval.config import check_config

    with pytest.raises(MtmimError, match="--reuse-stale"):
        check_config(EvalConfig(protocol="fgnet-loo", models=[ModelArg("m", tmp_path / "m")],
                                cache=tmp_path / "c.h5", reuse_stale=True))


def test_evaluate_cli_passes_reuse_stale(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from typer.testing import CliRunner

    import mtmim_cli.orchestration.evaluate as OE
    from mtmim_cli.cli import app

    seen = []
    monkeypatch.setattr(OE, "evaluate", lambda cfg, **kw: seen.append(cfg.reuse_stale))
    for extra in ([], ["--reuse-stale"]):
        r = CliRunner().invoke(app, ["evaluate", "-p", "fgnet-loo", "-m", "m.pt", "--cache",
                                     "c.h5", "--refit", "head", *extra])
        assert r.exit_code == 0, r.output
    assert seen == [False, True]


def test_a_bench_run_of_other_code_is_refused_or_reused_as_stale(
        two_sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = two_sources
    run = tmp_path / "run"
    run.mkdir()
    settings, inputs = {"lr": 0.1, "mode": "mtmim"}, {"split_sha256": "ab"}
    assert reusable(run, settings, inputs) is None            # nothing finished: train it
    (run / "model.pt").write_bytes(b"m")
    monkeypatch.setattr(S, "PACKAGE_DIR", old)
    write_settings(run, settings, inputs)
    assert reusable(run, settings, inputs) == "current"
    assert json.loads((run / "bench-settings.json").read_text())["source"]["sha256"] == \
        S.package_digest(old)

    monkeypatch.setattr(S, "PACKAGE_DIR", new)
    with pytest.raises(SystemExit) as err:
        reusable(run, settings, inputs)
    msg = str(err.value.code)
    assert "\n" not in msg and str(run) in msg and "made by other code" in msg
    assert reusable(run, settings, inputs, reuse_stale=True) == "stale"
    # other settings or other inputs are never reused, stale or not
    with pytest.raises(SystemExit, match="other settings"):
        reusable(run, {**settings, "lr": 0.2}, inputs, reuse_stale=True)
    with pytest.raises(SystemExit, match="other inputs .split_sha256"):
        reusable(run, settings, {"split_sha256": "cd"}, reuse_stale=True)
    # a record written before code and inputs were kept: the settings alone
    (run / "bench-settings.json").write_text(json.dumps(settings))
    with pytest.raises(SystemExit, match="source unknown"):
        reusable(run, settings, inputs)
    assert reusable(run, settings, inputs, reuse_stale=True) == "stale"


def test_round_key_holds_the_source_digest(two_sources, monkeypatch) -> None:
    old, new = two_sources
    cfg = EvalConfig(protocol="fgnet-loo", models=[], refit="head", folds=10)

    def key() -> dict:
        return RF.round_key(cfg, ModelArg("m", Path("m.pt")), cache_sha256="c",
                            model_sha256="m", input_width=112, features=(10, 4))

    monkeypatch.setattr(S, "PACKAGE_DIR", old)
    a = key()
    monkeypatch.setattr(S, "PACKAGE_DIR", new)
    b = key()
    assert {k for k in a if a[k] != b[k]} == {"source_sha256"}
