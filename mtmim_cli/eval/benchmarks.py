"""Is this run the benchmark the paper reports on? The paper's rows are printed beside a
result only when it is; otherwise under "not comparable: <reason>".

What counts (decisions, written here once):
- fgnet-loo: the cache holds FG-NET's 1002 photos (recognised by the digest of their file
  names, wherever they were aligned from), and every round re-fits without its held-out
  photo, one round per photo (`--refit head` or `--refit full`, no `--folds`). The paper
  fine-tunes on the other 1001 photos per round. `--refit head` re-fits only the
  factorization and heads: the protocol is the paper's, the method lighter. Grouped rounds
  (`--folds 10`) train each round on nine tenths of the photos: a different, harder
  protocol, not comparable. `--refit none` uses none of the other photos: not comparable.
  Photos without a detected face count as failures in the all-images figure.
- agedb30 / lfw / calfw: a pair file (not pairs drawn from a cache) with the official lists'
  structure: 6,000 pairs in 10 folds, each of 300 genuine and 300 impostor pairs. The file's
  sha256 is printed beside the result so a reader can compare it with the published list;
  the structure is what is checked, since this repository holds none of those files.
- morph-s1 / morph-s2: the full split sizes (Setting-1: 10,000 test subjects; Setting-2:
  10,000 training and 3,000 test subjects).
- cacd-map: the paper's 120 test celebrities.
- cacd-vs: all 4,000 pairs of the release's 10 folds, each of 200 genuine and 200 impostor
  pairs, every pair scored: from a `--format cacd-vs` cache (the release's own rule) or from
  a pair file with that structure. Fewer folds (the four the project shares) are a different,
  smaller test: their accuracy is not the published figure's. The published rows are other
  papers' (as the DAL paper tabulates them), not Hou et al.'s.
- Any protocol: no test image among the model's recorded training images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

FGNET_PHOTOS = 1002
# sha256 of FG-NET's 1002 file names (upper case, sorted, one per line), from the complete
# set in ../shared/data/fgnet/images; tests/real/test_benchmarks_real.py recomputes it.
FGNET_NAMES_SHA256 = "27626a9eb633f6fbe5df2ae96725afca090469016ccc3d68fc6b6d05b8744078"
OFFICIAL_PAIRS = {"agedb30": "AgeDB-30", "lfw": "LFW", "calfw": "CALFW"}
OFFICIAL_FOLDS, OFFICIAL_PER_CLASS = 10, 300
MORPH_FULL = {"morph-s1": {"test": 10_000, "train": None},
              "morph-s2": {"test": 3_000, "train": 10_000}}
CACD_TEST_CELEBRITIES = 120
CACD_VS_FOLDS, CACD_VS_PER_CLASS = 10, 200


@dataclass(frozen=True)
class Verdict:
    comparable: bool
    reason: str  # what makes it the benchmark, or why it is not

    def to_dict(self) -> dict:
        return {"comparable": self.comparable, "reason": self.reason}


def names_sha256(paths: Sequence[str]) -> str:
    names = sorted(PurePath(p.replace("\\", "/")).name.upper() for p in paths)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def fgnet(paths: Sequence[str], refit: str, rounds: int, n_ranked: int) -> Verdict:
    """`paths`: every record of the cache; `rounds`: re-fit rounds run; `n_ranked`: photos
    with a face (one round each in the exact protocol)."""
    if len(paths) != FGNET_PHOTOS or names_sha256(paths) != FGNET_NAMES_SHA256:
        return Verdict(False, f"not FG-NET's {FGNET_PHOTOS} photos (this cache holds "
                              f"{len(paths)} records)")
    if refit == "none":
        return Verdict(False, "no re-fit per round (the paper fine-tunes on the other 1001 "
                              "photos in every round; use --refit head or full)")
    if rounds < n_ranked:
        return Verdict(False, f"{rounds} grouped rounds, each training on about "
                              f"{1 - 1 / rounds:.0%} of the photos (the paper re-fits once per "
                              "photo; run without --folds)")
    return Verdict(True, f"FG-NET, all {FGNET_PHOTOS} photos, re-fit ({refit}) once per photo "
                         "without it")


def pair_structure(same: np.ndarray, folds: int | np.ndarray) -> tuple[int, list[tuple[int, int]]]:
    """(number of folds, [(genuine, impostor) per fold]) of a pair list; an integer `folds`
    means contiguous equal blocks, as in the official files."""
    same = np.asarray(same, bool)
    if isinstance(folds, (int, np.integer)):
        fold_of = (np.arange(len(same)) * int(folds)) // max(len(same), 1)
    else:
        fold_of = np.asarray(folds)
    ids = np.unique(fold_of)
    return len(ids), [(int(same[fold_of == f].sum()), int((~same[fold_of == f]).sum())) for f in ids]


def pairs(protocol: str, source: str, same: np.ndarray, folds: int | np.ndarray) -> Verdict:
    """`source`: 'file' for a pair file, 'drawn' for pairs drawn from a cache."""
    name = OFFICIAL_PAIRS[protocol]
    if source != "file":
        return Verdict(False, f"pairs drawn from a cache, not the official {name} pair list")
    n_folds, per = pair_structure(same, folds)
    want = (OFFICIAL_PER_CLASS, OFFICIAL_PER_CLASS)
    if n_folds != OFFICIAL_FOLDS or any(p != want for p in per):
        return Verdict(False, f"{len(same)} pairs in {n_folds} folds; the official {name} list "
                              f"has {OFFICIAL_FOLDS} folds of {OFFICIAL_PER_CLASS} genuine + "
                              f"{OFFICIAL_PER_CLASS} impostor pairs")
    return Verdict(True, f"{len(same)} pairs in {OFFICIAL_FOLDS} folds of {OFFICIAL_PER_CLASS} "
                         f"genuine + {OFFICIAL_PER_CLASS} impostor pairs, the official "
                         f"{name} structure")


def morph(protocol: str, n_test: int, n_train: int) -> Verdict:
    full = MORPH_FULL[protocol]
    short = {"morph-s1": "Setting-1 tests on 10,000 subjects",
             "morph-s2": "Setting-2 trains on 10,000 subjects and tests on 3,000 others"}[protocol]
    if n_test != full["test"] or (full["train"] is not None and n_train != full["train"]):
        return Verdict(False, f"{n_test} test and {n_train} training subjects ({short})")
    return Verdict(True, f"the full split: {short}")


def cacd(n_test_identities: int) -> Verdict:
    if n_test_identities != CACD_TEST_CELEBRITIES:
        return Verdict(False, f"{n_test_identities} test celebrities (the paper tests on "
                              f"{CACD_TEST_CELEBRITIES})")
    return Verdict(True, f"the paper's {CACD_TEST_CELEBRITIES} test celebrities")


def cacd_vs(origin: dict | None, same: np.ndarray, folds: int | np.ndarray) -> Verdict:
    """`origin`: the pairs' origin (`eval.inputs.PairInput.origin`)."""
    kind = (origin or {}).get("kind", "drawn")
    if kind == "drawn":
        return Verdict(False, "pairs drawn from a cache, not the CACD-VS release's pairs")
    want = f"{CACD_VS_FOLDS} folds of {CACD_VS_PER_CLASS} genuine + {CACD_VS_PER_CLASS} impostor pairs"
    n_folds, per = pair_structure(same, folds)
    if kind == "release":
        dropped = len(origin["dropped_pairs"])
        if n_folds < CACD_VS_FOLDS:
            return Verdict(False, f"{n_folds} of the release's {CACD_VS_FOLDS} folds "
                                  f"({len(same) + dropped} of its 4,000 pairs): thresholds and "
                                  f"accuracy over those folds only, not the published "
                                  f"{CACD_VS_FOLDS}-fold figure")
        if dropped:
            return Verdict(False, f"{dropped} pairs left out (a photo without a face; align "
                                  "with --on-miss center to score every pair)")
    if n_folds != CACD_VS_FOLDS or any(p != (CACD_VS_PER_CLASS,) * 2 for p in per):
        return Verdict(False, f"{len(same)} pairs in {n_folds} folds; the release has {want}")
    source = "the release's rule" if kind == "release" else "a pair file with its structure"
    return Verdict(True, f"all {len(same)} CACD-VS pairs, {want} ({source})")


