"""The `trained_on` record in checkpoints (mtmim_cli.data.provenance, train/lineage.py):
digests against an independent hash of the HDF5 pixels, real pretrain and fine-tune runs on
small caches, exclusion, and the lineage chain through --init."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import torch

from mtmim_cli.data import provenance as PV
from mtmim_cli.data.cache import MISS, Cache, CacheWriter
from mtmim_cli.data.records import Record

from .conftest import write_cache


def _independent_digests(path: Path) -> list[int]:
    """The digest rule read straight from the HDF5 file: blake2b-64 of each image's bytes."""
    with h5py.File(path, "r") as f:
        return [int.from_bytes(hashlib.blake2b(np.ascontiguousarray(img).tobytes(),
                                               digest_size=8).digest(), "little")
                for img in f["images"][:]]


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_digests_follow_the_pixels_not_the_file(tmp_path: Path) -> None:
    imgs = _images(6, 0)
    a = write_cache(tmp_path / "a.h5", [f"p{k // 2}" for k in range(6)], images=imgs)
    perm = np.array([3, 1, 5, 0, 2, 4])
    b = write_cache(tmp_path / "b.h5", [f"q{k}" for k in range(6)], images=imgs[perm])
    da, db = PV.cache_digests(Cache(a)), PV.cache_digests(Cache(b))
    assert da.tolist() == _independent_digests(a)
    assert db.tolist() == da[perm].tolist()                  # same pixels, other file and names
    assert PV.content_sha256(da) != PV.content_sha256(db)     # ... but another record order
    one = imgs.copy()
    one[2, 50, 50, 0] ^= 1                                    # one bit of one pixel
    c = write_cache(tmp_path / "c.h5", [f"p{k // 2}" for k in range(6)], images=one)
    dc = PV.cache_digests(Cache(c))
    assert (dc != da).tolist() == [False, False, True, False, False, False]
    assert PV.unpack(PV.pack(da[::-1])).tolist() == sorted(da.tolist())


def _record_with(cache_path: Path, used: list[int], excluded: list[int], init=None) -> dict:
    return PV.training_record([Cache(cache_path)], [np.array(used)], [excluded], init)


def test_overlap_status_and_titles(tmp_path: Path) -> None:
    imgs = _images(8, 1)
    train = write_cache(tmp_path / "train.h5", [f"p{k // 2}" for k in range(8)], images=imgs)
    test = write_cache(tmp_path / "test.h5", ["x", "x", "y", "y"], images=imgs[[0, 5, 6, 7]])
    meta = {"trained_on": _record_with(train, [0, 1, 2, 3, 4, 6], [5, 7])}
    td = PV.cache_digests(Cache(test))
    ov = PV.overlap(meta, td)
    assert ov.mask.tolist() == [True, False, True, False]    # 5 and 7 excluded, 0 and 6 trained
    assert ov.status == "trained-on" and ov.title().startswith("faces seen in training (2 of 4")
    held = PV.overlap(meta, td[[1, 3]])
    assert held.status == "held-out" and held.title() == "held-out faces"
    # A link without a record (weights from elsewhere) is said, never assumed clean.
    ext = {"trained_on": _record_with(train, [0], [], init=PV.init_link("casia.ckpt", "ab", None))}
    ov = PV.overlap(ext, td[[1, 3]])
    assert ov.status == "unrecorded" and "casia.ckpt" in ov.title()
    assert PV.overlap({"kind": "external"}, td, source="w/backbone.pth").unrecorded == ["w/backbone.pth"]


def _tiny_caches(tmp_path: Path) -> tuple[Path, Path]:
    """Two caches of 4 identities x 6 aged images; the second has one record without a face."""
    ids = [f"id{k}" for k in range(4) for _ in range(6)]
    ages = [float((k * 5 + j * 9) % 70) for k in range(4) for j in range(6)]
    a = write_cache(tmp_path / "a.h5", ids, ages, seed=1)
    recs = [Record(path=f"b{i}.jpg", identity=f"b{s}", age=ag)
            for i, (s, ag) in enumerate(zip(ids, ages, strict=True))]
    w = CacheWriter(tmp_path / "b.h5", recs, attrs={"reader": "test", "source_root": "."})
    rng = np.random.default_rng(2)
    for i in range(len(recs)):
        if i == 4:
            w.write(i, None, MISS, reason="no face")
        else:
            w.write(i, rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), 0,
                    landmarks=np.zeros((5, 2)), det_score=1.0)
    return a, w.finish()


