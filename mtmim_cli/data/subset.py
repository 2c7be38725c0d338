"""`mtmim subset`: a new cache holding only some identities' records of another, for the
open-set checks (fine-tune on some people, test on others) without re-aligning.

Records keep their order, status, landmarks, scores and reasons; images are copied (encoded
ones byte for byte), so their pixel digests, which checkpoints record as what they trained
on, are those of the source and `evaluate` can still tell trained-on faces."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtmim_cli.errors import MtmimError


def subset_cache(src: str | os.PathLike, out: str | os.PathLike, identities: Sequence[str],
                 command: str = "", progress: bool = True, block: int = 256) -> Path:
    """Write the records of `src` whose identity is in `identities` (by name; whole numbers
    also by value: '1' selects '001') to `out`; returns its path."""
    from mtmim_cli.data.cache import Cache, CacheWriter
    from mtmim_cli.data.identity_lists import listed_labels, name_key
    from mtmim_cli.data.records import Record
    from mtmim_cli.progress import make_progress

    c = Cache(src)
    rows = np.flatnonzero(listed_labels(c.identity_names, identities)[c.identity])
    if len(rows) == 0:
        raise MtmimError(f"{c.path}: none of the {len(identities)} listed identities is in it")
    present = {name_key(m) for m in c.identity_names}
    unknown = [n for n in identities if name_key(n) not in present]
    if unknown:
        raise MtmimError(f"{c.path}: {len(unknown)} listed identities are not in it "
                         f"(e.g. {unknown[0]})")
    records = [Record(c.paths[k], c.identity_names[c.identity[k]], float(c.age[k]), c.split[k])
               for k in rows]
    attrs = {k: v for k, v in c.attrs.items()
             if k not in ("format", "schema_version", "tool_version", "records_sha1", "n_done",
                          "image_format", "all_records_sha1", "shard")}
    attrs.update(command=command, subset_of=str(c.path), subset_identities=len(identities))
    writer = CacheWriter(out, records, attrs, resume=False, image_format=c.image_format)
    usable = c.usable
    try:
        with make_progress("img", disable=not progress) as bar:
            task = bar.add_task("subset", total=len(rows))
            for lo in range(0, len(rows), block):
                part = rows[lo:lo + block]
                images = c.images(part) if c.image_format == "raw" else [None] * len(part)
                for j, (k, img) in enumerate(zip(part, images, strict=True)):
                    lm = c.landmarks[k]
                    data = c.encoded(int(k)) if c.image_format != "raw" and usable[k] else None
                    writer.write(lo + j, img if usable[k] and data is None else None,
                                 int(c.status[k]), landmarks=None if np.isnan(lm).all() else lm,
                                 det_score=float(c.det_score[k]), reason=c.reason[k],
                                 encoded=data)
                writer.commit(lo + len(part))
                bar.advance(task, len(part))
            return writer.finish()
    finally:
        writer.close()
        c.close()

