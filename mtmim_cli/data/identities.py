"""Which caches share identity names: one class per person when training on several caches.

An identity name means a person only within a dataset: CelebA's '7201' and MS1M's '7201' are
different people, while the shards of one `align --shard I/N` job (or one dataset aligned
twice) use the names of the same dataset, and an identity whose photos straddle a shard
boundary is still one person. `--identities` chooses how names are matched across caches:

auto       (default) caches made by one align job (the same `all_records_sha1`: the shards of
           a job, or the same records aligned again) share names; other caches keep theirs
           apart. When caches of different align runs read the same dataset folder (same
           reader and source root) and share a name, that is ambiguous (one dataset listed
           twice by hand, or two datasets?) and training refuses, naming the caches.
by-name    one name is one person in every cache (e.g. several manifests of one dataset).
per-cache  every cache's names are its own (several datasets whose names collide).
"""

from __future__ import annotations

from collections.abc import Sequence

from mtmim_cli.errors import MtmimError

MODES = ("auto", "by-name", "per-cache")


def namespaces(caches: Sequence, mode: str = "auto") -> list[int]:
    """A namespace number per cache (0, 1, ... in order of first appearance); caches with the
    same number share identity names. `caches` are `Cache` objects (attrs, identity_names)."""
    if mode not in MODES:
        raise MtmimError(f"--identities {mode}: choose from {', '.join(MODES)}")
    if mode == "by-name":
        return [0] * len(caches)
    if mode == "per-cache":
        return list(range(len(caches)))
    keys = [str(c.attrs.get("all_records_sha1") or f"file:{c.path}") for c in caches]
    first: dict[str, int] = {}
    out = [first.setdefault(k, len(first)) for k in keys]
    _refuse_ambiguous(caches, out)
    return out


def _refuse_ambiguous(caches: Sequence, spaces: list[int]) -> None:
    """Different align runs over one dataset folder that share a name: ask the user."""
    by_folder: dict[tuple[str, str], dict[int, tuple[object, set[str]]]] = {}
    for space, c in zip(spaces, caches, strict=True):
        folder = (str(c.attrs.get("reader", "")), str(c.attrs.get("source_root", "")))
        runs = by_folder.setdefault(folder, {})
        first, names = runs.get(space, (c, set()))
        runs[space] = (first, names | set(c.identity_names))
    for folder, runs in by_folder.items():
        items = sorted(runs.items())
        for k, (_, (a, names_a)) in enumerate(items):
            for _, (b, names_b) in items[k + 1:]:
                common = sorted(names_a & names_b)
                if common:
                    raise MtmimError(
                        f"{b.path}: made by another align run than {a.path} from the same "
                        f"dataset folder ({folder[1]}), and both name identity {common[0]!r}: "
                        "pass --identities by-name if a name is one person across them, or "
                        "--identities per-cache if not (see docs/SCALE.md)")
