"""Labels of an insightface `.rec` pack: the header-only scan against reading whole records.

Writes a pack of --records image records (default 50,000, --per-identity images per label
(MS1M averages ~68), random-byte payloads of 5-9 KB, the size of 112x112 JPEGs) in insightface's layout
(header, images, identity ranges), then collects its labels three ways, each once after one
warm-up call, with the pack in the page cache:

- today's reader before the scan: every record read whole (`iter_rec`),
- `rec_labels` (auto): the header's identity ranges, three record headers per identity,
- `rec_labels(method="headers")`: every record's header (packs without identity ranges).

Bytes are what the process asked the kernel for (rchar in /proc/self/io), so they count the
.idx as well; the three must give identical labels.

    .venv/bin/python bench/rec_scan.py [--records 50000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise SystemExit("no rchar in /proc/self/io (Linux only)")


def measure(fn):
    """(result, seconds, bytes read) of one call after a warm-up call."""
    fn()
    before = rchar()
    itself = rchar() - before
    before = rchar()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    return out, dt, rchar() - before - itself


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--per-identity", type=int, default=68)
    ap.add_argument("--dir", default=None, help="Where to write the pack (deleted afterwards).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from mtmim_cli.data.insightface import iter_rec, rec_labels, write_rec

    rng = np.random.default_rng(args.seed)
    sizes = rng.integers(5 * 1024, 9 * 1024, args.records)
    blob = rng.bytes(int(sizes.max()) + 4096)

    def items():
        for k in range(args.records):
            lo = int(rng.integers(0, 4096))
            yield float(k // args.per_identity), blob[lo: lo + int(sizes[k])]

    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)   # a scratch folder that is not there yet
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        rec = write_rec(Path(tmp) / "train.rec", items())
        size = rec.stat().st_size
        idx_size = rec.with_suffix(".idx").stat().st_size
        print(f"pack: {args.records} images, {args.records // args.per_identity + 1} identities, "
              f"{size / 2**20:.1f} MiB .rec + {idx_size / 2**10:.0f} KiB .idx "
              f"(written in {time.perf_counter() - t0:.1f} s)")

        def whole():
            got = [g for g in iter_rec(rec) if g.image]
            return (np.array([g.key for g in got]),
                    np.array([g.label if isinstance(g.label, float) else g.label[0] for g in got]))

        ref, ref_t, ref_b = measure(whole)
        rows = [("whole records (today's reader)", ref, ref_t, ref_b)]
        for method in ("auto", "headers"):
            got, t, b = measure(lambda m=method: rec_labels(rec, method=m))
            rows.append((f"rec_labels {method} ({got.method})", (got.keys, got.labels), t, b))

    print(f"{'labels from':<34} {'bytes read':>14} {'bytes/record':>13} {'time s':>8} "
          f"{'bytes x less':>13} {'x faster':>9}")
    for name, (keys, labels), t, b in rows:
        same = np.array_equal(keys, ref[0]) and np.array_equal(labels, ref[1])
        print(f"{name:<34} {b:>14,} {b / args.records:>13.1f} {t:>8.3f} "
              f"{ref_b / max(b, 1):>13.1f} {ref_t / t:>9.1f}" + ("" if same else "  LABELS DIFFER"))
        if not same:
            raise SystemExit(f"{name}: labels differ from reading whole records")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
