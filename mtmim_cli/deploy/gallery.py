"""A gallery of enrolled faces and 1:N search over it (`mtmim enroll`, `mtmim search`).

A gallery is a folder:

    manifest.json          written last, by rename: a gallery without one is not a gallery
    features-G.npy         float32 (N, D), L2-normalised (what `embed` writes, same model)
    faces-G.npy            uint8 (N, 56, 56, 3): each face's aligned crop at half size (sheets)
    records-G.csv          identity, path, age (empty unknown), status, source per row
    index-G.faiss          the FAISS index when one is in use (none for the exact scan)
    .work/                 an enroll under way: its key and finished chunks (resume)

G is the generation: append and remove write a new generation beside the old one, rename the
manifest onto it and only then delete the old files, so a reader (or a killed writer) sees
one whole generation or the previous one. The manifest holds the model's path and sha256,
the feature, flip, pad and backbone, the counts, each file's size, and the index: its kind,
parameters and recall@1 against the exact scan (`mtmim_cli.index.ann`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtmim_cli import __version__
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.flip import check_flip

FORMAT = "mtmim-gallery"
VERSION = 1
THUMB = 56                  # crop side stored per face (the aligned 112 halved)
CHUNK = 512                 # records per resumable chunk of an enroll
FIELDS = ("identity", "path", "age", "status", "source")


# --------------------------------------------------------------------------- sources

@dataclass
class _Source:
    """Records to enroll: labels per record, and how to get their aligned faces."""
    kind: str                 # cache or photos
    root: Path
    paths: list[str]
    identity: list[str]
    age: np.ndarray
    cache: object | None = None
    cache_rows: np.ndarray | None = None   # cache: the record index of each entry
    files: list[Path] = field(default_factory=list)


def read_source(src: Path) -> _Source:
    """A cache (.h5: its records with a face), a folder of photos (identity: the parent
    folder's name) or a CSV path,identity[,age] (paths relative to the CSV)."""
    from mtmim_cli.data.readers import IMAGE_EXTS, read_csv

    if not src.exists():
        raise MtmimError(f"{src}: no such file or folder")
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file()
                       and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
        if not files:
            raise MtmimError(f"{src}: no photos found (looked for {', '.join(sorted(IMAGE_EXTS))})")
        return _Source("photos", src, [p.relative_to(src).as_posix() for p in files],
                       [p.parent.name if p.parent != src else p.stem for p in files],
                       np.full(len(files), np.nan, np.float32), files=files)
    if src.suffix.lower() == ".csv":
        recs = read_csv(src)
        files = [src.parent / r.path for r in recs]
        for f in files:
            if not f.is_file():
                raise MtmimError(f"{f}: no such photo (listed in {src})")
        return _Source("photos", src.parent, [r.path for r in recs], [r.identity for r in recs],
                       np.array([r.age for r in recs], np.float32), files=files)
    if src.suffix.lower() in (".h5", ".hdf5"):
        from mtmim_cli.data.cache import Cache

        cache = Cache(src)
        rows = np.flatnonzero(cache.usable)
        if not len(rows):
            raise MtmimError(f"{src}: no record holds a face")
        names = np.asarray(cache.identity_names, dtype=object)
        paths = list(cache.paths)
        return _Source("cache", src, [paths[int(i)] for i in rows],
                       [str(names[cache.identity[int(i)]]) for i in rows],
                       cache.age[rows].astype(np.float32), cache=cache, cache_rows=rows)
    raise MtmimError(f"{src}: not a cache (.h5), a CSV or a folder of photos")


def thumbnails(images: np.ndarray) -> np.ndarray:
    """112x112 crops halved by 2x2 means (uint8, 56x56): enough for a contact sheet."""
    n = len(images)
    x = images.reshape(n, THUMB, 2, THUMB, 2, 3).astype(np.uint16).sum(axis=(2, 4))
    return ((x + 2) // 4).astype(np.uint8)


# --------------------------------------------------------------------------- the folder

def _read_manifest(path: Path) -> dict:
    mf = path / "manifest.json"
    if not path.is_dir():
        raise MtmimError(f"{path}: no such gallery folder")
    if not mf.is_file():
        extra = " (an enroll was interrupted: rerun it to resume)" if (path / ".work").is_dir() else ""
        raise MtmimError(f"{path}: not a gallery (no manifest.json){extra}")
    try:
        m = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MtmimError(f"{mf}: corrupt gallery manifest ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise MtmimError(f"{mf}: not an mtmim gallery manifest")
    if m.get("version") != VERSION:
        raise MtmimError(f"{mf}: gallery version {m.get('version')}; this mtmim reads {VERSION}")
    return m


def _sha256_bytes(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Hit:
    rank: int
    row: int
    identity: str
    path: str
    age: float
    score: float
    accepted: bool | None       # None: no threshold to decide with


@dataclass
class ProbeResult:
    probe: str                  # the photo, or the cache record
    hits: list[Hit]
    reason: str = ""            # why there are no hits (no face, unreadable)
    face: np.ndarray | None = None   # the aligned probe (112x112x3), for sheets

    @property
    def accepted(self) -> bool:
        return bool(self.hits) and self.hits[0].accepted is not False


class Gallery:
    """An enrolled gallery, opened read-only: features memory-mapped, records, the index."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        files = self.manifest["files"]
        n, d = int(self.manifest["count"]), int(self.manifest["dim"])
        try:
            for key, name in files.items():
                if name is None:
                    continue
                p = self.path / name
                size = self.manifest["sizes"][key]
                if not p.is_file():
                    raise MtmimError(f"{p}: missing from the gallery (manifest names it)")
                if p.stat().st_size != size:
                    raise MtmimError(f"{p}: corrupt gallery file ({p.stat().st_size} bytes, "
                                     f"the manifest says {size})")
            if _sha256_bytes(self.path / files["records"]) != self.manifest["records_sha256"]:
                raise MtmimError(f"{self.path / files['records']}: corrupt gallery file "
                                 "(its sha256 differs from the manifest's)")
            self.features = np.load(self.path / files["features"], mmap_mode="r")
            self.faces = np.load(self.path / files["faces"], mmap_mode="r")
        except (ValueError, OSError, KeyError) as exc:
            raise MtmimError(f"{self.path}: corrupt gallery ({exc})") from None
        if self.features.shape != (n, d) or self.features.dtype != np.float32:
            raise MtmimError(f"{self.path}: corrupt gallery (features {self.features.shape} "
                             f"{self.features.dtype}, manifest says ({n}, {d}) float32)")
        self.records = _read_records(self.path / files["records"])
        if len(self.records["identity"]) != n or len(self.faces) != n:
            raise MtmimError(f"{self.path}: corrupt gallery (records, faces and features "
                             "disagree in count)")
        self.index = None
        if files.get("index"):
            import faiss

            try:
                self.index = faiss.read_index(str(self.path / files["index"]))
            except RuntimeError as exc:
                raise MtmimError(f"{self.path / files['index']}: corrupt index "
                                 f"({str(exc).splitlines()[0]})") from None
            info = self.manifest["index"]
            from mtmim_cli.index.ann import set_search_param

            key = "nprobe" if info["kind"] == "ivf" else "efSearch"
            set_search_param(self.index, info["kind"], info["params"][key])
        self._model = None
        self.last_summary: dict | None = None

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def identities(self) -> list[str]:
        return sorted(set(self.records["identity"]))

    # ---- search
    def search_features(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the top-`k` gallery faces of each probe feature."""
        from mtmim_cli.index.ann import faiss_search
        from mtmim_cli.index.exact import exact_search

        if probes.shape[-1] != self.features.shape[1]:
            raise MtmimError(f"{self.path}: probes are {probes.shape[-1]}-d, the gallery "
                             f"{self.features.shape[1]}-d")
        if self.index is not None:
            return faiss_search(self.index, probes, k)
        return exact_search(self.features, probes, k)

    def model(self, model_path: str | os.PathLike | None = None):
        """The enrolled model (its recorded path, or `model_path` when moved), its sha256
        checked against the manifest's."""
        if self._model is not None and model_path is None:
            return self._model
        from mtmim_cli.digest import file_sha256
        from mtmim_cli.models.identity import load_identity_model

        path = Path(model_path or self.manifest["model"])
        if not path.is_file():
            raise MtmimError(f"{path}: the gallery's model is not there (pass --model)")
        if file_sha256(path) != self.manifest["model_sha256"]:
            raise MtmimError(f"{path}: not the model {self.path} was enrolled with "
                             f"(sha256 {self.manifest['model_sha256'][:12]}...)")
        self._model = load_identity_model(path, self.manifest.get("backbone"))
        return self._model

    def threshold(self, override: float | None = None) -> dict | None:
        """The decision threshold: `override`, else the model's calibrated one when it was
        measured on the gallery's flip mode; None when there is none."""
        if override is not None:
            return {"value": float(override), "source": "given"}
        t = self.manifest.get("threshold")
        if isinstance(t, dict) and "value" in t and t.get("flip", "concat") == self.manifest["flip"]:
            return {"value": float(t["value"]), "far": t.get("far"), "source": "calibrated"}
        return None

    def search(self, probes: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray,
               top: int = 5, *, model: str | os.PathLike | None = None,
               threshold: float | None = None, device: str = "cpu",
               progress: bool = False) -> list[ProbeResult]:
        """Search photos, folders of photos, caches (or aligned 112x112 uint8 faces as an
        array) against the gallery: one ProbeResult per probe, a faceless one with no hits and
        its reason."""
        m = self.model(model)
        faces = probe_faces(probes, self.manifest.get("pad", 0.0), device)
        with_face = [k for k, (_, img, _) in enumerate(faces) if img is not None]
        results = [ProbeResult(name, [], reason, img) for name, img, reason in faces]
        if not with_face:
            return results
        from mtmim_cli.eval.features import extract_features

        imgs = np.stack([faces[k][1] for k in with_face])
        feats = extract_features(m, imgs, flip=self.manifest["flip"], device=device,
                                 progress=progress)
        scores, rows = self.search_features(feats, top)
        t = self.threshold(threshold)
        for j, k in enumerate(with_face):
            results[k].hits = [self._hit(r + 1, int(row), float(s), t)
                               for r, (s, row) in enumerate(zip(scores[j], rows[j], strict=True))
                               if row >= 0]
        return results

    def _hit(self, rank: int, row: int, score: float, t: dict | None) -> Hit:
        rec = self.records
        return Hit(rank, row, rec["identity"][row], rec["path"][row], float(rec["age"][row]),
                   score, None if t is None else score >= t["value"])


def probe_faces(probes, pad: float, device: str) -> list[tuple[str, np.ndarray | None, str]]:
    """(name, aligned face or None, reason) per probe: photos aligned (a folder: its photos),
    a cache's records with a face read as they are."""
    from mtmim_cli.deploy.embed import align_one

    if isinstance(probes, np.ndarray):
        if probes.ndim != 4 or probes.shape[1:] != (112, 112, 3) or probes.dtype != np.uint8:
            raise MtmimError(f"<array>: expected aligned faces (N, 112, 112, 3) uint8, "
                             f"got {probes.shape} {probes.dtype}")
        return [(f"<face {k}>", probes[k], "") for k in range(len(probes))]
    if isinstance(probes, (str, os.PathLike)):
        probes = [probes]
    out: list[tuple[str, np.ndarray | None, str]] = []
    photos: list[Path] = []
    for p in map(Path, probes):
        if not p.exists():
            raise MtmimError(f"{p}: no such file or folder")
        if p.is_dir() or p.suffix.lower() == ".csv":
            photos += read_source(p).files
        elif p.suffix.lower() in (".h5", ".hdf5"):
            s = read_source(p)
            imgs = s.cache.images(s.cache_rows)
            out += [(f"{p.name}:{path}", img, "") for path, img in zip(s.paths, imgs, strict=True)]
        else:
            photos.append(p)
    if photos:
        from mtmim_cli.data.detect import FaceDetector, check_pad

        detector = FaceDetector(device=device, pad=check_pad(pad))
        for p in photos:
            img, status, reason = align_one(p, detector)
            out.append((str(p), img, reason if img is None else ""))
    return out


# --------------------------------------------------------------------------- records I/O

def _write_records(path: Path, rec: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        for k in range(len(rec["identity"])):
            age = rec["age"][k]
            w.writerow([rec["identity"][k], rec["path"][k], "" if math.isnan(age) else f"{age:g}",
                        rec["status"][k], rec["source"][k]])


def _read_records(path: Path) -> dict:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise MtmimError(f"{path}: unreadable gallery records ({exc})") from None
    if not rows or tuple(rows[0]) != FIELDS:
        raise MtmimError(f"{path}: corrupt gallery records (header {rows[:1]})")
    body = rows[1:]
    return {"identity": [r[0] for r in body], "path": [r[1] for r in body],
            "age": np.array([float(r[2]) if r[2] else np.nan for r in body], np.float32),
            "status": [r[3] for r in body], "source": [r[4] for r in body]}


def _empty_records() -> dict:
    return {"identity": [], "path": [], "age": np.zeros(0, np.float32), "status": [],
            "source": []}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- enroll

def _work_key(src: Path, s: _Source, model_sha: str, flip: str, pad: float, backbone,
              generation: int, on_miss: str) -> dict:
    listing = hashlib.sha256("\n".join(s.paths).encode()).hexdigest()
    return {"source": str(src.resolve()), "listing_sha256": listing, "records": len(s.paths),
            "model_sha256": model_sha, "flip": flip, "pad": pad, "backbone": backbone,
            "on_miss": on_miss, "base_generation": generation, "chunk": CHUNK}


def _embed_chunk(s: _Source, lo: int, hi: int, model, flip: str, detector, on_miss: str,
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
           append: bool = False, index: str = "auto", flip: str | None = None,
           backbone: str | None = None, pad: float = 0.0, on_miss: str = "skip",
           device: str = "cpu", batch_size: int | None = None, seed: int = 0,
           progress: bool = True) -> dict:
    """Enroll every face of `src` into the gallery folder `out` (new, or `append` to one made
    with the same model and settings): align where needed, embed, write the generation and
    its index, the manifest last. Chunks are kept under out/.work until the manifest is
    written, so the same command run again after a kill resumes where it stopped."""
    from mtmim_cli.data.detect import FaceDetector, check_pad
    from mtmim_cli.deploy.embed import ON_MISS, feature_name
    from mtmim_cli.digest import file_sha256
    from mtmim_cli.index.ann import KINDS
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.progress import make_progress

    src, model_path, out = Path(src), Path(model_path), Path(out)
    if index not in KINDS:   # before hours of embedding, not after
        raise MtmimError(f"--index {index}: choose from {', '.join(KINDS)}")
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
    elif append:
        raise MtmimError(f"{out}: no gallery to append to (enroll without --append first)")
    s = read_source(src)
    model = load_identity_model(model_path, backbone)
    t = model.meta.get("threshold") if isinstance(model.meta.get("threshold"), dict) else None
    flip = flip or (t or {}).get("flip", "concat")
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
    dim = model.embedding_size * (2 if flip == "concat" else 1)
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
                             previous=old.manifest if old else None)
    shutil.rmtree(work, ignore_errors=True)
    return {"out": str(out), "enrolled": int(len(keep)), "records": len(s.paths),
            "total": int(len(feats)), "identities": len(set(new["identity"])), "dim": dim,
            "missed": missed, "resumed": resumed, "index": built}


def write_generation(out: Path, feats: np.ndarray, faces: np.ndarray, rec: dict,
                     settings: dict, *, index: str, seed: int = 0,
                     previous: dict | None = None) -> dict:
    """Write a complete gallery generation and its index beside the current one, then the
    manifest by rename, then remove the previous generation's files."""
    from mtmim_cli.index.ann import build_index

    gen = int(previous["generation"]) + 1 if previous else 1
    names = {"features": f"features-{gen}.npy", "faces": f"faces-{gen}.npy",
             "records": f"records-{gen}.csv", "index": None}
    out.mkdir(parents=True, exist_ok=True)
    _save_npy(out / names["features"], feats)
    _save_npy(out / names["faces"], faces)
    tmp = out / f".{names['records']}.{os.getpid()}.tmp"
    _write_records(tmp, rec)
    os.replace(tmp, out / names["records"])
    idx, built = build_index(feats, index, seed=seed)
    if idx is not None:
        import faiss

        names["index"] = f"index-{gen}.faiss"
        tmp = out / f".{names['index']}.{os.getpid()}.tmp"
        faiss.write_index(idx, str(tmp))
        os.replace(tmp, out / names["index"])
    manifest = {"format": FORMAT, "version": VERSION, "generation": gen, "count": int(len(feats)),
                "dim": int(feats.shape[1]), "identities": len(set(rec["identity"])),
                **settings, "index": built.to_dict(), "files": names,
                "sizes": {k: (out / v).stat().st_size for k, v in names.items() if v},
                "records_sha256": _sha256_bytes(out / names["records"]),
                "tool_version": __version__}
    tmp = out / f".manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out / "manifest.json")
    for name in (previous or {}).get("files", {}).values():
        if name and name not in names.values():
            (out / name).unlink(missing_ok=True)
    return built.to_dict()


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
    built = write_generation(g.path, feats, faces, rec, settings,
                             index=index or g.manifest["index"]["requested"], seed=seed,
                             previous=g.manifest)
    return {"removed": int(len(g) - len(keep)), "total": int(len(keep)),
            "identities": len(set(rec["identity"])), "index": built}
