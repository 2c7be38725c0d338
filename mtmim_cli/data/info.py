"""`mtmim info`: what a cache holds (counts, identities, ages, misses, schema)."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

AGE_BINS = (0, 10, 20, 30, 40, 50, 60, 70, 200)


def cache_info(path: str | os.PathLike) -> dict:
    """A plain dict describing the cache at `path` (MtmimError if it is not an mtmim cache)."""
    from mtmim_cli.data.cache import STATUS_NAMES, Cache

    c = Cache(path)
    usable = c.usable
    per_id = np.bincount(c.identity[usable], minlength=len(c.identity_names))
    per_id = per_id[per_id > 0]
    ages = c.age[usable]
    known = ages[~np.isnan(ages)]
    hist, _ = np.histogram(known, bins=AGE_BINS)
    labels = [f"{a}-{b - 1}" for a, b in zip(AGE_BINS[:-2], AGE_BINS[1:-1], strict=True)]
    labels.append(f"{AGE_BINS[-2]}+")
    schema = {k: v for k, v in c.attrs.items() if k not in ("template",)}
    for k in ("settings",):
        if isinstance(schema.get(k), str):
            try:
                schema[k] = json.loads(schema[k])
            except ValueError:
                pass
    return {
        "path": str(c.path),
        "records": len(c),
        "status": {STATUS_NAMES[k]: int((c.status == k).sum()) for k in STATUS_NAMES},
        "usable": int(usable.sum()),
        "identities": int(len(per_id)),
        "identity_names": len(c.identity_names),
        "images_per_identity": ({"min": int(per_id.min()), "median": float(np.median(per_id)),
                                 "max": int(per_id.max())} if len(per_id) else {}),
        "ages_known": int(len(known)),
        "age_range": [float(known.min()), float(known.max())] if len(known) else [],
        "age_histogram": dict(zip(labels, (int(v) for v in hist), strict=True)),
        "splits": dict(Counter(s for s in c.split if s)),
        "problems": [(c.paths[i], STATUS_NAMES[int(s)], c.reason[i])
                     for i, s in enumerate(c.status) if c.reason[i]],
        "schema": schema,
    }


def format_info(info: dict, max_problems: int | None = 20) -> str:
    lines = [f"{info['path']}"]
    lines.append(f"  records      {info['records']}  (usable {info['usable']})")
    lines.append("  status       " + ", ".join(f"{k} {v}" for k, v in info["status"].items()))
    ipi = info["images_per_identity"]
    lines.append(f"  identities   {info['identities']} with a face"
                 + (f"; images per identity min {ipi['min']}, median {ipi['median']:g}, "
                    f"max {ipi['max']}" if ipi else ""))
    if info["ages_known"]:
        lo, hi = info["age_range"]
        lines.append(f"  ages         {info['ages_known']} known, {lo:g}-{hi:g}")
        top = max(info["age_histogram"].values()) or 1
        for label, count in info["age_histogram"].items():
            lines.append(f"    {label:>6} {count:6d} {'#' * round(30 * count / top)}")
    else:
        lines.append("  ages         none known")
    if info["splits"]:
        lines.append("  splits       " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()))
    problems = info["problems"]
    if problems:
        lines.append(f"  misses and unreadable files ({len(problems)}):")
        shown = problems if max_problems is None else problems[:max_problems]
        for path, status, reason in shown:
            lines.append(f"    {status:10s} {path}: {reason}")
        if len(shown) < len(problems):
            lines.append(f"    ... {len(problems) - len(shown)} more (--misses shows all)")
    lines.append("  schema")
    for k, v in info["schema"].items():
        lines.append(f"    {k}: {v}")
    return "\n".join(lines)
