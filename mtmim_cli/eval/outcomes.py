"""Per-unit outcomes of a model on a protocol: for identification, per probe its top match,
the rank of its first correct match and whether rank 1 is right; for verification, per pair
its score and whether the K-fold rule got it right. Every model scored on a protocol's units
shares them, which is what makes comparisons between models paired.

Conventions are metrics.py's: the top match is the best-scoring gallery item (ties: the
lowest index); the rank is 1 + the wrong-identity items scoring strictly above the best
right one (0 when the gallery holds none). A protocol photo without a face is a probe with
no outcome of its own: it counts as a miss (hit False, rank 0, top1 -1).

`write_outcomes` / `read_outcomes`: the sidecar `<stem>.outcomes.json` that evaluate writes beside
results.json, one entry per model, in the protocol's unit order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.errors import MtmimError

OUTCOMES_FORMAT = 1


def probe_outcomes(query_feats: np.ndarray, query_ids: np.ndarray, gallery_feats: np.ndarray,
                   gallery_ids: np.ndarray, *, query_index: np.ndarray | None = None,
                   block: int = 256) -> dict[str, np.ndarray]:
    """top1 (gallery index), rank and hit per query, in query blocks (memory: block x gallery
    scores). `query_index[k]`: the gallery item query k must not match (itself, in a
    leave-one-out set), or None."""
    q = np.asarray(query_feats, np.float32)
    g = np.asarray(gallery_feats, np.float32)
    qids, gids = np.asarray(query_ids), np.asarray(gallery_ids)
    n = len(q)
    top = np.full(n, -1, np.int64)
    rank = np.zeros(n, np.int64)
    for q0 in range(0, n, block):
        q1 = min(n, q0 + block)
        s = q[q0:q1] @ g.T
        if query_index is not None:
            s[np.arange(q1 - q0), np.asarray(query_index)[q0:q1]] = -np.inf
        top[q0:q1] = np.argmax(s, axis=1)
        right = (qids[q0:q1, None] == gids[None, :]) & np.isfinite(s)
        best = np.where(right, s, -np.inf).max(axis=1)
        above = ((s > best[:, None]) & ~right).sum(axis=1)
        rank[q0:q1] = np.where(right.any(axis=1), above + 1, 0)
    hit = (top >= 0) & (gids[np.maximum(top, 0)] == qids) if len(gids) else np.zeros(n, bool)
    return {"top1": top, "rank": rank, "hit": hit}


def on_records(n_records: int, rows: np.ndarray, per_row: dict[str, np.ndarray],
               top_rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Outcomes of the probes at cache records `rows`, spread over all `n_records` records of
    the protocol (records not in `rows`: misses). `top1` indexes `top_rows` (the gallery's
    records) and is translated to a record index."""
    rows = np.asarray(rows, np.int64)
    hit = np.zeros(n_records, bool)
    rank = np.zeros(n_records, np.int64)
    top = np.full(n_records, -1, np.int64)
    hit[rows] = per_row["hit"]
    rank[rows] = per_row["rank"]
    t = np.asarray(per_row["top1"], np.int64)
    top[rows] = t if top_rows is None else np.where(t >= 0, np.asarray(top_rows)[t], -1)
    return {"index": np.arange(n_records), "hit": hit, "rank": rank, "top1": top}


def from_rounds(records: dict[int, dict], n_positions: int) -> dict[str, np.ndarray]:
    """Per-position outcomes (hit, rank, top1) from leave-one-out round records, each holding
    'held_out', 'hit', 'rank', 'top1' lists (as `protocols.rank_held_out` returns them).
    Every position must be held out exactly once."""
    hit = np.zeros(n_positions, bool)
    rank = np.zeros(n_positions, np.int64)
    top = np.full(n_positions, -1, np.int64)
    seen = np.zeros(n_positions, np.int64)
    for rec in records.values():
        held = np.asarray(rec["held_out"], np.int64)
        hit[held] = rec["hit"]
        rank[held] = rec["rank"]
        top[held] = rec["top1"]
        seen[held] += 1
    if not np.all(seen == 1):
        bad = int(np.flatnonzero(seen != 1)[0])
        raise MtmimError(f"rounds hold image {bad} {int(seen[bad])} times (expected once)")
    return {"hit": hit, "rank": rank, "top1": top}


def mates_from_rounds(records: dict[int, dict]) -> dict[str, np.ndarray] | None:
    """Probe-mate success pairs (positions) from round records that hold 'mates' and
    'mate_ok' (as `protocols.rank_held_out` writes them); None when any round lacks them
    (rounds stored by an older version)."""
    probe, mate, ok = [], [], []
    for r in sorted(records):
        rec = records[r]
        if "mates" not in rec or "mate_ok" not in rec:
            return None
        for q, ms, oks in zip(rec["held_out"], rec["mates"], rec["mate_ok"], strict=True):
            probe += [q] * len(ms)
            mate += ms
            ok += oks
    return {"probe": np.asarray(probe, np.int64), "mate": np.asarray(mate, np.int64),
            "success": np.asarray(ok, bool)}


def features_from_rounds(records: dict[int, dict], n_positions: int) -> np.ndarray | None:
    """Each position's features from the round that held it out (`features` of the round
    records), stacked in position order; None when any round lacks them."""
    out: np.ndarray | None = None
    for rec in records.values():
        if "features" not in rec:
            return None
        f = np.asarray(rec["features"], np.float32)
        if out is None:
            out = np.zeros((n_positions, f.shape[1]), np.float32)
        out[np.asarray(rec["held_out"], np.int64)] = f
    return out


def write_outcomes(path: Path, protocol: str, unit: str, models: dict[str, dict]) -> Path:
    """The sidecar: {'format', 'protocol', 'unit', 'models': {label: {field: list}}}."""
    doc = {"format": OUTCOMES_FORMAT, "protocol": protocol, "unit": unit,
           "models": {label: {k: np.asarray(v).tolist() for k, v in fields.items()}
                      for label, fields in models.items()}}
    atomic_write_text(Path(path), json.dumps(doc, separators=(",", ":")) + "\n")
    return Path(path)


def read_outcomes(path: Path) -> dict:
    """The sidecar with its fields as arrays; one-line errors for a file that is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MtmimError(f"{path}: not a readable outcomes file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != OUTCOMES_FORMAT or "models" not in doc:
        raise MtmimError(f"{path}: not an outcomes file of format {OUTCOMES_FORMAT}")
    doc["models"] = {label: {k: np.asarray(v) for k, v in fields.items()}
                     for label, fields in doc["models"].items()}
    return doc
