"""The gallery: the exact scan against brute force (ties and order included), recall@1 and the
index fallback, enroll / append / unenroll / resume, search and its outputs, bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mtmim_cli.errors import MtmimError
from mtmim_cli.index.ann import build_index, faiss_search, nearest_other, recall_at_1
from mtmim_cli.index.exact import brute_force, exact_search
from tests.conftest import REPO, run_cli, write_cache

# --------------------------------------------------------------------------- exact scan


@pytest.mark.parametrize("k", [1, 3, 10, 64, 500])
@pytest.mark.parametrize("block", [None, 7, 64, 1000])
def test_exact_equals_brute_force_with_ties(k: int, block: int | None) -> None:
    """Small-integer vectors: every dot product is exact in float32 and many are equal, so
    the order (score desc, row asc) is tested on ties at the k-th place and across blocks."""
    rng = np.random.default_rng(k)
    g = rng.integers(-2, 3, (300, 6)).astype(np.float32)
    g[150:160] = g[10]   # duplicated faces: ten rows with exactly equal scores
    p = np.r_[rng.integers(-2, 3, (40, 6)).astype(np.float32), g[10:11]]
    s, i = exact_search(g, p, k, block_rows=block)
    bs, bi = brute_force(g, p, min(k, len(g)))
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_array_equal(s, bs)
    # brute force written out independently: a stable sort on -score keeps row order
    full = p @ g.T
    ref = np.argsort(-full, axis=1, kind="stable")[:, :min(k, len(g))]
    np.testing.assert_array_equal(i, ref)


def test_exact_on_real_valued_features() -> None:
    rng = np.random.default_rng(1)
    g = rng.standard_normal((5000, 32)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    p = g[rng.choice(5000, 30)] + 0.1 * rng.standard_normal((30, 32)).astype(np.float32)
    s, i = exact_search(g, p, 5, block_rows=999)
    full = p @ g.T
    np.testing.assert_array_equal(i, np.argsort(-full, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(s, np.take_along_axis(full, i, axis=1), rtol=1e-5, atol=1e-6)


def test_exact_edge_sizes() -> None:
    g = np.eye(3, dtype=np.float32)
    s, i = exact_search(g, g[1], 10)
    assert i.tolist() == [[1, 0, 2]] and s.tolist() == [[1.0, 0.0, 0.0]]
    assert exact_search(g, np.zeros((0, 3), np.float32), 2)[1].shape == (0, 2)


# --------------------------------------------------------------------------- recall, index


def _clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 10, d))
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_recall_counts_wrong_neighbours() -> None:
    """A search that answers wrongly for a known set of probes has recall 1 - that share."""
    f = _clustered(400)
    sample = np.arange(0, 400, 4)
    exact = lambda p, k: exact_search(f, p, k)   # noqa: E731
    assert recall_at_1(f, exact, sample) == 1.0
    _, true_rows = nearest_other(exact, f[sample], sample)
    far = np.argsort(f @ f[0])[:1]   # a face far from most: a wrong answer for nearly all

    def wrong_every_fifth(p, k):
        s, r = exact_search(f, p, k)
        bad = np.arange(len(p)) % 5 == 0
        r[bad, :] = far[0]
        s[bad, :] = -1.0
        return s, r

    rec = recall_at_1(f, wrong_every_fifth, sample)
    expected = 1 - np.mean((np.arange(len(sample)) % 5 == 0) & (true_rows != far[0]))
    assert rec == pytest.approx(expected)


def test_index_reaches_recall_or_falls_back() -> None:
    f = _clustered(3000)
    index, built = build_index(f, "ivf", sample_size=300)
    assert built.kind == "ivf" and built.recall_at_1 >= 0.99 and "nprobe" in built.params
    assert built.recall_at_1 == pytest.approx(recall_at_1(
        f, lambda p, k: faiss_search(index, p, k), np.sort(
            np.random.default_rng(0).choice(3000, 300, replace=False))))
    # a bar no index can pass: the exact scan is used and the reason says so
    none, fb = build_index(f, "hnsw", sample_size=200, min_recall=1.01)
    assert none is None and fb.kind == "exact" and fb.requested == "hnsw"
    assert "using the exact scan" in fb.fallback and fb.tried
    assert build_index(f, "auto")[1].kind == "exact"   # small galleries: exact
    with pytest.raises(MtmimError, match="--index bogus"):
        build_index(f, "bogus")


# --------------------------------------------------------------------------- galleries


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from tests.test_finetune import save_tiny_pretrain

    d = tmp_path_factory.mktemp("gallery")
    _, model = save_tiny_pretrain(d / "pre.pt", seed=1)
    _, other = save_tiny_pretrain(d / "other.pt", seed=2)
    ids = [f"id{k}" for k in range(8) for _ in range(6)]
    ages = [float((k * 7 + j * 11) % 70) for k in range(8) for j in range(6)]
    cache = write_cache(d / "c.h5", ids, ages)
    more = write_cache(d / "more.h5", [f"new{k}" for k in range(5)], seed=3)
    return {"d": d, "model": model, "other": other, "cache": cache, "more": more, "ids": ids,
            "ages": ages}


def _enroll(setup, out: Path, src=None, **kw):
    from mtmim_cli import api

    return api.enroll(src or setup["cache"], setup["model"], out, **kw)


def test_enroll_and_search_match_brute_force(setup, tmp_path) -> None:
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.eval.features import extract_features
    from mtmim_cli.models.identity import load_identity_model

    g = _enroll(setup, tmp_path / "g")
    assert len(g) == 48 and g.identities == sorted(set(setup["ids"]))
    np.testing.assert_array_equal(g.records["age"], np.array(setup["ages"], np.float32))
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert m["index"]["kind"] == "exact" and len(m["model_sha256"]) == 64
    # the features are embed's: the same model on the same images
    cache = Cache(setup["cache"])
    ref = extract_features(load_identity_model(setup["model"]), cache, np.arange(48))
    np.testing.assert_allclose(np.asarray(g.features), ref, atol=1e-6)
    assert g.faces.shape == (48, 56, 56, 3)
    res = g.search(setup["cache"], top=4)
    bs, bi = brute_force(ref, ref, 4)
    for n, r in enumerate(res):
        assert [h.row for h in r.hits] == bi[n].tolist()
        np.testing.assert_allclose([h.score for h in r.hits], bs[n], atol=1e-5)
        assert r.hits[0].identity == setup["ids"][n] and r.hits[0].accepted is None


def test_append_remove_and_refusals(setup, tmp_path) -> None:
    out = tmp_path / "g"
    _enroll(setup, out)
    g = _enroll(setup, out, setup["more"], append=True)
    assert len(g) == 53 and "new4" in g.identities and g.manifest["generation"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "faces-2.npy", "features-2.npy", "manifest.json", "records-2.csv"]   # old generation gone
    with pytest.raises(MtmimError, match="another model"):
        from mtmim_cli import api

        api.enroll(setup["more"], setup["other"], out, append=True)
    with pytest.raises(MtmimError, match="already a gallery; --append"):
        _enroll(setup, out)
    from mtmim_cli import api

    g = api.remove(out, ["id0", "new1"])
    assert len(g) == 53 - 7 and "id0" not in g.identities
    assert all(i not in ("id0", "new1") for i in g.records["identity"])
    with pytest.raises(MtmimError, match="no enrolled identity nobody"):
        api.remove(out, ["nobody"])


def test_killed_enroll_resumes(setup, tmp_path, monkeypatch) -> None:
    import mtmim_cli.deploy.enroll as G

    monkeypatch.setattr(G, "CHUNK", 10)
    real = G._embed_chunk
    calls = []

    def dies_on_third(*a, **kw):
        calls.append(a[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(G, "_embed_chunk", dies_on_third)
    out = tmp_path / "g"
    with pytest.raises(KeyboardInterrupt):
        _enroll(setup, out)
    assert not (out / "manifest.json").exists()
    with pytest.raises(MtmimError, match="not a gallery .*interrupted"):
        G.Gallery(out)
    monkeypatch.setattr(G, "_embed_chunk", real)
    g = _enroll(setup, out)
    assert g.last_summary["resumed"] == 20 and len(g) == 48
    assert not (out / ".work").exists()
    fresh = _enroll(setup, tmp_path / "fresh")
    np.testing.assert_array_equal(np.asarray(g.features), np.asarray(fresh.features))


def test_outputs_and_threshold(setup, tmp_path) -> None:
    from mtmim_cli.deploy.search_report import write_results, write_sheet

    g = _enroll(setup, tmp_path / "g")
    res = g.search(setup["cache"], top=2, threshold=0.99999)
    assert all(h.accepted == (h.score >= 0.99999) for r in res for h in r.hits)
    meta = {"gallery": "g", "faces": 48, "identities": 8, "index": "exact", "threshold": "x"}
    md = write_results(tmp_path / "r.md", res, meta).read_text()
    assert md.count("\n| c.h5:img000") == 96
    js = json.loads(write_results(tmp_path / "r.json", res, meta).read_text())
    assert js["results"][5]["hits"][0]["identity"] == "id0"
    csv_text = write_results(tmp_path / "r.csv", res, meta).read_text()
    assert csv_text.splitlines()[0] == "probe,rank,identity,photo,age,cosine,decision"
    png = write_sheet(tmp_path / "s.png", res[:3], g.faces, 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrated_threshold_is_used(setup, tmp_path) -> None:
    from mtmim_cli.deploy.verify import store_threshold

    ck = tmp_path / "cal.pt"
    store_threshold(setup["model"], {"value": 0.5, "far": 0.01, "protocol": "x",
                                     "flip": "concat", "backbone": "tiny"}, ck)
    from mtmim_cli import api

    g = api.enroll(setup["cache"], ck, tmp_path / "g")
    assert g.threshold() == {"value": 0.5, "far": 0.01, "source": "calibrated"}
    assert g.search(setup["cache"], top=1)[0].hits[0].accepted is True


@pytest.mark.slow
def test_cli_errors_and_exit_codes(setup, tmp_path) -> None:
    """One real subprocess round: enroll, a search with a faceless photo and a missing file,
    a wrong model on append, a corrupt gallery; each bad input is one line, exit 2."""
    from PIL import Image

    out = tmp_path / "g"
    r = run_cli("enroll", str(setup["cache"]), "-m", str(setup["model"]), "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert "48/48 faces enrolled" in r.stdout and "index: exact" in r.stdout
    blank = tmp_path / "blank.jpg"
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(blank)
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    r = run_cli("search", str(blank), str(junk), str(setup["cache"]), "-g", str(out), "-k", "2",
                "--threshold", "0.5", "-o", str(tmp_path / "r.csv"))
    assert r.returncode == 1, r.stderr   # the blank photo has no match
    assert f"{blank}: no face found" in r.stdout
    # one line naming the file once
    assert f"{junk}: not an image file" in r.stdout and r.stdout.count(str(junk)) == 1
    r = run_cli("search", str(setup["cache"]), "-g", str(out), "-q", "--threshold", "-1")
    assert r.returncode == 0, r.stderr
    r = run_cli("search", str(setup["cache"]), "-g", str(out), "-q", "--threshold", "1.5")
    assert r.returncode == 1
    bad = {
        "missing": ("search", str(tmp_path / "nope.jpg"), "-g", str(out)),
        "other model": ("enroll", str(setup["more"]), "-m", str(setup["other"]), "-o",
                        str(out), "--append", "-q"),
        "not a gallery": ("search", str(blank), "-g", str(tmp_path)),
        "bad index": ("enroll", str(setup["more"]), "-m", str(setup["model"]), "-o",
                      str(tmp_path / "g2"), "--index", "kd", "-q"),
    }
    feats = out / "features-1.npy"
    feats.write_bytes(feats.read_bytes()[:-100])
    bad["corrupt"] = ("search", str(setup["cache"]), "-g", str(out))
    for what, args in bad.items():
        r = run_cli(*args)
        assert r.returncode == 2, (what, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (what, r.stderr)
    assert not (tmp_path / "g2" / ".work").exists()   # --index refused before embedding
    (out / "manifest.json").write_text("{not json")
    r = run_cli("search", str(blank), "-g", str(out))
    assert r.returncode == 2 and "corrupt gallery manifest" in r.stderr


def test_readme_example_runs(setup, tmp_path, monkeypatch) -> None:
    """The README's five-line example, as written there, on a cache, a model and a photo of
    a face laid out under the names it uses."""
    import shutil

    from tests.faces import face_variants, write_jpeg

    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- api example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md: the api example block is missing"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 6
    monkeypatch.chdir(tmp_path)
    shutil.copy(setup["cache"], tmp_path / "faces.h5")
    shutil.copy(setup["model"], tmp_path / "model.pt")
    write_jpeg(tmp_path / "probe.jpg", face_variants(1, size=240)[0])
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "gallery" / "manifest.json").is_file()
    assert scope["vector"].shape == (128,)


def test_search_speed_bench_runs(tmp_path) -> None:
    """The bench's smallest run: every row printed, the exact scan checked against numpy."""
    import subprocess
    import sys

    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "search_speed.py"), "--sizes",
                        "10000", "--repeats", "1", "--batch", "20", "--threads", "1", "--out",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["sizes"]["10000"]
    assert {"faiss flat", "faiss sq8", "faiss fp16"} <= set(row["indexes"])
    assert any(k.startswith("hnsw48 sq8") for k in row["indexes"]) and row["exact_bytes_per_face"] == 512
    assert "exact/numpy" in r.stdout
