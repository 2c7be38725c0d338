"""Which faces a model was trained on: the `trained_on` record every checkpoint of ours
carries in its meta, and the check that test images are not among them.

Digest. Each image is identified by an 8-byte BLAKE2b digest of the aligned 112x112x3 uint8
array stored in the cache, i.e. of exactly the pixels the model saw (before crop and flip).
Two caches aligned from the same photos with the same settings give the same digests, so a
test cache that is a copy, a merge or a subset of a training cache is still recognised; a
re-aligned or re-encoded photo is not (its pixels differ). Computing them reads every image
once: 0.11 s for FG-NET's 1002 photos and 0.64 s for the 6,300-photo CelebA subset on one
core of a busy machine (load average 4.5), so about a minute for CASIA-WebFace's 0.5M,
small against its training. A whole-file sha256 was
not used: it changes when `mtmim groups` or an HDF5 rewrite touches the file although no
pixel moved, and it cannot tell which records of a different file overlap.

Record (version 1), `meta["trained_on"]`::

    {"version": 1, "digest": DIGEST_NAME,
     "caches": [{"path", "records", "content_sha256", "used", "excluded": [record indices]}],
     "images": bytes,   # sorted unique uint64 (little-endian) digests of every image trained on
     "init": None | {"path", "sha256", "kind", "trained_on": <its record> | None}}

A model written by `mtmim remove-age` also carries the same record (with `init` None) for the
faces its age subspace was fitted on, as `meta["age_subspace"]["fitted_on"]`; `overlap`
counts them as trained on, since the projection was fitted to them.

`content_sha256` is the sha256 of the cache's per-record digests in record order (every
record, faces or not): a content fingerprint independent of the HDF5 layout. `images` holds
8 bytes per trained image (8 KB for FG-NET, 4 MB for 0.5M images). `init` chains: a
fine-tune from one of our pretrain checkpoints carries that checkpoint's record inside its
own, so the lineage of the weights is complete; weights from elsewhere (the shared
MobileFaceNet, an insightface backbone) carry none, and checks then say so.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtmim_cli.data.cache import Cache

VERSION = 1
DIGEST_NAME = "blake2b-64 of the aligned 112x112x3 uint8 image"
_BATCH = 256
_MEMO: dict[tuple[str, int, int], np.ndarray] = {}


def image_digests(images: np.ndarray) -> np.ndarray:
    """(N,) uint64: the 8-byte BLAKE2b digest of each image's bytes (C order)."""
    images = np.ascontiguousarray(images)
    out = np.empty(len(images), np.uint64)
    for k, img in enumerate(images):
        out[k] = int.from_bytes(hashlib.blake2b(img.tobytes(), digest_size=8).digest(), "little")
    return out


