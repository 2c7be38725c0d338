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
    """Yield a temporary path; on success fsync it, rename it onto `final` and fsync the
    folder (so the rename itself survives a crash), else remove it. The writer may create
    the temporary file itself (by name) or open it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_folder(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename into `folder` durable (a no-op where folders cannot be opened: Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass   # some file systems refuse fsync on a folder; the file itself is synced
    finally:
        os.close(fd)


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    with atomic_write(final) as tmp:
        tmp.write_text(text)


def ensure_writable(path: str | os.PathLike, *, folder: bool = False,
                    option: str = "--out") -> Path:
    """Fail early, on one line, when a command could not write `path` (a file, or a folder
    with `folder`): create the folder and a probe file in it, so that a long run does not end
    in a traceback at its first write. Raises MtmimError naming the path and the reason."""
    from mtmim_cli.errors import MtmimError

    path = Path(path)
    where = path if folder else path.parent
    if folder and path.exists() and not path.is_dir():
        raise MtmimError(f"{option} {path}: cannot write here (a file, not a folder)")
    if not folder and path.is_dir():
        raise MtmimError(f"{option} {path}: cannot write here (a folder, not a file)")
    existing = next((p for p in (where, *where.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise MtmimError(f"{option} {path}: cannot write to {where} ({existing} is a file, "
                         "not a folder)")
    probe = where / f".mtmim-write-probe.{os.getpid()}"
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        failed = where if exc.filename in (None, str(probe)) else exc.filename
        raise MtmimError(f"{option} {path}: cannot write to {failed} "
                         f"({exc.strerror or exc})") from None
    return path
