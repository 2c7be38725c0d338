"""LFW pairs.txt in both layouts (eval/lfw_pairs.py): the official `10 300` folds and the
`3000` variant (matched half, then mismatched half; folds taken in order from each half),
told apart by the first line; anything else is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtmim_cli.data.cache import DETECTED, Cache, CacheWriter
from mtmim_cli.data.records import Record
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import benchmarks as B
from mtmim_cli.eval import metrics as M
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.eval.features import extract_features
from mtmim_cli.eval.lfw_pairs import parse_lfw_pairs, read_lfw_pairs
from mtmim_cli.orchestration.evaluate import evaluate
from tests.conftest import PoolNet

NAMES = ["Ann_Lee", "Bo_Du", "Cy_Ng", "Di_Wu"]
PER_NAME = 4


@pytest.fixture
def lfw_cache(tmp_path: Path) -> Path:
    """A folder-layout cache `name/name_000k.jpg`, each person a pattern plus noise."""
    rng = np.random.default_rng(0)
    recs = [Record(path=f"{n}/{n}_{k:04d}.jpg", identity=n, age=float("nan"))
            for n in NAMES for k in range(1, PER_NAME + 1)]
    w = CacheWriter(tmp_path / "lfw.h5", recs, attrs={"reader": "folder"})
    patterns = rng.uniform(40, 215, (len(NAMES), 14, 14, 3))
    for k, r in enumerate(recs):
        base = np.kron(patterns[NAMES.index(r.identity)], np.ones((8, 8, 1)))
        img = np.clip(base + 70 * rng.standard_normal(base.shape), 0, 255).astype(np.uint8)
        w.write(k, img, DETECTED)
    w.commit(len(recs))
    w.finish()
    return tmp_path / "lfw.h5"


def _pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """n matched lines `name i j` and n mismatched lines `name1 i name2 j`, drawn at random."""
    rng = np.random.default_rng(seed)
    matched, mismatched = [], []
    for _ in range(n):
        name = NAMES[rng.integers(len(NAMES))]
        i, j = rng.choice(np.arange(1, PER_NAME + 1), 2, replace=False)
        matched.append(f"{name}\t{i}\t{j}")
        a, b = rng.choice(len(NAMES), 2, replace=False)
        mismatched.append(f"{NAMES[a]}\t{rng.integers(1, PER_NAME + 1)}\t"
                          f"{NAMES[b]}\t{rng.integers(1, PER_NAME + 1)}")
    return matched, mismatched


def _position(cache: Cache, line: str) -> tuple[int, int]:
    """The cache rows of one pair line, found independently of the reader."""
    f = line.split("\t")
    paths = list(cache.paths)
    first = f"{f[0]}/{f[0]}_{int(f[1]):04d}.jpg"
    second = f"{f[0]}/{f[0]}_{int(f[2]):04d}.jpg" if len(f) == 3 else \
        f"{f[2]}/{f[2]}_{int(f[3]):04d}.jpg"
    return paths.index(first), paths.index(second)


def _evaluate(tmp_path: Path, cache: Path, model: Path, pairs: Path, name: str) -> tuple[dict, str]:
    out = tmp_path / name / "results.md"
    cfg = EvalConfig(protocol="lfw", models=[ModelArg("pool", model)], cache=cache,
                     pairs=pairs, out=out)
    return evaluate(cfg, progress=False)["results"][0]["metrics"], out.read_text()


def test_the_10_300_layout_scores_contiguous_folds(tmp_path: Path, lfw_cache: Path,
                                                   pool_model: Path) -> None:
    """`folds n`: fold f is lines f*2n+1 .. (f+1)*2n, its n matched pairs first."""
    folds, per = 3, 4
    lines = []
    for f in range(folds):
        matched, mismatched = _pairs(per, seed=f)
        lines += matched + mismatched
    (tmp_path / "pairs.txt").write_text(f"{folds} {per}\n" + "\n".join(lines) + "\n")
    m, md = _evaluate(tmp_path, lfw_cache, pool_model, tmp_path / "pairs.txt", "std")

    cache = Cache(lfw_cache)
    ij = np.array([_position(cache, ln) for ln in lines])
    same = np.array([len(ln.split("\t")) == 3 for ln in lines])
    fold_of = np.repeat(np.arange(folds), 2 * per)
    feats = extract_features(PoolNet(), cache, None, "concat")
    expected = M.tenfold_verification(np.sum(feats[ij[:, 0]] * feats[ij[:, 1]], axis=1),
                                      same, fold_of)
    assert m["fold_accuracies"] == expected["fold_accuracies"] and m["pairs"] == len(lines)
    assert f"'{folds} {per}' layout: {folds} folds of {per} matched, then {per} mismatched" in md


def test_the_3000_layout_takes_folds_in_order_from_each_half(tmp_path: Path, lfw_cache: Path,
                                                             pool_model: Path) -> None:
    """`N`: N matched then N mismatched; fold k pairs the k-th tenth of each half. The same
    pairs written in the `10 n` layout give the same folds, so the same accuracies."""
    n = 30
    matched, mismatched = _pairs(n, seed=7)
    (tmp_path / "halves.txt").write_text(f"{n}\n" + "\n".join(matched + mismatched) + "\n")
    per = n // 10
    regrouped = [ln for k in range(10) for ln in matched[k * per:(k + 1) * per]
                 + mismatched[k * per:(k + 1) * per]]
    (tmp_path / "folds.txt").write_text(f"10 {per}\n" + "\n".join(regrouped) + "\n")

    halves, md = _evaluate(tmp_path, lfw_cache, pool_model, tmp_path / "halves.txt", "halves")
    folds, _ = _evaluate(tmp_path, lfw_cache, pool_model, tmp_path / "folds.txt", "folds")
    assert halves["fold_accuracies"] == folds["fold_accuracies"]
    assert halves["accuracy"] == folds["accuracy"] and halves["pairs"] == 2 * n
    assert (f"'{n}' layout: {n} matched, then {n} mismatched pairs; 10 folds of {per} + {per}, "
            "in order from each half") in md

    cache = Cache(lfw_cache)
    i, j, same, fold, _ = read_lfw_pairs(tmp_path / "halves.txt", cache)
    assert [(int(a), int(b)) for a, b in zip(i, j, strict=True)] == \
        [_position(cache, ln) for ln in matched + mismatched]     # file order kept
    assert same.tolist() == [True] * n + [False] * n
    assert fold.tolist() == [k // per for k in range(n)] * 2


def test_a_full_3000_file_has_the_official_structure(tmp_path: Path) -> None:
    """The variant as LFW copies ship it: 6,000 pairs, 10 folds of 300 + 300, which the
    benchmark check counts as LFW's official structure."""
    matched, mismatched = _pairs(3000, seed=1)
    (tmp_path / "pairs.txt").write_text("3000\n" + "\n".join(matched + mismatched) + "\n")
    p = parse_lfw_pairs(tmp_path / "pairs.txt")
    assert B.pair_structure(p.same, p.folds) == (10, [(300, 300)] * 10)
    assert B.pairs("lfw", "file", p.same, p.folds).comparable
    assert p.lines[0] == 2 and p.lines[-1] == 6001
    assert p.a[3000] == (mismatched[0].split("\t")[0], int(mismatched[0].split("\t")[1]))


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("10 300 1\nAnn_Lee\t1\t2\n", "'10 300 1' is neither LFW's"),
    ("pairs\nAnn_Lee\t1\t2\n", "'pairs' is neither"),
    ("1 2\n", "needs at least 2 folds"),
    ("15\n", "15 matched pairs do not split into 10 equal folds"),
    ("2 1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBo_Du\t1\n", "2 pair lines, the header '2 1' promises 4"),
    # a mismatched line where fold 2's matched pair belongs (line numbers count blank lines)
    ("2 1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBo_Du\t1\n\nAnn_Lee\t2\tBo_Du\t2\nBo_Du\t1\t2\n",
     "line 5: a mismatched pair where the '2 1' layout has fold 2's matched pairs"),
    ("10\n" + "Ann_Lee\t1\t2\n" * 9 + "Ann_Lee\t1\tBo_Du\t1\n" * 11,
     "line 11: a mismatched pair where the '10' layout has the matched half"),
    ("2 1\nAnn_Lee\t1\nAnn_Lee\t1\tBo_Du\t1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBo_Du\t1\n",
     "line 2: expected 'name i j' or 'name1 i name2 j'"),
])
def test_anything_else_is_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises(MtmimError, match=message) as err:
        parse_lfw_pairs(tmp_path / "pairs.txt")
    assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / "pairs.txt"))


def test_a_photo_missing_from_the_cache_names_its_line(tmp_path: Path, lfw_cache: Path) -> None:
    (tmp_path / "pairs.txt").write_text(
        "10\n" + "Ann_Lee\t1\t2\n" * 9 + "Ann_Lee\t1\t9\n" + "Ann_Lee\t1\tBo_Du\t1\n" * 10)
    with pytest.raises(MtmimError, match=r"line 11: Ann_Lee/Ann_Lee_0009.jpg is not in"):
        read_lfw_pairs(tmp_path / "pairs.txt", Cache(lfw_cache))
