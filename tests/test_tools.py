"""calibrate / verify / embed / export against independent computations, with real models
(a short real fine-tuning run), real MTCNN on synthetic photos, real onnxruntime."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from mtmim_cli.errors import MtmimError
from tests.conftest import run_cli, tiny_finetuned


@pytest.fixture(scope="module")
def model_and_cache(tmp_path_factory) -> tuple[Path, Path]:
    """A real fine-tuned (mtmim mode) tiny model and a labelled cache of 8 x 6 images."""
    return tiny_finetuned(tmp_path_factory.mktemp("tools"),
                          [float(3 + 11 * j + k) for k in range(8) for j in range(6)], seed=5)


def _features(model_path: Path, images: np.ndarray) -> np.ndarray:
    """Image + mirror features, concatenated and L2-normalised, computed directly."""
    from mtmim_cli.models.identity import load_identity_model

    model = load_identity_model(model_path)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    off = (112 - model.input_width) // 2
    x = (x[..., off:off + model.input_width] - 127.5) / 128
    with torch.no_grad():
        f = torch.cat([model(x), model(torch.flip(x, dims=[3]))], 1).numpy().astype(np.float64)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_calibrated_threshold_is_the_lowest_one_within_the_far(model_and_cache, tmp_path) -> None:
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.deploy.verify import calibrate_threshold, store_threshold
    from mtmim_cli.eval.pairs import cross_age_pairs
    from mtmim_cli.models.identity import load_identity_model

    model, cache = model_and_cache
    far = 0.1  # 100 impostor pairs: 10 false accepts, the fewest that count as measured
    t = calibrate_threshold(model, cache, far=far, n_pairs=200, seed=2)
    c = Cache(cache)
    i, j, same = cross_age_pairs(c.identity, c.age, 200, 2, usable=c.usable)
    f = _features(model, c.images(np.arange(len(c))))
    scores = (f[i] * f[j]).sum(1)
    imp = scores[~same]
    # brute force: every candidate threshold, the lowest whose FAR (score >= t) is <= far
    cands = np.sort(np.r_[scores, np.inf])
    best = next(x for x in cands if np.mean(imp >= x) <= far)
    assert t["value"] == pytest.approx(best, abs=1e-5)
    assert t["far_measured"] <= far and t["far"] == far
    assert t["tar"] == pytest.approx(np.mean(scores[same] >= t["value"]), abs=1e-9)
    assert t["impostor_pairs"] == int((~same).sum()) == 100 and t["far_resolved"]
    k = int((imp >= t["value"]).sum())
    assert t["false_accepts"] == k and t["far_measured"] == k / 100
    ci = binomtest(k, 100).proportion_ci(confidence_level=0.95, method="exact")
    np.testing.assert_allclose(t["far_interval"], [ci.low, ci.high], rtol=1e-9)
    out = store_threshold(model, t, tmp_path / "calibrated.pt")
    loaded = load_identity_model(out)
    assert loaded.meta["threshold"]["value"] == t["value"]
    assert {"value", "far", "protocol"} <= set(loaded.meta["threshold"])
    # weights untouched
    ref = load_identity_model(model)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))


def test_calibrate_refuses_a_far_its_impostor_pairs_cannot_resolve(model_and_cache,
                                                                     tmp_path) -> None:
    """FAR 0.05 over 100 impostor pairs rests on 5 false accepts: refused (before any model
    is read), stored marked unresolved on request, accepted with a lower bar."""
    from mtmim_cli.deploy.verify import calibrate_threshold

    model, cache = model_and_cache
    with pytest.raises(MtmimError) as err:
        calibrate_threshold(tmp_path / "absent.pt", cache, far=0.05, n_pairs=200, seed=2)
    assert str(err.value) == (
        "--far 0.05: 100 impostor pairs from c.h5 leave 5 false accepts at that rate; the "
        "smallest FAR they resolve is 0.1 (10 false accepts, --min-false-accepts): raise "
        "--far, draw more pairs, or pass --allow-unresolved")
    t = calibrate_threshold(model, cache, far=0.05, n_pairs=200, seed=2, allow_unresolved=True)
    assert t["far_resolved"] is False and t["far_measured"] <= 0.05
    assert calibrate_threshold(model, cache, far=0.05, n_pairs=200, seed=2,
                               min_false_accepts=5)["far_resolved"] is True

    r = run_cli("calibrate", str(model), "--cache", str(cache), "--far", "0.01",
                "--n-pairs", "200", "--out", str(tmp_path / "cal.pt"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "100 impostor pairs" in r.stderr and "smallest FAR they resolve is 0.1" in r.stderr
    assert not (tmp_path / "cal.pt").exists()
    r = run_cli("calibrate", str(model), "--cache", str(cache), "--far", "0.01",
                "--n-pairs", "200", "--out", str(tmp_path / "cal.pt"), "--allow-unresolved")
    assert r.returncode == 0 and "UNRESOLVED" in r.stderr, r.stderr
    assert "1 of 100 impostor pairs, 95% interval 0.00025-0.054" in r.stdout, r.stdout
    from mtmim_cli.models.identity import load_identity_model

    stored = load_identity_model(tmp_path / "cal.pt").meta["threshold"]
    assert stored["far_resolved"] is False and stored["impostor_pairs"] == 100


def test_exact_rate_interval_matches_scipy_and_its_edges() -> None:
    from mtmim_cli.eval.metrics import exact_rate_interval

    for k, n in [(0, 10), (2, 270), (10, 1000), (7, 7), (1, 1)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        np.testing.assert_allclose(exact_rate_interval(k, n), [ci.low, ci.high], atol=1e-12)
    assert exact_rate_interval(0, 100)[0] == 0.0 and exact_rate_interval(100, 100)[1] == 1.0
    # zero events in n: the upper end is 1 - 0.025^(1/n) (the "rule of three" is ~3/n)
    assert exact_rate_interval(0, 100)[1] == pytest.approx(1 - 0.025 ** (1 / 100))


def test_calibrate_refuses_external_weights_without_out(model_and_cache, tmp_path) -> None:
    from mtmim_cli.deploy.verify import store_threshold

    plain = tmp_path / "backbone.pth"
    from mtmim_cli.models.identity import load_identity_model

    torch.save(load_identity_model(model_and_cache[0]).encoder.state_dict(), plain)
    with pytest.raises(MtmimError, match="give --out"):
        store_threshold(plain, {"value": 0.5, "far": 0.01, "protocol": "x", "backbone": "tiny"})


def test_embed_cache_matches_direct_features(model_and_cache, tmp_path) -> None:
    import h5py

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.deploy.embed import embed_source

    model, cache = model_and_cache
    s = embed_source(cache, model, tmp_path / "e.h5", progress=False)
    c = Cache(cache)
    assert s["embedded"] == len(c) == s["total"] and s["missed"] == []
    with h5py.File(tmp_path / "e.h5", "r") as f:
        emb = f["embeddings"][:]
        assert list(f["path"].asstr()[:]) == c.paths
        assert set(f["status"].asstr()[:]) == {"detected"} and len(f["missed_path"]) == 0
        assert f.attrs["flip"] == "concat" and f.attrs["feature"] == "x_id"
        np.testing.assert_allclose(f["age"][:], c.age, equal_nan=True)
    np.testing.assert_allclose(emb, _features(model, c.images(np.arange(len(c)))), atol=1e-5)


def test_embed_skips_faceless_records_instead_of_writing_nan_rows(tmp_path) -> None:
    """A cache with misses and an unreadable record: one row per face, no NaN anywhere, the
    skipped records listed with their reasons; a pretrained model's feature is x."""
    import h5py

    from mtmim_cli.data.cache import DETECTED, ERROR, MISS, CacheWriter
    from mtmim_cli.data.records import Record
    from mtmim_cli.deploy.embed import embed_source
    from tests.test_finetune import save_tiny_pretrain

    rng = np.random.default_rng(3)
    records = [Record(f"{i}.jpg", f"p{i % 3}", float(10 + i)) for i in range(7)]
    faulty = {2: (MISS, "no face found"), 5: (ERROR, "truncated JPEG")}
    w = CacheWriter(tmp_path / "c.h5", records, attrs={"reader": "test", "source_root": "."})
    faces = {}
    for i in range(7):
        if i in faulty:
            w.write(i, None, faulty[i][0], reason=faulty[i][1])
        else:
            faces[i] = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            w.write(i, faces[i], DETECTED)
    w.commit(7)
    cache = w.finish()
    _, model = save_tiny_pretrain(tmp_path / "pre.pt", seed=1)

    s = embed_source(cache, model, tmp_path / "e.h5", progress=False)
    assert (s["embedded"], s["total"]) == (5, 7)
    assert s["missed"] == [("2.jpg", "no face found"), ("5.jpg", "truncated JPEG")]
    with h5py.File(tmp_path / "e.h5", "r") as f:
        emb = f["embeddings"][:]
        assert f.attrs["feature"] == "x"
        assert list(f["path"].asstr()[:]) == [f"{i}.jpg" for i in faces]
        assert list(f["identity"].asstr()[:]) == [f"p{i % 3}" for i in faces]
        np.testing.assert_array_equal(f["age"][:], [10.0 + i for i in faces])
        assert list(f["missed_path"].asstr()[:]) == ["2.jpg", "5.jpg"]
        assert list(f["missed_reason"].asstr()[:]) == ["no face found", "truncated JPEG"]
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(emb, _features(model, np.stack(list(faces.values()))), atol=1e-5)


