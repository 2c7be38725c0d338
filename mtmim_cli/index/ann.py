"""FAISS indexes over L2-normalised features, their recall against the exact scan, and the
choice by gallery size.

recall@1 is measured on a seeded sample of the gallery's own faces, each searched with itself
left out (it would always find itself): the share whose nearest other face under the index is
the exact scan's nearest other face (one with an equal true cosine counts, duplicates being
interchangeable; the index's own score estimate is not trusted for that).
An index is tuned upward (IVF, IVF-PQ: nprobe, HNSW: efSearch) along `search_ladder` (steps
of x1.33-x1.5, up to every cell for IVF) until recall@1 reaches `MIN_RECALL`; one that cannot
is refused and the exact scan used instead, said so in `Built`.

IVF-PQ keeps M one-byte codes a face (product quantisation, 256 centroids per sub-vector).
Those codes alone rank a face's nearest other face wrongly too often for 0.99 (0.85 on the
7,284 real 256-d features at M 64), so by default the PQ shortlist (k x PQ_K_FACTOR) is
re-ranked on a second copy of each face as SQ8 codes (`refine`: none, sq8, fp16, flat); the
index's bytes per face count both. Even so, at 10^6 faces (real probes among synthetic
distractors, docs/SCALE.md) it tops out at recall@1 0.986 probing every cell and is refused:
it is a memory figure (332 bytes a face at 256-d), not an index for the 0.99 bar.

HNSW links each face to M=48 others (efConstruction 120) and walks the graph on SQ8 codes (a
byte a dimension: a quarter of float32's bytes read per step, so about twice the steps per
millisecond); the k x HNSW_K_FACTOR faces it finds are scored again by their true cosine on
the float32 features, which a gallery keeps anyway (`Reranked`). So its scores are exact
and the codes only choose the faces. Measured at 10^6 faces, real probes among synthetic
distractors (docs/SCALE.md): recall@1 0.991 at 0.85 ms a probe (efSearch 128), where HNSW32
on float32 needed 3.4 ms for 0.9925.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from mtmim_cli.errors import MtmimError
from mtmim_cli.index.exact import exact_search

KINDS = ("auto", "exact", "ivf", "hnsw", "ivfpq")
REFINES = ("none", "sq8", "fp16", "flat")
PQ_OPTIONS = ("pq_m", "refine")   # the ivfpq build options a caller may set (--pq-m, --pq-refine)
PQ_K_FACTOR = 8              # PQ candidates re-ranked per neighbour asked for
PQ_MIN_FACES = 256           # k-means of a codebook needs a point per centroid (2^8)
HNSW_M = 48                  # links a node
HNSW_EF_CONSTRUCTION = 120
HNSW_K_FACTOR = 4            # graph candidates re-scored on float32 per neighbour asked for
HNSW_CODES = ("sq8", "flat")
# what each kind tunes at search time
SEARCH_KEY = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}
MIN_RECALL = 0.99
# faces; above this `auto` builds HNSW (the exact scan: ~30 ms a probe at 10^5 here; HNSW
# reaches recall@1 0.99 in about 1 ms at 10^6 where IVF needs nprobe 768, 12 ms)
AUTO_EXACT_UP_TO = 100_000
RECALL_SAMPLE = 1000
SCORE_TIE = 1e-6             # an index's neighbour this close to the exact one's score is a hit


def _faiss():
    try:
        import faiss
    except ImportError:   # declared in pyproject; a broken install says what is missing
        raise MtmimError("faiss: not installed (pip install faiss-cpu)") from None
    return faiss


@dataclass
class Built:
    """What was built: the kind in use, its parameters, the measured recall, and why exact
    was used instead when the requested index fell short."""
    kind: str
    requested: str
    params: dict = field(default_factory=dict)
    recall_at_1: float | None = None
    recall_sample: int = 0
    build_seconds: float = 0.0
    bytes_per_face: float = 0.0
    fallback: str = ""
    tried: list = field(default_factory=list)
    options: dict = field(default_factory=dict)   # build options asked for (pq_m, refine)

    def to_dict(self) -> dict:
        return asdict(self)


def choose_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise MtmimError(f"--index {kind}: choose from {', '.join(KINDS)}")
    if kind == "auto":
        return "exact" if n <= AUTO_EXACT_UP_TO else "hnsw"
    return kind


def check_pq_options(kind: str, pq_m: int | None = None, refine: str | None = None,
                     dim: int | None = None) -> dict:
    """--pq-m / --pq-refine checked before any work: only with --index ivfpq, M a positive
    divisor of the feature dimension (when known), refine one of REFINES. The options given,
    as build_index's keywords."""
    given = {k: v for k, v in (("pq_m", pq_m), ("refine", refine)) if v is not None}
    if given and kind != "ivfpq":
        names = " and ".join({"pq_m": "--pq-m", "refine": "--pq-refine"}[k] for k in given)
        raise MtmimError(f"{names}: only with --index ivfpq (not --index {kind})")
    if pq_m is not None and (isinstance(pq_m, bool) or not isinstance(pq_m, int) or pq_m < 1):
        raise MtmimError(f"--pq-m {pq_m}: a positive number of one-byte codes a face")
    if pq_m is not None and dim is not None and dim % pq_m:
        raise MtmimError(f"--pq-m {pq_m}: must divide the feature dimension {dim}")
    if refine is not None and refine not in REFINES:
        raise MtmimError(f"--pq-refine {refine}: choose from {', '.join(REFINES)}")
    return given


