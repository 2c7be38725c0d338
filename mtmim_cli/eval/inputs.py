"""The inputs a protocol reads besides the models, each read once: the cache, pair lists
(insightface .bin, CSV, LFW pairs.txt, or pairs drawn from the cache), CACD's metadata and
MORPH's subject split. `open_inputs` turns a checked `EvalConfig` into an `EvalInputs`."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.config import VERIFICATION, EvalConfig
from mtmim_cli.eval.lfw_pairs import read_lfw_pairs


@dataclass
class PairInput:
    """Verification pairs: `source` (a Cache or a uint8 image array) indexed by `i`, `j`."""
    source: Any
    i: np.ndarray
    j: np.ndarray
    same: np.ndarray
    folds: int | np.ndarray
    origin: dict | None = None         # {'kind': 'file' | 'drawn' | 'release', ...}
    dropped_folds: np.ndarray | None = None   # fold of each pair left out (a photo without a face)


@dataclass
class EvalInputs:
    cache: Any = None                  # Cache, or None for a .bin pair list alone
    pairs: PairInput | None = None     # verification protocols
    cacd_year: np.ndarray | None = None
    cacd_test: np.ndarray | None = None
    split: dict | None = None          # MORPH subject split (identity values and names)


def open_inputs(cfg: EvalConfig) -> EvalInputs:
    """Open the cache and read what `cfg.protocol` needs; one-line errors for bad files."""
    from mtmim_cli.data.cache import Cache

    for p in (cfg.cache, cfg.pairs, cfg.meta):
        if p is not None and not Path(p).exists():
            raise MtmimError(f"{p}: no such file")
    inp = EvalInputs(cache=Cache(cfg.cache) if cfg.cache is not None else None)
    cache = inp.cache
    if cfg.protocol in ("morph-s1", "morph-s2"):
        split = P.morph_split(cache.identity[cache.usable], cfg.protocol, cfg.seed,
                              cfg.test_subjects, cfg.train_subjects)
        split["test_names"] = [cache.identity_names[k] for k in split["test"]]
        split["train_names"] = [cache.identity_names[k] for k in split["train"]]
        inp.split = split
    elif cfg.protocol == "cacd-map":
        if cfg.meta is None:
            raise MtmimError("cacd-map needs --meta (CSV: path,year,test)")
        inp.cacd_year, inp.cacd_test = read_cacd_meta(cfg.meta, cache)
    elif cfg.protocol in VERIFICATION:
        inp.pairs = pair_input(cfg, cache)
    return inp


def is_synthetic(cache) -> bool:
    """Whether the cache was aligned from a `mtmim synth` folder (its source holds synth.json)."""
    root = str(cache.attrs.get("source_root", "")) if cache is not None else ""
    return bool(root) and (Path(root) / "synth.json").is_file()


def pair_input(cfg: EvalConfig, cache) -> PairInput:
    """The verification pairs from --pairs (.bin, .txt, .csv) or drawn from the cache."""
    if cfg.pairs is not None and cfg.pairs.suffix == ".bin":
        from mtmim_cli.data.insightface import decode_pair_images, load_pair_bin

        pb = load_pair_bin(cfg.pairs)
        images = decode_pair_images(pb, str(cfg.pairs))
        n = len(pb)
        return PairInput(images, np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2), pb.issame, 10,
                         _file_origin(cfg.pairs, "insightface .bin"))
    if cache is None:
        raise MtmimError(f"{cfg.protocol}: needs --pairs FILE.bin, or --cache with --pairs FILE.csv "
                         "(or --cache alone to draw cross-age pairs)")
    if cfg.pairs is not None and cfg.pairs.suffix == ".txt":
        i, j, same, folds, layout = read_lfw_pairs(cfg.pairs, cache)
        return PairInput(cache, i, j, same, folds,
                         {**_file_origin(cfg.pairs, "LFW pairs.txt"), "layout": layout})
    if cfg.pairs is not None:
        i, j, same, folds = read_pair_csv(cfg.pairs, cache)
        return PairInput(cache, i, j, same, folds if folds is not None else 10,
                         _file_origin(cfg.pairs, "CSV"))
    if cfg.protocol == "cacd-vs":
        return release_pair_input(cache)
    from mtmim_cli.eval.pairs import cross_age_pairs

    i, j, same = cross_age_pairs(cache.identity, cache.age, cfg.n_pairs, cfg.seed,
                                 min_gap=cfg.min_gap, usable=cache.usable)
    return PairInput(cache, i, j, same, 10, {"kind": "drawn", "cache": str(cache.path),
                                             "seed": cfg.seed, "requested": cfg.n_pairs,
                                             "min_gap": cfg.min_gap})


def release_pair_input(cache) -> PairInput:
    """CACD-VS's pairs and folds from a cache aligned with `--format cacd-vs`, by the
    release's rule; pairs with a photo without a face are left out and counted."""
    from mtmim_cli.data import cacd_vs

    if not cacd_vs.is_release_cache(cache):
        raise MtmimError(f"{cache.path}: cacd-vs without --pairs needs a cache aligned with "
                         f"--format cacd-vs (this one was read as "
                         f"{cache.attrs.get('reader', 'unknown')!r})")
    rp = cacd_vs.cache_pairs(cache.paths, [cache.identity_names[k] for k in cache.identity],
                             cache.split, cache.usable, where=str(cache.path))
    folds = sorted({int(f) for f in rp.fold})
    if len(folds) < 2:
        held = rp.folds_present()
        raise MtmimError(f"{cache.path}: pairs with faces in {len(folds)} fold(s) "
                         f"({', '.join(map(str, held)) or 'none'}); each fold's threshold is "
                         "chosen on the other folds, so at least two are needed")
    dropped = np.asarray(cacd_vs.fold_of(rp.dropped), np.int64)
    every = np.r_[rp.fold, dropped]
    per_fold = {int(f): int(np.sum(every == f)) for f in np.unique(every)}
    return PairInput(cache, rp.i, rp.j, rp.same, rp.fold,
                     {"kind": "release", "release": "CACD-VS", "cache": str(cache.path),
                      "folds": folds, "release_folds": cacd_vs.FOLDS,
                      "pairs_per_fold": per_fold,
                      "release_pairs_per_fold": cacd_vs.PAIRS_PER_FOLD,
                      "dropped_pairs": rp.dropped.tolist()},
                     dropped_folds=dropped)


