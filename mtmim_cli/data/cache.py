"""The HDF5 cache of aligned faces: schema, a resumable atomic writer, and a reader.

Layout (schema version 1)::

    images          uint8   (N, 112, 112, 3)  RGB, uncompressed, one image per chunk
    identity        int64   (N,)              index into identity_names
    identity_names  str     (M,)
    age             float32 (N,)              NaN where unknown
    path            str     (N,)              relative to attrs['source_root']
    split           str     (N,)              '' unless the reader knows one
    landmarks       float32 (N, 5, 2)         source-image pixels, NaN where none
    det_score       float32 (N,)              NaN where none
    status          uint8   (N,)              see STATUS_NAMES
    reason          str     (N,)              why a record is a miss or an error, else ''

Attributes: format='mtmim-cache', schema_version, template (JSON), reader, source_root,
tool_version, command, n_done (records written so far, for resume), records_sha1.

One image per uncompressed chunk: random single-image reads are ~300x faster than with
compressed multi-image chunks, and training reads in random order.

The writer fills ``<final>.partial`` and renames it when every record is written, so a file
with the final name is always complete; a killed run resumes from ``n_done``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from mtmim_cli import __version__
from mtmim_cli.atomic import tmp_path_for
from mtmim_cli.data.records import Record
from mtmim_cli.errors import MtmimError

FORMAT = "mtmim-cache"
SCHEMA_VERSION = 1
IMAGE_SIZE = 112

# Status codes. DETECTED, CENTER and PREALIGNED hold a usable face; MISS and ERROR do not.
DETECTED, CENTER, PREALIGNED, MISS, ERROR = 0, 1, 2, 3, 4
STATUS_NAMES = {DETECTED: "detected", CENTER: "center", PREALIGNED: "prealigned",
                MISS: "miss", ERROR: "error"}
USABLE = (DETECTED, CENTER, PREALIGNED)

_STR = h5py.string_dtype(encoding="utf-8")
_ZEROS = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def records_digest(records: Sequence[Record]) -> str:
    """A fingerprint of the record list, so resume refuses a different input."""
    h = hashlib.sha1()
    for r in records:
        h.update(f"{r.path}\t{r.identity}\t{r.age}\t{r.split}\n".encode())
    return h.hexdigest()


class CacheWriter:
    """Writes records by index into ``<final>.partial``; `finish()` renames it into place.

    Records must be written in index order; `commit(n)` marks the first n as durable.
    Opening a writer over an existing partial file with the same records (and the same values
    of the attributes named in `match_attrs`) resumes it from `start`.

    Written records are held in memory until `commit` (or a bounded buffer fills) and then
    written and flushed together, so a process killed between commits leaves the file exactly
    as the last flush left it; image chunks are allocated when the file is created, so those
    writes touch no HDF5 index structures.
    """

    BUFFER = 256  # records held before an early write (not a commit: n_done does not move)

    def __init__(self, final_path: str | os.PathLike, records: Sequence[Record],
                 attrs: dict | None = None, resume: bool = True,
                 match_attrs: Sequence[str] = ()) -> None:
        self.final_path = Path(final_path)
        self.tmp_path = tmp_path_for(self.final_path)
        self.records = list(records)
        digest = records_digest(self.records)
        attrs = attrs or {}
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self.start = 0
        self._pending: dict[int, tuple] = {}
        if resume and self.tmp_path.exists():
            f = self._open_partial(digest, attrs, match_attrs)
            if f is not None:
                self.h5 = f
                self.start = int(f.attrs["n_done"])
                self.committed = self.start
                return
        if self.tmp_path.exists():
            self.tmp_path.unlink()
        self.h5 = self._create(digest, attrs)
        self.committed = 0

    def _open_partial(self, digest: str, attrs: dict, match_attrs: Sequence[str]) -> h5py.File | None:
        """The partial file if it can be resumed, else None (it is then started over)."""
        try:
            f = h5py.File(self.tmp_path, "r+")
        except OSError:
            return None  # a partial file too broken to open: start over
        try:
            same = f.attrs.get("records_sha1") == digest and all(
                _attr_text(f.attrs.get(k)) == _attr_text(attrs.get(k)) for k in match_attrs)
            n_done = int(f.attrs["n_done"])
            ok = same and 0 <= n_done <= len(self.records) and f["status"].shape == (len(self.records),)
            if ok and n_done:
                f["images"][n_done - 1]  # the last committed image must read back
                f["reason"][n_done - 1]
        except Exception:  # noqa: BLE001  any damage means: start over, never resume garbage
            ok = False
        if not ok:
            f.close()
            return None
        return f

    def _create(self, digest: str, attrs: dict) -> h5py.File:
        n = len(self.records)
        names = sorted({r.identity for r in self.records})
        index = {name: i for i, name in enumerate(names)}
        f = h5py.File(self.tmp_path, "w")
        dcpl = None
        if n:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        f.create_dataset("images", (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                         chunks=(1, IMAGE_SIZE, IMAGE_SIZE, 3) if n else None, dcpl=dcpl,
                         fill_time="never" if n else None)
        f.create_dataset("identity", data=np.array([index[r.identity] for r in self.records],
                                                   dtype=np.int64))
        f.create_dataset("identity_names", data=np.array(names, dtype=object), dtype=_STR)
        f.create_dataset("age", data=np.array([r.age for r in self.records], dtype=np.float32))
        f.create_dataset("path", data=np.array([r.path for r in self.records], dtype=object),
                         dtype=_STR)
        f.create_dataset("split", data=np.array([r.split for r in self.records], dtype=object),
                         dtype=_STR)
        f.create_dataset("landmarks", data=np.full((n, 5, 2), np.nan, dtype=np.float32))
        f.create_dataset("det_score", data=np.full((n,), np.nan, dtype=np.float32))
        f.create_dataset("status", data=np.full((n,), ERROR, dtype=np.uint8))
        f.create_dataset("reason", data=np.array(["not processed"] * n, dtype=object), dtype=_STR)
        f.attrs["format"] = FORMAT
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["tool_version"] = __version__
        f.attrs["records_sha1"] = digest
        f.attrs["n_done"] = 0
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        f.flush()
        return f

    def write(self, i: int, image: np.ndarray | None, status: int, landmarks: np.ndarray | None = None,
              det_score: float = float("nan"), reason: str = "") -> None:
        """Store record i. `image` is (112,112,3) uint8, or None for a miss or an error."""
        if image is not None and (image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or image.dtype != np.uint8):
            raise ValueError(f"image {i} has shape {image.shape} {image.dtype}")
        lm = None if landmarks is None else np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
        self._pending[i] = (None if image is None else image.copy(), status, lm, det_score, reason)
        if len(self._pending) >= self.BUFFER:
            self._write_pending()

    def _write_pending(self) -> None:
        h5 = self.h5
        for i in sorted(self._pending):
            image, status, lm, det_score, reason = self._pending[i]
            # chunks are allocated without a fill: a record without a face gets explicit zeros
            h5["images"][i] = image if image is not None else _ZEROS
            if lm is not None:
                h5["landmarks"][i] = lm
            h5["det_score"][i] = det_score
            h5["status"][i] = status
            h5["reason"][i] = reason
        self._pending.clear()

    def commit(self, n_done: int) -> None:
        """Mark records [0, n_done) as written and flush them to disk."""
        self._write_pending()
        self.h5.attrs["n_done"] = n_done
        self.h5.flush()
        self.committed = n_done

    def finish(self) -> Path:
        self.commit(len(self.records))
        self.h5.close()
        os.replace(self.tmp_path, self.final_path)
        return self.final_path

    def close(self) -> None:
        """Close without finishing (the partial file stays for a later resume; uncommitted
        records are dropped)."""
        self._pending.clear()
        if self.h5.id.valid:
            self.h5.close()


def _attr_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


class Cache:
    """Read-only view of a cache. Safe to pass to DataLoader workers: each process opens
    its own HDF5 handle on first image access (h5py handles must not cross a fork)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise MtmimError(f"{self.path}: no such file")
        try:
            f = h5py.File(self.path, "r")
        except OSError as exc:
            raise MtmimError(f"{self.path}: not an mtmim cache (not an HDF5 file: {exc})") from None
        with f:
            if f.attrs.get("format") != FORMAT:
                raise MtmimError(f"{self.path}: not an mtmim cache (format attribute missing)")
            version = int(f.attrs.get("schema_version", -1))
            if version != SCHEMA_VERSION:
                raise MtmimError(f"{self.path}: cache schema {version}, this tool reads {SCHEMA_VERSION}")
            self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            self.identity = f["identity"][:]
            self.identity_names = [s.decode() if isinstance(s, bytes) else s
                                   for s in f["identity_names"][:]]
            self.age = f["age"][:].astype(np.float64)
            self.paths = [s.decode() if isinstance(s, bytes) else s for s in f["path"][:]]
            self.split = [s.decode() if isinstance(s, bytes) else s for s in f["split"][:]]
            self.landmarks = f["landmarks"][:]
            self.det_score = f["det_score"][:]
            self.status = f["status"][:]
            self.reason = [s.decode() if isinstance(s, bytes) else s for s in f["reason"][:]]
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.identity)

    @property
    def usable(self) -> np.ndarray:
        """Boolean mask of records that hold a face (detected, centre fallback, pre-aligned)."""
        return np.isin(self.status, USABLE)

    def _images(self) -> h5py.Dataset:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5["images"]

    def image(self, i: int) -> np.ndarray:
        return self._images()[int(i)]

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images at the given indices, in the given order.

        h5py's fancy indexing is ~20x slower than plain reads here, so runs of consecutive
        indices are read as slices and the rest row by row.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        if idx.size == 0:
            return out
        ds = self._images()
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        if np.all(order == np.arange(len(idx))):
            # Already increasing: read each run of consecutive indices in one slice.
            breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
            for run in np.split(np.arange(len(idx)), breaks):
                lo, hi = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]]) + 1
                out[run[0]:run[-1] + 1] = ds[lo:hi]
            return out
        for k, i in enumerate(idx):
            out[k] = ds[int(i)]
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
