"""What `enroll` reads and `search` probes with: a cache's records with a face, a folder of
photos or a CSV of them, as labels per record and the way to get each aligned face."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtmim_cli.errors import MtmimError


@dataclass
class Source:
    """Records to enroll: labels per record, and how to get their aligned faces."""
    kind: str                 # cache or photos
    root: Path
    paths: list[str]
    identity: list[str]
    age: np.ndarray
    cache: object | None = None
    cache_rows: np.ndarray | None = None   # cache: the record index of each entry
    files: list[Path] = field(default_factory=list)


def read_source(src: Path) -> Source:
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
        return Source("photos", src, [p.relative_to(src).as_posix() for p in files],
                       [p.parent.name if p.parent != src else p.stem for p in files],
                       np.full(len(files), np.nan, np.float32), files=files)
    if src.suffix.lower() == ".csv":
        recs = read_csv(src)
        files = [src.parent / r.path for r in recs]
        for f in files:
            if not f.is_file():
                raise MtmimError(f"{f}: no such photo (listed in {src})")
        return Source("photos", src.parent, [r.path for r in recs], [r.identity for r in recs],
                       np.array([r.age for r in recs], np.float32), files=files)
    if src.suffix.lower() in (".h5", ".hdf5"):
        from mtmim_cli.data.cache import Cache

        cache = Cache(src)
        rows = np.flatnonzero(cache.usable)
        if not len(rows):
            raise MtmimError(f"{src}: no record holds a face")
        names = np.asarray(cache.identity_names, dtype=object)
        paths = list(cache.paths)
        return Source("cache", src, [paths[int(i)] for i in rows],
                       [str(names[cache.identity[int(i)]]) for i in rows],
                       cache.age[rows].astype(np.float32), cache=cache, cache_rows=rows)
    raise MtmimError(f"{src}: not a cache (.h5), a CSV or a folder of photos")