def cache_digests(cache: Cache) -> np.ndarray:
    """Digests of every record of the cache, in record order (records without a face hold
    zero images and get the digest of zeros). Memoised per file (path, size, mtime), so the
    per-round re-fits of a leave-one-out run read the cache once."""
    st = os.stat(cache.path)
    key = (str(Path(cache.path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        n = len(cache)
        out = np.empty(n, np.uint64)
        for lo in range(0, n, _BATCH):
            hi = min(n, lo + _BATCH)
            out[lo:hi] = image_digests(cache.images(np.arange(lo, hi)))
        _MEMO.clear()  # one file at a time is what the callers need; keep memory flat
        _MEMO[key] = out
    return _MEMO[key]


def content_sha256(digests: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(digests, "<u8").tobytes()).hexdigest()


def pack(digests: np.ndarray) -> bytes:
    return np.unique(np.asarray(digests, np.uint64)).astype("<u8").tobytes()


def unpack(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, "<u8").astype(np.uint64)


def training_record(caches: Sequence[Cache], used: Sequence[np.ndarray],
                    excluded: Sequence[Sequence[int]], init: dict | None) -> dict:
    """The record of one training run: `used[k]` are the record indices of `caches[k]` it
    trained on, `excluded[k]` the ones left out on purpose (e.g. a leave-one-out probe),
    `init` the starting weights' link (see `init_link`) or None for a fresh encoder."""
    entries, trained = [], []
    for cache, rows, drop in zip(caches, used, excluded, strict=True):
        d = cache_digests(cache)
        rows = np.asarray(rows, np.int64)
        trained.append(d[rows])
        entries.append({"path": str(cache.path), "records": len(cache),
                        "content_sha256": content_sha256(d), "used": int(len(rows)),
                        "excluded": sorted(int(i) for i in drop)})
    return {"version": VERSION, "digest": DIGEST_NAME, "caches": entries,
            "images": pack(np.concatenate(trained) if trained else np.zeros(0, np.uint64)),
            "init": init}


def init_link(path: str | os.PathLike, sha256: str, meta: dict | None) -> dict:
    """The `init` entry for starting weights at `path` whose checkpoint meta is `meta`
    (None or without a record: weights from elsewhere, training data unknown)."""
    meta = meta or {}
    return {"path": str(path), "sha256": sha256, "kind": str(meta.get("kind", "external")),
            "trained_on": meta.get("trained_on")}


@dataclass
class Lineage:
    """Everything a model's recorded lineage trained on, and the links that have no record."""

    images: np.ndarray                      # sorted unique uint64 digests
    caches: list[dict] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)


def lineage(meta: dict | None, source: str = "the model") -> Lineage:
    """Walk a checkpoint's `trained_on` chain through its `init` links."""
    parts, caches, unrecorded = [], [], []
    record = (meta or {}).get("trained_on")
    name = source
    while True:
        if not isinstance(record, dict) or "images" not in record:
            unrecorded.append(name)
            break
        parts.append(unpack(record["images"]))
        caches += record.get("caches", [])
        link = record.get("init")
        if not link:
            break
        name, record = link.get("path", "init weights"), link.get("trained_on")
    images = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
    return Lineage(images, caches, unrecorded)


@dataclass
class Overlap:
    """How a set of test images relates to a model's training data (its weights' lineage and,
    for a remove-age model, the faces its age subspace was fitted on)."""

    test_images: int
    trained_on: int                         # test images found among the trained images
    unrecorded: list[str]                   # links of the lineage without a training record
    mask: np.ndarray                        # per test image: trained on
    subspace_fitted_on: int = 0             # of `trained_on`: those the age subspace saw

    @property
    def status(self) -> str:
        """'trained-on', 'held-out' (whole lineage recorded, no overlap) or 'unrecorded'
        (no overlap in the recorded part, but some weights carry no record)."""
        if self.trained_on:
            return "trained-on"
        return "unrecorded" if self.unrecorded else "held-out"

    def title(self) -> str:
        """The words a section title may use for these test faces."""
        if self.trained_on:
            return (f"faces seen in training ({self.trained_on} of {self.test_images} test "
                    f"images were trained on{self._subspace_words()})")
        if self.unrecorded:
            return ("faces outside the recorded training data (no training record for "
                    + ", ".join(Path(u).name for u in self.unrecorded) + ")")
        return "held-out faces"

    def _subspace_words(self) -> str:
        if not self.subspace_fitted_on:
            return ""
        return f"; its age subspace was fitted on {self.subspace_fitted_on} of them"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "test_images": self.test_images,
                "trained_on": self.trained_on, "unrecorded": self.unrecorded,
                "subspace_fitted_on": self.subspace_fitted_on}


def overlap(meta: dict | None, test_digests: np.ndarray, source: str = "the model") -> Overlap:
    """Which test images (by digest) a model with checkpoint meta `meta` was trained on: its
    weights' lineage, and the faces its age subspace (remove-age) was fitted on."""
    lin = lineage(meta, source)
    test_digests = np.asarray(test_digests, np.uint64)
    mask = np.isin(test_digests, lin.images)
    unrecorded = list(lin.unrecorded)
    fitted = 0
    subspace = (meta or {}).get("age_subspace")
    if isinstance(subspace, dict):
        record = subspace.get("fitted_on")
        if isinstance(record, dict) and "images" in record:
            seen = np.isin(test_digests, unpack(record["images"]))
            fitted = int(seen.sum())
            mask = mask | seen
        else:   # written before remove-age recorded its faces
            unrecorded.append(f"{source} (age subspace)")
    return Overlap(int(len(test_digests)), int(mask.sum()), unrecorded, mask, fitted)