def _file_origin(path: Path, fmt: str) -> dict:
    from mtmim_cli.digest import file_sha256

    return {"kind": "file", "format": fmt, "path": str(path), "sha256": file_sha256(path)}


def pairs_origin_text(pairs: PairInput) -> str:
    """Where the pairs came from, for the variant line: the file and its digest, or the
    cache, seed and count they were drawn with."""
    o, n = pairs.origin or {}, len(pairs.same)
    n_imp = int((~np.asarray(pairs.same, bool)).sum())
    counts = f"{n} pairs, {n - n_imp} genuine and {n_imp} impostor"
    if o.get("kind") == "file":
        layout = f"; {o['layout']}" if o.get("layout") else ""
        return (f"pairs: {o['format']} file {o['path']} (sha256 {o['sha256'][:16]}; "
                f"{counts}){layout}")
    if o.get("kind") == "release":
        return release_origin_text(o, counts)
    if o.get("kind") == "drawn":
        gap = f", age gap >= {o['min_gap']:g} years" if o["min_gap"] else ""
        return (f"pairs: drawn from {o['cache']} (seed {o['seed']}, {o['requested']} asked{gap}; "
                f"{counts}), not an official pair list")
    return f"pairs: {counts}"


def release_origin_text(o: dict, counts: str) -> str:
    """The variant line for pairs derived from a release cache: which folds, how complete,
    and what was left out."""
    folds, n_rel = o["folds"], o["release_folds"]
    which = f"folds {_ranges(folds)} of the release's {n_rel}"
    if len(folds) < n_rel:
        which += f" (not all {n_rel})"
    short = {f: n for f, n in o["pairs_per_fold"].items() if n < o["release_pairs_per_fold"]}
    text = (f"pairs: the {o['release']} release's rule on {o['cache']}, {which}; {counts}; "
            "each fold's threshold chosen on the other folds present")
    if short:
        text += "; fewer than the release's " + str(o["release_pairs_per_fold"]) + \
            " pairs in fold " + ", ".join(f"{f} ({n})" for f, n in sorted(short.items()))
    if o["dropped_pairs"]:
        text += (f"; {len(o['dropped_pairs'])} pairs left out because a photo has no face in "
                 "the cache (not scored; accuracy_all_pairs counts them as errors)")
    return text


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out, start = [], None
    for k, v in enumerate(values):
        if start is None:
            start = v
        if k + 1 == len(values) or values[k + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def read_cacd_meta(path: Path, cache) -> tuple[np.ndarray, np.ndarray]:
    """CSV with columns path,year,test (test: 1 for the 120 test celebrities), joined to the
    cache by its `path` field. Returns (year per record, test mask); unmatched records get
    year 0 and are left out."""
    if not path.exists():
        raise MtmimError(f"{path}: no such file")
    pos = {p: k for k, p in enumerate(cache.paths)}
    year = np.zeros(len(cache), np.int64)
    test = np.zeros(len(cache), bool)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "year", "test"} <= set(reader.fieldnames):
            raise MtmimError(f"{path}: needs the columns path,year,test")
        for n, row in enumerate(reader, 2):
            k = pos.get(row["path"])
            if k is None:
                continue
            try:
                year[k] = int(row["year"])
                test[k] = row["test"].strip().lower() in ("1", "true", "yes")
            except ValueError:
                raise MtmimError(f"{path}: line {n}: year must be an integer") from None
    return year, test & cache.usable


def read_pair_csv(path: Path, cache) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """CSV with columns path_a,path_b,same[,fold]; paths as stored in the cache."""
    if not path.exists():
        raise MtmimError(f"{path}: no such file")
    pos = {p: k for k, p in enumerate(cache.paths)}
    a, b, same, fold = [], [], [], []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not {"path_a", "path_b", "same"} <= cols:
            raise MtmimError(f"{path}: needs the columns path_a,path_b,same[,fold]")
        for n, row in enumerate(reader, 2):
            for key in ("path_a", "path_b"):
                if row[key] not in pos:
                    raise MtmimError(f"{path}: line {n}: {row[key]} is not in {cache.path}")
                if not cache.usable[pos[row[key]]]:
                    raise MtmimError(f"{path}: line {n}: {row[key]} has no aligned face in "
                                     f"{cache.path} (re-align with --on-miss center)")
            a.append(pos[row["path_a"]])
            b.append(pos[row["path_b"]])
            same.append(row["same"].strip().lower() in ("1", "true", "yes"))
            if "fold" in cols:
                fold.append(int(row["fold"]))
    if not a:
        raise MtmimError(f"{path}: no pairs")
    return (np.array(a), np.array(b), np.array(same, bool),
            np.array(fold) if "fold" in cols else None)