@pytest.mark.slow
def test_embed_folder_skips_or_centre_crops_a_faceless_photo(model_and_cache, tmp_path) -> None:
    """Real MTCNN on a folder of two synthetic faces and one blank photo, through the CLI."""
    import shutil

    import h5py
    from PIL import Image

    from mtmim_cli.data.align import center_crop
    from mtmim_cli.demo.synth import SynthConfig, synthesize
    from mtmim_cli.deploy.embed import embed_source

    model, _ = model_and_cache
    syn = tmp_path / "syn"
    synthesize(syn, SynthConfig(identities=2, per_identity=2, seed=4), progress=False)
    photos = tmp_path / "photos"
    shutil.copytree(syn / "images" / "s000", photos)
    blank = np.full((160, 120, 3), 200, np.uint8)
    blank[40:120, 30:90] = 90
    Image.fromarray(blank).save(photos / "blank.png")

    r = run_cli("embed", str(photos), "--model", str(model), "--out", str(tmp_path / "a.h5"),
                "--quiet")
    assert r.returncode == 0, r.stderr
    assert "2/3 faces embedded (128-d x_id)" in r.stdout
    assert "skipped 1 without a face" in r.stdout and "blank.png: no face found" in r.stdout
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert len(f["embeddings"]) == 2 and np.isfinite(f["embeddings"][:]).all()
        assert list(f["missed_path"].asstr()[:]) == ["blank.png"]

    s = embed_source(photos, model, tmp_path / "b.h5", on_miss="center", progress=False)
    assert (s["embedded"], s["center"], s["missed"]) == (3, 1, [])
    with h5py.File(tmp_path / "b.h5", "r") as f:
        paths, status = list(f["path"].asstr()[:]), list(f["status"].asstr()[:])
        k = paths.index("blank.png")
        assert status[k] == "center" and status.count("detected") == 2
        np.testing.assert_allclose(f["embeddings"][k],
                                   _features(model, np.array(center_crop(blank))[None])[0],
                                   atol=1e-5)
        assert len(f["missed_path"]) == 0


