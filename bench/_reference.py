"""The plain reference the align benchmarks compare against, and shared helpers.

Reference: facenet-pytorch MTCNN with its defaults (20-px minimum face) on each photo at full
resolution, one photo at a time, decoded in the same thread, the most probable face kept, and
the same five-point warp as ours (`warp_face`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def reference_loop(paths: list[Path]) -> tuple[list[np.ndarray | None], float]:
    """Landmarks (5, 2) or None per photo, and the seconds the loop took (model load excluded)."""
    from facenet_pytorch import MTCNN
    from PIL import Image, ImageOps

    from mtmim_cli.data.align import warp_face

    mtcnn = MTCNN(keep_all=True, post_process=False)
    out: list[np.ndarray | None] = []
    t0 = time.perf_counter()
    for p in paths:
        try:
            with Image.open(p) as im:
                img = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except OSError:
            out.append(None)
            continue
        boxes, probs, points = mtcnn.detect(img, landmarks=True)
        if boxes is None:
            out.append(None)
            continue
        lm = np.asarray(points[0], dtype=np.float64)  # detect() sorts by probability
        warp_face(img, lm)
        out.append(lm)
    return out, time.perf_counter() - t0


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
