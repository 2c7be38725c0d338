"""Identity embeddings of a photo folder or an aligned cache, written to one HDF5 file.

Every row is a face: photos without one are skipped (counted, and listed in `missed_path` /
`missed_reason`), never written as NaN or zero rows that a scorer unaware of them would rank.
With `on_miss="center"` a photo folder's faceless photos are embedded from their central
square instead, and marked "center" in `status`.

Layout: `embeddings` float32 (N, D), L2-normalised; `path` str (relative to the source);
`identity` str (the cache's name, or the photo's parent folder); `age` float32 (NaN unknown);
`status` str (detected, center, prealigned); `missed_path`, `missed_reason` str (M,);
attributes: feature (x_id for a fine-tuned model, x for a pretrained or external encoder; with
"minus its age subspace" for a model written by `mtmim remove-age`),
model, model_sha256, flip, on_miss, pad (detection framing of a folder's photos), source,
tool_version. Written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtmim_cli import __version__
from mtmim_cli.digest import file_sha256
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.flip import check_flip

ON_MISS = ("skip", "center")


def feature_name(model) -> str:
    """Which feature a model's embeddings are: x_id (fine-tuned), x, and any age subspace
    projected out (`mtmim remove-age`), said wherever its features go."""
    feature = "x_id" if model.factorize is not None else "x"
    if model.age_basis is not None:
        feature += f" minus its age subspace ({model.age_basis.shape[1]} dims)"
    return feature


def align_one(path: Path, detector, on_miss: str = "skip") -> tuple[np.ndarray | None, str, str]:
    """One photo aligned: (112x112x3 uint8 or None, status, reason); status detected, center
    (faceless, `on_miss="center"`), miss or error (an unreadable file: its reason)."""
    from mtmim_cli.data.align import align_photo, center_crop
    from mtmim_cli.data.readers import load_image

    try:
        aligned, _ = align_photo(path, detector)
    except MtmimError as exc:
        # the reason without the file name (callers print "path: reason", as align's do)
        return None, "error", getattr(exc, "reason", str(exc))
    if aligned is not None:
        return aligned, "detected", ""
    if on_miss == "center":
        return center_crop(load_image(path)), "center", "no face found"
    return None, "miss", "no face found"


@dataclass
class _Source:
    """What to embed: images (a Cache or an array), the rows holding a face, and per-record
    labels over all records (faceless ones included, so they can be listed)."""

    images: object
    rows: np.ndarray
    paths: list[str]
    identity: list[str]
    age: np.ndarray
    status: list[str]
    reasons: list[str]


def _from_cache(src: Path) -> _Source:
    from mtmim_cli.data.cache import STATUS_NAMES, Cache

    cache = Cache(src)
    usable = cache.usable
    names = np.asarray(cache.identity_names, dtype=object)
    return _Source(cache, np.flatnonzero(usable), list(cache.paths),
                   [str(n) for n in names[cache.identity]], cache.age.astype(np.float32),
                   [STATUS_NAMES[int(k)] for k in cache.status],
                   [r if not u else "" for r, u in zip(cache.reason, usable, strict=True)])


def _from_folder(src: Path, device: str, on_miss: str, progress: bool, pad: float) -> _Source:
    """Align every photo under `src` (recursively; detection framed by `pad`, as `align
    --pad`); faceless ones are centre-cropped when `on_miss` is "center", else left out of
    `rows`."""
    from mtmim_cli.data.detect import FaceDetector
    from mtmim_cli.data.readers import IMAGE_EXTS
    from mtmim_cli.progress import make_progress

    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not p.name.startswith("."))
    if not files:
        raise MtmimError(f"{src}: no photos found (looked for {', '.join(sorted(IMAGE_EXTS))})")
    detector = FaceDetector(device=device, pad=pad)
    images = np.zeros((len(files), 112, 112, 3), np.uint8)
    status = ["miss"] * len(files)
    reasons = [""] * len(files)
    with make_progress("img", disable=not progress) as bar:
        task = bar.add_task("align", total=len(files))
        for n, p in enumerate(files):
            aligned, status[n], reasons[n] = align_one(p, detector, on_miss)
            if aligned is not None:
                images[n] = aligned
                if status[n] == "detected":
                    reasons[n] = ""
            bar.advance(task)
    rows = np.flatnonzero([s in ("detected", "center") for s in status])
    rel = [p.relative_to(src).as_posix() for p in files]
    ident = [p.parent.name if p.parent != src else "" for p in files]
    return _Source(images, rows, rel, ident, np.full(len(files), np.nan, np.float32), status,
                   reasons)


def embed_source(src: str | os.PathLike, model_path: str | os.PathLike,
                 out: str | os.PathLike, *, flip: str = "concat", on_miss: str = "skip",
                 backbone: str | None = None, device: str = "cpu", batch_size: int | None = None,
                 pad: float = 0.0, progress: bool = True) -> dict:
    """Embed every face of `src` (a folder of photos or an mtmim cache) into `out`; records
    without a face are skipped and listed (`on_miss="center"`: a folder's faceless photos are
    embedded from their centre crop). `pad` frames a folder's photos for detection, as
    `align --pad` does."""
    import h5py

    from mtmim_cli.atomic import atomic_write
    from mtmim_cli.data.detect import check_pad
    from mtmim_cli.eval.features import extract_features
    from mtmim_cli.models.identity import load_identity_model

    check_flip(flip)
    if on_miss not in ON_MISS:
        raise MtmimError(f"--on-miss {on_miss}: choose from {', '.join(ON_MISS)}")
    src, model_path, out = Path(src), Path(model_path), Path(out)
    if not src.exists():
        raise MtmimError(f"{src}: no such file or folder")
    pad = check_pad(pad)
    if pad and not src.is_dir():
        raise MtmimError(f"{src}: --pad frames photos for detection; a cache holds aligned faces")
    model = load_identity_model(model_path, backbone)
    s = _from_folder(src, device, on_miss, progress, pad) if src.is_dir() else _from_cache(src)
    rows = s.rows
    if len(rows):
        feats = extract_features(model, s.images, rows, flip=flip, batch_size=batch_size,
                                 device=device, progress=progress)
    else:
        feats = np.zeros((0, model.embedding_size * (2 if flip == "concat" else 1)), np.float32)
    missed = np.setdiff1d(np.arange(len(s.paths)), rows)
    feature = feature_name(model)
    text = h5py.string_dtype(encoding="utf-8")

    def strings(values: list[str], idx: np.ndarray) -> np.ndarray:
        return np.array([values[int(i)] for i in idx], dtype=object)

    with atomic_write(out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("embeddings", data=feats.astype(np.float32))
            f.create_dataset("path", data=strings(s.paths, rows), dtype=text)
            f.create_dataset("identity", data=strings(s.identity, rows), dtype=text)
            f.create_dataset("age", data=s.age[rows])
            f.create_dataset("status", data=strings(s.status, rows), dtype=text)
            f.create_dataset("missed_path", data=strings(s.paths, missed), dtype=text)
            f.create_dataset("missed_reason", data=strings(s.reasons, missed), dtype=text)
            f.attrs.update({"format": "mtmim-embeddings", "feature": feature,
                            "model": str(model_path), "model_sha256": file_sha256(model_path),
                            "flip": flip, "on_miss": on_miss, "pad": pad, "source": str(src),
                            "tool_version": __version__})
    return {"out": str(out), "embedded": len(rows), "total": len(s.paths),
            "dim": int(feats.shape[1]), "feature": feature,
            "center": int(sum(s.status[int(i)] == "center" for i in rows)),
            "missed": [(s.paths[int(i)], s.reasons[int(i)]) for i in missed]}
