"""Finished fine-tunes a bench reuses when rerun.

Each run folder keeps `bench-settings.json`: the settings it was trained with (resolved over
their defaults and recipe), the digests of the inputs the settings only name by path (a
split file), and the code that made it (`mtmim_cli.source`). A finished run is reused only
when all three match. With `--reuse-stale` a run whose settings and inputs match but whose
code differs is reused too, and the bench's table says so; anything else stops the bench
with a one-line error naming the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SETTINGS_FILE = "bench-settings.json"


def reusable(run: Path, settings: dict, inputs: dict, reuse_stale: bool = False) -> str | None:
    """None when `run` holds no finished model (train it); 'current' when it was made with
    these settings and inputs by this code; 'stale' when only the code differs and
    `reuse_stale`. Exits with a one-line error otherwise."""
    from mtmim_cli.source import short, source_digest

    if not (run / "model.pt").exists():
        return None
    saved = run / SETTINGS_FILE
    record = json.loads(saved.read_text()) if saved.exists() else None
    if isinstance(record, dict) and "settings" not in record:
        # written before inputs and code were recorded: the settings alone, the rest unknown
        record = {"settings": record, "inputs": None, "source": None}
    if record is None or record["settings"] != _plain(settings):
        sys.exit(f"error: {run}: a finished run with other settings (or none recorded); "
                 "remove it or use another --out")
    if record["inputs"] is not None and record["inputs"] != _plain(inputs):
        sys.exit(f"error: {run}: a finished run on other inputs "
                 f"({', '.join(k for k in inputs if record['inputs'].get(k) != inputs[k])}); "
                 "remove it or use another --out")
    made = (record.get("source") or {}).get("sha256")
    if made == source_digest():   # a record without its code (made None) never is
        return "current"
    if reuse_stale:
        return "stale"
    sys.exit(f"error: {run}: a finished run made by other code (mtmim_cli source "
             f"{short(made)}, this code {short(source_digest())}); remove it to rerun it, or "
             "pass --reuse-stale to use it flagged as stale")


def write_settings(run: Path, settings: dict, inputs: dict) -> None:
    """Record what `run` was made with and by which code (written atomically)."""
    from mtmim_cli.atomic import atomic_write_text
    from mtmim_cli.source import source_record

    atomic_write_text(run / SETTINGS_FILE, json.dumps(
        {"settings": _plain(settings), "inputs": _plain(inputs), "source": source_record()},
        sort_keys=True, indent=1))


def _plain(d: dict) -> dict:
    """As JSON reads it back (tuples as lists, paths as text), so a saved record compares."""
    return json.loads(json.dumps(d, sort_keys=True, default=str))


if __name__ == "__main__":
    sys.exit("bench/_runs.py is a helper of the bench scripts")
