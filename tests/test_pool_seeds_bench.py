"""bench/pool_seeds.py: per-seed and pooled differences of two models' hits, against plain means
and an exact enumeration of the pooled bootstrap of a tiny case (runs drawn once for both
models), and its refusal of runs that do not fit the cache."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import write_cache

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pool_seeds", REPO / "bench" / "pool_seeds.py")
PS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(PS)


def _doc(a: np.ndarray, b: np.ndarray) -> dict:
    return {"format": 1, "protocol": "fgnet-loo", "unit": "probe",
            "models": {"m/a": {"hit": a.astype(bool)}, "m/b": {"hit": b.astype(bool)}}}


def test_pooled_difference_is_the_mean_over_seeds_and_per_seed_counts_are_its_own() -> None:
    rng = np.random.default_rng(0)
    identity = np.repeat(np.arange(10), 5)
    runs = [_doc(rng.random(50) < 0.9, rng.random(50) < 0.8) for _ in range(3)]
    r = PS.pooled(runs, "m/a", "m/b", identity, resamples=500)
    diffs = [np.mean(d["models"]["m/a"]["hit"]) - np.mean(d["models"]["m/b"]["hit"]) for d in runs]
    assert np.allclose([d.diff for d in r["per_seed"]], diffs)
    assert np.isclose(r["pooled"].diff, np.mean(diffs))
    assert r["per_seed"][0].a_only == int(np.sum(runs[0]["models"]["m/a"]["hit"]
                                                 & ~runs[0]["models"]["m/b"]["hit"]))


def _exact_pooled(A: np.ndarray, B: np.ndarray, identity: list[int], paired: bool) -> np.ndarray:
    """Every equally likely pooled replicate, by loops: each ordered draw of identities and of
    runs (A and B from the same drawn runs when paired, else each its own draw), the mean hit
    over the drawn runs and the drawn identities' probes."""
    ids = sorted(set(identity))
    out = []
    for draw in itertools.product(range(len(ids)), repeat=len(ids)):
        probes = [i for c in draw for i in range(len(identity)) if identity[i] == ids[c]]
        for ra in itertools.product(range(len(A)), repeat=len(A)):
            for rb in ([ra] if paired else itertools.product(range(len(B)), repeat=len(B))):
                out.append(np.mean([A[k][i] for k in ra for i in probes])
                           - np.mean([B[k][i] for k in rb for i in probes]))
    return np.array(out)


def test_pooled_interval_is_the_bootstrap_that_keeps_each_runs_pairing() -> None:
    identity = [0, 0, 1, 2]
    # run 0 is easy for both modes, run 1 hard for both: the runs move A and B together
    A = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    B = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    runs = [_doc(a, b) for a, b in zip(A, B, strict=True)]
    p = PS.pooled(runs, "m/a", "m/b", np.array(identity), resamples=20_000)["pooled"]
    paired, apart = _exact_pooled(A, B, identity, True), _exact_pooled(A, B, identity, False)

    def window(exact: np.ndarray, q: float) -> tuple[float, float]:
        return tuple(np.quantile(exact, [q - 0.01, q + 0.01], method="inverted_cdf"))

    lo, hi = window(paired, 0.025), window(paired, 0.975)
    assert lo[0] <= p.low <= lo[1] and hi[0] <= p.high <= hi[1]
    assert p.low >= 0 > window(apart, 0.025)[1]   # runs drawn apart would reach below zero
    assert p.resampling == "clusters+paired seeds"


def _write_run(folder: Path, doc: dict, *, sha256: str, protocol: str = "fgnet-loo",
               seed: int = 0) -> Path:
    """An evaluate output set: results.outcomes.json, then results.json listing it."""
    from mtmim_cli.eval.output_set import write_output_set

    doc = {**doc, "models": {k: {f: np.asarray(v).tolist() for f, v in m.items()}
                             for k, m in doc["models"].items()}}
    write_output_set(folder / "results.md", {
        "protocol": protocol, "variant": {"seed": seed},
        "inputs": [{"path": "some.h5", "sha256": sha256}]},
        {"outcomes": lambda p: p.write_text(json.dumps(doc))})
    return folder


def _pool(cache: Path, *runs: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "pool_seeds.py"), "--cache",
                           str(cache), "--a", "m/a", "--b", "m/b", "--resamples", "200",
                           *map(str, runs)], capture_output=True, text=True)


def test_runs_that_do_not_fit_the_cache_are_refused_on_one_line(tmp_path) -> None:
    from mtmim_cli.digest import file_sha256

    cache = write_cache(tmp_path / "c.h5", [f"p{k}" for k in range(4) for _ in range(2)])
    sha = file_sha256(cache)
    fits = _doc(np.ones(8), np.zeros(8))
    # Before manifests: outcomes.json under its fixed name, a results.json listing nothing.
    legacy = _write_run(tmp_path / "legacy", fits, sha256=sha)
    (legacy / "results.outcomes.json").rename(legacy / "outcomes.json")
    results = json.loads((legacy / "results.json").read_text())
    del results["files"]
    (legacy / "results.json").write_text(json.dumps(results))
    edited = _write_run(tmp_path / "edited", fits, sha256=sha)
    changed = json.loads((edited / "results.outcomes.json").read_text())
    changed["models"]["m/a"]["hit"] = [False] * 8   # after the fact: its digest no longer fits
    (edited / "results.outcomes.json").write_text(json.dumps(changed))
    cases = {
        "5 probes": [_write_run(tmp_path / "short", _doc(np.ones(5), np.zeros(5)), sha256=sha)],
        "evaluated some.h5 (sha256 000000000000), not": [_write_run(tmp_path / "other", fits, sha256="0" * 64)],
        "protocol morph-s2, not fgnet-loo": [
            _write_run(tmp_path / "morph", fits, sha256=sha, protocol="morph-s2")],
        "seed 0, as": [_write_run(tmp_path / "s0", fits, sha256=sha),
                       _write_run(tmp_path / "again", fits, sha256=sha)],
        "results.json: not a readable results file": [tmp_path / "empty"],
        "lists no outputs (written before manifests)": [legacy],
        "results.outcomes.json: changed since evaluate wrote it": [edited],
    }
    (tmp_path / "empty").mkdir()
    for why, runs in cases.items():
        r = _pool(cache, *runs)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (why, r.stderr)
        assert why in r.stderr, (why, r.stderr)
    ok = _pool(cache, tmp_path / "s0", _write_run(tmp_path / "s1", fits, sha256=sha, seed=1))
    assert ok.returncode == 0 and "pooled over 2 seeds" in ok.stdout, ok.stderr
