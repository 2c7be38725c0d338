"""The gallery folder's format: the manifest, the per-row records, and writing one whole
generation (features, crops, records, index) with its manifest last.

A gallery is a folder:

    manifest.json          written last, by rename: a gallery without one is not a gallery
    features-G.npy         float32 (N, D), L2-normalised (what `embed` writes, same model)
    faces-G.npy            uint8 (N, 56, 56, 3): each face's aligned crop at half size (sheets)
    records-G.csv          identity, path, age (empty unknown), status, source per row
    index-G.faiss          the FAISS index when one is in use (none for the exact scan)
    .work/                 an enroll under way: its key and finished chunks (resume)

G is the generation: append and remove write a new generation beside the old one, rename the
manifest onto it and only then delete the old files, so a reader (or a killed writer) sees
one whole generation or the previous one. The manifest holds the model's path and sha256,
the feature, flip, pad and backbone, the counts, each file's size, and the index: its kind,
parameters and recall@1 against the exact scan (`mtmim_cli.index.ann`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from mtmim_cli import __version__
from mtmim_cli.digest import file_sha256
from mtmim_cli.errors import MtmimError

FORMAT = "mtmim-gallery"
VERSION = 1
FIELDS = ("identity", "path", "age", "status", "source")


def read_manifest(path: Path) -> dict:
    mf = path / "manifest.json"
    if not path.is_dir():
        raise MtmimError(f"{path}: no such gallery folder")
    if not mf.is_file():
        extra = " (an enroll was interrupted: rerun it to resume)" if (path / ".work").is_dir() else ""
        raise MtmimError(f"{path}: not a gallery (no manifest.json){extra}")
    try:
        m = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MtmimError(f"{mf}: corrupt gallery manifest ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise MtmimError(f"{mf}: not an mtmim gallery manifest")
    if m.get("version") != VERSION:
        raise MtmimError(f"{mf}: gallery version {m.get('version')}; this mtmim reads {VERSION}")
    return m



def write_records(path: Path, rec: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        for k in range(len(rec["identity"])):
            age = rec["age"][k]
            w.writerow([rec["identity"][k], rec["path"][k], "" if math.isnan(age) else f"{age:g}",
                        rec["status"][k], rec["source"][k]])


def read_records(path: Path) -> dict:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise MtmimError(f"{path}: unreadable gallery records ({exc})") from None
    if not rows or tuple(rows[0]) != FIELDS:
        raise MtmimError(f"{path}: corrupt gallery records (header {rows[:1]})")
    body = rows[1:]
    return {"identity": [r[0] for r in body], "path": [r[1] for r in body],
            "age": np.array([float(r[2]) if r[2] else np.nan for r in body], np.float32),
            "status": [r[3] for r in body], "source": [r[4] for r in body]}


def save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)



def write_generation(out: Path, feats: np.ndarray, faces: np.ndarray, rec: dict,
                     settings: dict, *, index: str, seed: int = 0,
                     previous: dict | None = None, index_options: dict | None = None) -> dict:
    """Write a complete gallery generation and its index beside the current one, then the
    manifest by rename, then remove the previous generation's files. `index_options`: the
    ivfpq build options (pq_m, refine) for build_index."""
    from mtmim_cli.index.ann import build_index, faiss_of

    gen = int(previous["generation"]) + 1 if previous else 1
    names = {"features": f"features-{gen}.npy", "faces": f"faces-{gen}.npy",
             "records": f"records-{gen}.csv", "index": None}
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / names["features"], feats)
    save_npy(out / names["faces"], faces)
    tmp = out / f".{names['records']}.{os.getpid()}.tmp"
    write_records(tmp, rec)
    os.replace(tmp, out / names["records"])
    idx, built = build_index(feats, index, seed=seed, **(index_options or {}))
    if idx is not None:
        import faiss

        names["index"] = f"index-{gen}.faiss"
        tmp = out / f".{names['index']}.{os.getpid()}.tmp"
        faiss.write_index(faiss_of(idx), str(tmp))
        os.replace(tmp, out / names["index"])
    manifest = {"format": FORMAT, "version": VERSION, "generation": gen, "count": int(len(feats)),
                "dim": int(feats.shape[1]), "identities": len(set(rec["identity"])),
                **settings, "index": built.to_dict(), "files": names,
                "sizes": {k: (out / v).stat().st_size for k, v in names.items() if v},
                "records_sha256": file_sha256(out / names["records"]),
                "tool_version": __version__}
    tmp = out / f".manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out / "manifest.json")
    for name in (previous or {}).get("files", {}).values():
        if name and name not in names.values():
            (out / name).unlink(missing_ok=True)
    return built.to_dict()

