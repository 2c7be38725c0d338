"""`evaluate`'s outputs are one set, whole or absent: every file is named after --out's stem,
results.json (the manifest, each sibling's sha256) lands last, and `mtmim report` attaches
only what a manifest lists with a matching digest. End to end on small synthetic caches with
the fixed pooling encoder (conftest's pool_model)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mtmim_cli.digest import file_sha256
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.eval.feature_file import read_feature_file, write_feature_file
from mtmim_cli.eval.output_set import verified_files
from mtmim_cli.eval.tables import curve_csvs, results_markdown
from mtmim_cli.orchestration.evaluate import evaluate
from mtmim_cli.report import build_report
from mtmim_cli.report.loading import load_evaluation
from tests.conftest import run_cli, write_cache

# What one `evaluate --features` on fgnet-loo writes, the manifest last.
SET = ("md", "cmc", "roc", "outcomes", "features", "json")
SUFFIX = {"md": ".md", "cmc": ".cmc.csv", "roc": ".roc.csv", "outcomes": ".outcomes.json",
          "features": ".features.npz", "json": ".json"}


def _cache(path: Path, seed: int) -> Path:
    ids = [f"p{k}" for k in range(6) for _ in range(4)]
    return write_cache(path, ids, [float(5 + 9 * j + k) for k in range(6) for j in range(4)],
                       seed=seed)


def _run(out: Path, label: str, model: Path, cache: Path) -> dict:
    return evaluate(EvalConfig(protocol="fgnet-loo", models=[ModelArg(label, model)],
                               cache=cache, out=out, features=True, age_probe=False,
                               resamples=100, command=f"mtmim evaluate {out.stem}"),
                    progress=False)


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_two_stems_in_one_folder_keep_separate_complete_sets(tmp_path: Path,
                                                             pool_model: Path) -> None:
    ev = tmp_path / "ev"
    ca, cb = _cache(tmp_path / "a.h5", seed=1), _cache(tmp_path / "b.h5", seed=2)
    _run(ev / "a.md", "a", pool_model, ca)
    _run(ev / "b.md", "b", pool_model, cb)
    assert _names(ev) == {f"{s}{SUFFIX[k]}" for s in "ab" for k in SET}
    for stem, label, cache in (("a", "a", ca), ("b", "b", cb)):
        manifest = json.loads((ev / f"{stem}.json").read_text())
        assert set(manifest["files"]) == set(SET) - {"json"}
        for kind, entry in manifest["files"].items():
            assert entry["name"] == f"{stem}{SUFFIX[kind]}"
            assert entry["sha256"] == file_sha256(ev / entry["name"])
        e = load_evaluation(ev / f"{stem}.json")
        assert e.ignored == [] and e.manifest == ev / f"{stem}.json"
        # each run's own features, tables and curves, not the other stem's
        assert list(e.features) == [label]
        own = read_feature_file(ev / f"{stem}.features.npz")[label]
        np.testing.assert_array_equal(e.features[label]["x_id"], own["x_id"])
        assert set(own["paths"]) <= {f"img{i:05d}.jpg" for i in range(24)}
        assert set(e.cmc["model"]) == {label} and f"| {label} |" in e.markdown
        assert f"Caches: `{cache}`" in e.markdown
    fa = load_evaluation(ev / "a.md").features["a"]["x_id"]
    fb = load_evaluation(ev / "b.json").features["b"]["x_id"]
    assert fa.shape == fb.shape and not np.allclose(fa, fb)   # other faces, other features
    # the folder alone is ambiguous: one line asks for a stem, rather than a guess
    with pytest.raises(MtmimError, match=r"holds 2 evaluations \(a, b\); name one's .json"):
        load_evaluation(ev)
    text = build_report([ev / "a.json", ev / "b.json"], tmp_path / "rep").read_text()
    assert f"From `{ev / 'a.json'}`" in text and f"From `{ev / 'b.json'}`" in text
    assert "not attached" not in text


def _fail_after(k: int, folder: Path, on_fail) -> list[str]:
    """Patch os.replace (atomic_write's rename) so that the (k+1)-th file landing in
    `folder` calls `on_fail` instead; returns the names that landed."""
    landed: list[str] = []
    real = os.replace

    def replace(src, dst):
        if Path(dst).parent == folder:
            if len(landed) == k:
                on_fail()
            landed.append(Path(dst).name)
        return real(src, dst)

    os.replace = replace
    return landed


def _raise() -> None:
    raise OSError(28, "No space left on device (injected)")


@pytest.mark.parametrize("k", range(len(SET)))
def test_a_writer_failing_at_any_step_leaves_no_manifest(tmp_path: Path, pool_model: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         k: int) -> None:
    """A previous complete set, then a rerun whose (k+1)-th file fails to land: no
    results.json afterwards (the old one went first), none of the rerun's files either, and
    the report refuses the folder on one line."""
    ev = tmp_path / "ev"
    _run(ev / "results.md", "pool", pool_model, _cache(tmp_path / "c1.h5", seed=1))
    monkeypatch.setattr(os, "replace", os.replace)   # restored after the test
    landed = _fail_after(len(SET), ev, _raise)       # a counting pass: all six land
    _run(ev / "results.md", "pool", pool_model, _cache(tmp_path / "c2.h5", seed=2))
    assert landed == [f"results{SUFFIX[kind]}" for kind in SET]   # the manifest last
    _fail_after(k, ev, _raise)
    with pytest.raises(OSError, match="injected"):
        _run(ev / "results.md", "pool", pool_model, _cache(tmp_path / "c3.h5", seed=3))
    assert _names(ev) == set()   # the set is absent: no manifest, no sibling, no temp file
    with pytest.raises(MtmimError, match="results.json: not a readable results file"):
        load_evaluation(ev)
    with pytest.raises(MtmimError, match="neither a training run"):
        build_report([ev], tmp_path / "rep")


@pytest.mark.parametrize("k", range(len(SET)))
def test_a_run_killed_at_any_step_leaves_no_manifest(tmp_path: Path, pool_model: Path,
                                                     k: int) -> None:
    """The same rerun killed outright (os._exit in a forked child: no cleanup runs) after k
    files: what landed has no manifest, so nothing is attached; an old manifest put back
    beside them is caught by the digests."""
    ev = tmp_path / "ev"
    _run(ev / "results.md", "pool", pool_model, _cache(tmp_path / "c1.h5", seed=1))
    old = (ev / "results.json").read_text()
    c2 = _cache(tmp_path / "c2.h5", seed=2)
    pid = os.fork()
    if pid == 0:   # the child: rerun, die at the (k+1)-th rename
        try:
            _fail_after(k, ev, lambda: os._exit(9))
            _run(ev / "results.md", "pool", pool_model, c2)
        finally:
            os._exit(3)   # not killed where it should have been
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9
    landed = {p.name for p in ev.iterdir() if not p.name.startswith(".")}
    assert landed == {f"results{SUFFIX[kind]}" for kind in SET[:k]}   # a prefix, no manifest
    with pytest.raises(MtmimError, match="results.json: not a readable results file"):
        load_evaluation(ev)
    (ev / "results.json").write_text(old)   # as if the old manifest had been left in place
    listed = json.loads(old)["files"]
    good, bad = verified_files(ev / "results.json", json.loads(old))
    # a new file with the old bytes is the old file (fgnet's ROC: a header only); every
    # other one landed is caught by its digest, and the rest of the old set is gone
    same = {kind for kind in SET[:k] if file_sha256(ev / f"results{SUFFIX[kind]}")
            == listed[kind]["sha256"]}
    assert set(good) == same and "md" not in same   # results.md names the other cache
    assert sorted(b.split(":")[0] for b in bad if "sha256 differs" in b) == sorted(
        f"results{SUFFIX[kind]}" for kind in SET[:k] if kind not in same)
    assert sorted(b.split(":")[0] for b in bad if "listed but missing" in b) == sorted(
        f"results{SUFFIX[kind]}" for kind in SET[k:-1])


def test_a_sibling_changed_afterwards_is_not_attached(tmp_path: Path, pool_model: Path) -> None:
    ev = tmp_path / "ev"
    cache = _cache(tmp_path / "c.h5", seed=1)
    payload = _run(ev / "results.md", "pool", pool_model, cache)
    before = load_evaluation(ev)
    assert before.features is not None and before.ignored == []
    # A valid features file of other numbers, and one CMC rate edited by hand.
    feats = read_feature_file(ev / "results.features.npz")["pool"]
    from mtmim_cli.data.cache import Cache

    idx = np.array([int(p[3:8]) for p in feats["paths"]])
    write_feature_file(ev / "results.features.npz", Cache(cache), idx,
                       {"pool": {"x_id": feats["x_id"] + 1.0, "x_age": None}})
    cmc = (ev / "results.cmc.csv").read_text().splitlines()
    cmc[1] = ",".join(cmc[1].split(",")[:3] + ["0.000001"])
    (ev / "results.cmc.csv").write_text("\n".join(cmc) + "\n")
    lines: list[str] = []
    text = build_report([ev], tmp_path / "rep", echo=lines.append).read_text()
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    for name, line in zip(("results.cmc.csv", "results.features.npz"), sorted(lines), strict=True):
        assert line == (f"{ev / 'results.json'}: {name}: changed since evaluate wrote it "
                        "(sha256 differs): not attached")
        assert f"- {line}" in text
    e = load_evaluation(ev)
    assert e.features is None
    # the curve is drawn from results.json itself, not from the edited file
    rates = e.cmc[e.cmc["model"] == "pool"]["rate"].to_numpy()
    np.testing.assert_allclose(rates, payload["results"][0]["metrics"]["cmc"], atol=1e-6)
    assert rates[0] != pytest.approx(1e-6)
    assert (tmp_path / "rep" / "cmc.png").is_file()


def test_a_folder_written_before_manifests_attaches_nothing_but_renders_its_results(
        tmp_path: Path, pool_model: Path) -> None:
    """The layout evaluate wrote before manifests: fixed names (cmc.csv, roc.csv,
    outcomes.json, features.npz) beside a results.json without "files"."""
    ev = tmp_path / "ev"
    payload = _run(ev / "results.md", "pool", pool_model, _cache(tmp_path / "c.h5", seed=1))
    for kind in ("cmc", "roc", "outcomes", "features"):
        (ev / f"results{SUFFIX[kind]}").rename(ev / SUFFIX[kind].lstrip("."))
    legacy = json.loads((ev / "results.json").read_text())
    del legacy["files"]
    (ev / "results.json").write_text(json.dumps(legacy))
    (ev / "results.md").write_text("# edited by hand, unverifiable\n")
    assert _names(ev) == {"results.md", "results.json", "cmc.csv", "roc.csv", "outcomes.json",
                          "features.npz"}
    lines: list[str] = []
    text = build_report([ev], tmp_path / "rep", echo=lines.append).read_text()
    assert lines == [f"{ev / 'results.json'}: lists no outputs (written before manifests): "
                     "its results.md, CSVs and features not attached, tables and curves drawn "
                     "from results.json itself; rerun evaluate for features"]
    assert f"- {lines[0]}" in text
    res = run_cli("report", str(ev), "--out", str(tmp_path / "rep-cli"))   # the line on stderr
    assert res.returncode == 0 and res.stderr.strip().splitlines() == lines, res.stderr
    e = load_evaluation(ev)
    assert e.features is None
    assert "edited by hand" not in text and e.markdown == results_markdown(legacy)
    assert "| pool |" in text and "![CMC](cmc.png)" in text
    rates = e.cmc[e.cmc["model"] == "pool"]["rate"].to_numpy()
    np.testing.assert_allclose(rates, payload["results"][0]["metrics"]["cmc"], atol=1e-6)
    # redrawn from results.json, the curves are those the old run wrote beside it
    assert curve_csvs(legacy) == tuple((ev / f"{k}.csv").read_bytes().decode() for k in ("cmc", "roc"))
    # the legacy fixed names are another run's business: a new run of the stem leaves them
    shutil.copy(ev / "features.npz", tmp_path / "kept.npz")
    _run(ev / "results.md", "pool", pool_model, _cache(tmp_path / "c2.h5", seed=2))
    assert (ev / "features.npz").read_bytes() == (tmp_path / "kept.npz").read_bytes()
    assert load_evaluation(ev).ignored == []


def test_out_naming_the_manifest_is_refused_before_any_work(tmp_path: Path,
                                                            pool_model: Path) -> None:
    with pytest.raises(MtmimError, match=r"--out .*results.json: give the results .md"):
        _run(tmp_path / "results.json", "pool", pool_model, tmp_path / "absent.h5")