def default_pq_m(d: int) -> int:
    """PQ sub-quantizers: one byte per 4 dimensions (codes 16x smaller than float32), the
    largest such count dividing d (faiss needs whole sub-vectors)."""
    m = max(1, d // 4)
    while d % m:
        m -= 1
    return m


def _train_rows(feats: np.ndarray, want: int, seed: int) -> np.ndarray:
    # k-means on a seeded sample: faiss's own advice, and minutes saved at 10^6
    if len(feats) <= want:
        return feats
    return feats[np.random.default_rng(seed).choice(len(feats), want, replace=False)]


def _sq_type(name: str):
    """faiss's scalar-quantizer type for a code name: sq8 (a byte a dimension) or fp16."""
    sq = _faiss().ScalarQuantizer
    return {"sq8": sq.QT_8bit, "fp16": sq.QT_fp16}[name]


def _build_ivfpq(feats: np.ndarray, nlist: int | None, pq_m: int | None, refine: str,
                 seed: int):
    faiss = _faiss()
    n, d = feats.shape
    ip = faiss.METRIC_INNER_PRODUCT
    pq_m = pq_m or default_pq_m(d)
    refine = refine or "sq8"
    if d % pq_m:
        raise MtmimError(f"ivfpq M {pq_m}: must divide the feature dimension {d}")
    if refine not in REFINES:
        raise MtmimError(f"ivfpq refine {refine}: choose from {', '.join(REFINES)}")
    base = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist or ivf_nlist(n), pq_m, 8, ip)
    base.cp.seed = seed
    base.pq.cp.seed = seed
    if refine == "none":
        index = base
    elif refine == "flat":
        index = faiss.IndexRefineFlat(base)
    else:
        index = faiss.IndexRefine(base, faiss.IndexScalarQuantizer(d, _sq_type(refine), ip))
    if refine != "none":
        index.k_factor = PQ_K_FACTOR
    # the PQ codebooks want 39 points per centroid (256 of them), the cells 64 each
    index.train(_train_rows(feats, max(64 * base.nlist, 39 * 256), seed))
    index.add(feats)
    return index