def test_pretrain_then_finetune_records_the_chain(tmp_path: Path) -> None:
    from mtmim_cli.train.checkpoint import load_checkpoint
    from mtmim_cli.train.config import TrainConfig
    from mtmim_cli.train.finetune import finetune
    from mtmim_cli.train.pretrain import pretrain

    a, b = _tiny_caches(tmp_path)
    pre = pretrain([a], TrainConfig(out=str(tmp_path / "pre"), batch_size=8, max_steps=1,
                                    progress=False), backbone="tiny", embedding_size=16)
    pre_meta = load_checkpoint(Path(pre.run_dir) / "model.pt")["meta"]
    rec = pre_meta["trained_on"]
    assert rec["caches"] == [{"path": str(a), "records": 24, "used": 24, "excluded": [],
                              "content_sha256": PV.content_sha256(np.array(_independent_digests(a),
                                                                           np.uint64))}]
    assert rec["init"] is None
    assert PV.unpack(rec["images"]).tolist() == sorted(set(_independent_digests(a)))

    run = finetune([b], Path(pre.run_dir) / "model.pt",
                   {"out": str(tmp_path / "ft"), "epochs": 1, "batch_size": 8, "max_steps": 1,
                    "progress": False}, mode="baseline", age_groups=2, exclude=[0, 7])
    meta = load_checkpoint(run / "model.pt")["meta"]
    rec = meta["trained_on"]
    assert rec["caches"][0]["excluded"] == [0, 7] and rec["caches"][0]["used"] == 21  # 24 - miss - 2
    db = _independent_digests(b)
    want = sorted({db[i] for i in range(24) if i not in (0, 4, 7)})
    assert PV.unpack(rec["images"]).tolist() == want
    link = rec["init"]
    assert link["kind"] == "pretrain" and link["trained_on"]["caches"][0]["path"] == str(a)
    assert link["sha256"] == hashlib.sha256((Path(pre.run_dir) / "model.pt").read_bytes()).hexdigest()

    # The whole lineage: every image of a, b's images but the excluded ones and the miss.
    lin = PV.lineage(meta)
    assert set(lin.images.tolist()) == set(_independent_digests(a)) | set(want)
    assert lin.unrecorded == []
    ov = PV.overlap(meta, PV.cache_digests(Cache(b)))
    assert np.flatnonzero(~ov.mask).tolist() == [0, 4, 7]
    assert PV.overlap(meta, PV.cache_digests(Cache(a))).trained_on == 24


def test_finetune_from_external_weights_says_unrecorded(tmp_path: Path) -> None:
    from mtmim_cli.models.backbones import build_backbone
    from mtmim_cli.train.checkpoint import load_checkpoint
    from mtmim_cli.train.finetune import finetune

    a, b = _tiny_caches(tmp_path)
    torch.manual_seed(0)
    torch.save(build_backbone("tiny", 16).state_dict(), tmp_path / "backbone.pth")
    run = finetune([a], tmp_path / "backbone.pth",
                   {"out": str(tmp_path / "ft"), "epochs": 1, "batch_size": 8, "max_steps": 1,
                    "progress": False}, mode="baseline", age_groups=2, backbone="tiny")
    meta = load_checkpoint(run / "model.pt")["meta"]
    assert meta["trained_on"]["init"]["kind"] == "external"
    ov = PV.overlap(meta, PV.cache_digests(Cache(b)))
    assert ov.status == "unrecorded" and ov.unrecorded == [str(tmp_path / "backbone.pth")]
    assert PV.overlap(meta, PV.cache_digests(Cache(a))).status == "trained-on"
