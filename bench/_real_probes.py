"""search_speed.py's real-probe mode: real faces and their mates planted in a gallery padded to
N faces with synthetic distractors, each index's recall@1 against the exact scan on the real
probes, and its latency per probe.

The distractors are synthetic, not faces: identity centres drawn from a Gaussian with the real
features' mean and between-identity covariance, 5 faces around each from a Gaussian with
their within-identity covariance, projected onto the unit sphere. So they sit in the same
region of feature space as the real faces (isotropic vectors would be near-orthogonal to
every real face and never compete), but a real 10^6-face gallery may crowd the real faces
differently. The figure is "real probes and mates among synthetic distractors".
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from mtmim_cli.deploy.gallery_store import read_records
from mtmim_cli.index import ann
from mtmim_cli.index.exact import exact_search

K = 10


def load_labelled(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features and an identity number per face of an enrolled gallery (identities are
    named per source: FG-NET's '001' and CelebA's '001' are different people)."""
    m = json.loads((path / "manifest.json").read_text())
    feats = np.load(path / m["files"]["features"]).astype(np.float32)
    rec = read_records(path / m["files"]["records"])
    names = [f"{s}\t{i}" for s, i in zip(rec["source"], rec["identity"], strict=True)]
    _, ids = np.unique(names, return_inverse=True)
    return feats, ids.astype(np.int64)


def _sqrt_cov(x: np.ndarray) -> np.ndarray:
    """A square root of x's covariance (eigenvalues clipped at 0: fewer identities than
    dimensions leave it rank-deficient)."""
    w, v = np.linalg.eigh(np.cov(x, rowvar=False).astype(np.float64))
    return (v * np.sqrt(np.clip(w, 0, None))).T.astype(np.float32)