def test_export_onnx_matches_torch_on_another_batch_size(model_and_cache, tmp_path) -> None:
    import onnxruntime as ort

    from mtmim_cli.deploy.export import export_onnx
    from mtmim_cli.models.identity import load_identity_model

    model, cache = model_and_cache
    r = export_onnx(model, tmp_path / "m.onnx", check_cache=cache)
    assert r["max_abs_diff"] < 1e-4 and r["min_cosine"] > 0.99999
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(9))
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]) \
        .run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = load_identity_model(model)(x).numpy()  # x_id of the fine-tuned model
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_verify_cli_exit_codes_and_messages(model_and_cache, tmp_path) -> None:
    """Real MTCNN on synthetic photos: 0 same, 1 different, 2 with a one-line reason."""
    from PIL import Image

    from mtmim_cli.demo.synth import SynthConfig, synthesize

    model, cache = model_and_cache
    syn = tmp_path / "syn"
    synthesize(syn, SynthConfig(identities=2, per_identity=2, seed=3), progress=False)
    a, b = syn / "images/s000/s000_00.jpg", syn / "images/s001/s001_00.jpg"
    from mtmim_cli.deploy.verify import calibrate_threshold, store_threshold, verify_photos

    with pytest.raises(MtmimError, match="no verification threshold"):
        verify_photos(a, a, model)
    cal = str(store_threshold(model, calibrate_threshold(model, cache, far=0.1, n_pairs=200),
                              tmp_path / "cal.pt"))
    res = run_cli("verify", str(a), str(a), "--model", cal)
    assert res.returncode == 0 and "same person" in res.stdout
    score = float(res.stdout.split("cosine ")[1].split(",")[0])
    assert math.isclose(score, 1.0, abs_tol=1e-4)
    res = run_cli("verify", str(a), str(b), "--model", cal, "--threshold", "1.01")
    assert res.returncode == 1 and "different people" in res.stdout
    blank = tmp_path / "blank.jpg"
    Image.fromarray(np.full((160, 160, 3), 200, np.uint8)).save(blank)
    res = run_cli("verify", str(a), str(blank), "--model", cal)
    assert res.returncode == 2 and f"{blank}: no face found" in res.stderr
    assert "Traceback" not in res.stderr


