"""The HDF5 cache of aligned faces: schema, a resumable atomic writer, and a reader.

Layout::

    images          uint8   (N, 112, 112, 3)  RGB, uncompressed, one image per chunk   (raw)
    image_bytes     uint8   (B,)              the encoded images end to end        (jpeg, png)
    image_offset    int64   (N + 1,)          record i is image_bytes[off[i]:off[i+1]]
    identity        int64   (N,)              index into identity_names
    identity_names  str     (M,)
    age             float32 (N,)              NaN where unknown
    path            str     (N,)              relative to attrs['source_root']
    split           str     (N,)              '' unless the reader knows one
    landmarks       float32 (N, 5, 2)         source-image pixels, NaN where none
    det_score       float32 (N,)              NaN where none
    status          uint8   (N,)              see STATUS_NAMES
    reason          str     (N,)              why a record is a miss or an error, else ''

Attributes: format='mtmim-cache', schema_version (1 raw, 2 encoded), image_format (raw, jpeg,
png; absent = raw), template (JSON), reader, source_root, tool_version, command, n_done
(records written so far, for resume), records_sha1.

Raw images: one image per uncompressed chunk, since random single-image reads are ~300x
faster than with compressed multi-image chunks, and training reads in random order. 37,632
bytes an image (MS1M: 218 GB).

Encoded images (`image_format` jpeg or png): each record's JPEG/PNG bytes, decoded when read
(in the DataLoader workers during training). A 112x112 face is ~5.8 KB as JPEG at quality 95
(6.5x smaller than raw; `bench/cache_formats.py`), ~20 KB as PNG (lossless). The bytes are
stored end to end in one chunked byte array with an offset table, not as an HDF5
variable-length dataset: h5py keeps variable-length elements in the global heap, one heap
object per image, which read ~6x slower than a slice of a byte array here.

Both layouts grow as records are written (by half their size, at most 1024 images or 16 MiB
at a time), so a cache takes the disk it needs, not the whole set's size from the start. Growth
allocates the new chunks at once and flushes, so the writes between two flushes touch only
allocated chunks, never HDF5's index structures.

The writer fills ``<final>.partial`` and renames it when every record is written, so a file
with the final name is always complete; a killed run resumes from ``n_done``.

A merged cache (`mtmim merge`) may hold its images as HDF5 virtual datasets that point into
the shard files (no copy); `Cache` refuses it with a clear message when a shard is missing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np

from mtmim_cli import __version__
from mtmim_cli.atomic import tmp_path_for
from mtmim_cli.data.records import Record
from mtmim_cli.errors import MtmimError

FORMAT = "mtmim-cache"
SCHEMA_VERSION = 1            # raw images
ENCODED_SCHEMA_VERSION = 2    # encoded images (image_bytes + image_offset)
IMAGE_SIZE = 112
IMAGE_FORMATS = ("raw", "jpeg", "png")
_RAW_GROW = 1024              # images added per growth of a raw cache (38.5 MB)
_BYTES_CHUNK = 1 << 18        # chunk of the encoded byte array (256 KiB)
_BYTES_GROW = 16 << 20        # bytes added per growth of an encoded cache

# Status codes. DETECTED, CENTER and PREALIGNED hold a usable face; MISS and ERROR do not.
DETECTED, CENTER, PREALIGNED, MISS, ERROR = 0, 1, 2, 3, 4
STATUS_NAMES = {DETECTED: "detected", CENTER: "center", PREALIGNED: "prealigned",
                MISS: "miss", ERROR: "error"}
USABLE = (DETECTED, CENTER, PREALIGNED)

_STR = h5py.string_dtype(encoding="utf-8")
_ZEROS = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def encode_image(image: np.ndarray, image_format: str, quality: int = 95) -> bytes:
    """A (112,112,3) uint8 RGB face as JPEG (at `quality`, libjpeg's default 4:2:0 chroma
    subsampling, as insightface's packs) or PNG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    elif image_format == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    else:
        raise ValueError(f"image format {image_format!r}")
    return buf.getvalue()


def decode_image(data: np.ndarray, where: str = "") -> np.ndarray:
    """Encoded bytes (uint8 array) -> (112,112,3) uint8 RGB."""
    try:
        img = _decoder()(data)
    except (RuntimeError, OSError, ValueError) as exc:
        raise MtmimError(f"{where}: undecodable image in the cache ({exc})") from None
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise MtmimError(f"{where}: cached image is {img.shape}, not 112x112x3")
    return img


@functools.cache
def _decoder() -> Callable[[np.ndarray], np.ndarray]:
    """torchvision's libjpeg-turbo / libpng decoders (~1.8x Pillow's rate on 112x112 JPEGs,
    the same pixels); Pillow where torchvision no longer decodes (it deprecated its image
    codecs in 0.29 for TorchCodec)."""
    import warnings

    try:
        import torch
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode
    except ImportError:
        import io

        from PIL import Image

        def pil(data: np.ndarray) -> np.ndarray:
            with Image.open(io.BytesIO(data.tobytes())) as im:
                return np.asarray(im.convert("RGB"))
        return pil
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of "
                            "TorchVision are deprecated", category=DeprecationWarning)

    def tv(data: np.ndarray) -> np.ndarray:
        img = tv_decode(torch.from_numpy(np.ascontiguousarray(data)), mode=ImageReadMode.RGB)
        return img.permute(1, 2, 0).numpy()
    return tv


