"""Speed of `align` on the shared CelebA subset against a plain reference loop, in one run.

    .venv/bin/python bench/align.py [--n 300] [--min-face 0.15] [--threads 1]

Both sides get the same torch thread count and the same photos (the first N of the subset by
name), alternating in blocks so that load from other jobs falls on both alike; model loading is
excluded from both (ours is timed through `align_dataset`, HDF5 writing included). Prints photos/s of each, their ratio, and the
detection counts (the ratio is only meaningful when the counts are equal).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reference import load_avg, reference_loop  # noqa: E402

from mtmim_cli.paths import shared_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=shared_path("data", "celeba-subset"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--min-face", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=5, help="alternate ours/reference in this many blocks")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    from mtmim_cli.data.align import align_dataset
    from mtmim_cli.data.cache import DETECTED, Cache
    from mtmim_cli.data.detect import DEFAULT_MIN_FACE, FaceDetector
    from mtmim_cli.data.readers import read_records, source_root

    if not args.data.exists():
        print(f"skipped: CelebA subset not found at {args.data} (set MTMIM_SHARED)")
        return 0
    torch.set_num_threads(args.threads)
    records = read_records(args.data, "celeba")[: args.n]
    root = source_root(args.data, "celeba")
    paths = [root / r.path for r in records]
    print(f"{len(paths)} CelebA photos, torch threads {args.threads}, load average {load_avg()}")

    min_face = DEFAULT_MIN_FACE if args.min_face is None else args.min_face
    det = FaceDetector(min_face=min_face)
    ours_s = ref_s = 0.0
    ours_n = ref_n = 0
    # alternate blocks of photos between the two so that a change in the machine's load
    # (other people's jobs) falls on both alike
    blocks = np.array_split(np.arange(len(paths)), args.blocks)
    with tempfile.TemporaryDirectory() as tmp:
        for b, idx in enumerate(blocks):
            manifest = Path(tmp) / f"block{b}.csv"
            with open(manifest, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "identity"])
                w.writerows([str(paths[i]), records[i].identity] for i in idx)
            s = align_dataset(manifest, "csv", Path(tmp) / f"ours{b}.h5", detector=det,
                              progress=False, min_face=min_face, workers=args.workers)
            ours_s += s.seconds
            ours_n += int((Cache(s.out).status == DETECTED).sum())
            if not args.skip_reference:
                lms, seconds = reference_loop([paths[i] for i in idx])
                ref_s += seconds
                ref_n += sum(lm is not None for lm in lms)
    n = len(paths)
    print(f"ours      {ours_s:7.1f} s  {n / ours_s:6.1f} img/s  detected {ours_n}/{n}"
          f"  (min face {min_face} of the shorter side, retry at 20 px)")
    if args.skip_reference:
        return 0
    print(f"reference {ref_s:7.1f} s  {n / ref_s:6.1f} img/s  detected {ref_n}/{n}"
          "  (MTCNN defaults, full resolution)")
    print(f"speed ratio ours/reference: {ref_s / ours_s:.2f}x; detection counts "
          f"{'equal' if ours_n == ref_n else f'differ ({ours_n} vs {ref_n})'}; "
          f"load average {load_avg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