def test_embed_and_verify_pad_detect_as_align_pad(model_and_cache, tmp_path, monkeypatch) -> None:
    """--pad on a photo folder (embed) and on two photos (verify) is align's --pad: the
    detector is built with it, the faces embedded are those `align --pad` caches from the same
    photos, and verify's cosine is that of the two embeddings. Bad values are one line."""
    import h5py

    import mtmim_cli.data.detect as D
    from mtmim_cli.data.align import align_dataset
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.deploy.embed import embed_source
    from mtmim_cli.deploy.verify import verify_photos
    from tests.faces import astronaut, write_jpeg

    pads = []

    class Spy(D.FaceDetector):
        def __init__(self, *a, **kw):
            pads.append(kw.get("pad"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(D, "FaceDetector", Spy)
    model, _ = model_and_cache
    face = astronaut()
    tight = write_jpeg(tmp_path / "photos" / "eileen" / "tight.jpg", face[70:180, 165:265])
    wide = write_jpeg(tmp_path / "photos" / "eileen" / "wide.jpg", face[0:320, 60:380])
    cache = Cache(align_dataset(tmp_path / "photos", "folder", tmp_path / "a.h5", pad=0.5,
                                workers=1, progress=False).out)
    assert cache.usable.all()
    s = embed_source(tmp_path / "photos", model, tmp_path / "e.h5", pad=0.5, progress=False)
    assert s["embedded"] == 2 and pads == [0.5, 0.5]
    with h5py.File(tmp_path / "e.h5", "r") as f:
        assert list(f["path"].asstr()[:]) == list(cache.paths) and f.attrs["pad"] == 0.5
        emb = f["embeddings"][:]
    np.testing.assert_allclose(emb, _features(model, cache.images(np.arange(2))), atol=1e-5)
    v = verify_photos(tight, wide, model, threshold=0.0, pad=0.5)
    assert pads[-1] == 0.5 and v.score == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5)

    with pytest.raises(MtmimError, match="a cache holds aligned faces"):
        embed_source(tmp_path / "a.h5", model, tmp_path / "e2.h5", pad=0.5, progress=False)
    r = run_cli("verify", str(tight), str(wide), "--model", str(model), "--pad", "3")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --pad 3: must lie between 0 and 2 (a fraction of the longer side)"], r.stderr
