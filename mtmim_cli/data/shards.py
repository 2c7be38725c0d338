"""Merging the caches of `mtmim align --shard I/N` into the one an unsharded run would write."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtmim_cli.errors import MtmimError

# attributes every shard of one job must share
_SAME = ("reader", "source_root", "settings", "all_records_sha1", "template")


def merge_caches(out: str | os.PathLike, shards: Sequence[str | os.PathLike], command: str = "",
                 progress: bool = True, block: int = 256) -> Path:
    """Check that `shards` are all N shards of one align job and write them, in order, to `out`.

    The merged file equals an unsharded run's (records, identity table, images, landmarks,
    status, reasons); its attributes drop the shard and take `command`.
    """
    from mtmim_cli.data.cache import Cache, CacheWriter, records_digest
    from mtmim_cli.data.records import Record
    from mtmim_cli.progress import make_progress

    if not shards:
        raise MtmimError("merge: no shard files given")
    caches = [Cache(p) for p in shards]
    by_index: dict[int, Cache] = {}
    total = None
    for c in caches:
        shard = str(c.attrs.get("shard", ""))
        if not shard:
            raise MtmimError(f"{c.path}: not a shard (made without --shard)")
        i, n = (int(x) for x in shard.split("/"))
        if total is not None and n != total:
            raise MtmimError(f"{c.path}: shard {shard} belongs to a {n}-way split, others to {total}")
        total = n
        if i in by_index:
            raise MtmimError(f"{c.path}: shard {shard} given twice ({by_index[i].path})")
        for key in _SAME:
            if str(c.attrs.get(key)) != str(caches[0].attrs.get(key)):
                raise MtmimError(f"{c.path}: {key} differs from {caches[0].path}; "
                                 "shards of different align jobs cannot be merged")
        by_index[i] = c
    assert total is not None
    missing = sorted(set(range(total)) - set(by_index))
    if missing:
        raise MtmimError(f"merge: shard(s) {', '.join(f'{i}/{total}' for i in missing)} missing")
    ordered = [by_index[i] for i in range(total)]
    records = [Record(c.paths[k], c.identity_names[c.identity[k]], float(c.age[k]), c.split[k])
               for c in ordered for k in range(len(c))]
    if records_digest(records) != caches[0].attrs.get("all_records_sha1"):
        raise MtmimError(f"{out}: the shards do not add up to the records of their job")

    attrs = {k: v for k, v in caches[0].attrs.items()
             if k not in ("format", "schema_version", "tool_version", "records_sha1", "n_done")}
    attrs.update(shard="", command=command)
    writer = CacheWriter(out, records, attrs, resume=False)
    bar = make_progress("img", disable=not progress)
    try:
        with bar:
            task = bar.add_task("merge", total=len(records))
            base = 0
            for c in ordered:
                usable = c.usable
                for lo in range(0, len(c), block):
                    idx = np.arange(lo, min(len(c), lo + block))
                    images = c.images(idx)
                    for k, img in zip(idx, images, strict=True):
                        lm = c.landmarks[k]
                        writer.write(base + int(k), img if usable[k] else None, int(c.status[k]),
                                     landmarks=None if np.isnan(lm).all() else lm,
                                     det_score=float(c.det_score[k]), reason=c.reason[k])
                    writer.commit(base + int(idx[-1]) + 1)
                    bar.advance(task, len(idx))
                base += len(c)
            return writer.finish()
    finally:
        writer.close()
        for c in caches:
            c.close()