def distractors(feats: np.ndarray, ids: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n synthetic unit vectors, 5 a centre, from the real features' fitted Gaussians."""
    means = np.stack([feats[ids == i].mean(0) for i in range(ids.max() + 1)])
    between, within = _sqrt_cov(means), _sqrt_cov(feats - means[ids])
    mu = means.mean(0)
    rng = np.random.default_rng(seed)
    d = feats.shape[1]
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):   # float temporaries of 100k rows at a time
        m = min(100_000, n - s)
        c = mu + rng.standard_normal((m // 5 + 1, d), dtype=np.float32) @ between
        x = np.repeat(c, 5, axis=0)[:m] + rng.standard_normal((m, d), dtype=np.float32) @ within
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def per_probe_ms(search, probes: np.ndarray, count: int) -> float:
    """Median ms of one search call per probe, over `count` probes taken one at a time."""
    search(probes[:1])
    out = []
    for p in probes[:count]:
        t = time.perf_counter()
        search(p[None])
        out.append(time.perf_counter() - t)
    return 1e3 * statistics.median(out)


def neighbour_margins(g: np.ndarray, probes: np.ndarray, self_rows: np.ndarray) -> dict:
    """Each probe's nearest other face by the exact scan (itself left out): its row, the
    cosine to it and the margin over the second nearest (how easily an index's shortlist
    swaps them)."""
    s, r = exact_search(g, probes, 3)
    own = r == self_rows[:, None]
    keep = ~own
    s2 = np.stack([row[k][:2] for row, k in zip(s, keep, strict=True)])
    r2 = np.stack([row[k][:2] for row, k in zip(r, keep, strict=True)])
    return {"row": r2[:, 0], "top1": s2[:, 0], "margin": s2[:, 0] - s2[:, 1]}


def _q(x: np.ndarray, qs=(0.1, 0.5, 0.9)) -> str:
    return " / ".join(f"{v:.3f}" for v in np.quantile(x, qs))


def cells_needed(index, g: np.ndarray, probes: np.ndarray, nn_rows: np.ndarray) -> np.ndarray:
    """The nprobe each probe needs for its exact nearest other face to be scanned: 1 + the
    rank of that face's cell among the cells ordered by the probe's similarity."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    _, order = ivf.quantizer.search(np.ascontiguousarray(probes), ivf.nlist)
    _, cell = ivf.quantizer.search(np.ascontiguousarray(g[nn_rows]), 1)
    return 1 + np.argmax(order == cell, axis=1)


def run(path: Path, size: int, *, kinds: tuple[str, ...], max_probes: int, timing_probes: int,
        seed: int = 0, pq_m: int | None = None, pq_refine: str | None = None,
        nlist: int | None = None) -> dict:
    feats, ids = load_labelled(path)
    n_real = len(feats)
    rng = np.random.default_rng(seed)
    gallery = distractors(feats, ids, size - n_real, seed)
    # plant the real faces at random rows (tie order and IVF cells do not favour them)
    rows = np.sort(rng.choice(size, n_real, replace=False))
    g = np.empty((size, feats.shape[1]), np.float32)
    mask = np.zeros(size, bool)
    mask[rows] = True
    g[mask], g[~mask] = feats, gallery
    gallery = None
    counts = np.bincount(ids)
    with_mate = np.flatnonzero(counts[ids] >= 2)
    pick = np.sort(rng.choice(with_mate, min(max_probes, len(with_mate)), replace=False))
    probes, self_rows = feats[pick], rows[pick]
    print(f"\n== real probes among synthetic distractors: {path} ({n_real:,} real faces x "
          f"{feats.shape[1]}, {len(with_mate):,} with a mate) planted in {size:,} faces; "
          f"{size - n_real:,} synthetic distractors (Gaussian fitted to the real features' "
          f"between- and within-identity covariance, 5 a centre, unit length); "
          f"{len(pick):,} real probes, each searched with itself left out")
    t = time.perf_counter()
    near_real = neighbour_margins(g, probes, self_rows)   # the exact nearest other face
    exact = (near_real["top1"], near_real["row"])
    exact_s = time.perf_counter() - t
    real_of = np.full(size, -1, np.int64)
    real_of[rows] = ids
    mate_top = float((real_of[exact[1]] == ids[pick]).mean())
    only_real = ann.nearest_other(lambda p, k: exact_search(feats, p, k), probes, pick)
    mate_real = float((ids[only_real[1]] == ids[pick]).mean())
    ex_ms = per_probe_ms(lambda q: exact_search(g, q, K), probes, min(timing_probes, 30))
    print(f"exact scan: rank-1 (nearest other face is a mate) {mate_real:.4f} among the real "
          f"faces alone, {mate_top:.4f} with the distractors; one probe {ex_ms:.2f} ms, "
          f"{4 * g.shape[1]} bytes/face ({exact_s:.0f} s for the {len(pick):,} probes batched)")
    out = {"path": str(path), "size": size, "real_faces": n_real, "probes": len(pick),
           "rank1_real_only": mate_real, "rank1_with_distractors": mate_top,
           "exact_one_ms": ex_ms, "indexes": {}}
    # build_index's own-face sample (the same seeded rows) against the real probes: what
    # each one's nearest other face looks like under the exact scan
    own = ann.recall_sample(size, ann.RECALL_SAMPLE, seed)
    groups = {"real probes": (probes, self_rows),
              "own-face sample": (g[own], own)}
    near = {"real probes": near_real, "own-face sample": neighbour_margins(g, g[own], own)}
    print(f"own-face sample: {len(own):,} rows, {int(mask[own].sum())} of them real faces; "
          "exact nearest other face, quantiles 0.1 / 0.5 / 0.9:")
    for k, v in near.items():
        print(f"  {k:16s} cosine {_q(v['top1'])}   margin over the 2nd {_q(v['margin'])}")
    out["nearest"] = {k: {"top1_q": np.quantile(v["top1"], [.1, .5, .9]).tolist(),
                          "margin_q": np.quantile(v["margin"], [.1, .5, .9]).tolist()}
                      for k, v in near.items()}
    for kind, params in kinds_params(kinds, pq_m, pq_refine, nlist):
        out["indexes"][label(kind, params)] = one_index(g, kind, params, probes, self_rows,
                                                        exact, timing_probes, seed,
                                                        groups=groups, near=near)
    return out


def kinds_params(kinds: tuple[str, ...], pq_m: int | None = None,
                 pq_refine: str | None = None, nlist: int | None = None
                 ) -> list[tuple[str, dict]]:
    """ivfpq twice, re-ranked on SQ8 codes (the default) and on its PQ codes alone, unless
    `pq_refine` names one; hnsw-flat: HNSW32 on float32 (efConstruction 80), the index
    before the SQ8 graph; `pq_m` codes a face (default D/4); `nlist` cells for ivf and
    ivfpq (default ann.ivf_nlist)."""
    out = []
    cells = {"nlist": nlist} if nlist else {}
    m = {"pq_m": pq_m, **cells} if pq_m else dict(cells)
    for kind in kinds:
        if kind == "ivf":
            out.append((kind, dict(cells)))
        elif kind == "hnsw-flat":   # HNSW as before the SQ8 graph: 32 links, float32 itself
            out.append(("hnsw", {"codes": "flat", "m": 32, "ef_construction": 80}))
        elif kind != "ivfpq":
            out.append((kind, {}))
        elif pq_refine:
            out.append((kind, {**m, "refine": pq_refine}))
        else:
            out += [(kind, dict(m)), (kind, {**m, "refine": "none"})]
    return out


def label(kind: str, params: dict) -> str:
    return kind + (f"{params['nlist']}" if "nlist" in params else "") + (f" M{params['pq_m']}" if "pq_m" in params else "") + (
        f" refine {params['refine']}" if "refine" in params else "") + (
        f"{params['m']} {params['codes']}" if "codes" in params else "")


def one_index(g: np.ndarray, kind: str, params: dict, probes: np.ndarray,
              self_rows: np.ndarray, exact, timing_probes: int, seed: int,
              groups: dict | None = None, near: dict | None = None) -> dict:
    """build_index's verdict (`ann.tune_index` on a sample of the gallery's own faces, mostly
    distractors), then on the real probes (also for a refused index): recall@1 at each search setting, and latency at
    the kept one and at the smallest one reaching MIN_RECALL on them."""
    name = label(kind, params)
    t = time.perf_counter()
    index = ann.build_faiss(kind, g, seed=seed, **params)
    build_s = time.perf_counter() - t
    # build_index's tuning and verdict, on this index (a refused one is kept for the sweep)
    kept_index, built = ann.tune_index(index, g, kind, seed=seed, build_s=build_s, **params)
    total_s = time.perf_counter() - t
    verdict = (f"kept {built.params}" if kept_index is not None else f"FALLBACK: {built.fallback}")
    print(f"{name:18s} build {build_s:.0f} s, +tune {total_s - build_s:.0f} s; "
          f"own-face sample ({built.recall_sample}): "
          f"recall@1 {built.recall_at_1:.4f}, tried "
          f"{[(x['param'], round(x['recall_at_1'], 4)) for x in built.tried]}; {verdict}")
    rec = {"built": built.to_dict(), "build_s": build_s, "build_tune_s": total_s, "sweep": []}
    bpf = ann.index_bytes(index) / len(g)
    key = ann.SEARCH_KEY[kind]
    kept = built.params.get(key)
    import faiss

    nlist = faiss.extract_index_ivf(index).nlist if kind != "hnsw" else 0
    if nlist and groups:
        rec["cells_needed"] = {}
        for k, (p, _) in groups.items():
            need = cells_needed(index, g, p, near[k]["row"])
            qs = np.quantile(need, [0.5, 0.9, 0.95, 0.99]).tolist()
            rec["cells_needed"][k] = qs
            print(f"  {k:16s} nprobe needed for the exact nearest other face's cell: median "
                  f"{qs[0]:.0f}, 0.9 {qs[1]:.0f}, 0.95 {qs[2]:.0f}, 0.99 {qs[3]:.0f} of {nlist}; "
                  f"within 256: {float((need <= 256).mean()):.4f}")
    ladder = ann.search_ladder(kind, nlist)
    first_ok = None
    for value in ladder:
        ann.set_search_param(index, kind, value)
        r = ann.recall_at_1(g, lambda q, k: ann.faiss_search(index, q, k), self_rows, exact)
        ms = per_probe_ms(lambda q: ann.faiss_search(index, q, K), probes, timing_probes)
        rec["sweep"].append({key: value, "recall_at_1_real": r, "one_ms": ms})
        mark = " <- kept by build_index" if value == kept else ""
        if first_ok is None and r >= ann.MIN_RECALL:
            first_ok = value
            mark += " <- smallest reaching 0.99 on the real probes"
        print(f"  {key} {value:5d}: real-probe recall@1 {r:.4f}  one probe {ms:7.3f} ms  "
              f"{bpf:6.0f} bytes/face{mark}", flush=True)
        if first_ok is not None and (kept is None or value >= kept):
            break   # higher settings only cost time
    rec.update(bytes_per_face=bpf, smallest_ok=first_ok)
    return rec

