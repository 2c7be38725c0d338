"""Face verification with a stored decision threshold.

`calibrate_threshold` picks, on a labelled cache, the lowest cosine threshold whose false-accept
rate over impostor pairs is at most `far` (the same rule as `mtmim evaluate`'s TAR@FAR), and
`store_threshold` writes it into the checkpoint's meta as

    meta["threshold"] = {"value", "far", "protocol", "far_measured", "far_interval",
                         "false_accepts", "tar", "genuine_pairs", "impostor_pairs",
                         "far_resolved", "min_false_accepts", "flip", "cache", "seed"}

so `mtmim verify` decides with the features the threshold was measured on (same flip mode).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.flip import check_flip
from mtmim_cli.eval.metrics import allowed_false_accepts, min_impostors


def _features(model, images: np.ndarray, flip: str) -> np.ndarray:
    from mtmim_cli.eval.features import extract_features

    return extract_features(model, images, flip=flip)


MIN_FALSE_ACCEPTS = 10  # impostors above a threshold before its FAR counts as measured


def check_far_resolved(far: float, impostors: int, min_false_accepts: int = MIN_FALSE_ACCEPTS,
                       *, allow_unresolved: bool = False, source: str = "") -> bool:
    """Whether `impostors` pairs resolve a FAR of `far`: the threshold rests on the
    floor(far x impostors) impostor scores above it, and below `min_false_accepts` of them the
    measured rate is a guess (2 false accepts of 270 pairs: a 95% interval from 0.0009 to 0.027).
    Unresolved is an MtmimError naming the count and the smallest FAR the pairs resolve,
    unless `allow_unresolved`."""
    if impostors >= min_impostors(far, min_false_accepts):
        return True
    if allow_unresolved:
        return False
    accepted = allowed_false_accepts(far, impostors)
    smallest = min_false_accepts / impostors
    raise MtmimError(f"--far {far:g}: {impostors} impostor pairs{source} leave {accepted} "
                     f"false accepts at that rate; the smallest FAR they resolve is "
                     f"{smallest:.3g} ({min_false_accepts} false accepts, --min-false-accepts): "
                     f"raise --far, draw more pairs, or pass --allow-unresolved")


def calibrate_threshold(model_path: str | os.PathLike, cache_path: str | os.PathLike, *,
                        far: float = 1e-3, n_pairs: int = 6000, seed: int = 0,
                        min_gap: float = 0.0, flip: str = "concat",
                        backbone: str | None = None, progress: bool = False,
                        min_false_accepts: int = MIN_FALSE_ACCEPTS,
                        allow_unresolved: bool = False) -> dict:
    """The verification threshold of a model at a target FAR, measured on cross-age pairs
    drawn (seeded, half genuine) from a labelled cache that the model was not trained on.
    Refuses (before extracting any feature) a FAR the drawn impostor pairs cannot resolve
    (see `check_far_resolved`) unless `allow_unresolved`; the result says which it was."""
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.eval.features import extract_features
    from mtmim_cli.eval.metrics import exact_rate_interval, threshold_at_far
    from mtmim_cli.eval.pairs import cross_age_pairs
    from mtmim_cli.models.identity import load_identity_model

    check_flip(flip)
    if not 0 < far < 1:
        raise MtmimError(f"--far {far}: must lie between 0 and 1")
    if min_false_accepts < 1:
        raise MtmimError(f"--min-false-accepts {min_false_accepts}: must be at least 1")
    cache = Cache(cache_path)
    i, j, same = cross_age_pairs(cache.identity, cache.age, n_pairs, seed, min_gap=min_gap,
                                 usable=cache.usable)
    if not same.any() or same.all():
        raise MtmimError(f"{cache_path}: cannot draw both genuine and impostor pairs")
    n_imp = int((~same).sum())
    resolved = check_far_resolved(far, n_imp, min_false_accepts,
                                  allow_unresolved=allow_unresolved,
                                  source=f" from {Path(cache_path).name}")
    model = load_identity_model(model_path, backbone)
    used = np.unique(np.concatenate([i, j]))
    feats = extract_features(model, cache, used, flip=flip, progress=progress)
    row = {int(k): n for n, k in enumerate(used)}
    fi = feats[[row[int(k)] for k in i]]
    fj = feats[[row[int(k)] for k in j]]
    scores = (fi * fj).sum(1).astype(np.float64)
    value = float(threshold_at_far(scores, same, far))
    false_accepts = int((scores[~same] >= value).sum())
    return {
        "value": value,
        "far": float(far),
        "protocol": (f"cross-age pairs from {Path(cache_path).name} ({len(same)} pairs, "
                     f"seed {seed}, min age gap {min_gap:g}); accept if cosine >= value"),
        "far_measured": false_accepts / n_imp,
        "far_interval": list(exact_rate_interval(false_accepts, n_imp)),
        "false_accepts": false_accepts,
        "tar": float(np.mean(scores[same] >= value)),
        "genuine_pairs": int(same.sum()),
        "impostor_pairs": n_imp,
        "far_resolved": resolved,
        "min_false_accepts": int(min_false_accepts),
        "flip": flip,
        "cache": str(cache_path),
        "seed": int(seed),
    }


def is_mtmim_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is one of our checkpoints (meta + objective), not plain weights."""
    from mtmim_cli.models.onnx_graph import is_onnx_path
    from mtmim_cli.models.weights_io import load_weights_file

    if is_onnx_path(path):
        load_weights_file(path)   # a readable encoder, but not a checkpoint file of ours
        return False
    obj = load_weights_file(path)
    return isinstance(obj, dict) and "meta" in obj and "objective" in obj


