"""One protocol on one loaded model: extract the features the protocol needs, then score
them with `mtmim_cli.eval.protocols`. The FG-NET re-fit (which trains) is not here: it lives
in `mtmim_cli.orchestration.refit`, above both `eval/` and `train/`.

Each runner returns a `Scored`: the table's metrics, and what the analyses across models
need: per-unit outcomes in the protocol's unit order (`eval.outcomes`), the units' context
(probe and gallery records, or the pairs), the identity features of the images with their
records (the age probe), the raw outputs of the image view (x_id, and x_age for factorized
models: the InfoNCE estimate, and `evaluate --features` writes them), and for identification
the success of every probe-mate pair (the probe-age x gallery-age map)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.inputs import EvalInputs, PairInput


@dataclass(frozen=True)
class FeatureOptions:
    """How identity features are taken: mirror combination, batch, device, progress bar."""
    flip: str = "concat"
    batch_size: int | None = None   # images per pass (None: sized to the model)
    device: str = "cpu"
    progress: bool = False

    def extract(self, model, source, indices: np.ndarray) -> np.ndarray:
        from mtmim_cli.eval.features import extract_features

        return extract_features(model, source, indices, self.flip, self.batch_size,
                                device=self.device, progress=self.progress)

    def extract_parts(self, model, source, indices: np.ndarray
                      ) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
        """Identity features, and the image view's raw parts {'x_id', 'x_age'} from the same
        pass: x_id is the model's output, x_age None unless the model has a factorization
        unit (then the unit is applied to one pass of the encoder)."""
        from mtmim_cli.eval.features import combine_views, extract_views

        factorize = getattr(model, "factorize", None)
        views = dict(mirror=self.flip != "none", batch_size=self.batch_size,
                     device=self.device, progress=self.progress)
        if factorize is None or not callable(getattr(model, "encoder_view", None)):
            f, ff = extract_views(model, source, indices, **views)
            return combine_views(f, ff, self.flip), {"x_id": f, "x_age": None}
        import torch

        # A fresh view is in training mode; extract_views restores the mode it finds, which
        # would leave the model's BatchNorm layers training afterwards.
        view = model.encoder_view().train(model.training)
        f, ff = extract_views(view, source, indices, **views)
        with torch.no_grad():
            unit = factorize.to("cpu")
            x_id, x_age = (t.numpy() for t in unit(torch.from_numpy(f)))
            x_id_f = unit(torch.from_numpy(ff))[0].numpy() if ff is not None else None
        return combine_views(x_id, x_id_f, self.flip), {"x_id": x_id, "x_age": x_age}


@dataclass
class Scored:
    """One model on one protocol: the metrics and the per-unit material (see the module)."""
    metrics: dict
    outcomes: dict[str, np.ndarray] = field(default_factory=dict)
    context: dict = field(default_factory=dict)
    rows: np.ndarray | None = None
    features: np.ndarray | None = None
    parts: dict[str, np.ndarray | None] | None = None   # extract_parts' image view, over rows
    mates: dict | None = None
    feature_source: str = "identity features as matched (image + mirror as --flip says)"

    @property
    def factors(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(x_id, x_age) of a factorized model; None otherwise."""
        if self.parts is None or self.parts["x_age"] is None:
            return None
        return self.parts["x_id"], self.parts["x_age"]


def fgnet_loo(model, cache, feat: FeatureOptions, max_rank: int) -> Scored:
    """Every usable image ranked against all the others (the model as given, no re-fit)."""
    from mtmim_cli.eval.agebins import mate_success
    from mtmim_cli.eval.outcomes import probe_outcomes

    idx = np.flatnonzero(cache.usable)
    ident = cache.identity[idx]
    feats, parts = feat.extract_parts(model, cache, idx)
    m = P.identification(feats, ident, max_rank=max_rank)
    pos = np.arange(len(idx))
    per_row = probe_outcomes(feats, ident, feats, ident, query_index=pos)
    mates = mate_success(feats, ident, pos, pos)
    return Scored(with_all_images(m, cache), **fgnet_units(cache, idx, per_row),
                  rows=idx, features=feats, parts=parts,
                  mates={**mates, "probe": idx[mates["probe"]], "mate": idx[mates["mate"]]})


