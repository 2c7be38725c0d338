"""CACD-VS read as released: a release-shaped folder of generated faces (`mtmim_cli.demo.faces`,
from the portraits scikit-image and matplotlib ship, so no ../shared is needed) through
`align --format cacd-vs` and `evaluate --protocol cacd-vs`; labels, folds and accuracy
checked against the release's rule and a brute-force k-fold written here."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest
from torch import nn

from mtmim_cli.data.cache import DETECTED, MISS, Cache, CacheWriter
from mtmim_cli.data.readers import read_records
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import benchmarks
from mtmim_cli.eval import loading as L
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.eval.tables import markdown_table
from mtmim_cli.orchestration.evaluate import evaluate
from tests.conftest import Pool, run_cli

# two folds of the release, three pairs of each kind in each: fold 1 is pairs 0-399 (genuine
# 0-199), fold 2 pairs 400-799 (genuine 400-599)
PAIRS = (0, 1, 2, 200, 201, 202, 400, 401, 402, 600, 601, 602)


def rule(pair: int) -> tuple[int, bool]:
    """The release's rule, written out independently: (fold 1-10, same person)."""
    return pair // 400 + 1, pair % 400 < 200


def _render(person: int, age: float) -> np.ndarray:
    from mtmim_cli.demo import faces as F

    ident = F.draw_identity(11, person)
    img, _ = F.render(F.Photo(ident, int(age), age), F.load_base(ident.base),
                      np.asarray(F.BASE_LANDMARKS[ident.base], np.float64), 11)
    return np.asarray(Image.fromarray(img).resize((250, 250), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`images/NNNN_0.jpg`, `NNNN_1.jpg` as the release ships them: a genuine pair is one
    generated person at two ages, an impostor pair two people."""
    root = tmp_path_factory.mktemp("cacd-vs")
    (root / "images").mkdir()
    person = 0
    for pair in PAIRS:
        same = rule(pair)[1]
        for photo in (0, 1):
            if photo == 0 or not same:
                person += 1
            face = _render(person, 30.0 + 6 * photo)
            Image.fromarray(face).save(root / "images" / f"{pair:04d}_{photo}.jpg", quality=92)
    return root


def _copy(release: Path, dest: Path) -> Path:
    shutil.copytree(release / "images", dest)
    return dest


# ---------------------------------------------------------------- the reader
def test_records_carry_pair_fold_and_made_up_identities(release: Path) -> None:
    records = read_records(release, "cacd-vs")        # SRC may be the folder above images/
    assert [r.path for r in records] == sorted(f"{p:04d}_{k}.jpg" for p in PAIRS for k in (0, 1))
    by_path = {r.path: r for r in records}
    for pair in PAIRS:
        fold, same = rule(pair)
        a, b = by_path[f"{pair:04d}_0.jpg"], by_path[f"{pair:04d}_1.jpg"]
        assert a.split == b.split == f"fold{fold}"
        assert (a.identity == b.identity) == same
        assert math.isnan(a.age) and math.isnan(b.age)    # the release has no ages
    # nothing shared across pairs: a genuine pair is one identity, an impostor photo its own
    ids = [r.identity for r in records]
    n_same = sum(rule(p)[1] for p in PAIRS)
    assert len(set(ids)) == n_same + 2 * (len(PAIRS) - n_same)
    assert read_records(release / "images", "cacd-vs") == records


@pytest.mark.parametrize("defect, message", [
    ("lone", "0201_0.jpg: pair 0201 has only this photo"),
    ("name", "0003_2.jpg: name does not match --format cacd-vs"),
    ("past", "4000_0.jpg: pair 4000 is past the release's 4000 pairs"),
    ("twice", "0000_1.png: a second file for photo 1 of pair 0000 (also 0000_1.jpg)"),
])
def test_a_malformed_release_is_refused_naming_the_file(release: Path, tmp_path: Path,
                                                        defect: str, message: str) -> None:
    d = _copy(release, tmp_path / "images")
    if defect == "lone":
        (d / "0201_1.jpg").unlink()
    elif defect == "name":
        shutil.copy(d / "0000_0.jpg", d / "0003_2.jpg")
    elif defect == "past":
        for k in (0, 1):
            shutil.copy(d / f"0000_{k}.jpg", d / f"4000_{k}.jpg")
    else:
        Image.open(d / "0000_1.jpg").save(d / "0000_1.png")
    with pytest.raises(MtmimError) as err:
        read_records(tmp_path, "cacd-vs")
    assert message in str(err.value) and str(d) in str(err.value)


def test_align_refuses_on_one_line_and_writes_nothing(release: Path, tmp_path: Path) -> None:
    d = _copy(release, tmp_path / "rel")
    (d / "0600_0.jpg").unlink()
    r = run_cli("align", str(d), "--format", "cacd-vs", "--out", str(tmp_path / "c.h5"), "-q")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "0600_1.jpg: pair 0600 has only this photo" in lines[0]
    assert "Traceback" not in r.stderr and not list(tmp_path.glob("c.h5*"))


# ---------------------------------------------------------------- pairs from a cache
def _pool_loader(p: Path, backbone: str | None) -> nn.Module:
    m = Pool(1)
    m.load_state_dict(torch.load(p, weights_only=True))
    return m


@pytest.fixture
def pool_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    out = {}
    for k in (8, 16):
        out[f"pool{k}"] = tmp_path / f"pool{k}.pt"
        torch.save(Pool(k).state_dict(), out[f"pool{k}"])
    monkeypatch.setattr(L, "MODEL_LOADER", _pool_loader)
    return out


def numpy_features(images: np.ndarray, k: int) -> np.ndarray:
    """Pool(k)'s image and mirror features, concatenated and L2-normalised, in numpy."""
    def pool(x: np.ndarray) -> np.ndarray:
        x = (x.astype(np.float64) - 127.5) / 128.0
        n, s = len(x), 112 // k
        return x.transpose(0, 3, 1, 2).reshape(n, 3, s, k, s, k).mean(axis=(3, 5)).reshape(n, -1)
    f = np.concatenate([pool(images), pool(images[:, :, ::-1])], axis=1)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def brute_force(scores: np.ndarray, same: np.ndarray, fold: np.ndarray
                ) -> tuple[np.ndarray, list[float]]:
    """Per pair: right or wrong at its fold's threshold, the best on the other folds (every
    cut between sorted training scores tried; a tie goes to the cut accepting more; the
    threshold midway in the gap); and the accuracy per fold."""
    correct = np.zeros(len(scores), bool)
    accs = []
    for f in sorted(set(fold.tolist())):
        tr = fold != f
        s = np.sort(scores[tr])[::-1]
        y = same[tr][np.argsort(-scores[tr], kind="stable")]
        cuts = [(int(y[:c].sum() + (~y[c:]).sum()), c) for c in range(len(s) + 1)
                if c in (0, len(s)) or s[c] != s[c - 1]]
        best = max(cuts)[1]
        thr = s[0] + 1 if best == 0 else s[-1] - 1 if best == len(s) else (s[best - 1] + s[best]) / 2
        te = fold == f
        correct[te] = (scores[te] >= thr) == same[te]
        accs.append(float(correct[te].mean()))
    return correct, accs


@pytest.mark.slow
def test_release_to_table_in_two_commands(release: Path, tmp_path: Path,
                                          pool_models: dict) -> None:
    from mtmim_cli.data.align import align_dataset

    cache_path = tmp_path / "cacd-vs.h5"
    align_dataset(release, "cacd-vs", cache_path, progress=False, workers=1)
    cache = Cache(cache_path)
    assert cache.usable.all()
    out = tmp_path / "eval" / "results.md"
    payload = evaluate(EvalConfig(protocol="cacd-vs", cache=cache_path, out=out, resamples=2000,
                                  age_probe=False, mi_steps=0,
                                  models=[ModelArg("a", pool_models["pool8"]),
                                          ModelArg("b", pool_models["pool16"])]),
                       progress=False)

    # the pairs by the rule, from the file names alone
    pos = {p: k for k, p in enumerate(cache.paths)}
    i = np.array([pos[f"{p:04d}_0.jpg"] for p in PAIRS])
    j = np.array([pos[f"{p:04d}_1.jpg"] for p in PAIRS])
    fold = np.array([rule(p)[0] for p in PAIRS])
    same = np.array([rule(p)[1] for p in PAIRS])
    outcomes = json.loads((out.parent / "results.outcomes.json").read_text())["models"]
    correct = {}
    for label, k in (("a", 8), ("b", 16)):
        f = numpy_features(cache.images(np.arange(len(cache))), k)
        scores = np.sum(f[i] * f[j], axis=1)
        correct[label], accs = brute_force(scores, same, fold)
        m = next(r["metrics"] for r in payload["results"] if r["model"] == label)
        assert m["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
        assert m["std"] == pytest.approx(np.std(accs), abs=1e-12)
        assert m["folds_used"] == 2 and m["pairs"] == len(PAIRS)
        np.testing.assert_allclose(outcomes[label]["score"], scores, atol=1e-5)
        assert outcomes[label]["correct"] == correct[label].tolist()
        # 6 impostors resolve no FAR of the list (0.1 needs 10)
        assert all(e["tar_at_far"] is None for e in m["tar_at_fars"])
    # the paired comparison: pairs resampled, exact McNemar on the discordant pairs
    c = payload["comparisons"]
    assert c["resampling"] == "pairs" and c["units"] == len(PAIRS)
    p = c["pairs"][0]
    a_only = int(np.sum(correct["a"] & ~correct["b"]))
    b_only = int(np.sum(~correct["a"] & correct["b"]))
    assert (p["a_only"], p["b_only"]) == (a_only, b_only)
    want = 1.0 if a_only + b_only == 0 else binomtest(min(a_only, b_only), a_only + b_only).pvalue
    assert p["p_mcnemar"] == pytest.approx(want)
    # two folds of ten: said, and the published rows kept out of the result table
    assert not payload["benchmark"]["comparable"]
    assert "2 of the release's 10 folds" in payload["benchmark"]["reason"]
    assert "folds 1-2 of the release's 10 (not all 10)" in payload["variant_text"]
    md = out.read_text()
    table, _, rest = md.partition("#### Not comparable")
    assert "| a |" in table and "DAL" not in table and "| DAL (reported) | 99.40 |" in rest


def _release_cache(path: Path, pairs: list[int], miss: tuple[str, ...] = ()) -> Path:
    """A cache as `align --format cacd-vs` writes it (reader records), random faces."""
    from mtmim_cli.data.cacd_vs import release_records

    records = release_records([Path(f"{p:04d}_{k}.jpg") for p in pairs for k in (0, 1)])
    rng = np.random.default_rng(0)
    w = CacheWriter(path, records, attrs={"reader": "cacd-vs", "source_root": str(path.parent)})
    for n, r in enumerate(records):
        if r.path in miss:
            w.write(n, None, MISS, reason="no face found")
        else:
            w.write(n, rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), DETECTED,
                    landmarks=np.zeros((5, 2)), det_score=1.0)
    return w.finish()


def test_pairs_without_a_face_are_left_out_and_counted(tmp_path: Path,
                                                       pool_models: dict) -> None:
    pairs = [*range(0, 5), *range(200, 205), *range(800, 805), *range(1000, 1005)]
    path = _release_cache(tmp_path / "c.h5", pairs, miss=("0003_1.jpg", "1001_0.jpg"))
    payload = evaluate(EvalConfig(protocol="cacd-vs", cache=path, resamples=200,
                                  age_probe=False, mi_steps=0,
                                  models=[ModelArg("a", pool_models["pool8"])]), progress=False)
    m = payload["results"][0]["metrics"]
    assert m["pairs"] == 18 and m["pairs_dropped"] == 2 and m["folds_used"] == 2
    assert payload["pairs_origin"]["dropped_pairs"] == [3, 1001]
    # dropped pairs count as errors in the all-pairs figure: fold 1 (10 pairs, one dropped)
    # and fold 3 (10 pairs, one dropped)
    acc = m["fold_accuracies"]
    assert m["accuracy_all_pairs"] == pytest.approx(np.mean([acc[0] * 9 / 10, acc[1] * 9 / 10]))
    assert "2 pairs left out because a photo has no face" in payload["variant_text"]
    assert "folds 1, 3 of the release's 10" in payload["variant_text"]


def test_cacd_vs_without_pairs_needs_a_release_cache_with_two_folds(
        tmp_path: Path, pool_models: dict, tiny_cache: Path) -> None:
    cfg = dict(protocol="cacd-vs", age_probe=False, mi_steps=0,
               models=[ModelArg("a", pool_models["pool8"])])
    with pytest.raises(MtmimError, match="needs a cache aligned with --format cacd-vs"):
        evaluate(EvalConfig(cache=tiny_cache, **cfg), progress=False)
    one = _release_cache(tmp_path / "one.h5", [0, 1, 200, 201])
    with pytest.raises(MtmimError, match=r"1 fold\(s\) \(1\); .* at least two"):
        evaluate(EvalConfig(cache=one, **cfg), progress=False)


def test_published_rows_only_beside_all_ten_folds() -> None:
    full = np.array([p % 400 < 200 for p in range(4000)])
    folds = np.arange(4000) // 400 + 1
    release = {"kind": "release", "dropped_pairs": []}
    v = benchmarks.cacd_vs(release, full, folds)
    assert v.comparable and "4000 CACD-VS pairs" in v.reason
    part = benchmarks.cacd_vs(release, full[:1600], folds[:1600])
    assert not part.comparable and "4 of the release's 10 folds" in part.reason
    assert not benchmarks.cacd_vs({**release, "dropped_pairs": [5]}, full[1:], folds[1:]).comparable
    assert benchmarks.cacd_vs({"kind": "file"}, full, folds).comparable
    assert not benchmarks.cacd_vs({"kind": "drawn"}, full, folds).comparable
    row = [{"model": "m", "metrics": {"accuracy": 0.99, "std": 0.003, "auc": 0.999,
                                      "pairs": 4000, "folds_used": 10}}]
    md = markdown_table("cacd-vs", row, benchmark=v.to_dict())
    assert "| DAL (reported) | 99.40 |" in md and "Not comparable" not in md
    md = markdown_table("cacd-vs", row, benchmark=part.to_dict())
    assert md.index("| DAL (reported)") > md.index("#### Not comparable: 4 of the release's")


def test_intervals_may_resample_whole_folds(tmp_path: Path, pool_models: dict) -> None:
    pairs = [p for f in range(3) for p in (*range(400 * f, 400 * f + 4),
                                            *range(400 * f + 200, 400 * f + 204))]
    path = _release_cache(tmp_path / "c.h5", pairs)
    models = [ModelArg("a", pool_models["pool8"]), ModelArg("b", pool_models["pool16"])]
    payload = evaluate(EvalConfig(protocol="cacd-vs", cache=path, resamples=200, resample="fold",
                                  age_probe=False, mi_steps=0, models=models), progress=False)
    c = payload["comparisons"]
    assert c["resampling"] == "folds" and c["clusters"] == 3 and c["units"] == len(pairs)
    assert c["pairs"][0]["resampling"] == "folds"
    with pytest.raises(MtmimError, match="--resample fold: applies to verification"):
        evaluate(EvalConfig(protocol="fgnet-loo", cache=path, resample="fold", models=models),
                 progress=False)
