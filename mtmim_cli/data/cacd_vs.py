"""CACD-VS as released (Chen, Chen, Hsu 2014): the release's labelling rule, and the records
and pairs it implies.

The release is a folder of 250x250 photos `NNNN_0.jpg`, `NNNN_1.jpg`: the two photos of pair
NNNN (0000-3999). It carries no names, ages or pair list; labels and folds come from one rule:
10 folds of 400 consecutive pairs (fold k, counted from 1, holds pairs 400(k-1) .. 400k-1),
in each fold the first 200 pairs are one person twice and the last 200 two different people;
no person appears in two folds.

A cache aligned with `--format cacd-vs` records exactly that and nothing more: the path keeps
the file name (pair and photo index), `split` the fold (`fold1` .. `fold10`), and identities
are made up so that the two photos of a genuine pair share one (`pair0007`) and every photo of
an impostor pair has its own (`pair0207_0`, `pair0207_1`). The release does not say whether
two pairs show the same person, so no identity is shared across pairs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtmim_cli.data.records import Record
from mtmim_cli.errors import MtmimError

FORMAT = "cacd-vs"
PAIRS = 4000
FOLDS = 10
PAIRS_PER_FOLD = 400
GENUINE_PER_FOLD = 200
NAME_RE = re.compile(r"^(\d{4})_([01])$")
EXPECTED = "NNNN_0.jpg and NNNN_1.jpg photos, the two of pair NNNN (0000-3999)"


def fold_of(pair: int | np.ndarray) -> int | np.ndarray:
    """The release's fold (1-10) of a pair number."""
    return pair // PAIRS_PER_FOLD + 1


def is_genuine(pair: int | np.ndarray) -> bool | np.ndarray:
    """Whether the release says the pair's two photos show one person."""
    return pair % PAIRS_PER_FOLD < GENUINE_PER_FOLD


def identity_name(pair: int, photo: int) -> str:
    """The made-up identity of photo 0 or 1 of a pair: one per genuine pair, one per photo of
    an impostor pair."""
    return f"pair{pair:04d}" if is_genuine(pair) else f"pair{pair:04d}_{photo}"


def split_name(pair: int) -> str:
    return f"fold{fold_of(pair)}"


def parse_name(name: str) -> tuple[int, int] | None:
    """(pair, photo) of a release file name (`0007_1.jpg` -> (7, 1)); None when it is not one."""
    m = NAME_RE.match(Path(name.replace("\\", "/")).stem)
    return (int(m.group(1)), int(m.group(2))) if m else None


def release_records(photos: Sequence[Path]) -> list[Record]:
    """The records of release photos whose names already match `NAME_RE`, sorted by path.
    Refuses (naming the file) a pair number past the release, two files for one photo, and a
    pair with one photo: any of them means this is not the release as shipped."""
    seen: dict[tuple[int, int], Path] = {}
    for p in photos:
        key = parse_name(p.name)
        if key is None:
            raise MtmimError(f"{p}: name does not match --format {FORMAT} (expected {EXPECTED})")
        if key[0] >= PAIRS:
            raise MtmimError(f"{p}: pair {key[0]:04d} is past the release's {PAIRS} pairs "
                             f"(0000-{PAIRS - 1})")
        if key in seen:
            raise MtmimError(f"{p}: a second file for photo {key[1]} of pair {key[0]:04d} "
                             f"(also {seen[key].name})")
        seen[key] = p
    for (pair, photo), p in sorted(seen.items()):
        if (pair, 1 - photo) not in seen:
            raise MtmimError(f"{p}: pair {pair:04d} has only this photo (no {pair:04d}_"
                             f"{1 - photo}.*); the release ships both photos of every pair")
    return sorted((Record(p.name, identity_name(pair, photo), math.nan, split_name(pair))
                   for (pair, photo), p in seen.items()), key=lambda r: r.path)


@dataclass
class ReleasePairs:
    """The pairs of a `--format cacd-vs` cache: record indices `i` (photo 0) and `j` (photo 1),
    the release's label and fold, the pair numbers, and the pairs left out because a photo
    has no face in the cache (`dropped`, pair numbers)."""

    i: np.ndarray
    j: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    pair: np.ndarray
    dropped: np.ndarray

    def folds_present(self) -> list[int]:
        return sorted({int(f) for f in fold_of(np.r_[self.pair, self.dropped])})


def is_release_cache(cache) -> bool:
    """Whether a cache was aligned with `--format cacd-vs` (or subset/merged from one)."""
    reader = cache.attrs.get("reader", "")
    return (reader.decode() if isinstance(reader, bytes) else str(reader)) == FORMAT


def cache_pairs(paths: Sequence[str], identity_names: Sequence[str], split: Sequence[str],
                usable: np.ndarray, where: str = "cache") -> ReleasePairs:
    """Every complete pair of a `--format cacd-vs` cache, from its paths by the release's rule,
    checked against the identities and folds the reader stored (a cache edited since would
    disagree). `identity_names[k]` and `split[k]` belong to record k."""
    index: dict[tuple[int, int], int] = {}
    for k, path in enumerate(paths):
        key = parse_name(path)
        if key is None or key[0] >= PAIRS:
            raise MtmimError(f"{where}: record {path!r} is not a CACD-VS release photo "
                             f"({EXPECTED}); align the release with --format {FORMAT}")
        if (identity_names[k] != identity_name(*key) or split[k] != split_name(key[0])):
            raise MtmimError(f"{where}: record {path} has identity {identity_names[k]!r}, split "
                             f"{split[k]!r}, not what --format {FORMAT} writes for it")
        index[key] = k
    pairs = sorted({p for p, _ in index})
    whole = [p for p in pairs if (p, 0) in index and (p, 1) in index]
    if len(whole) != len(pairs):
        lone = next(p for p in pairs if p not in set(whole))
        raise MtmimError(f"{where}: pair {lone:04d} has one photo in the cache; every pair "
                         "needs both")
    usable = np.asarray(usable, bool)
    ok = [p for p in whole if usable[index[(p, 0)]] and usable[index[(p, 1)]]]
    dropped = np.array(sorted(set(whole) - set(ok)), np.int64)
    pair = np.array(ok, np.int64)
    return ReleasePairs(i=np.array([index[(p, 0)] for p in ok], np.int64),
                        j=np.array([index[(p, 1)] for p in ok], np.int64),
                        same=np.asarray(is_genuine(pair), bool),
                        fold=np.asarray(fold_of(pair), np.int64), pair=pair, dropped=dropped)
