"""The `trained_on` record of a training run (see `mtmim_cli.data.provenance`): which cache
records the run's dataset holds, which were excluded, and the starting weights' own record."""

from __future__ import annotations

import os
from collections.abc import Sequence

from mtmim_cli.data import provenance
from mtmim_cli.digest import file_sha256
from mtmim_cli.models.weights_io import load_weights_file


def saves_checkpoints() -> bool:
    """Rank 0 of a torchrun job, or a lone process: the one that writes checkpoints, so the
    only one that needs the record (asked before the process group is up)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_link(init: str | os.PathLike | None) -> dict | None:
    """The starting weights' link: their path, sha256 and, for a checkpoint of ours, its
    own record (so lineages chain); None for a freshly built encoder."""
    if not init:
        return None
    obj = load_weights_file(init)
    meta = obj.get("meta") if isinstance(obj, dict) and "objective" in obj else None
    return provenance.init_link(init, file_sha256(init), meta)


def run_record(dataset, init: str | os.PathLike | None,
               excluded: Sequence[int] | None = None) -> dict:
    """Record for a run over `dataset` (a CacheDataset, or finetune's subset of one with
    `base` and `keep`); `excluded` are record indices of its single cache left out."""
    base, keep = (dataset.base, dataset.keep) if hasattr(dataset, "keep") else (dataset, None)
    cache_of = base.cache_of if keep is None else base.cache_of[keep]
    record = base.record if keep is None else base.record[keep]
    used = [record[cache_of == k] for k in range(len(base.caches))]
    dropped = [list(excluded or []) if k == 0 else [] for k in range(len(base.caches))]
    return provenance.training_record(base.caches, used, dropped, init_link(init))

