"""Hand-labelled landmark files and the normalised landmark error used to check alignment."""

from __future__ import annotations

import os

import numpy as np

from mtmim_cli.errors import MtmimError

# FG-NET's own 68-point markup, 0-based, in MTCNN's order: pupil (image left), pupil (image
# right), nose tip, mouth corner (image left), mouth corner (image right)
FGNET_FIVE = (31, 36, 67, 48, 54)


def read_pts(path: str | os.PathLike) -> np.ndarray:
    """Points of a .pts file (``version``, ``n_points``, then ``x y`` lines between braces)."""
    text = open(path, encoding="utf-8", errors="replace").read()
    try:
        body = text[text.index("{") + 1:text.rindex("}")]
        pts = np.array([[float(v) for v in line.split()] for line in body.splitlines() if line.strip()])
    except ValueError:
        raise MtmimError(f"{path}: not a .pts landmark file") from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise MtmimError(f"{path}: not a .pts landmark file (points of shape {pts.shape})")
    return pts


def fgnet_five(path: str | os.PathLike) -> np.ndarray:
    """The five FG-NET points comparable to MTCNN's, (5, 2)."""
    pts = read_pts(path)
    if len(pts) != 68:
        raise MtmimError(f"{path}: expected 68 FG-NET points, found {len(pts)}")
    return pts[list(FGNET_FIVE)]


def normalised_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean point-to-point distance divided by the inter-ocular distance (truth's points 0, 1)."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    iod = np.linalg.norm(truth[0] - truth[1])
    return float(np.linalg.norm(pred - truth, axis=1).mean() / iod)


def cache_landmark_errors(cache_path: str | os.PathLike, points_dir: str | os.PathLike) -> dict[str, float]:
    """Normalised error of each detected record of an FG-NET cache against its .pts file.

    Keys are the record paths; records without a detection or without a .pts file are left out.
    """
    from pathlib import Path

    from mtmim_cli.data.cache import DETECTED, Cache

    c = Cache(cache_path)
    points_dir = Path(points_dir)
    out = {}
    for i, rel in enumerate(c.paths):
        pts = points_dir / (Path(rel).stem.lower() + ".pts")
        if c.status[i] == DETECTED and pts.exists():
            out[rel] = normalised_error(c.landmarks[i], fgnet_five(pts))
    return out
