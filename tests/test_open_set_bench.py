"""bench/open_set.py's pure parts: the settings it parses, the validation folds it carves out of
the train side (never touching the test side), and the summary's means and pair selection."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("open_set", REPO / "bench" / "open_set.py")
OS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(OS)


def test_settings_parse_name_mode_and_options() -> None:
    got = OS._settings(['base=baseline', 'f1=mtmim:{"mi_target":"features","lambda_mim":1.0}'])
    assert got == [("base", "baseline", {}),
                   ("f1", "mtmim", {"mi_target": "features", "lambda_mim": 1.0})]


def test_validation_folds_partition_the_train_side_only() -> None:
    split = {"fgnet": {"train_subjects": list(range(1, 61)), "test_subjects": list(range(61, 83))},
             "celeba_subset": {"train_identities": [str(i) for i in range(100)],
                               "test_identities": ["x", "y"]}}
    held = []
    for k in range(4):
        v = OS._val_split(split, k)
        tr, te = v["fgnet"]["train_subjects"], v["fgnet"]["test_subjects"]
        assert len(te) == 15 and not set(tr) & set(te) and set(tr) | set(te) == set(range(1, 61))
        assert not set(v["celeba_subset"]["test_identities"]) & {"x", "y"}
        held += te
    assert sorted(held) == list(range(1, 61))            # every train subject validates once


def test_validation_folds_are_the_same_people_in_every_process() -> None:
    """The README's validation runs carve fold 0 (mi-sweep) and folds 1-3 (mi-folds) in
    separate processes: together they must still partition the train side, whatever the
    process's hash seed, and fold 0 is pinned so that a change to the carving, which would
    make stored validation runs hold out other people, fails here."""
    import json
    import os
    import subprocess
    import sys

    split = {"fgnet": {"train_subjects": list(range(1, 61)), "test_subjects": list(range(61, 83))},
             "celeba_subset": {"train_identities": [str(i) for i in range(100)],
                               "test_identities": ["x", "y"]}}
    code = ("import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('o', {str(REPO / 'bench' / 'open_set.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(json.dumps(m._val_split(json.loads(sys.argv[1]), int(sys.argv[2]))))")
    folds = []
    for k in range(4):
        env = {**os.environ, "PYTHONHASHSEED": str(11 + k)}
        out = subprocess.run([sys.executable, "-c", code, json.dumps(split), str(k)],
                             capture_output=True, text=True, check=True, env=env)
        folds.append(json.loads(out.stdout))
    held = [s for f in folds for s in f["fgnet"]["test_subjects"]]
    assert sorted(held) == list(range(1, 61))
    cb = [s for f in folds for s in f["celeba_subset"]["test_identities"]]
    assert sorted(cb, key=int) == [str(i) for i in range(100)]
    assert folds[0]["fgnet"]["test_subjects"] == [2, 7, 8, 9, 13, 15, 18, 21, 25, 27, 29, 39,
                                                  48, 49, 54]


def _payload(rank1: dict[str, float], r2: dict[str, float], pairs: list[tuple]) -> dict:
    return {"results": [{"model": m, "metrics": {"rank1": v, "age_leakage": {"age_r2": r2[m]}}}
                        for m, v in rank1.items()],
            "comparisons": {"pairs": [{"a": a, "b": b, "diff": d, "low": lo, "high": hi}
                                      for a, b, d, lo, hi in pairs]}}


def test_summary_means_seeds_and_shows_pairs_against_pretrained_and_the_reference() -> None:
    models = ["pretrained", "age@s0", "age@s1", "g1@s0", "g1@s1"]
    fg = _payload(dict(zip(models, [0.90, 0.92, 0.94, 0.93, 0.95], strict=True)),
                  dict(zip(models, [0.5, 0.3, 0.1, 0.0, 0.2], strict=True)),
                  [("pretrained", "age", -0.03, -0.05, -0.01), ("pretrained", "g1", -0.04, -0.06, 0.0),
                   ("age", "g1", -0.01, -0.02, 0.005)])
    cb = _payload(dict(zip(models, [0.97] * 5, strict=True)), dict(zip(models, [np.nan] * 5, strict=True)), [])
    text = OS.summary({"fgnet": fg, "celeba": cb}, "the validation fold", reference="age")
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "| age | 2 | 93.00 ± 1.41 | 97.00 ± 0.00 | 0.200 ± 0.141 |" in rows["age"]
    assert "| pretrained | 1 | 90.00 | 97.00 | 0.500 |" in rows["pretrained"]
    # shown as later - earlier: g1 - age = +1.00 points, interval flipped accordingly
    assert "| FG-NET | g1 | age | +1.00 | [-0.50, +2.00] |" in text
    assert "| FG-NET | g1 | pretrained | +4.00 | [-0.00, +6.00] |" in text
    other = OS.summary({"fgnet": fg, "celeba": cb}, "the test side", reference="baseline")
    assert "| FG-NET | g1 | age |" not in other      # age is not the reference there
    assert "made by other code" not in text
    flagged = OS.summary({"fgnet": fg, "celeba": cb}, "the test side", stale={"g1@s0"})
    assert "| g1 | 2, 1 made by other code (--reuse-stale) | 94.00 ± 1.41 |" in flagged
    assert "| age | 2 | 93.00" in flagged


def test_a_finished_run_is_reused_only_with_the_same_resolved_settings(tmp_path, monkeypatch) -> None:
    import pytest

    import mtmim_cli.train.finetune_options as FO
    from mtmim_cli.train.finetune_options import resolved_settings

    run = tmp_path / "mtmim-s0"
    opts = {"recipe": "small", "mode": "mtmim", "seed": 0, "out": str(run), "progress": False}
    inputs = {"split_sha256": "ab"}

    def reusable(o: dict) -> str | None:
        return OS.reusable(run, resolved_settings(o), inputs)

    assert reusable(opts) is None                          # nothing there yet
    run.mkdir()
    (run / "model.pt").write_bytes(b"x")
    with pytest.raises(SystemExit, match="other settings"):
        reusable(opts)                                     # a model without recorded settings
    OS.write_settings(run, resolved_settings(opts), inputs)
    assert reusable({**opts, "progress": True}) == "current"   # progress does not change a run
    monkeypatch.setitem(FO.RECIPES, "small", {**FO.RECIPES["small"], "lambda_mim": 0.123})
    with pytest.raises(SystemExit, match="other settings"):
        reusable(opts)                                     # the recipe changed underneath


def test_test_subsets_are_named_by_what_they_hold(tmp_path) -> None:
    """Another fold or split in the same --out gets its own test subset file: the name is
    a digest of the source cache's bytes and the identities kept (in any order)."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    a.write_bytes(b"cache one")
    b.write_bytes(b"cache two")
    key = OS._subset_key(a, ["1", "2"])
    assert len(key) == 12 and key == OS._subset_key(a, ["2", "1"])
    assert key != OS._subset_key(a, ["1", "3"]) and key != OS._subset_key(b, ["1", "2"])