def with_training_overlap(verdict: Verdict, trained_on: dict[str, int]) -> Verdict:
    """A run whose models were trained on some test images is no benchmark result,
    whatever its protocol. `trained_on`: model label -> test images it trained on."""
    seen = {k: v for k, v in trained_on.items() if v}
    if not seen:
        return verdict
    who = ", ".join(f"{k} ({v})" for k, v in seen.items())
    return Verdict(False, f"test images were trained on by {who}")


def for_run(cfg, inputs) -> Verdict | None:
    """The verdict for an `EvalConfig` and its opened `EvalInputs`; None for a plain pair
    list (no published figure belongs beside it)."""
    from mtmim_cli.eval import protocols as P

    if cfg.protocol == "fgnet-loo":
        cache = inputs.cache
        n = int(cache.usable.sum())
        rounds = 0 if cfg.refit == "none" else len(P.loo_rounds(n, cfg.folds, cfg.seed))
        return fgnet(cache.paths, cfg.refit, rounds, n)
    if cfg.protocol in MORPH_FULL:
        return morph(cfg.protocol, len(inputs.split["test"]), len(inputs.split["train"]))
    if cfg.protocol == "cacd-map":
        test = inputs.cacd_test
        return cacd(len(np.unique(inputs.cache.identity[test])))
    if cfg.protocol == "cacd-vs":
        p = inputs.pairs
        return cacd_vs(p.origin, p.same, p.folds)
    if cfg.protocol in OFFICIAL_PAIRS:
        p = inputs.pairs
        return pairs(cfg.protocol, (p.origin or {}).get("kind", "drawn"), p.same, p.folds)
    return None