def fgnet_units(cache, idx: np.ndarray, per_row: dict) -> dict:
    """FG-NET's units are all its photos (each is a probe; one without a face is a miss)
    against the photos with a face: outcomes over all records, and that context."""
    from mtmim_cli.eval.outcomes import on_records

    return {"outcomes": on_records(len(cache), idx, per_row, top_rows=idx),
            "context": {"kind": "identification", "probe": np.arange(len(cache)),
                        "gallery": idx}}


def with_all_images(m: dict, cache) -> dict:
    """FG-NET's figure is over all photos of the protocol: a photo without a face cannot be
    ranked and counts as a failure. `rank1` and `cmc` become all-photo figures, `queries` the
    photo count; `rank1_faces` and `ranked` keep the figure over the photos with a face."""
    n_all, n_used = len(cache), int(cache.usable.sum())
    scale = n_used / n_all if n_all else float("nan")
    return {**m, "rank1": m["rank1"] * scale, "cmc": [c * scale for c in m.get("cmc", [])],
            "rank1_faces": m["rank1"], "ranked": n_used, "queries": n_all,
            "rank1_all_images": m["rank1"] * scale, **image_counts(cache)}


def image_counts(cache) -> dict:
    n_all = len(cache)
    return {"images_total": n_all, "images_without_face": n_all - int(cache.usable.sum())}


def _identification(cache, feats: np.ndarray, probe: np.ndarray, gallery: np.ndarray,
                    metrics: dict, rows: np.ndarray, parts: dict) -> Scored:
    """A probe set against a gallery (cache records; `feats` holds a row per record)."""
    from mtmim_cli.eval.agebins import mate_success
    from mtmim_cli.eval.outcomes import probe_outcomes

    ident = cache.identity
    per = probe_outcomes(feats[probe], ident[probe], feats[gallery], ident[gallery])
    top = np.where(per["top1"] >= 0, gallery[np.maximum(per["top1"], 0)], -1)
    return Scored(metrics, outcomes={"index": probe, "hit": per["hit"], "rank": per["rank"],
                                     "top1": top},
                  context={"kind": "identification", "probe": probe, "gallery": gallery},
                  rows=rows, features=feats[rows], parts=parts,
                  mates=mate_success(feats, ident, probe, gallery))


def morph_indices(cache, split: dict) -> np.ndarray:
    """The records MORPH scores: per test subject the oldest (probe) and youngest (gallery)
    photo with a face."""
    masked_age = np.where(cache.usable, cache.age, np.nan)
    probe, gallery, _ = P.largest_gap_pairs(cache.identity, masked_age, split["test"])
    return np.unique(np.r_[probe, gallery])


def morph(model, cache, split: dict, feat: FeatureOptions, max_rank: int) -> Scored:
    """MORPH: each test subject's oldest photo against the youngest photos of all test subjects."""
    masked_age = np.where(cache.usable, cache.age, np.nan)
    probe, gallery, _ = P.largest_gap_pairs(cache.identity, masked_age, split["test"])
    idx = morph_indices(cache, split)
    sub, parts = feat.extract_parts(model, cache, idx)
    feats = np.zeros((len(cache), sub.shape[1]), np.float32)
    feats[idx] = sub
    m = P.morph_rank1(feats, cache.identity, masked_age, split["test"], max_rank)
    return _identification(cache, feats, probe, gallery, m, idx, parts)