def store_threshold(model_path: str | os.PathLike, threshold: dict,
                    out: str | os.PathLike | None = None) -> Path:
    """Write `threshold` into meta["threshold"] of a checkpoint (atomically; in place unless
    `out`). External weights (the shared MobileFaceNet, a backbone.pth) become a checkpoint of
    ours at `out`, which must then be given."""
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.models.onnx_graph import is_onnx_path
    from mtmim_cli.models.weights_io import load_weights_file
    from mtmim_cli.train.checkpoint import save_checkpoint

    model_path = Path(model_path)
    obj = load_weights_file(model_path, threshold.get("backbone"))
    if is_onnx_path(model_path) and out is None:
        raise MtmimError(f"{model_path}: an ONNX model; give --out for the calibrated "
                         "checkpoint (the ONNX file is left as it is)")
    if isinstance(obj, dict) and "meta" in obj and "objective" in obj:
        state = obj
    else:
        if out is None:
            raise MtmimError(f"{model_path}: not an mtmim checkpoint; give --out for the "
                             "calibrated copy")
        model = load_identity_model(model_path, threshold.get("backbone"))
        meta = {k: model.meta[k] for k in ("backbone", "input_width", "embedding_size",
                                           "normalisation")}
        state = {"meta": {"kind": "external", "source": str(model_path), **meta},
                 "objective": {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}}
    state["meta"] = {**state["meta"], "threshold": {k: v for k, v in threshold.items()
                                                    if k != "backbone"}}
    return save_checkpoint(Path(out) if out else model_path, state)


@dataclass
class Verdict:
    score: float
    same: bool
    threshold: dict


def stored_threshold(model, model_path: str | os.PathLike) -> dict:
    t = model.meta.get("threshold")
    if not isinstance(t, dict) or "value" not in t:
        raise MtmimError(f"{model_path}: holds no verification threshold; run "
                         "`mtmim calibrate` on it first (or pass --threshold)")
    return t


def verify_photos(photo_a: str | os.PathLike, photo_b: str | os.PathLike,
                  model_path: str | os.PathLike, *, threshold: float | None = None,
                  flip: str | None = None, backbone: str | None = None,
                  device: str = "cpu", pad: float = 0.0, detector=None) -> Verdict:
    """Align both photos (detection framed by `pad`, as `align --pad`), compare their identity
    features, decide at the stored threshold (or `threshold`). A photo without a face is an
    MtmimError naming it."""
    from mtmim_cli.data.align import align_photo
    from mtmim_cli.data.detect import FaceDetector, check_pad
    from mtmim_cli.models.identity import load_identity_model

    pad = check_pad(pad)
    model = load_identity_model(model_path, backbone)
    if threshold is None:
        t = dict(stored_threshold(model, model_path))
    else:
        t = {"value": float(threshold), "far": None, "protocol": "given on the command line"}
    flip = flip or t.get("flip", "concat")
    detector = detector or FaceDetector(device=device, pad=pad)
    faces = []
    for photo in (photo_a, photo_b):
        aligned, _ = align_photo(photo, detector)
        if aligned is None:
            raise MtmimError(f"{photo}: no face found")
        faces.append(aligned)
    f = _features(model, np.stack(faces), flip)
    score = float(f[0] @ f[1])
    return Verdict(score=score, same=score >= float(t["value"]), threshold={**t, "flip": flip})