class Reranked:
    """A FAISS index that ranks on codes, its shortlist (k x k_factor faces) scored again by
    the true cosine on `feats`, the float32 features of the same rows (in memory or a
    gallery's memory-mapped file): scores are exact, ties ordered by row as in the exact
    scan. Searched like a FAISS index (`search`, `ntotal`, and `hnsw` for efSearch); `index`
    is the FAISS index to write."""

    def __init__(self, index, feats: np.ndarray, k_factor: int = HNSW_K_FACTOR) -> None:
        if index.ntotal != len(feats):
            raise MtmimError(f"index of {index.ntotal} faces over {len(feats)} features")
        self.index, self.feats, self.k_factor = index, feats, int(k_factor)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def hnsw(self):
        return self.index.hnsw

    def search(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, rows = self.index.search(probes, min(k * self.k_factor, self.ntotal))
        rows = rows.astype(np.int64)
        # rows read in increasing order: a memory-mapped file is paged in front to back
        flat = np.maximum(rows, 0).ravel()
        uniq, inv = np.unique(flat, return_inverse=True)
        vecs = np.asarray(self.feats[uniq], np.float32)[inv].reshape(*rows.shape, -1)
        true = np.einsum("qd,qkd->qk", probes, vecs)
        true[rows < 0] = -np.inf
        # best first; equal scores by row (np.lexsort's last key is the primary one)
        order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -true), axis=1)
        order = order[:, :k]
        return (np.take_along_axis(true, order, 1).astype(np.float32),
                np.take_along_axis(rows, order, 1))


def faiss_of(index):
    """The FAISS index to write or measure (a `Reranked` one's inner index)."""
    return index.index if isinstance(index, Reranked) else index


def build_faiss(kind: str, feats: np.ndarray, *, nlist: int | None = None, m: int = HNSW_M,
                ef_construction: int = HNSW_EF_CONSTRUCTION, seed: int = 0, codec: str = "flat",
                pq_m: int | None = None, refine: str | None = "sq8", codes: str = "sq8"):
    """An IVF (inverted lists over k-means cells, flat or SQ8/fp16 codes), IVF-PQ (cells of
    `pq_m`-byte PQ codes, re-ranked on `refine` codes) or HNSW (graph, M links per node, on
    SQ8 `codes` re-scored on float32 (`Reranked`), or on float32 itself) inner-product index
    holding `feats` (float32, normalised)."""
    faiss = _faiss()
    n, d = feats.shape
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "ivfpq":
        return _build_ivfpq(feats, nlist, pq_m, refine, seed)
    if kind == "ivf":
        nlist = nlist or ivf_nlist(n)
        quantizer = faiss.IndexFlatIP(d)
        if codec == "flat":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, _sq_type(codec), ip)
        index.cp.seed = seed
        index.train(_train_rows(feats, 64 * nlist, seed))
        index.add(feats)
        return index
    if kind == "hnsw":
        if codes not in HNSW_CODES:
            raise MtmimError(f"hnsw codes {codes}: choose from {', '.join(HNSW_CODES)}")
        if codes == "flat":
            index = faiss.IndexHNSWFlat(d, m, ip)
        else:
            index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, m, ip)
            index.train(feats)   # per-dimension ranges: one pass, no sampling needed
        index.hnsw.efConstruction = ef_construction
        index.add(feats)
        return index if codes == "flat" else Reranked(index, feats)
    if kind in ("flat", "sq8", "fp16"):
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            index = faiss.IndexScalarQuantizer(d, _sq_type(kind), ip)
            index.train(feats)
        index.add(feats)
        return index
    raise MtmimError(f"--index {kind}: not a FAISS index kind here")


