"""Which code made a result: a digest of the package's source text, and the git state of
the checkout it ran from.

Stored work that is reused (re-fit rounds, the finished runs a bench reuses) is keyed by it,
and every results.json records it: the tool's version string is bumped by hand and rarely,
so a change to the training code that adds no option would otherwise reuse work the old
code made. The digest covers every `mtmim_cli/**/*.py` file (its path and bytes), so a
comment edit changes it too: that costs a rerun, never a wrong reuse.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

# The package whose source is digested; tests point it at an edited copy.
PACKAGE_DIR = Path(__file__).resolve().parent


def source_digest() -> str:
    """sha256 (hex) of the package source that is running (computed once per process)."""
    return package_digest(PACKAGE_DIR)


def short(digest: str | None) -> str:
    """The first 12 hex digits, as messages and tables show a digest ('unknown' for None)."""
    return digest[:12] if digest else "unknown"


@functools.cache
def package_digest(package: Path) -> str:
    """sha256 over the sorted relative paths and contents of every *.py under `package`."""
    h = hashlib.sha256()
    files = sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package).as_posix())
    for path in files:
        data = path.read_bytes()
        # path and length first, so no two different file sets hash alike
        h.update(path.relative_to(package).as_posix().encode() + b"\0")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@functools.cache
def git_state(folder: Path) -> dict | None:
    """{'commit', 'dirty'} of the git work tree holding `folder` (dirty: any tracked file
    changed, staged or not, or an untracked file not ignored); None when git or a work tree is not there (an installed copy)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def source_record() -> dict:
    """What results and stored work record about their code: {'sha256', 'git'} (git: see
    `git_state`, None without git)."""
    return {"sha256": source_digest(), "git": git_state(PACKAGE_DIR)}