def _early_dcpl():
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


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
    as the last flush left it; image chunks are allocated (and flushed) when a dataset grows,
    so those writes touch no HDF5 index structures.

    `image_format` "jpeg" or "png" stores encoded images (see the module doc); `write` then
    also takes the bytes already encoded (`encoded=`, e.g. from worker threads or another
    cache), and `images=False` writes no image store at all (`finish(add)` lets the caller
    add one, as `merge` does with virtual datasets).
    """

    BUFFER = 256  # records held before an early write (not a commit: n_done does not move)

    def __init__(self, final_path: str | os.PathLike, records: Sequence[Record],
                 attrs: dict | None = None, resume: bool = True,
                 match_attrs: Sequence[str] = (), image_format: str = "raw",
                 jpeg_quality: int = 95, images: bool = True) -> None:
        if image_format not in IMAGE_FORMATS:
            raise MtmimError(f"--image-format {image_format}: choose from {', '.join(IMAGE_FORMATS)}")
        if not 1 <= int(jpeg_quality) <= 100:
            raise MtmimError(f"--jpeg-quality {jpeg_quality}: must be 1..100")
        self.image_format, self.jpeg_quality, self.store = image_format, int(jpeg_quality), images
        self.encoded = image_format != "raw"
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
                self.committed = self._next = self.start
                self._at = int(f["image_offset"][self.start]) if self._has_bytes() else 0
                return
        if self.tmp_path.exists():
            self.tmp_path.unlink()
        self.h5 = self._create(digest, attrs)
        self.committed = self._next = self._at = 0

    def _has_bytes(self) -> bool:
        return self.store and self.encoded

    def _open_partial(self, digest: str, attrs: dict, match_attrs: Sequence[str]) -> h5py.File | None:
        """The partial file if it can be resumed, else None (it is then started over)."""
        try:
            f = h5py.File(self.tmp_path, "r+")
        except OSError:
            return None  # a partial file too broken to open: start over
        try:
            same = f.attrs.get("records_sha1") == digest and all(
                _attr_text(f.attrs.get(k)) == _attr_text(attrs.get(k)) for k in match_attrs)
            same = same and _attr_text(f.attrs.get("image_format", "raw")) == self.image_format
            n_done = int(f.attrs["n_done"])
            ok = same and 0 <= n_done <= len(self.records) and f["status"].shape == (len(self.records),)
            if ok and n_done:
                if self._has_bytes():   # the last committed image must read back
                    lo, hi = f["image_offset"][n_done - 1: n_done + 1]
                    ok = lo <= hi <= f["image_bytes"].shape[0]
                    f["image_bytes"][lo:hi]
                elif self.store:
                    f["images"][n_done - 1]
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
        if self.store and not self.encoded:   # sized as it fills (see _grow)
            f.create_dataset("images", (0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                             maxshape=(n, IMAGE_SIZE, IMAGE_SIZE, 3),
                             chunks=(1, IMAGE_SIZE, IMAGE_SIZE, 3) if n else None,
                             dcpl=_early_dcpl() if n else None, fill_time="never" if n else None)
        elif self.store:
            f.create_dataset("image_bytes", (0,), dtype=np.uint8, maxshape=(None,),
                             chunks=(_BYTES_CHUNK,), dcpl=_early_dcpl(), fill_time="never")
            f.create_dataset("image_offset", data=np.zeros(n + 1, np.int64))
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
        f.attrs["schema_version"] = ENCODED_SCHEMA_VERSION if self.encoded else SCHEMA_VERSION
        f.attrs["image_format"] = self.image_format
        f.attrs["tool_version"] = __version__
        f.attrs["records_sha1"] = digest
        f.attrs["n_done"] = 0
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        f.flush()
        return f

    def write(self, i: int, image: np.ndarray | None, status: int, landmarks: np.ndarray | None = None,
              det_score: float = float("nan"), reason: str = "", encoded: bytes | None = None) -> None:
        """Store record i. `image` is (112,112,3) uint8, or None for a miss or an error;
        an encoded cache takes the JPEG/PNG bytes instead when `encoded` is given."""
        if image is not None and (image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or image.dtype != np.uint8):
            raise ValueError(f"image {i} has shape {image.shape} {image.dtype}")
        if encoded is not None and not self.encoded:
            raise ValueError("encoded bytes given to a raw cache")
        lm = None if landmarks is None else np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
        keep = encoded if encoded is not None else (None if image is None else image.copy())
        self._pending[i] = (keep, status, lm, det_score, reason)
        if len(self._pending) >= self.BUFFER:
            self._write_pending()

    def encode(self, image: np.ndarray) -> bytes:
        """The bytes this cache stores for `image` (thread-safe: callers may encode ahead)."""
        return encode_image(image, self.image_format, self.jpeg_quality)

    def _grow(self, name: str, need: int, step: int, cap: int | None = None) -> None:
        """Extend dataset `name` to hold `need` rows and flush, so the chunks the next writes
        fill are allocated and recorded on disk. It grows by half its size, at most `step`
        (a small cache stays small: space freed by the final trim is not given back)."""
        ds = self.h5[name]
        if ds.shape[0] >= need:
            return
        size = max(need, ds.shape[0] + min(step, ds.shape[0] // 2))
        ds.resize(min(size, cap) if cap is not None else size, axis=0)
        self.h5.flush()

    def _write_pending(self) -> None:
        h5 = self.h5
        if self._has_bytes():
            # appended in index order: write the run that starts at the next index only
            ready = []
            while self._next in self._pending:
                ready.append(self._next)
                self._next += 1
            blobs = [self._bytes_of(self._pending[i][0]) for i in ready]
            if ready:
                ends = self._at + np.cumsum([len(b) for b in blobs])
                self._grow("image_bytes", int(ends[-1]), _BYTES_GROW)
                if ends[-1] > self._at:
                    h5["image_bytes"][self._at: int(ends[-1])] = np.frombuffer(b"".join(blobs), np.uint8)
                h5["image_offset"][ready[0] + 1: ready[-1] + 2] = ends
                self._at = int(ends[-1])
            order = ready
        else:
            order = sorted(self._pending)
            if self.store and order:
                self._grow("images", order[-1] + 1, _RAW_GROW, cap=len(self.records))
        for i in order:
            image, status, lm, det_score, reason = self._pending.pop(i)
            if self.store and not self.encoded:
                # chunks are allocated without a fill: a record without a face gets explicit zeros
                h5["images"][i] = image if image is not None else _ZEROS
            if lm is not None:
                h5["landmarks"][i] = lm
            h5["det_score"][i] = det_score
            h5["status"][i] = status
            h5["reason"][i] = reason

    def _bytes_of(self, image: np.ndarray | bytes | None) -> bytes:
        if image is None:
            return b""          # a record without a face: no bytes (reads back as zeros)
        return image if isinstance(image, bytes) else self.encode(image)

    def commit(self, n_done: int) -> None:
        """Mark records [0, n_done) as written and flush them to disk."""
        self._write_pending()
        if self._has_bytes() and self._next < n_done:
            raise ValueError(f"commit({n_done}): record {self._next} was not written")
        self.h5.attrs["n_done"] = n_done
        self.h5.flush()
        self.committed = n_done

    def finish(self, add: Callable[[h5py.File], None] | None = None) -> Path:
        """Commit everything, let `add` put more into the file, and rename it into place."""
        self.commit(len(self.records))
        if self._has_bytes():
            self.h5["image_bytes"].resize((self._at,))
        if add is not None:
            add(self.h5)
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
    """Read-only view of a cache, either image layout. Safe to pass to DataLoader workers:
    each process opens its own HDF5 handle on first image access (h5py handles must not
    cross a fork). Identity, age and status are read at once; paths, splits, landmarks,
    detection scores and reasons only when first used (a training rank never needs them)."""

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
            if version not in (SCHEMA_VERSION, ENCODED_SCHEMA_VERSION):
                raise MtmimError(f"{self.path}: cache schema {version}, this tool reads "
                                 f"{SCHEMA_VERSION} and {ENCODED_SCHEMA_VERSION}")
            self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            self.image_format = _attr_text(self.attrs.get("image_format")) or "raw"
            if self.image_format not in IMAGE_FORMATS:
                raise MtmimError(f"{self.path}: unknown image format {self.image_format!r}")
            self._check_linked_shards(f)
            self.identity = f["identity"][:]
            self.identity_names = _texts(f["identity_names"][:])
            self.age = f["age"][:].astype(np.float64)
            self.status = f["status"][:]
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._offsets: np.ndarray | None = None

    def _check_linked_shards(self, f: h5py.File) -> None:
        """A merged cache's virtual images read as zeros when a shard file is gone: refuse."""
        name = "images" if self.image_format == "raw" else "image_bytes"
        ds = f.get(name)
        if ds is None or not ds.is_virtual:
            return
        for src in {v.file_name for v in ds.virtual_sources()}:
            where = Path(src) if Path(src).is_absolute() else self.path.parent / src
            if not where.exists():
                raise MtmimError(f"{self.path}: its images are in the shard {where}, which is "
                                 "missing (a merged cache links its shards; keep them beside "
                                 "it or merge with --copy)")

    def _field(self, name: str) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return f[name][:]

    @functools.cached_property
    def paths(self) -> list[str]:
        return _texts(self._field("path"))

    @functools.cached_property
    def split(self) -> list[str]:
        return _texts(self._field("split"))

    @functools.cached_property
    def reason(self) -> list[str]:
        return _texts(self._field("reason"))

    @functools.cached_property
    def landmarks(self) -> np.ndarray:
        return self._field("landmarks")

    @functools.cached_property
    def det_score(self) -> np.ndarray:
        return self._field("det_score")

    def __len__(self) -> int:
        return len(self.identity)

    @property
    def usable(self) -> np.ndarray:
        """Boolean mask of records that hold a face (detected, centre fallback, pre-aligned)."""
        return np.isin(self.status, USABLE)

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
            self._offsets = self._h5["image_offset"][:] if self.image_format != "raw" else None
        return self._h5

    def _images(self) -> h5py.Dataset:
        return self._file()["images"]

    def encoded(self, i: int) -> bytes:
        """The stored JPEG/PNG bytes of record i (an encoded cache; b'' for a record without
        a face)."""
        if self.image_format == "raw":
            raise ValueError(f"{self.path}: raw images, nothing encoded")
        f = self._file()
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        return f["image_bytes"][lo:hi].tobytes() if hi > lo else b""

    def image(self, i: int) -> np.ndarray:
        if self.image_format == "raw":
            return self._images()[int(i)]
        f = self._file()
        lo, hi = int(self._offsets[int(i)]), int(self._offsets[int(i) + 1])
        if hi <= lo:
            return _ZEROS.copy()
        return decode_image(f["image_bytes"][lo:hi], f"{self.path} record {int(i)}")

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images at the given indices, in the given order.

        h5py's fancy indexing is ~20x slower than plain reads here, so runs of consecutive
        indices are read as slices and the rest row by row.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        if idx.size == 0:
            return out
        if self.image_format != "raw":
            for k, i in enumerate(idx):
                out[k] = self.image(int(i))
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
        state["_offsets"] = None
        return state

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


def _texts(values: np.ndarray) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else s for s in values]
