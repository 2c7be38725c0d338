"""The embedded cross-age face set: geometry, independence of identity and age, determinism,
and that a real MTCNN finds the faces where the generator says they are."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from mtmim_cli.demo import faces as F
from mtmim_cli.demo import synth as S
from mtmim_cli.demo import warps as W
from tests.conftest import run_cli


def _digest(folder: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_cardioid_matches_the_published_formula() -> None:
    # with no fade, R' = R (1 + k (1 - cos theta)) and theta unchanged
    rng = np.random.default_rng(0)
    origin = np.array([80.0, 75.0])
    k = -0.15
    pts = origin + rng.normal(0, 30, (50, 2))
    out = W.Cardioid(origin, k, fade=1e9).forward(pts)
    d, d2 = pts - origin, out - origin
    r, r2 = np.linalg.norm(d, axis=1), np.linalg.norm(d2, axis=1)
    cos_t = -d[:, 1] / r  # theta from the upward vertical, image y down
    np.testing.assert_allclose(r2, r * (1 + k * (1 - cos_t)), rtol=1e-9)
    np.testing.assert_allclose(np.arctan2(d2[:, 1], d2[:, 0]), np.arctan2(d[:, 1], d[:, 0]), atol=1e-12)


def test_backward_chain_inverts_the_forward_chain() -> None:
    base_lm = np.asarray(F.BASE_LANDMARKS["astronaut"])
    a, b = W.similarity_from_eyes(base_lm[:2], F.EYES)
    ctrl0 = F.control_points(W.apply_similarity(a, b, base_lm))
    ident = F.draw_identity(3, 5)
    idw = F.identity_warp(ident, ctrl0)
    for age in (2.0, 8.0, 30.0, 69.0):
        maps = [idw, *F.ageing_maps(age, idw.forward(ctrl0))]
        q = np.stack(np.meshgrid(np.linspace(0, 159, 40), np.linspace(0, 159, 40)), -1)
        p0 = W.backward_chain(maps, q)[-1]
        assert np.abs(W.forward_chain(maps, p0) - q).max() < 0.01  # pixels


def test_ageing_transform_shapes_children_and_old_faces() -> None:
    """Cardioidal strain shortens the lower face of a child; sagging lengthens an old one."""
    base_lm = np.asarray(F.BASE_LANDMARKS["hopper"])
    a, b = W.similarity_from_eyes(base_lm[:2], F.EYES)
    lm0 = W.apply_similarity(a, b, base_lm)
    ctrl = F.control_points(lm0)

    def eye_mouth_over_iod(age: float) -> float:
        lm = W.forward_chain(F.ageing_maps(age, ctrl), lm0)
        iod = np.linalg.norm(lm[1] - lm[0])
        return float(np.linalg.norm((lm[3] + lm[4]) / 2 - (lm[0] + lm[1]) / 2) / iod)

    ratios = [eye_mouth_over_iod(a) for a in (1, 6, 12, 25, 55, 70)]
    assert ratios[0] < ratios[1] < ratios[2] < ratios[3]  # children grow into the adult shape
    assert ratios[3] == pytest.approx(eye_mouth_over_iod(30))  # adults before sagging: no change
    assert ratios[3] < ratios[4] < ratios[5]
    assert ratios[0] < 0.93 * ratios[3]


def test_identity_and_age_are_independent_by_construction() -> None:
    from scipy.stats import chi2_contingency, kruskal

    cfg = S.SynthConfig(identities=120, per_identity=10, seed=4)
    photos = S.plan(cfg)
    ages = np.array([p.age for p in photos])
    ident = np.array([p.identity.index for p in photos])
    base = np.array([F.BASE_NAMES.index(p.identity.base) for p in photos])
    assert ages.min() >= cfg.age_min and ages.max() <= cfg.age_max
    # every identity spans the whole range (stratified draws): one age per tenth of the range
    for i in range(cfg.identities):
        strata = np.floor((ages[ident == i] - cfg.age_min) / (cfg.age_max - cfg.age_min) * 10 - 1e-9)
        assert len(set(np.clip(strata, 0, 9))) >= 8
    # ages do not differ between identities, nor between base portraits
    assert kruskal(*[ages[ident == i] for i in range(cfg.identities)]).pvalue > 0.5
    table = np.array([np.histogram(ages[base == k], bins=7, range=(1, 70))[0] for k in (0, 1)])
    assert chi2_contingency(table).pvalue > 0.05
    # the photo's age does not depend on which other identities exist
    small = S.plan(S.SynthConfig(identities=3, per_identity=10, seed=4))
    assert [p.age for p in small] == list(ages[:30])


def test_held_out_identities_cover_both_portraits() -> None:
    cfg = S.SynthConfig(identities=24)
    held = S.held_out_identities(cfg)
    assert len(held) == 6
    assert {F.draw_identity(0, int(n[1:])).base for n in held} == set(F.BASE_NAMES)


def test_synth_is_deterministic_and_complete(tmp_path: Path) -> None:
    """The same files from one process and from a pool of two (order of completion differs)."""
    cfg = S.SynthConfig(identities=3, per_identity=3, seed=7)
    S.synthesize(tmp_path / "a", cfg, progress=False, workers=1)
    S.synthesize(tmp_path / "b", cfg, progress=False, workers=2)
    S.synthesize(tmp_path / "c", S.SynthConfig(identities=3, per_identity=3, seed=8), progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    rows = list(csv.DictReader(open(tmp_path / "a" / "labels.csv")))
    assert len(rows) == 9 and set(rows[0]) == {"path", "identity", "age", "split"}
    assert {r["split"] for r in rows} == {"train", "test"}
    for r in rows:
        assert (tmp_path / "a" / r["path"]).is_file()
    assert not list(tmp_path.glob(".*partial"))


def test_synth_cli_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    res = run_cli("synth", "--out", str(tmp_path / "x"), "--identities", "2", "--per-identity", "2")
    assert res.returncode == 2
    assert "not empty" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_mtcnn_finds_the_faces_where_synth_put_them(tmp_path: Path) -> None:
    """A real MTCNN detects >= 95% of the photos, its five points near the generator's."""
    from facenet_pytorch import MTCNN
    from PIL import Image

    out = tmp_path / "syn"
    S.synthesize(out, S.SynthConfig(identities=6, per_identity=4, seed=1), progress=False)
    truth = {r[0]: np.array(r[1:], float).reshape(5, 2)
             for r in list(csv.reader(open(out / "landmarks.csv")))[1:]}
    mtcnn = MTCNN(keep_all=True, device="cpu")
    found, errors = 0, []
    for path, gt in truth.items():
        boxes, probs, lms = mtcnn.detect(np.asarray(Image.open(out / path).convert("RGB")), landmarks=True)
        if boxes is None or boxes[0] is None:
            continue
        found += 1
        lm = np.asarray(lms[int(np.argmax(probs.astype(float)))], dtype=float)
        errors.append(np.linalg.norm(lm - gt, axis=1).mean() / np.linalg.norm(gt[1] - gt[0]))
    assert found >= 0.95 * len(truth)
    assert np.median(errors) < 0.1
