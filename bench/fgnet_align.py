"""All 1002 FG-NET photos through `align`: detection rate, landmark error, time, and the same
figures for the plain reference loop in the same run.

    .venv/bin/python bench/fgnet_align.py [--step 1] [--no-reference] [--threads 1]

Detection rate counts detections only (no fallback). Landmark error: the five MTCNN points
against FG-NET's hand-labelled ones (0-based: pupils 31 and 36, nose tip 67, mouth corners 48
and 54), mean distance over the five divided by the inter-ocular distance, median over photos.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _reference import load_avg, reference_loop  # noqa: E402

from mtmim_cli.paths import shared_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=shared_path("data", "fgnet"))
    ap.add_argument("--step", type=int, default=1, help="every step-th photo (1: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="keep the cache here")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()

    import torch

    from mtmim_cli.data.align import align_dataset
    from mtmim_cli.data.cache import DETECTED, Cache
    from mtmim_cli.data.detect import FaceDetector
    from mtmim_cli.data.landmarks import cache_landmark_errors, fgnet_five, normalised_error

    images, points = args.data / "images", args.data / "points"
    if not images.is_dir():
        print(f"skipped: FG-NET not found at {args.data} (set MTMIM_SHARED)")
        return 0
    torch.set_num_threads(args.threads)
    photos = sorted(images.iterdir())[:: args.step]
    print(f"{len(photos)} FG-NET photos, torch threads {args.threads}, load average {load_avg()}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        src.mkdir()
        for p in photos:
            (src / p.name).symlink_to(p.resolve())
        out = args.out or Path(tmp) / "fgnet.h5"
        s = align_dataset(src, "fgnet", out, detector=FaceDetector(), progress=False, overwrite=True)
        c = Cache(out)
        errors = np.array(list(cache_landmark_errors(out, points).values()))
        n_det = int((c.status == DETECTED).sum())
        print(f"ours      detected {n_det}/{len(c)} = {n_det / len(c):.1%} (no fallback); "
              f"median landmark error / IOD {np.median(errors):.4f} (mean {errors.mean():.4f}, "
              f"90th pct {np.quantile(errors, 0.9):.4f}); {s.seconds:.1f} s, {s.speed:.1f} img/s")
        for path, status, reason in s.problems:
            print(f"  {status} {path}: {reason}")
    if args.no_reference:
        return 0
    lms, ref_s = reference_loop(photos)
    ref_err = np.array([normalised_error(lm, fgnet_five(points / (p.stem.lower() + ".pts")))
                        for p, lm in zip(photos, lms, strict=True) if lm is not None])
    n_ref = len(ref_err)
    print(f"reference detected {n_ref}/{len(photos)} = {n_ref / len(photos):.1%}; median landmark "
          f"error / IOD {np.median(ref_err):.4f}; {ref_s:.1f} s, {len(photos) / ref_s:.1f} img/s")
    print(f"speed ratio ours/reference: {ref_s / s.seconds:.2f}x; load average {load_avg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