def ivf_nlist(n: int) -> int:
    """Cells of an IVF index: about 4 sqrt(N) (faiss's guideline), at least 1, at most N/39
    so that k-means has 39 points a cell (faiss warns below that)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def set_search_param(index, kind: str, value: int) -> None:
    if kind in ("ivf", "ivfpq"):
        _faiss().extract_index_ivf(index).nprobe = int(value)   # under a refine wrapper too
    elif kind == "hnsw":
        index.hnsw.efSearch = int(value)


def faiss_search(index, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    probes = np.ascontiguousarray(np.atleast_2d(probes), dtype=np.float32)
    k = min(int(k), index.ntotal)
    scores, rows = index.search(probes, k)   # a Reranked index's search: true cosines
    return scores.astype(np.float32), rows.astype(np.int64)


def nearest_other(search, probes: np.ndarray, self_rows: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each probe's best gallery row other than itself (its own row `self_rows`): (score,
    row), row -1 when the search returned nothing else."""
    scores, rows = search(probes, 2)
    own = rows == self_rows[:, None]
    pick = np.where(own[:, 0], 1, 0)
    r = rows[np.arange(len(rows)), pick] if rows.shape[1] > 1 else np.full(len(rows), -1)
    s = scores[np.arange(len(rows)), pick] if rows.shape[1] > 1 else np.full(len(rows), -np.inf)
    r = np.where(r == self_rows, -1, r)
    return s, r


