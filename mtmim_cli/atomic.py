"""Write-then-rename helpers: a file with its final name is always complete."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def tmp_path_for(final: str | os.PathLike) -> Path:
    """The temporary sibling a writer fills before renaming (same folder, so rename is atomic)."""
    final = Path(final)
    return final.with_name(final.name + ".partial")


@contextmanager
def atomic_write(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success fsync and rename it onto `final`, else remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    with atomic_write(final) as tmp:
        tmp.write_text(text)
