"""An enrolled gallery opened for 1:N search (`mtmim search`): its files checked against the
manifest, features memory-mapped, the index loaded, probes aligned and embedded. The folder's
format is `gallery_store`; enrolling into it is `enroll`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtmim_cli.deploy.gallery_sources import read_source
from mtmim_cli.deploy.gallery_store import read_manifest, read_records
from mtmim_cli.digest import file_sha256
from mtmim_cli.errors import MtmimError


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
        self.manifest = read_manifest(self.path)
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
            if file_sha256(self.path / files["records"]) != self.manifest["records_sha256"]:
                raise MtmimError(f"{self.path / files['records']}: corrupt gallery file "
                                 "(its sha256 differs from the manifest's)")
            self.features = np.load(self.path / files["features"], mmap_mode="r")
            self.faces = np.load(self.path / files["faces"], mmap_mode="r")
        except (ValueError, OSError, KeyError) as exc:
            raise MtmimError(f"{self.path}: corrupt gallery ({exc})") from None
        if self.features.shape != (n, d) or self.features.dtype != np.float32:
            raise MtmimError(f"{self.path}: corrupt gallery (features {self.features.shape} "
                             f"{self.features.dtype}, manifest says ({n}, {d}) float32)")
        self.records = read_records(self.path / files["records"])
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
            from mtmim_cli.index.ann import SEARCH_KEY, Reranked, set_search_param

            if "k_factor" in info["params"] and info["kind"] == "hnsw":
                # the graph ranks on SQ8 codes; its shortlist is scored on the features file
                self.index = Reranked(self.index, self.features, info["params"]["k_factor"])
            set_search_param(self.index, info["kind"], info["params"][SEARCH_KEY[info["kind"]]])
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