def recall_at_1(feats: np.ndarray, search, sample: np.ndarray,
                exact: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Share of the sampled gallery faces whose nearest other face under `search` is the exact
    scan's (equal score within SCORE_TIE counts); `exact`: that answer computed already
    (`nearest_other` of the exact scan), reused while an index is tuned."""
    probes = feats[sample]
    es, er = exact if exact is not None else nearest_other(
        lambda p, k: exact_search(feats, p, k), probes, sample)
    _, r = nearest_other(search, probes, sample)
    # the returned face's true cosine, not the index's estimate: PQ / SQ codes over-estimate
    # some, and a wrong face scored above the right one must not count as a tie
    s = np.where(r >= 0, np.einsum("ij,ij->i", probes, feats[np.maximum(r, 0)]), -np.inf)
    hit = (r == er) | ((r >= 0) & (s >= es - SCORE_TIE))
    return float(hit.mean())


def recall_sample(n: int, size: int = RECALL_SAMPLE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(n, size), replace=False))


LADDER_START = {"ivf": 8, "ivfpq": 8, "hnsw": 32}
HNSW_EF_MAX = 2048


def search_ladder(kind: str, nlist: int = 0) -> list[int]:
    """The search settings build_index tries, smallest first: 2^k and 3 x 2^(k-1) from
    LADDER_START (8, 12, 16, 24, 32, 48, ...: each step x1.33 or x1.5), for IVF up to and
    ending at nlist (every cell), for HNSW up to HNSW_EF_MAX."""
    top = nlist if kind in ("ivf", "ivfpq") else HNSW_EF_MAX
    out, v = [], LADDER_START[kind]
    while v < top:
        out.append(v)
        v = v * 3 // 2 if v & (v - 1) == 0 else v * 4 // 3   # 2^k -> 3*2^(k-1) -> 2^(k+1)
    return out + [top]


def build_index(feats: np.ndarray, kind: str = "auto", *, seed: int = 0,
                sample_size: int = RECALL_SAMPLE, min_recall: float = MIN_RECALL,
                **params) -> tuple[object | None, Built]:
    """The index `kind` asks for (auto: exact up to AUTO_EXACT_UP_TO faces, HNSW above),
    tuned to `min_recall`; (None, Built(kind="exact", ...)) for the exact scan, also when
    the index fell short (Built.fallback says why)."""
    n = len(feats)
    chosen = choose_kind(kind, n)
    exact_bytes = float(feats.shape[1] * 4) if n else 0.0
    options = {k: params[k] for k in PQ_OPTIONS if params.get(k) is not None}
    if chosen == "exact" or n < 2:
        return None, Built("exact", kind, bytes_per_face=exact_bytes, options=options,
                           fallback="" if chosen == "exact" else "fewer than 2 faces")
    if chosen == "ivfpq" and n < PQ_MIN_FACES:
        return None, Built("exact", kind, bytes_per_face=exact_bytes, options=options,
                           fallback=(f"ivfpq needs at least {PQ_MIN_FACES} faces to train its "
                                     f"8-bit codebooks ({n} here); using the exact scan"))
    t0 = time.perf_counter()
    index = build_faiss(chosen, feats, seed=seed, **params)
    return tune_index(index, feats, chosen, requested=kind, seed=seed, sample_size=sample_size,
                      min_recall=min_recall, build_s=time.perf_counter() - t0, **params)


def tune_index(index, feats: np.ndarray, chosen: str, *, requested: str | None = None,
               seed: int = 0, sample_size: int = RECALL_SAMPLE, min_recall: float = MIN_RECALL,
               build_s: float = 0.0, **params) -> tuple[object | None, Built]:
    """build_index's second half: an index of kind `chosen` built from `feats` (with
    `params`) tuned along `search_ladder` on the seeded own-face sample; (index, Built), or
    (None, Built) with the fallback when it falls short. The bench calls it to keep a
    refused index for its own sweep without building it twice."""
    n = len(feats)
    kind = requested or chosen
    exact_bytes = float(feats.shape[1] * 4)
    options = {k: params[k] for k in PQ_OPTIONS if params.get(k) is not None}
    sample = recall_sample(n, sample_size, seed)
    tried = []
    nlist = _faiss().extract_index_ivf(index).nlist if chosen != "hnsw" else 0
    ladder = search_ladder(chosen, nlist)
    exact = nearest_other(lambda p, k: exact_search(feats, p, k), feats[sample], sample)
    for value in ladder:
        set_search_param(index, chosen, value)
        rec = recall_at_1(feats, lambda p, k: faiss_search(index, p, k), sample, exact)
        tried.append({"param": value, "recall_at_1": rec})
        # IVF-flat probing every cell is an exhaustive scan with extra steps, no faster than
        # exact and no smaller; IVF-PQ there still holds a fraction of the bytes, so it stays
        if rec >= min_recall and chosen == "ivf" and value >= nlist:
            return None, Built("exact", kind, {}, rec, len(sample), build_s, exact_bytes,
                               fallback=(f"ivf reached recall@1 {min_recall} only probing all "
                                         f"{nlist} cells; using the exact scan"),
                               tried=tried, options=options)
        if rec >= min_recall:
            return index, Built(chosen, kind, {**_recorded(chosen, params, index, nlist),
                                               SEARCH_KEY[chosen]: value},
                                rec, len(sample), build_s, index_bytes(index) / n, tried=tried,
                                options=options)
    return None, Built("exact", kind, {}, tried[-1]["recall_at_1"], len(sample), build_s,
                       exact_bytes, fallback=(f"{chosen} reached recall@1 "
                                              f"{tried[-1]['recall_at_1']:.4f} < {min_recall} "
                                              "of the exact scan; using the exact scan"),
                       tried=tried, options=options)


def _recorded(kind: str, params: dict, index, nlist: int) -> dict:
    """The build parameters a gallery's manifest records (what rebuilding it needs)."""
    if kind == "hnsw":
        out = {"M": params.get("m", HNSW_M),
               "efConstruction": params.get("ef_construction", HNSW_EF_CONSTRUCTION),
               "codes": params.get("codes", "sq8")}
        if isinstance(index, Reranked):
            out["k_factor"] = index.k_factor
        return out
    if kind == "ivf":
        return {"nlist": int(nlist)}
    base = _faiss().downcast_index(getattr(index, "base_index", index))
    refine = params.get("refine") or "sq8"
    out = {"nlist": int(nlist), "M": int(base.pq.M), "nbits": int(base.pq.nbits),
           "refine": refine}
    if refine != "none":
        out["k_factor"] = PQ_K_FACTOR
    return out


def index_bytes(index) -> int:
    """Bytes the index serialises to (what it holds in memory, within its small headers)."""
    return int(len(_faiss().serialize_index(faiss_of(index))))
