"""LFW's pairs.txt, in the two layouts it ships in, told apart by the first line:

- `10 300` (the official View 2 file): `folds n`, then per fold n matched lines `name i j`
  followed by n mismatched lines `name1 i name2 j`; the folds are contiguous blocks of 2n.
- `3000` (a variant many copies of LFW carry): `N`, then N matched lines followed by N
  mismatched ones; 10 folds, fold k the k-th tenth of the matched half with the k-th tenth
  of the mismatched half (for 3000: folds of 300 taken in order from each half, the official
  folds when the variant kept the official order).

Photos are found in a cache by the path ending `name/name_000i.jpg` (the folder layout
`align --format folder` stores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtmim_cli.errors import MtmimError

HALVES_FOLDS = 10   # the `N` layout's folds: LFW's ten


@dataclass
class LfwPairs:
    """A parsed pairs.txt: one entry per pair, in file order."""
    lines: list[int]                       # the file's line number of each pair
    a: list[tuple[str, int]]               # (name, image number) of each pair's first photo
    b: list[tuple[str, int]]
    same: np.ndarray                       # bool
    folds: int | np.ndarray                # a count of contiguous folds, or a fold per pair
    layout: str                            # for the results' pairs line


def parse_lfw_pairs(path: Path) -> LfwPairs:
    """Read either layout (see the module's text); a one-line MtmimError for anything else,
    a pair count the header does not promise, or a matched line where a mismatched one
    belongs (and the reverse)."""
    numbered = [(n, ln.split()) for n, ln in enumerate(path.read_text().splitlines(), 1)
                if ln.strip()]
    if not numbered:
        raise MtmimError(f"{path}: empty (an LFW pairs.txt starts '10 300' or '3000')")
    head_line, head = numbered[0]
    rows = numbered[1:]
    if len(head) == 2 and all(t.isdigit() for t in head):
        n_folds, per = int(head[0]), int(head[1])
        if n_folds < 2 or per < 1:
            raise MtmimError(f"{path}: line {head_line}: '{n_folds} {per}': needs at least "
                             "2 folds of at least 1 pair")
        expected = 2 * n_folds * per
        # within fold f: `per` matched lines, then `per` mismatched ones
        want_same = [(k % (2 * per)) < per for k in range(len(rows))]
        folds: int | np.ndarray = n_folds
        layout = (f"'{n_folds} {per}' layout: {n_folds} folds of {per} matched, then {per} "
                  "mismatched pairs")

        def where(k: int) -> str:
            return f"fold {k // (2 * per) + 1}'s {'matched' if want_same[k] else 'mismatched'}"
    elif len(head) == 1 and head[0].isdigit():
        half = int(head[0])
        if half < HALVES_FOLDS or half % HALVES_FOLDS:
            raise MtmimError(f"{path}: line {head_line}: {half} matched pairs do not split "
                             f"into {HALVES_FOLDS} equal folds (need a multiple of "
                             f"{HALVES_FOLDS})")
        expected, per = 2 * half, half // HALVES_FOLDS
        want_same = [k < half for k in range(len(rows))]
        folds = np.array([(k % half) // per for k in range(len(rows))], np.int64)
        layout = (f"'{half}' layout: {half} matched, then {half} mismatched pairs; "
                  f"{HALVES_FOLDS} folds of {per} + {per}, in order from each half")

        def where(k: int) -> str:
            return "the matched half" if want_same[k] else "the mismatched half"
    else:
        raise MtmimError(f"{path}: line {head_line}: '{' '.join(head)}' is neither LFW's "
                         "'<folds> <pairs per fold>' header (e.g. '10 300') nor the "
                         "'<matched pairs>' one (e.g. '3000')")
    if len(rows) != expected:
        raise MtmimError(f"{path}: {len(rows)} pair lines, the header "
                         f"'{' '.join(head)}' promises {expected}")
    lines, a, b, same = [], [], [], []
    for k, (n, f) in enumerate(rows):
        if len(f) not in (3, 4) or not all(t.isdigit() for t in (f[1], f[-1])) \
                or (len(f) == 4 and f[2].isdigit()):
            raise MtmimError(f"{path}: line {n}: expected 'name i j' or 'name1 i name2 j'")
        is_same = len(f) == 3
        if is_same != want_same[k]:
            kind = "a matched pair" if is_same else "a mismatched pair"
            raise MtmimError(f"{path}: line {n}: {kind} where the {layout.split(':')[0]} has "
                             f"{where(k)} pairs")
        lines.append(n)
        a.append((f[0], int(f[1])))
        b.append((f[0], int(f[2])) if is_same else (f[2], int(f[3])))
        same.append(is_same)
    return LfwPairs(lines, a, b, np.array(same, bool), folds, layout)


def read_lfw_pairs(path: Path, cache) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                 int | np.ndarray, str]:
    """(i, j, same, folds, layout) of a pairs.txt against `cache`: i and j index the cache."""
    if not path.exists():
        raise MtmimError(f"{path}: no such file")
    parsed = parse_lfw_pairs(path)
    pos = {}
    for k, p in enumerate(cache.paths):
        parts = p.replace("\\", "/").split("/")
        pos["/".join(parts[-2:])] = k

    def find(photo: tuple[str, int], n: int) -> int:
        name, num = photo
        key = f"{name}/{name}_{num:04d}.jpg"
        if key not in pos:
            raise MtmimError(f"{path}: line {n}: {key} is not in {cache.path}")
        if not cache.usable[pos[key]]:
            raise MtmimError(f"{path}: line {n}: {key} has no aligned face in {cache.path}")
        return pos[key]

    i = np.array([find(p, n) for p, n in zip(parsed.a, parsed.lines, strict=True)], np.int64)
    j = np.array([find(p, n) for p, n in zip(parsed.b, parsed.lines, strict=True)], np.int64)
    return i, j, parsed.same, parsed.folds, parsed.layout
