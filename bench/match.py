"""Rank-1 over a 1,000,000 x 512 synthetic gallery in bounded memory, against a dense reference.

Each measurement runs in a fresh child process so its peak resident memory (ru_maxrss, minus
the child's resident size before the work) belongs to that measurement alone.

1. At a size the dense reference can hold (default 200,000 x 512): the plain reference
   (gallery in memory, the whole query x gallery score matrix, argmax) and the blocked
   matcher (`mtmim_cli.eval.metrics.top1`) on the same data: equal answers, queries/s and
   peak memory of each, as ratios.
2. At 1,000,000 x 512: the blocked matcher over a gallery generated block by block (it is
   never held whole; the dense reference would need the 2 GiB gallery plus a 4 GB score
   matrix for 1,000 queries). Generation time is measured separately and taken out of the
   matching rate; both are printed.

Queries are noisy copies of known gallery rows, so the correct answer is known and rank-1
is printed too.

    .venv/bin/python bench/match.py [--gallery 1000000] [--ref-gallery 100000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

CHUNK = 16_384
DIM = 512


class SynthGallery:
    """Random unit vectors generated per fixed chunk from (seed, chunk), so any row range is
    reproducible without holding the gallery."""

    def __init__(self, n: int, dim: int = DIM, seed: int = 0) -> None:
        self.shape = (n, dim)
        self.seed = seed

    def chunk(self, c: int) -> np.ndarray:
        n, d = self.shape
        rows = min(CHUNK, n - c * CHUNK)
        # Uniform components (4x cheaper to draw than normal ones), centred and normalised.
        x = np.random.default_rng([self.seed, c]).random((rows, d), dtype=np.float32)
        x -= 0.5
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.shape[0])
        c0, c1 = start // CHUNK, (stop - 1) // CHUNK
        parts = [self.chunk(c) for c in range(c0, c1 + 1)]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return block[start - c0 * CHUNK: stop - c0 * CHUNK]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.shape[1]), np.float32)
        for c in np.unique(idx // CHUNK):
            sel = idx // CHUNK == c
            out[sel] = self.chunk(int(c))[idx[sel] - c * CHUNK]
        return out


def make_queries(gallery: SynthGallery, n_q: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.sort(rng.choice(gallery.shape[0], n_q, replace=False))
    q = gallery.rows(truth) + noise * rng.standard_normal((n_q, gallery.shape[1]), dtype=np.float32) / np.sqrt(gallery.shape[1])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32), truth


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, n: int, n_q: int, noise: float) -> dict:
    from mtmim_cli.eval.metrics import top1

    gallery = SynthGallery(n)
    q, truth = make_queries(gallery, n_q, noise, seed=1)
    base = rss_mib()
    t0 = time.perf_counter()
    if mode == "dense":
        g = np.empty((n, DIM), np.float32)     # the whole gallery in memory
        for c in range(0, n, CHUNK):
            g[c:c + CHUNK] = gallery[c:c + CHUNK]
        scores = q @ g.T                       # the whole score matrix
        idx = np.argmax(scores, axis=1)
    elif mode == "blocked":
        idx, _ = top1(q, gallery, block=CHUNK, query_block=1024)
    elif mode == "generate":                   # the cost of producing the synthetic gallery
        for c in range(0, n, CHUNK):
            gallery[c:c + CHUNK]
        idx = truth
    else:
        raise ValueError(mode)
    secs = time.perf_counter() - t0
    return {"mode": mode, "n": n, "queries": n_q, "seconds": secs,
            "peak_extra_mib": peak_mib() - base, "rank1": float(np.mean(idx == truth)),
            "answer_sha": __import__("hashlib").sha1(np.asarray(idx, np.int64).tobytes()).hexdigest()}


def run_child(mode: str, n: int, n_q: int, noise: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--gallery", str(n),
                          "--queries", str(n_q), "--noise", str(noise)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--ref-gallery", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=1.0, help="query noise norm relative to 1")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.gallery, a.queries, a.noise)))
        return

    print(f"gallery {a.ref_gallery:,} x {DIM} (reference size), {a.queries:,} queries")
    dense = run_child("dense", a.ref_gallery, a.queries, a.noise)
    blocked = run_child("blocked", a.ref_gallery, a.queries, a.noise)
    gen_ref = run_child("generate", a.ref_gallery, a.queries, a.noise)
    same = dense["answer_sha"] == blocked["answer_sha"]
    for r in (dense, blocked):
        match_s = r["seconds"] - gen_ref["seconds"]
        r["qps"] = a.queries / match_s
        print(f"  {r['mode']:8s} {r['seconds']:7.2f} s incl. {gen_ref['seconds']:.2f} s generation -> "
              f"{r['qps']:8.1f} queries/s, peak +{r['peak_extra_mib']:8.1f} MiB, rank-1 {r['rank1']:.4f}")
    print(f"  identical answers: {same}; speed blocked/dense = {blocked['qps'] / dense['qps']:.2f}x, "
          f"peak memory blocked/dense = {blocked['peak_extra_mib'] / dense['peak_extra_mib']:.3f}")

    print(f"gallery {a.gallery:,} x {DIM}, {a.queries:,} queries (blocked only)")
    big = run_child("blocked", a.gallery, a.queries, a.noise)
    gen = run_child("generate", a.gallery, a.queries, a.noise)
    match_s = big["seconds"] - gen["seconds"]
    need = (a.gallery * DIM * 4 + a.queries * a.gallery * 4) / 2**20
    print(f"  blocked  {big['seconds']:7.2f} s incl. {gen['seconds']:.2f} s generation -> "
          f"{a.queries / match_s:8.1f} queries/s ({a.queries * a.gallery / match_s / 1e6:,.0f} M "
          f"comparisons/s), peak +{big['peak_extra_mib']:.1f} MiB, rank-1 {big['rank1']:.4f}")
    print(f"  the dense reference would hold {need:,.0f} MiB here (gallery + score matrix); "
          f"blocked peak / that = {big['peak_extra_mib'] / need:.4f}")
    if not same:
        sys.exit("blocked and dense answers differ")


if __name__ == "__main__":
    main()
