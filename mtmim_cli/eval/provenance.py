"""Where a result came from: file digests, the command line, the host, and the header of
results.json that carries them."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

from mtmim_cli import __version__
from mtmim_cli.digest import file_sha256
from mtmim_cli.source import source_record


def file_record(path: Path) -> dict:
    """{'path', 'sha256', 'bytes'} of an input file."""
    path = Path(path)
    return {"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def run_header(command: str) -> dict:
    """The fields every results.json starts with: tool, version, the digest of its source
    (and the git state of its checkout), command, time, host."""
    return {"tool": "mtmim", "tool_version": __version__, "source": source_record(),
            "command": command,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": {"python": sys.version.split()[0], "platform": platform.platform(),
                     "cpus": os.cpu_count()}}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["mtmim", *sys.argv[1:]])
