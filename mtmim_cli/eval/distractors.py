"""FG-NET leave-one-out with distractors (MegaFace challenge 2's cross-age test): every FG-NET
photo ranked against the rest of FG-NET plus N distractor faces (people not in FG-NET), for a
growing, nested series of N.

A probe's CMC rank is 1 + the number of wrong faces scoring above its best correct one (the
rule of `protocols.identification`), and the wrong faces split into the other FG-NET people
(scored exactly, as without distractors) and the distractors. So per N only the count of
the first N distractors above each probe's best correct score is needed, and only up to
`max_rank` of them: the exact scan counts them in one blocked pass over all N at once; an
index (when asked, or under auto for more than AUTO_INDEX_FROM_PROBES probes and
AUTO_EXACT_UP_TO distractors: `distractor_search`) returns each probe's top
`max_rank` distractors of the subset, whose count above the score is exact as long as the
index finds the true top ones (its recall@1 is measured and shown beside the figure). The
faces it returns are scored again by their true cosine: an IVF-PQ index ranks on codes, and
a code's over-estimate must not push a distractor above the correct face.

The subsets are nested and seeded: N distractors are the first N of one permutation (seed),
so a face in the 100 is in the 1000, and rank-1 can only fall as N grows.
"""

from __future__ import annotations

import numpy as np

from mtmim_cli.errors import MtmimError
from mtmim_cli.index.ann import AUTO_EXACT_UP_TO, KINDS, Reranked, build_index, faiss_search

DEFAULT_COUNTS = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
# All probes are known at once, so the exact scan is one batched pass, and an index pays for
# its build only over many probes. Both the build and the pass read every distractor, so the
# break-even is a number of probes, not of distractors: at 10^6 x 256-d on 2 cores the
# batched exact scan costs 15 ms a probe and the HNSW index auto builds 563 s (docs/SCALE.md),
# breaking even at about 37,000 probes; IVF at the recall bar is no faster a probe than the
# scan (23.8 ms at the nprobe build_index keeps).
AUTO_INDEX_FROM_PROBES = 40_000


def parse_counts(text: str | None, available: int) -> list[int]:
    """'10,100,1000' -> the counts up to `available` (always ending with all of them)."""
    if text:
        try:
            counts = sorted({int(x) for x in text.split(",") if x.strip()})
        except ValueError:
            raise MtmimError(f"--distractor-counts {text}: comma-separated integers") from None
        if any(c < 0 for c in counts):
            raise MtmimError(f"--distractor-counts {text}: counts must be >= 0")
        too_many = [c for c in counts if c > available]
        if too_many:
            raise MtmimError(f"--distractor-counts {text}: {too_many[0]} is more than the "
                             f"{available} distractor faces with a face")
    else:
        counts = [c for c in DEFAULT_COUNTS if c < available] + [available]
    return sorted({0, *counts})


def nested_order(n: int, seed: int) -> np.ndarray:
    """The order distractors join in: subset N is the first N of this permutation."""
    return np.random.default_rng(seed).permutation(n)


def best_correct_and_wrong(feats: np.ndarray, ident: np.ndarray, max_rank: int
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out within FG-NET: each probe's best correct score (-inf: no other photo of
    the person) and its `max_rank` best wrong scores (descending)."""
    s = feats @ feats.T
    np.fill_diagonal(s, -np.inf)
    right = ident[:, None] == ident[None, :]
    best = np.where(right, s, -np.inf).max(axis=1)
    wrong = np.where(right, -np.inf, s)
    k = min(max_rank, wrong.shape[1])
    top = -np.sort(-np.partition(wrong, wrong.shape[1] - k, axis=1)[:, -k:], axis=1)
    if k < max_rank:
        top = np.pad(top, ((0, 0), (0, max_rank - k)), constant_values=-np.inf)
    return best, top


def _ranks(best: np.ndarray, wrong_fg: np.ndarray, above_d: np.ndarray) -> np.ndarray:
    """CMC rank (0: no correct face exists) from the FG-NET wrong scores and the count of
    distractors above the best correct score."""
    n_wrong = (wrong_fg > best[:, None]).sum(axis=1) + above_d
    return np.where(np.isfinite(best), 1 + n_wrong, 0)


def exact_counts(probes: np.ndarray, best: np.ndarray, dis: np.ndarray, counts: list[int],
                 block: int = 65_536) -> np.ndarray:
    """(len(counts), Q): distractors among the first N (dis in join order) scoring above
    each probe's best correct score; one matrix product per block of distractors."""
    out = np.zeros((len(counts), len(probes)), np.int64)
    top = max(counts) if counts else 0
    for c0 in range(0, top, block):
        c1 = min(c0 + block, top)
        above = (probes @ np.asarray(dis[c0:c1], np.float32).T) > best[:, None]
        cum = np.cumsum(above, axis=1)
        for j, n in enumerate(counts):
            if n > c0:
                out[j] += cum[:, min(n, c1) - c0 - 1]
    return out


