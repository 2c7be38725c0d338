"""The sha256 of a file, read in blocks: the one helper every module that records or checks
a file's digest uses (checkpoint lineage, evaluate's inputs and manifest, embed's model)."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of the file's bytes (4 MiB blocks: flat memory for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
