"""Identity embeddings of a photo folder or an aligned cache, written to one HDF5 file.

Layout: `embeddings` float32 (N, D), L2-normalised (NaN rows where no face); `path` str
(relative to the source); `identity` str (the cache's name, or the photo's parent folder);
`age` float32 (NaN unknown); `ok` bool; `reason` str; attributes: model, model_sha256,
flip, source, tool_version. Written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from mtmim_cli import __version__
from mtmim_cli.errors import MtmimError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _from_cache(src: Path):
    from mtmim_cli.data.cache import Cache

    cache = Cache(src)
    usable = cache.usable
    names = np.asarray(cache.identity_names, dtype=object)
    return (cache, np.flatnonzero(usable), list(cache.paths),
            [str(n) for n in names[cache.identity]], cache.age.astype(np.float32),
            [r if not u else "" for r, u in zip(cache.reason, usable, strict=True)])


def _from_folder(src: Path, device: str, progress: bool):
    """Align every photo under `src` (recursively): (images, rows with a face, paths, ...)."""
    from mtmim_cli.data.align import align_photo
    from mtmim_cli.data.detect import FaceDetector
    from mtmim_cli.data.readers import IMAGE_EXTS
    from mtmim_cli.progress import make_progress

    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not p.name.startswith("."))
    if not files:
        raise MtmimError(f"{src}: no photos found (looked for {', '.join(sorted(IMAGE_EXTS))})")
    detector = FaceDetector(device=device)
    images = np.zeros((len(files), 112, 112, 3), np.uint8)
    ok = np.zeros(len(files), bool)
    reasons = [""] * len(files)
    with make_progress("img", disable=not progress) as bar:
        task = bar.add_task("align", total=len(files))
        for n, p in enumerate(files):
            try:
                aligned, _ = align_photo(p, detector)
            except MtmimError as exc:
                aligned, reasons[n] = None, str(exc)
            if aligned is not None:
                images[n], ok[n] = aligned, True
            elif not reasons[n]:
                reasons[n] = "no face found"
            bar.advance(task)
    rel = [p.relative_to(src).as_posix() for p in files]
    ident = [p.parent.name if p.parent != src else "" for p in files]
    return images, np.flatnonzero(ok), rel, ident, np.full(len(files), np.nan, np.float32), reasons


def embed_source(src: str | os.PathLike, model_path: str | os.PathLike,
                 out: str | os.PathLike, *, flip: str = "concat", backbone: str | None = None,
                 device: str = "cpu", batch_size: int = 128, progress: bool = True) -> dict:
    """Embed every face of `src` (a folder of photos or an mtmim cache) into `out`."""
    import h5py

    from mtmim_cli.atomic import atomic_write
    from mtmim_cli.eval.features import extract_features
    from mtmim_cli.models.identity import load_identity_model

    src, model_path, out = Path(src), Path(model_path), Path(out)
    if not src.exists():
        raise MtmimError(f"{src}: no such file or folder")
    model = load_identity_model(model_path, backbone)
    if src.is_dir():
        source, rows, paths, ident, age, reasons = _from_folder(src, device, progress)
    else:
        source, rows, paths, ident, age, reasons = _from_cache(src)
    n = len(paths)
    feats = extract_features(model, source, rows, flip=flip, batch_size=batch_size,
                             device=device, progress=progress)
    dim = feats.shape[1] if len(rows) else model.embedding_size * (2 if flip == "concat" else 1)
    emb = np.full((n, dim), np.nan, np.float32)
    emb[rows] = feats
    ok = np.zeros(n, bool)
    ok[rows] = True
    text = h5py.string_dtype(encoding="utf-8")
    with atomic_write(out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("embeddings", data=emb)
            f.create_dataset("path", data=np.array(paths, dtype=object), dtype=text)
            f.create_dataset("identity", data=np.array(ident, dtype=object), dtype=text)
            f.create_dataset("age", data=age)
            f.create_dataset("ok", data=ok)
            f.create_dataset("reason", data=np.array(reasons, dtype=object), dtype=text)
            f.attrs.update({"format": "mtmim-embeddings", "model": str(model_path),
                            "model_sha256": _sha256(model_path), "flip": flip,
                            "source": str(src), "tool_version": __version__})
    return {"out": str(out), "embedded": int(ok.sum()), "total": n, "dim": int(dim),
            "missed": [(p, r) for p, r, k in zip(paths, reasons, ok, strict=True) if not k]}