def index_counts(index, probes: np.ndarray, best: np.ndarray, dis: np.ndarray,
                 max_rank: int) -> np.ndarray:
    """Per probe: distractors among the index's top `max_rank` whose true cosine is above
    the probe's best correct score (the index's own score estimate only picks the faces)."""
    # an HNSW index re-scores its own shortlist already; any other is wrapped to do so
    rescored = index if isinstance(index, Reranked) else Reranked(index, dis, k_factor=1)
    true, _ = faiss_search(rescored, probes, max_rank)   # -inf where nothing was found
    return (true > best[:, None]).sum(axis=1)


def distractor_search(index: str, n: int, probes: int) -> str:
    """How N distractors are searched for `probes` probes: `index` as asked, and for auto
    the exact scan unless both the probes and N are past the index's break-even (then HNSW,
    the index `enroll` builds under auto). Fewer than 2 distractors are scanned: no index is
    built or tuned on them."""
    if index not in KINDS:
        raise MtmimError(f"--distractor-index {index}: choose from {', '.join(KINDS)}")
    if index != "auto":
        return index if n >= 2 else "exact"
    return "hnsw" if probes > AUTO_INDEX_FROM_PROBES and n > AUTO_EXACT_UP_TO else "exact"


def score_with_distractors(feats: np.ndarray, ident: np.ndarray, dis: np.ndarray,
                           counts: list[int], *, max_rank: int = 20, index: str = "auto",
                           seed: int = 0) -> list[dict]:
    """Per N: rank-1, the CMC to `max_rank` and each probe's rank, over the probes given
    (FG-NET faces), and how the distractors were searched. `dis` is in join order."""
    feats = np.ascontiguousarray(feats, np.float32)
    best, wrong_fg = best_correct_and_wrong(feats, ident, max_rank)
    kinds = [distractor_search(index, n, len(feats)) for n in counts]
    exact_n = [n for n, k in zip(counts, kinds, strict=True) if k == "exact"]
    exact = dict(zip(exact_n, exact_counts(feats, best, dis, exact_n), strict=True))
    rows = []
    for n, kind in zip(counts, kinds, strict=True):
        search = {"search": "exact"}
        if kind != "exact":
            sub = np.ascontiguousarray(dis[:n], np.float32)
            idx, built = build_index(sub, kind, seed=seed)
            if idx is None:   # the index fell short of the recall bar: exact, said so
                above = exact_counts(feats, best, sub, [n])[0]
                search = {"search": "exact", "fallback": built.fallback}
            else:
                above = index_counts(idx, feats, best, sub, max_rank)
                search = {"search": built.kind, "params": built.params,
                          "recall_at_1": built.recall_at_1}
        else:
            above = exact[n]
        rank = _ranks(best, wrong_fg, above)
        cmc = [float(np.mean((rank >= 1) & (rank <= r))) for r in range(1, max_rank + 1)]
        rows.append({"distractors": int(n), **search, "rank1": cmc[0], "cmc": cmc,
                     "rank": rank})
    return rows


def markdown(models: dict[str, list[dict]], probes: int, total: int, source: str) -> str:
    """The table: a row per N, per model rank-1, rank-5, rank-10 and how it was searched."""
    ranks = [r for r in (1, 5, 10, 20) if r <= len(next(iter(models.values()))[0]["cmc"])]
    head = ["distractors"] + [f"{m} rank-{r}" for m in models for r in ranks] + \
        [f"{m} search" for m in models]
    lines = [f"FG-NET leave-one-out with distractors from `{source}`: each of the {total} "
             f"FG-NET photos ({probes} with a face; those without count as failures) against "
             "the other FG-NET photos plus N distractors (nested, seeded subsets).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j, row in enumerate(next(iter(models.values()))):
        cells = [f"{row['distractors']:,}"]
        for rs in models.values():
            cells += [f"{100 * rs[j]['cmc'][r - 1]:.2f}" for r in ranks]
        for rs in models.values():
            cells.append(_search_text(rs[j]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _search_text(row: dict) -> str:
    if row["search"] == "exact":
        return "exact" + (" (index fell short: exact)" if row.get("fallback") else "")
    params = ", ".join(f"{k} {v}" for k, v in row["params"].items())
    return f"{row['search']} ({params}; recall@1 {row['recall_at_1']:.3f})"


def plot(path, models: dict[str, list[dict]]) -> None:
    """rank-1 against N (log axis; N=0 drawn at the left edge) and each model's CMC at the
    largest N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtmim_cli.atomic import atomic_write

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in models.items():
        n = np.array([max(r["distractors"], 1) for r in rows])
        a.plot(n, [100 * r["rank1"] for r in rows], marker="o", label=label)
        b.plot(range(1, len(rows[-1]["cmc"]) + 1), [100 * c for c in rows[-1]["cmc"]],
               marker=".", label=f"{label} (N={rows[-1]['distractors']:,})")
    a.set_xscale("log")
    a.set_xlabel("distractors N (N=0 drawn at 1)")
    a.set_ylabel("rank-1 (%)")
    a.set_title("FG-NET rank-1 against distractors")
    b.set_xlabel("rank")
    b.set_ylabel("identification rate (%)")
    b.set_title("CMC at the largest N")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
