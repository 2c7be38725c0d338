"""bench/pool_seeds.py: per-seed and pooled differences of two models' hits, against plain means,
and its refusal of runs that do not fit the cache."""

from __future__ import annotations

import importlib.util
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


def test_pooled_difference_is_the_mean_over_seeds_and_intervals_contain_it() -> None:
    rng = np.random.default_rng(0)
    identity = np.repeat(np.arange(10), 5)
    runs = [_doc(rng.random(50) < 0.9, rng.random(50) < 0.8) for _ in range(3)]
    r = PS.pooled(runs, "m/a", "m/b", identity, resamples=500)
    diffs = [np.mean(d["models"]["m/a"]["hit"]) - np.mean(d["models"]["m/b"]["hit"]) for d in runs]
    assert np.allclose([d.diff for d in r["per_seed"]], diffs)
    assert np.isclose(r["pooled"].diff, np.mean(diffs))
    assert r["pooled"].low <= r["pooled"].diff <= r["pooled"].high
    assert r["per_seed"][0].a_only == int(np.sum(runs[0]["models"]["m/a"]["hit"]
                                                 & ~runs[0]["models"]["m/b"]["hit"]))


def test_runs_that_do_not_fit_the_cache_are_refused_on_one_line(tmp_path) -> None:
    cache = write_cache(tmp_path / "c.h5", [f"p{k}" for k in range(4) for _ in range(2)])
    run = tmp_path / "run"
    run.mkdir()
    doc = _doc(np.ones(5), np.zeros(5))
    doc["models"] = {k: {f: v.tolist() for f, v in m.items()} for k, m in doc["models"].items()}
    (run / "outcomes.json").write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, str(REPO / "bench" / "pool_seeds.py"), "--cache",
                        str(cache), "--a", "m/a", "--b", "m/b", str(run)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "5 probes" in r.stderr and len(r.stderr.strip().splitlines()) == 1
