"""1:N search speed and memory against gallery size: mtmim's exact blocked scan
(`mtmim_cli.index.exact`) against a plain numpy matmul + argpartition in the same run, FAISS
(flat, IVF, IVF-PQ, HNSW, SQ8 / fp16 codes), and the machine's memory bandwidth (a numpy copy of the
gallery: the floor for any scan that reads every byte once).

Timing uses synthetic galleries of unit vectors grouped like faces (identities of 5 faces
around a random centre; unstructured vectors would be the worst case for IVF and HNSW).
Recall@1 of each index is measured against the exact scan on those galleries and, with
--real, on real features (a gallery folder from `mtmim enroll`, or an `mtmim embed` file):
each sampled face searched with itself left out (`mtmim_cli.index.ann.recall_at_1`).

--real-probes GALLERY plants that gallery's real faces in a --real-size gallery padded with
synthetic distractors fitted to them (`bench/_real_probes.py` says how) and measures, for
the real faces with a mate, each index's recall@1 against the exact scan and its latency
per probe: real probes and mates among synthetic distractors, not 10^6 real faces.

Printed per size: ms per query for one probe and per probe in batches, queries/s, the
ratios exact / numpy and exact / copy, and per index its build time, search time, recall@1
and bytes per face.

    .venv/bin/python bench/search_speed.py [--sizes 1000,10000,100000,1000000] [--dim 128]
        [--batch 200] [--threads 2] [--scan-only] [--real GALLERY] [--hnsw-up-to 100000] [--out r.json]
        [--real-probes GALLERY --real-size 1000000 --real-kinds ivf,ivfpq,hnsw,hnsw-flat]
        [--pq-m M] [--pq-refine none|sq8|fp16|flat] [--nlist CELLS]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _real_probes  # noqa: E402
from bench._reference import load_avg  # noqa: E402
from mtmim_cli.errors import MtmimError  # noqa: E402
from mtmim_cli.index import ann  # noqa: E402
from mtmim_cli.index.exact import exact_search  # noqa: E402

K = 10


def synthetic(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n unit vectors, 5 a random centre (cosine to it about 0.7), in blocks of 100k rows
    to keep the float64 temporaries small."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        c = rng.standard_normal((m // 5 + 1, d), dtype=np.float32)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        x = np.repeat(c, 5, axis=0)[:m] + rng.standard_normal((m, d), dtype=np.float32) * (1 / np.sqrt(d))
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_reference(g: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """What one writes with numpy: the whole score matrix, argpartition, sort the k."""
    s = q @ g.T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls (one warm-up call first)."""
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def one_and_batch(search, probes: np.ndarray, batch: int, repeats: int) -> tuple[float, float]:
    """(seconds for one probe, seconds per probe in a batch of `batch`)."""
    one = timed(lambda: search(probes[:1]), repeats)
    many = timed(lambda: search(probes[:batch]), max(1, repeats // 3)) / batch
    return one, many


def real_features(path: Path) -> np.ndarray:
    if path.is_dir():
        m = json.loads((path / "manifest.json").read_text())
        return np.load(path / m["files"]["features"]).astype(np.float32)
    import h5py

    with h5py.File(path, "r") as f:
        return f["embeddings"][:].astype(np.float32)


def tuned(kind: str, g: np.ndarray, **params) -> dict:
    t = time.perf_counter()
    index, built = ann.build_index(g, kind, **params)
    return {"index": index, "built": built, "total_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scan-only", action="store_true",
                    help="per size only the copy, numpy and the exact scan (no FAISS index)")
    ap.add_argument("--real", type=Path, default=None, help="gallery folder or embed .h5")
    ap.add_argument("--hnsw-up-to", type=int, default=100_000,
                    help="build HNSW only up to this size (about 9 min at 10^6 on 2 cores)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--real-probes", type=Path, default=None,
                    help="gallery folder whose faces are planted among synthetic distractors")
    ap.add_argument("--real-size", type=int, default=1_000_000)
    ap.add_argument("--real-kinds", default="ivf,ivfpq,hnsw")
    ap.add_argument("--real-max-probes", type=int, default=3000)
    ap.add_argument("--timing-probes", type=int, default=200)
    ap.add_argument("--nlist", type=int, default=None,
                    help="--real-probes: IVF cells (default about 4 sqrt(N))")
    ap.add_argument("--pq-m", type=int, default=None,
                    help="ivfpq: one-byte PQ codes a face (default D/4)")
    ap.add_argument("--pq-refine", default=None,
                    help=f"ivfpq: re-rank on {', '.join(ann.REFINES)} (default: sq8, and in "
                         "--real-probes also none)")
    a = ap.parse_args()
    try:
        pq = ann.check_pq_options("ivfpq", a.pq_m, a.pq_refine, dim=a.dim if a.sizes else None)
    except MtmimError as e:
        ap.error(str(e))
    t_start = time.perf_counter()

    import faiss
    from threadpoolctl import threadpool_limits

    threadpool_limits(a.threads)
    faiss.omp_set_num_threads(a.threads)
    print(f"faiss {faiss.__version__}, numpy {np.__version__}, {a.threads} threads, "
          f"load {load_avg()}, dim {a.dim}, top-{K}")
    report: dict = {"dim": a.dim, "threads": a.threads, "faiss": faiss.__version__,
                    "numpy": np.__version__, "sizes": {}, "real": None}
    for n in (int(x) for x in a.sizes.split(",") if x.strip()):   # "": none
        g = synthetic(n, a.dim)
        probes = synthetic(max(a.batch, 1), a.dim, seed=1)
        dst = np.empty_like(g)
        copy_s = timed(lambda g=g, dst=dst: np.copyto(dst, g), a.repeats)
        dst = None   # the copy's half gigabyte at 10^6, freed before the searches
        np_one, np_many = one_and_batch(lambda q, g=g: numpy_reference(g, q, K), probes,
                                        a.batch, a.repeats)
        ex_one, ex_many = one_and_batch(lambda q, g=g: exact_search(g, q, K), probes, a.batch,
                                        a.repeats)
        # the two must agree (the exact scan is exact)
        assert np.array_equal(exact_search(g, probes[:20], K)[1],
                              numpy_reference(g, probes[:20], K))
        row = {"gallery_mb": g.nbytes / 2**20, "copy_ms": 1e3 * copy_s,
               "copy_gb_s": 2 * g.nbytes / copy_s / 1e9,
               "numpy_one_ms": 1e3 * np_one, "numpy_batch_ms": 1e3 * np_many,
               "exact_one_ms": 1e3 * ex_one, "exact_batch_ms": 1e3 * ex_many,
               "exact_vs_numpy_one": ex_one / np_one, "exact_vs_numpy_batch": ex_many / np_many,
               "exact_vs_copy": ex_one / copy_s, "exact_bytes_per_face": 4 * a.dim,
               "indexes": {}}
        print(f"\n== {n:,} faces ({row['gallery_mb']:.0f} MiB float32); copy {row['copy_ms']:.1f} ms "
              f"({row['copy_gb_s']:.1f} GB/s read+write)")
        print(f"numpy matmul   one {row['numpy_one_ms']:8.2f} ms  batch {row['numpy_batch_ms']:7.3f} ms/probe")
        print(f"exact scan     one {row['exact_one_ms']:8.2f} ms  batch {row['exact_batch_ms']:7.3f} ms/probe"
              f"   exact/numpy {row['exact_vs_numpy_one']:.2f} (one) {row['exact_vs_numpy_batch']:.2f} "
              f"(batch); exact/copy {row['exact_vs_copy']:.2f}; {4 * a.dim} bytes/face")
        if a.scan_only:
            report["sizes"][n] = row
            continue
        sample = ann.recall_sample(n, 500)
        cands: list[tuple[str, object, dict]] = []
        for codec in ("flat", "sq8", "fp16"):
            t = time.perf_counter()
            idx = ann.build_faiss(codec, g)
            cands.append((f"faiss {codec}", idx, {"build_s": time.perf_counter() - t}))
        if n >= 10_000:
            for kind, tag in (("ivfpq", "ivfpq{nlist} M{M}+{refine} nprobe {nprobe}"),
                              ("ivf", "ivf{nlist} nprobe {nprobe}")):
                r = tuned(kind, g, **(pq if kind == "ivfpq" else {}))
                if r["index"] is not None:
                    cands.append((tag.format(**r["built"].params), r["index"],
                                  {"build_s": r["total_s"], "tuned": r["built"].to_dict()}))
                else:
                    print(f"{kind}: FALLBACK to exact: {r['built'].fallback}")
            for codec in ("sq8",):
                t = time.perf_counter()
                idx = ann.build_faiss("ivf", g, codec=codec)
                b = time.perf_counter() - t
                idx.nprobe = r["built"].params.get("nprobe", 64) if r["index"] is not None else 64
                cands.append((f"ivf-{codec} nprobe {idx.nprobe}", idx, {"build_s": b}))
        if 10_000 <= n <= a.hnsw_up_to:
            r = tuned("hnsw", g)
            if r["index"] is not None:
                hp = r["built"].params
                cands.append((f"hnsw{hp['M']} {hp['codes']} efSearch {hp['efSearch']}", r["index"],
                              {"build_s": r["total_s"], "tuned": r["built"].to_dict()}))
            else:
                print(f"hnsw: {r['built'].fallback}")
        for name, idx, info in cands:
            search = lambda q, k=K, idx=idx: ann.faiss_search(idx, q, k)  # noqa: E731
            one, many = one_and_batch(search, probes, a.batch, a.repeats)
            rec = ann.recall_at_1(g, search, sample)
            bpf = ann.index_bytes(idx) / n
            row["indexes"][name] = {**{k: v for k, v in info.items() if k != "tuned"},
                                    "one_ms": 1e3 * one, "batch_ms": 1e3 * many,
                                    "recall_at_1": rec, "bytes_per_face": bpf,
                                    "vs_exact_one": one / ex_one, "tuned": info.get("tuned")}
            print(f"{name:26s} one {1e3 * one:8.3f} ms  batch {1e3 * many:7.3f} ms/probe  "
                  f"({1 / one:9.0f} q/s one)  recall@1 {rec:.4f}  {bpf:6.0f} bytes/face  "
                  f"build {info['build_s']:.1f} s  one/exact {one / ex_one:.3f}")
        report["sizes"][n] = row
        g = cands = None
    if a.real is not None:
        f = real_features(a.real)
        print(f"\n== real features: {a.real} ({len(f):,} x {f.shape[1]})")
        real = {"path": str(a.real), "faces": len(f), "dim": int(f.shape[1]), "indexes": {}}
        for kind in ("ivf", "hnsw"):
            r = tuned(kind, f)
            b = r["built"]
            real["indexes"][kind] = b.to_dict()
            print(f"{kind}: {'kept' if r['index'] is not None else 'refused'} "
                  f"{b.params or ''} recall@1 {b.recall_at_1:.4f} on {b.recall_sample} faces "
                  f"{b.fallback}; tried {[(t['param'], round(t['recall_at_1'], 4)) for t in b.tried]}")
        report["real"] = real
    if a.real_probes is not None:
        kinds = tuple(k for k in a.real_kinds.split(",")
                      if not k.startswith("hnsw") or a.real_size <= a.hnsw_up_to)
        if len(kinds) < len(a.real_kinds.split(",")):
            print(f"(hnsw not built at {a.real_size:,}: above --hnsw-up-to {a.hnsw_up_to:,})")
        report["real_probes"] = _real_probes.run(a.real_probes, a.real_size, kinds=kinds,
                                                 max_probes=a.real_max_probes,
                                                 timing_probes=a.timing_probes,
                                                 pq_m=a.pq_m, pq_refine=a.pq_refine,
                                                 nlist=a.nlist)
    print(f"# {time.perf_counter() - t_start:.0f} s wall, load {load_avg()} at the end")
    if a.out:
        a.out.write_text(json.dumps(report, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
