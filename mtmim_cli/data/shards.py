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
                 progress: bool = True, block: int = 256, copy: bool = False) -> Path:
    """Check that `shards` are all N shards of one align job and write them, in order, to `out`.

    The merged file equals an unsharded run's (records, identity table, images, landmarks,
    status, reasons); its attributes drop the shard and take `command`. Its images are HDF5
    virtual datasets pointing into the shard files (relative paths), so merging copies no
    image and needs no disk beyond the per-record tables; the shards must then stay where
    they are relative to `out` (`Cache` refuses the merged file when one is missing). With
    `copy` the images are copied (encoded ones byte for byte) into a standalone file.
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
        if c.image_format != caches[0].image_format:
            raise MtmimError(f"{c.path}: {c.image_format} images, {caches[0].path} has "
                             f"{caches[0].image_format}; align every shard with one --image-format")
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
             if k not in ("format", "schema_version", "tool_version", "records_sha1", "n_done",
                          "image_format")}
    attrs.update(shard="", command=command)
    fmt = ordered[0].image_format
    writer = CacheWriter(out, records, attrs, resume=False, image_format=fmt, images=copy)
    bar = make_progress("img", disable=not progress)
    try:
        with bar:
            task = bar.add_task("merge", total=len(records))
            base = 0
            for c in ordered:
                usable = c.usable
                for lo in range(0, len(c), block):
                    idx = np.arange(lo, min(len(c), lo + block))
                    images = c.images(idx) if copy and fmt == "raw" else [None] * len(idx)
                    for k, img in zip(idx, images, strict=True):
                        lm = c.landmarks[k]
                        data = c.encoded(int(k)) if copy and fmt != "raw" and usable[k] else None
                        writer.write(base + int(k), img if usable[k] else None, int(c.status[k]),
                                     landmarks=None if np.isnan(lm).all() else lm,
                                     det_score=float(c.det_score[k]), reason=c.reason[k],
                                     encoded=data)
                    writer.commit(base + int(idx[-1]) + 1)
                    bar.advance(task, len(idx))
                base += len(c)
            return writer.finish(None if copy else (lambda h5: _link_images(h5, ordered, Path(out))))
    finally:
        writer.close()
        for c in caches:
            c.close()


def _link_images(h5, shards: Sequence, out: Path) -> None:
    """Virtual datasets over the shards' images, in shard order (paths relative to `out`)."""
    import h5py

    from mtmim_cli.data.cache import IMAGE_SIZE

    def source(c) -> str:
        return os.path.relpath(c.path.resolve(), out.resolve().parent)

    if shards[0].image_format == "raw":
        n = sum(len(c) for c in shards)
        layout = h5py.VirtualLayout((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        base = 0
        for c in shards:
            shape = (len(c), IMAGE_SIZE, IMAGE_SIZE, 3)
            layout[base: base + len(c)] = h5py.VirtualSource(source(c), "images", shape=shape)
            base += len(c)
        h5.create_virtual_dataset("images", layout, fillvalue=0)
        return
    offsets, sizes = [], []
    for c in shards:
        with h5py.File(c.path, "r") as f:
            off = f["image_offset"][:]
        offsets.append(off[:-1] + sum(sizes))
        sizes.append(int(off[-1]))
    layout = h5py.VirtualLayout((sum(sizes),), np.uint8)
    base = 0
    for c, size in zip(shards, sizes, strict=True):
        if size:
            layout[base: base + size] = h5py.VirtualSource(source(c), "image_bytes", shape=(size,))
        base += size
    h5.create_virtual_dataset("image_bytes", layout, fillvalue=0)
    h5.create_dataset("image_offset", data=np.concatenate([*offsets, [sum(sizes)]]).astype(np.int64))