def cacd_indices(year: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The records CACD scores: the test celebrities' photos of 2004-2013."""
    return np.flatnonzero(test & (year >= 2004) & (year <= 2013))


def cacd(model, cache, year: np.ndarray, test: np.ndarray, feat: FeatureOptions) -> Scored:
    """CACD retrieval over the test celebrities' photos of 2004-2013. Per query beside the
    MAP: its average precision in each database and its rank-1 against all of 2004-2012 (the
    figure the age breakdown uses)."""
    from mtmim_cli.eval import metrics as M

    idx = cacd_indices(year, test)
    sub, parts = feat.extract_parts(model, cache, idx)
    m = P.cacd_map(sub, cache.identity[idx], year[idx], np.ones(len(idx), bool))
    feats = np.zeros((len(cache), sub.shape[1]), np.float32)
    feats[idx] = sub
    queries = idx[year[idx] == P.CACD_QUERY_YEAR]
    database = idx[(year[idx] >= 2004) & (year[idx] <= 2012)]
    scored = _identification(cache, feats, queries, database, m, idx, parts)
    for name, (lo, hi) in P.CACD_DATABASES.items():
        d = idx[(year[idx] >= lo) & (year[idx] <= hi)]
        _, aps = M.mean_average_precision(feats[queries], cache.identity[queries], feats[d],
                                          cache.identity[d])
        scored.outcomes[f"ap {name}"] = aps
    return scored


def verification(model, pairs: PairInput, feat: FeatureOptions) -> Scored:
    """10-fold verification accuracy, TAR at FAR and AUC on the pairs; per pair its score
    and whether the K-fold rule classified it right."""
    from mtmim_cli.eval import metrics as M
    from mtmim_cli.eval.agebins import pair_correctness

    used, inv = np.unique(np.r_[pairs.i, pairs.j], return_inverse=True)
    feats, parts = feat.extract_parts(model, pairs.source, used)
    n = len(pairs.i)
    fa, fb = feats[inv[:n]], feats[inv[n:]]
    m = P.verification(fa, fb, pairs.same, pairs.folds)
    scores = np.sum(np.asarray(fa, np.float64) * fb, axis=1)
    correct = pair_correctness(scores, pairs.same, pairs.folds, m["thresholds"])
    if pairs.dropped_folds is not None:
        m.update(with_dropped_pairs(correct, pairs.folds, pairs.dropped_folds))
    on_cache = not isinstance(pairs.source, np.ndarray)
    fold = (pairs.folds if not isinstance(pairs.folds, (int, np.integer))
            else M.fold_labels(n, int(pairs.folds)))
    return Scored(m, outcomes={"index": np.arange(n), "correct": correct, "score": scores},
                  context={"kind": "verification", "i": pairs.i, "j": pairs.j,
                           "same": pairs.same, "fold": np.asarray(fold), "on_cache": on_cache},
                  rows=used if on_cache else None, features=feats if on_cache else None,
                  parts=parts if on_cache else None)


def with_dropped_pairs(correct: np.ndarray, folds: np.ndarray,
                       dropped_folds: np.ndarray) -> dict:
    """Pairs that could not be scored (a photo without a face) as errors: the accuracy over
    every pair of the folds, beside the figure over the scored ones (as FG-NET counts a
    photo without a face as a failure)."""
    folds, dropped_folds = np.asarray(folds), np.asarray(dropped_folds)
    accs = [float(np.sum(correct[folds == f]) / (np.sum(folds == f) + np.sum(dropped_folds == f)))
            for f in np.unique(np.r_[folds, dropped_folds])]
    return {"pairs_dropped": int(len(dropped_folds)),
            "accuracy_all_pairs": float(np.mean(accs)), "std_all_pairs": float(np.std(accs))}


def run_protocol(protocol: str, model, inputs: EvalInputs, feat: FeatureOptions,
                 max_rank: int) -> Scored:
    """The metrics of `protocol` for `model` (FG-NET without re-fit)."""
    if protocol == "fgnet-loo":
        return fgnet_loo(model, inputs.cache, feat, max_rank)
    if inputs.split is not None:
        return morph(model, inputs.cache, inputs.split, feat, max_rank)
    if protocol == "cacd-map":
        return cacd(model, inputs.cache, inputs.cacd_year, inputs.cacd_test, feat)
    return verification(model, inputs.pairs, feat)
