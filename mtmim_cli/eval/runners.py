"""One protocol on one loaded model: extract the features the protocol needs, then score
them with `mtmim_cli.eval.protocols`. The FG-NET re-fit (which trains) is not here: it lives
in `mtmim_cli.orchestration.refit`, above both `eval/` and `train/`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.inputs import EvalInputs, PairInput


@dataclass(frozen=True)
class FeatureOptions:
    """How identity features are taken: mirror combination, batch, device, progress bar."""
    flip: str = "concat"
    batch_size: int = 128
    device: str = "cpu"
    progress: bool = False

    def extract(self, model, source, indices: np.ndarray) -> np.ndarray:
        from mtmim_cli.eval.features import extract_features

        return extract_features(model, source, indices, self.flip, self.batch_size,
                                device=self.device, progress=self.progress)


def fgnet_loo(model, cache, feat: FeatureOptions, max_rank: int) -> dict:
    """Every usable image ranked against all the others (the model as given, no re-fit)."""
    idx = np.flatnonzero(cache.usable)
    m = P.identification(feat.extract(model, cache, idx), cache.identity[idx], max_rank=max_rank)
    return with_all_images(m, cache)


def with_all_images(m: dict, cache) -> dict:
    """Add the rank-1 over all photos, a photo without a face counting as a failure (it
    cannot be ranked), and the photo counts."""
    n_all, n_used = len(cache), int(cache.usable.sum())
    return {**m, "rank1_all_images": m["rank1"] * n_used / n_all if n_all else float("nan"),
            **image_counts(cache)}


def image_counts(cache) -> dict:
    n_all = len(cache)
    return {"images_total": n_all, "images_without_face": n_all - int(cache.usable.sum())}


def morph_indices(cache, split: dict) -> np.ndarray:
    """The records MORPH scores: per test subject the oldest (probe) and youngest (gallery)
    photo with a face."""
    masked_age = np.where(cache.usable, cache.age, np.nan)
    probe, gallery, _ = P.largest_gap_pairs(cache.identity, masked_age, split["test"])
    return np.unique(np.r_[probe, gallery])


def morph(model, cache, split: dict, feat: FeatureOptions, max_rank: int) -> dict:
    """MORPH: each test subject's oldest photo against the youngest photos of all test subjects."""
    idx = morph_indices(cache, split)
    sub = feat.extract(model, cache, idx)
    feats = np.zeros((len(cache), sub.shape[1]), np.float32)
    feats[idx] = sub
    masked_age = np.where(cache.usable, cache.age, np.nan)
    return P.morph_rank1(feats, cache.identity, masked_age, split["test"], max_rank)


def cacd_indices(year: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The records CACD scores: the test celebrities' photos of 2004-2013."""
    return np.flatnonzero(test & (year >= 2004) & (year <= 2013))


def cacd(model, cache, year: np.ndarray, test: np.ndarray, feat: FeatureOptions) -> dict:
    """CACD retrieval over the test celebrities' photos of 2004-2013."""
    idx = cacd_indices(year, test)
    sub = feat.extract(model, cache, idx)
    return P.cacd_map(sub, cache.identity[idx], year[idx], np.ones(len(idx), bool))


def verification(model, pairs: PairInput, feat: FeatureOptions) -> dict:
    """10-fold verification accuracy, TAR at FAR and AUC on the pairs."""
    used, inv = np.unique(np.r_[pairs.i, pairs.j], return_inverse=True)
    feats = feat.extract(model, pairs.source, used)
    n = len(pairs.i)
    return P.verification(feats[inv[:n]], feats[inv[n:]], pairs.same, pairs.folds)


def run_protocol(protocol: str, model, inputs: EvalInputs, feat: FeatureOptions,
                 max_rank: int) -> dict:
    """The metrics of `protocol` for `model` (FG-NET without re-fit)."""
    if protocol == "fgnet-loo":
        return fgnet_loo(model, inputs.cache, feat, max_rank)
    if inputs.split is not None:
        return morph(model, inputs.cache, inputs.split, feat, max_rank)
    if protocol == "cacd-map":
        return cacd(model, inputs.cache, inputs.cacd_year, inputs.cacd_test, feat)
    return verification(model, inputs.pairs, feat)
