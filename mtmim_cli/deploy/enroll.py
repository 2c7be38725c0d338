"""`mtmim enroll` and `mtmim unenroll`: records of a source aligned (photos) and embedded in
resumable chunks under out/.work, then written as a new gallery generation; identities taken
out by writing one without them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtmim_cli.deploy.gallery import Gallery
from mtmim_cli.deploy.gallery_sources import Source, read_source
from mtmim_cli.deploy.gallery_store import FIELDS, write_generation
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.flip import check_flip

THUMB = 56                  # crop side stored per face (the aligned 112 halved)
CHUNK = 512                 # records per resumable chunk of an enroll


def thumbnails(images: np.ndarray) -> np.ndarray:
    """112x112 crops halved by 2x2 means (uint8, 56x56): enough for a contact sheet."""
    n = len(images)
    x = images.reshape(n, THUMB, 2, THUMB, 2, 3).astype(np.uint16).sum(axis=(2, 4))
    return ((x + 2) // 4).astype(np.uint8)


def _work_key(src: Path, s: Source, model_sha: str, flip: str, pad: float, backbone,
              generation: int, on_miss: str) -> dict:
    listing = hashlib.sha256("\n".join(s.paths).encode()).hexdigest()
    return {"source": str(src.resolve()), "listing_sha256": listing, "records": len(s.paths),
            "model_sha256": model_sha, "flip": flip, "pad": pad, "backbone": backbone,
            "on_miss": on_miss, "base_generation": generation, "chunk": CHUNK}


def _embed_chunk(s: Source, lo: int, hi: int, model, flip: str, detector, on_miss: str,
                 device: str, batch_size: int | None) -> dict:
    """Align (photos) and embed records lo..hi of the source: features, thumbnails and which
    records got a face; the others with their reason."""
    from mtmim_cli.deploy.embed import align_one
    from mtmim_cli.eval.features import extract_features

    if s.kind == "cache":
        rows = s.cache_rows[lo:hi]
        images = s.cache.images(rows)
        keep = np.arange(lo, hi)
        status = np.array(["prealigned"] * len(keep), dtype=object)
        missed, reasons = np.zeros(0, np.int64), []
    else:
        got, keep, st, missed, reasons = [], [], [], [], []
        for n in range(lo, hi):
            img, status_n, reason = align_one(s.files[n], detector, on_miss)
            if img is None:
                missed.append(n)
                reasons.append(reason)
            else:
                got.append(img)
                keep.append(n)
                st.append(status_n)
        images = np.stack(got) if got else np.zeros((0, 112, 112, 3), np.uint8)
        keep, missed = np.asarray(keep, np.int64), np.asarray(missed, np.int64)
        status = np.array(st, dtype=object)
    feats = (extract_features(model, images, flip=flip, batch_size=batch_size, device=device)
             if len(images) else np.zeros((0, 0), np.float32))
    return {"features": feats, "faces": thumbnails(images), "keep": keep,
            "status": status.astype(str), "missed": missed, "reasons": np.array(reasons, str)}


def enroll(src: str | os.PathLike, model_path: str | os.PathLike, out: str | os.PathLike, *,
           append: bool = False, index: str | None = None, flip: str | None = None,
           backbone: str | None = None, pad: float = 0.0, on_miss: str = "skip",
           device: str = "cpu", batch_size: int | None = None, seed: int = 0,
           pq_m: int | None = None, pq_refine: str | None = None,
           progress: bool = True) -> dict:
    """Enroll every face of `src` into the gallery folder `out` (new, or `append` to one made
    with the same model and settings): align where needed, embed, write the generation and
    its index, the manifest last. Chunks are kept under out/.work until the manifest is
    written, so the same command run again after a kill resumes where it stopped."""
    from mtmim_cli.data.detect import FaceDetector, check_pad
    from mtmim_cli.deploy.embed import ON_MISS, feature_name
    from mtmim_cli.digest import file_sha256
    from mtmim_cli.index.ann import KINDS, check_pq_options
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.progress import make_progress

    src, model_path, out = Path(src), Path(model_path), Path(out)
    if index is not None and index not in KINDS:   # before hours of embedding, not after
        raise MtmimError(f"--index {index}: choose from {', '.join(KINDS)}")
    if index is not None:
        check_pq_options(index, pq_m, pq_refine)
    if on_miss not in ON_MISS:
        raise MtmimError(f"--on-miss {on_miss}: choose from {', '.join(ON_MISS)}")
    if flip is not None:
        check_flip(flip)
    pad = check_pad(pad)
    if not model_path.is_file():
        raise MtmimError(f"{model_path}: no such model file")
    model_sha = file_sha256(model_path)
    old = None
    if (out / "manifest.json").exists():
        if not append:
            raise MtmimError(f"{out}: already a gallery; --append adds to it")
        old = Gallery(out)
        om = old.manifest
        if om["model_sha256"] != model_sha:
            raise MtmimError(f"--model {model_path}: {out} was enrolled with another model "
                             f"({om['model']}, sha256 {om['model_sha256'][:12]}...)")
        if flip is not None and flip != om["flip"]:
            raise MtmimError(f"--flip {flip}: {out} was enrolled with --flip {om['flip']}")
        flip, pad, backbone = om["flip"], om["pad"], om.get("backbone") or backbone
        if index is None:   # the kind (and ivfpq options) the gallery was enrolled with
            index = om["index"]["requested"]
            if pq_m is None and pq_refine is None and index == "ivfpq":
                recorded = om["index"].get("options") or {}
                pq_m, pq_refine = recorded.get("pq_m"), recorded.get("refine")
    elif append:
        raise MtmimError(f"{out}: no gallery to append to (enroll without --append first)")
    s = read_source(src)
    model = load_identity_model(model_path, backbone)
    t = model.meta.get("threshold") if isinstance(model.meta.get("threshold"), dict) else None
    flip = flip or (t or {}).get("flip", "concat")
    dim = model.embedding_size * (2 if flip == "concat" else 1)
    index = index or "auto"
    pq = check_pq_options(index, pq_m, pq_refine, dim=dim)   # still before embedding
    generation = int(old.manifest["generation"]) if old else 0
    key = _work_key(src, s, model_sha, flip, pad, backbone, generation, on_miss)
    work = out / ".work"
    if work.is_dir():
        try:
            stored = json.loads((work / "key.json").read_text())
        except (OSError, json.JSONDecodeError):
            stored = None
        if stored != key:
            raise MtmimError(f"{work}: an interrupted enroll of other photos or settings; rerun "
                             "that command to finish it, or delete the folder")
    else:
        work.mkdir(parents=True)
        (work / "key.json.tmp").write_text(json.dumps(key))
        os.replace(work / "key.json.tmp", work / "key.json")
    detector = FaceDetector(device=device, pad=pad) if s.kind == "photos" else None
    chunks = range(0, len(s.paths), CHUNK)
    resumed = 0
    with make_progress("img", disable=not progress) as bar:
        task = bar.add_task("enroll", total=len(s.paths))
        for c, lo in enumerate(chunks):
            part = work / f"chunk-{c:06d}.npz"
            hi = min(lo + CHUNK, len(s.paths))
            if part.is_file():
                resumed += hi - lo
            else:
                got = _embed_chunk(s, lo, hi, model, flip, detector, on_miss, device, batch_size)
                tmp = work / f".chunk-{c:06d}.{os.getpid()}.npz"
                np.savez(tmp, **got)
                os.replace(tmp, part)
            bar.advance(task, hi - lo)
    parts = [np.load(work / f"chunk-{c:06d}.npz") for c in range(len(chunks))]
    keep = np.concatenate([p["keep"] for p in parts])
    feats = [p["features"] for p in parts if len(p["features"])]
    feats = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, dim), np.float32)
    faces = np.concatenate([p["faces"] for p in parts])
    status = [str(x) for p in parts for x in p["status"]]
    missed = [(s.paths[int(i)], str(r)) for p in parts
              for i, r in zip(p["missed"], p["reasons"], strict=True)]
    new = {"identity": [s.identity[i] for i in keep], "path": [s.paths[i] for i in keep],
           "age": s.age[keep], "status": status, "source": [str(src)] * len(keep)}
    if old is not None:
        rec = old.records
        new = {k: (np.concatenate([rec[k], new[k]]) if k == "age" else rec[k] + new[k])
               for k in FIELDS}
        feats = np.concatenate([np.asarray(old.features), feats])
        faces = np.concatenate([np.asarray(old.faces), faces])
    settings = {"model": str(model_path), "model_sha256": model_sha, "backbone": backbone,
                "flip": flip, "pad": pad, "on_miss": on_miss, "feature": feature_name(model),
                "threshold": t, "sources": (old.manifest["sources"] if old else []) + [
                    {"source": str(src), "records": len(s.paths), "enrolled": int(len(keep)),
                     "missed": len(missed)}]}
    built = write_generation(out, feats, faces, new, settings, index=index, seed=seed,
                             previous=old.manifest if old else None, index_options=pq)
    shutil.rmtree(work, ignore_errors=True)
    return {"out": str(out), "enrolled": int(len(keep)), "records": len(s.paths),
            "total": int(len(feats)), "identities": len(set(new["identity"])), "dim": dim,
            "missed": missed, "resumed": resumed, "index": built}



def remove_identities(gallery: str | os.PathLike, identities: Sequence[str], *,
                      index: str | None = None, seed: int = 0) -> dict:
    """A new generation without the faces of `identities` (each must be enrolled), its
    index rebuilt (the kind requested at enrolment unless `index`)."""
    g = Gallery(gallery)
    present = set(g.records["identity"])
    unknown = [i for i in identities if i not in present]
    if unknown:
        raise MtmimError(f"{g.path}: no enrolled identity {', '.join(unknown)}")
    drop = set(identities)
    keep = np.array([k for k, i in enumerate(g.records["identity"]) if i not in drop], np.int64)
    rec = {k: ([v[i] for i in keep] if k != "age" else v[keep]) for k, v in g.records.items()}
    settings = {k: g.manifest[k] for k in ("model", "model_sha256", "backbone", "flip", "pad",
                                           "on_miss", "feature", "threshold", "sources")}
    feats = np.asarray(g.features)[keep]
    faces = np.asarray(g.faces)[keep]
    info = g.manifest["index"]
    kind = index or info["requested"]
    # the ivfpq options asked for at enrolment, kept while the kind is
    options = info.get("options", {}) if kind == info["requested"] else {}
    built = write_generation(g.path, feats, faces, rec, settings, index=kind, seed=seed,
                             previous=g.manifest, index_options=options)
    return {"removed": int(len(g) - len(keep)), "total": int(len(keep)),
            "identities": len(set(rec["identity"])), "index": built}
