"""`--recipe auto`: a fine-tuning recipe chosen on the run's own training identities.

What the team did by hand for SFace (`small-sface`, the comment above RECIPES in
train/finetune_options.py) as one command, for any encoder with named stages:

1. Validation people come from the training identities only: the identities the run would
   train on (its cache's usable records, less `exclude` and outside `train_identities`) are
   dealt into FOLDS seeded, identity-grouped folds. Fold f's candidate trains on the other
   folds and is scored on fold f's people. Nothing of the test side is read.
2. A small declared GRID over `small`'s bundle: trainable depth (the encoder's last K
   stages, `freeze_through last:K`), lr, the MI weight (mode mtmim only) and WiSE alpha.
   An option the user gives fixes its axis. Candidates that differ only in alpha share one
   training (WiSE is an interpolation of the same trained weights), and candidates of one
   depth share the frozen trunk's activations (one trunk pass per depth, in the run's
   activation cache and in eval's trunk memo), so the search costs about
   folds x depths x lrs x lambdas fine-tunes of the tail.
3. The criterion: cross-age verification on the validation people, the ROC AUC of every
   young (age <= YOUNG_MAX) x adult (>= ADULT_MIN) photo pair, where every fold has such
   genuine pairs; leave-one-out rank-1 among the validation photos otherwise. Each candidate
   against the init, paired (the same photos, the same identity draws), averaged over folds,
   with a percentile interval from an identity-resampled bootstrap. With a general-face
   cache (`auto_guard`: people neither trained nor tested on), the all-pairs verification
   AUC on its people may fall by at most GUARD_TOLERANCE (point estimate, mean over folds).
4. Safe by construction: a candidate may be chosen only if its interval's lower bound is
   above zero and it passes the guard; among those, the highest criterion. When none
   qualifies the run says so in one line and writes a model equal to the init (the init's
   encoder, a factorization unit that passes x through: x_id = x), exit 0.
5. The chosen setting is retrained on all training identities into --out; the grid, every
   candidate's validation scores and the choice go into config.json (extra.auto) and
   model.pt's meta (auto).

A killed search resumes: each (fold, training setting) result is stored atomically in
OUT/auto/candidates/, keyed (like orchestration.refit's RoundStore) by everything that
changes it: the resolved settings, the fold's identities, the data's and init's digests,
the criterion and the package source digest; a result under another key is never reused.
Candidate fine-tunes run with resume, so one killed mid-training continues.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.errors import MtmimError
from mtmim_cli.progress import make_progress
from mtmim_cli.source import source_digest

# The declared search. Depth is the number of the encoder's last stages that train; a depth
# the encoder cannot take (K >= its number of stages) is dropped.
GRID: dict[str, tuple] = {"depth": (1, 2), "lr": (3e-4, 1e-3), "lambda_mim": (0.1, 1.0),
                          "wise": (0.5, 1.0)}
BASE_RECIPE = "small"       # every other setting: the small-set bundle
FOLDS = 2
YOUNG_MAX, ADULT_MIN = 10.0, 18.0
RESAMPLES = 500             # identity bootstrap replicates per fold
LEVEL = 0.95
GUARD_TOLERANCE = 0.002     # all-pairs AUC on the guard's people, init minus candidate
GUARD_MAX_IMAGES = 3000     # a larger guard cache is scored on a seeded subset of its photos
FORMAT = 1                  # bump when a stored candidate's meaning changes
# The options the search owns or adds; the rest pass to every fine-tune unchanged.
_SEARCH_KEYS = ("freeze_through", "lr", "lambda_mim", "wise")
_FORWARDED_AWAY = ("auto_guard", "recipe", "out", "progress", "resume", "val_identities")


@dataclass(frozen=True)
class Setting:
    """One candidate: a trained setting (depth, lr, lambda) and a WiSE alpha."""

    depth: str               # freeze_through: "last:K" or a stage the user named
    lr: float
    lambda_mim: float | None  # None: the mode has no MI penalty
    wise: float

    @property
    def train_key(self) -> tuple:
        return (self.depth, self.lr, self.lambda_mim)

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"freeze_through": self.depth, "lr": self.lr, "wise": self.wise}
        if self.lambda_mim is not None:
            out["lambda_mim"] = self.lambda_mim
        return out

    def label(self) -> str:
        lam = "" if self.lambda_mim is None else f", lambda {self.lambda_mim:g}"
        return f"{self.depth}, lr {self.lr:g}{lam}, wise {self.wise:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"freeze_through": self.depth, "lr": self.lr, "lambda_mim": self.lambda_mim,
                "wise": self.wise}


def declared_grid(mode: str, given: dict[str, Any], n_stages: int) -> dict[str, tuple]:
    """GRID for this run: an axis the user set is that one value; lambda only in mode mtmim;
    depths the encoder cannot take are dropped."""
    depths = ((str(given["freeze_through"]),) if given.get("freeze_through")
              else tuple(f"last:{k}" for k in GRID["depth"] if 1 <= k < n_stages))
    if not depths:
        raise MtmimError(f"--recipe auto: the encoder has {n_stages} stage(s); it needs at "
                         "least 2 to train its last one on a frozen trunk")
    lams: tuple = (None,)
    if mode == "mtmim":
        lams = (float(given["lambda_mim"]),) if "lambda_mim" in given else GRID["lambda_mim"]
    return {"depth": depths,
            "lr": (float(given["lr"]),) if "lr" in given else GRID["lr"],
            "lambda_mim": lams,
            "wise": (float(given["wise"]),) if "wise" in given else GRID["wise"]}


def candidates(grid: dict[str, tuple]) -> list[Setting]:
    """Every combination, in grid order (the tie-break: the first listed wins)."""
    return [Setting(d, float(lr), None if lam is None else float(lam), float(w))
            for d in grid["depth"] for lr in grid["lr"] for lam in grid["lambda_mim"]
            for w in grid["wise"]]


def declaration(mode: str = "mtmim") -> dict[str, Any]:
    """What auto searches and how it chooses, as stored keys and records hold it."""
    return {"format": FORMAT, "grid": {k: list(v) for k, v in GRID.items()},
            "lambda_searched": mode == "mtmim", "base_recipe": BASE_RECIPE, "folds": FOLDS,
            "young_max": YOUNG_MAX, "adult_min": ADULT_MIN, "resamples": RESAMPLES,
            "level": LEVEL, "guard_tolerance": GUARD_TOLERANCE,
            "guard_max_images": GUARD_MAX_IMAGES}


# ---------------------------------------------------------------------------------------
@dataclass
class Folds:
    """The training side and its validation folds, as cache records and identity names."""

    records: np.ndarray              # usable, not excluded, listed training records
    names: np.ndarray                # identity name per record
    folds: list[list[str]]           # identity names per fold

    def validation(self, f: int) -> np.ndarray:
        return self.records[np.isin(self.names, self.folds[f])]

    def training_names(self, f: int) -> list[str]:
        held = set(self.folds[f])
        return sorted({str(n) for n in self.names} - held)


def validation_folds(cache_path: str | os.PathLike, train_identities: str | None,
                     exclude: Sequence[int] | None, folds: int, seed: int) -> Folds:
    """Identity-grouped validation folds over the identities the fine-tune trains on (never
    the excluded records: a leave-out round's test photos), dealt by a seeded permutation."""
    from mtmim_cli.data.dataset import CacheDataset
    from mtmim_cli.data.identity_lists import read_identity_list
    from mtmim_cli.train.transfer import identity_mask

    if folds < 2:
        raise MtmimError(f"--recipe auto: {folds} validation fold(s); need at least 2")
    base = CacheDataset([cache_path], train=False)
    keep = np.ones(len(base), bool)
    if exclude is not None and len(exclude):
        keep &= ~np.isin(base.record, np.asarray(exclude, np.int64))
    if train_identities:
        keep &= identity_mask(base, range(1), read_identity_list(train_identities),
                              "--train-identities")
    cache = base.caches[0]
    records = base.record[keep]
    names = np.asarray(cache.identity_names, dtype=object)[cache.identity[records]].astype(str)
    ids = np.unique(names)
    if len(ids) < 2 * folds:
        raise MtmimError(f"{cache_path}: {len(ids)} training identities; --recipe auto needs at "
                         f"least {2 * folds} for {folds} validation folds")
    perm = np.random.default_rng([seed, 0xA070]).permutation(ids)
    return Folds(records, names, [sorted(str(n) for n in p) for p in np.array_split(perm, folds)])


# ---------------------------------------------------------------------------------------
class CandidateStore:
    """One JSON file per finished (fold, training setting), named by its key's digest and
    holding the key, written atomically: a killed search keeps every finished candidate,
    and a file under another key (other data, settings or code) is never read as this one."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, key: dict) -> Path:
        text = json.dumps(key, sort_keys=True, default=str)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"

    def get(self, key: dict) -> dict | None:
        path = self._path(key)
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        same = json.loads(json.dumps(key, sort_keys=True, default=str))
        return stored.get("result") if stored.get("key") == same else None

    def put(self, key: dict, result: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(key), json.dumps(
            {"key": json.loads(json.dumps(key, sort_keys=True, default=str)), "result": result}))


# ---------------------------------------------------------------------------------------
def _scores(features: np.ndarray, ident: np.ndarray, age: np.ndarray, criterion: str,
            seed: int) -> dict[str, Any]:
    """A model's criterion on one fold's validation photos: the AUC and its bootstrap
    replicates (identity draws fixed by `seed`, so every model of the fold is paired), or
    the rank-1 hit of each probe that has a mate."""
    from mtmim_cli.eval.cross_age import bootstrap_cross_age_auc, cross_age_auc

    if criterion == "auc":
        value = cross_age_auc(features, ident, age, young_max=YOUNG_MAX, adult_min=ADULT_MIN)
        reps = bootstrap_cross_age_auc({"m": features}, ident, age, young_max=YOUNG_MAX,
                                       adult_min=ADULT_MIN, resamples=RESAMPLES, seed=seed)["m"]
        return {"value": value, "reps": [round(float(r), 8) for r in reps]}
    hits = loo_hits(features, ident)
    return {"value": float(np.mean(hits)), "hits": [int(h) for h in hits]}


def loo_hits(features: np.ndarray, ident: np.ndarray) -> np.ndarray:
    """Rank-1 hit of every photo that has a mate, against all the other photos."""
    s = features @ features.T
    np.fill_diagonal(s, -np.inf)
    probes = _probes(ident)
    return (ident[np.argmax(s[probes], axis=1)] == ident[probes]).astype(np.int64)


def _probes(ident: np.ndarray) -> np.ndarray:
    _, inv, counts = np.unique(ident, return_inverse=True, return_counts=True)
    return np.flatnonzero(counts[inv] >= 2)


def choose_criterion(ident: np.ndarray, age: np.ndarray, folds: Folds) -> str:
    """'auc' when every fold's validation people have genuine and impostor young x adult
    pairs, 'rank1' otherwise."""
    from mtmim_cli.eval.cross_age import cross_age_pairs_all

    for f in range(len(folds.folds)):
        rows = np.isin(folds.records, folds.validation(f))
        try:
            cross_age_pairs_all(ident[rows], age[rows], YOUNG_MAX, ADULT_MIN)
        except ValueError:
            return "rank1"
    return "auc"


def guard_auc(features: np.ndarray, ident: np.ndarray) -> float:
    """Verification ROC AUC over every pair of the guard's photos."""
    from mtmim_cli.eval.metrics import roc_auc

    i, j = np.triu_indices(len(features), k=1)
    return roc_auc(np.einsum("nd,nd->n", features[i], features[j]), ident[i] == ident[j])


def summarise(settings: list[Setting], init: list[dict], cand: dict[Setting, list[dict]],
              criterion: str, guard_init: float | None, fold_ids: list[np.ndarray]
              ) -> list[dict]:
    """Per candidate: its criterion (mean over folds), the paired difference against the
    init with its interval, the guard's difference, and whether it may be chosen."""
    from mtmim_cli.eval.compare import bootstrap_difference

    rows = []
    alpha = (1 - LEVEL) / 2
    for s in settings:
        per = cand[s]
        value = float(np.mean([p["value"] for p in per]))
        if criterion == "auc":
            diffs = np.mean([np.asarray(p["reps"]) - np.asarray(i["reps"])
                             for p, i in zip(per, init, strict=True)], axis=0)
            diff = value - float(np.mean([i["value"] for i in init]))
            low, high = (float(x) for x in np.quantile(diffs, [alpha, 1 - alpha]))
        else:
            a = np.concatenate([p["hits"] for p in per])
            b = np.concatenate([i["hits"] for i in init])
            d = bootstrap_difference(a, b, clusters=np.concatenate(fold_ids), resamples=2000,
                                     level=LEVEL, seed=0)
            value, diff, low, high = d.mean_a, d.diff, d.low, d.high
        guard = None
        if guard_init is not None:
            guard = float(np.mean([p["guard"] for p in per])) - guard_init
        ok_guard = guard is None or guard >= -GUARD_TOLERANCE
        rows.append({"setting": s.to_dict(), "label": s.label(), "value": value, "diff": diff,
                     "low": low, "high": high, "guard_diff": guard, "guard_ok": ok_guard,
                     "eligible": bool(low > 0 and ok_guard)})
    return rows


def pick(rows: list[dict]) -> int | None:
    """The eligible candidate of highest criterion (the first listed on a tie), or None."""
    best = None
    for k, r in enumerate(rows):
        if r["eligible"] and (best is None or r["value"] > rows[best]["value"]):
            best = k
    return best


def table(rows: list[dict], init_value: float, criterion: str, guard: bool) -> str:
    """The candidates' validation scores as a Markdown table."""
    name = "AUC" if criterion == "auc" else "rank-1"
    head = ["candidate", "trains", "lr", "lambda", "wise", name, "vs init", f"{LEVEL:.0%} interval"]
    if guard:
        head.append("guard vs init")
    head.append("verdict")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    init_row = ["init", "-", "-", "-", "-", f"{init_value:.4f}", "-", "-"]
    lines.append("| " + " | ".join(init_row + (["-"] if guard else []) + ["-"]) + " |")
    for k, r in enumerate(rows):
        s = r["setting"]
        verdict = ("beats init" if r["eligible"] else
                   "guard: falls" if not r["guard_ok"] else "not above init")
        cells = [f"c{k + 1:02d}", s["freeze_through"], f"{s['lr']:g}",
                 "-" if s["lambda_mim"] is None else f"{s['lambda_mim']:g}", f"{s['wise']:g}",
                 f"{r['value']:.4f}", f"{r['diff']:+.4f}", f"[{r['low']:+.4f}, {r['high']:+.4f}]"]
        if guard:
            cells.append("-" if r["guard_diff"] is None else f"{r['guard_diff']:+.4f}")
        lines.append("| " + " | ".join([*cells, verdict]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
def auto_finetune(caches: Sequence[str | os.PathLike], init: str | os.PathLike | None,
                  options: dict[str, Any], *, echo: Callable[[str], None] | None = print,
                  on_candidate: Callable[[int], None] | None = None) -> Path:
    """`finetune --recipe auto`: search, choose on validation identities, retrain the choice
    (or write the init); returns the run folder. `options` are finetune's flat options
    (`recipe` 'auto'); `auto_guard` names a general-face cache for the guard. `echo` gets
    the table and the choice (None: silent); `on_candidate(n)` is called after each stored
    candidate (tests use it to stop a search)."""
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.digest import file_sha256
    from mtmim_cli.eval.runners import FeatureOptions
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.train.finetune import finetune
    from mtmim_cli.train.finetune_options import resolve_settings, resolved_settings

    opts = dict(options)
    resolve_settings(dict(opts), {})   # a bad setting is refused before the search reads a file
    if not init:
        raise MtmimError("--recipe auto: give --init (the encoder the recipe is chosen for)")
    if len(caches) != 1:
        raise MtmimError("--recipe auto: takes one training cache (its identities are carved "
                         "into validation folds)")
    if opts.get("val_identities"):
        raise MtmimError("--recipe auto: carves its own validation identities; leave out "
                         "--val-identities")
    guard_path = opts.pop("auto_guard", None)
    out = Path(opts.get("out") or "runs/finetune")
    progress = bool(opts.get("progress", True))
    mode = str(opts.get("mode", "mtmim"))
    seed = int(opts.get("seed", 0))
    say = echo or (lambda _s: None)
    t_start = time.perf_counter()

    init_model = load_identity_model(init, opts.get("backbone"))
    if not hasattr(init_model.encoder, "stages"):
        raise MtmimError(f"{init}: --recipe auto needs an encoder with named stages")
    grid = declared_grid(mode, opts, len(init_model.encoder.stages()))
    settings = candidates(grid)
    trained = list(dict.fromkeys(s.train_key for s in settings))
    alphas = sorted(set(grid["wise"]))
    base_opts = {k: v for k, v in opts.items() if k not in (*_SEARCH_KEYS, *_FORWARDED_AWAY)}
    base_opts.setdefault("activation_cache", str(out / "auto" / "activations"))
    folds = validation_folds(caches[0], opts.get("train_identities"), opts.get("exclude"),
                             FOLDS, seed)
    cache = Cache(caches[0])
    ident_all = np.asarray(cache.identity_names, dtype=object)[cache.identity].astype(str)
    rec_ident, rec_age = ident_all[folds.records], np.asarray(cache.age)[folds.records]
    criterion = choose_criterion(rec_ident, rec_age, folds)
    feat = FeatureOptions(flip="concat", device="cpu", progress=False)

    guard = None
    if guard_path:
        gcache = Cache(guard_path)
        grows = np.flatnonzero(gcache.usable)
        if len(grows) > GUARD_MAX_IMAGES:
            grows = np.sort(np.random.default_rng([seed, 0x6A7D]).choice(grows, GUARD_MAX_IMAGES,
                                                                          replace=False))
        gident = np.asarray(gcache.identity)[grows]
        guard = (gcache, grows, gident)

    def guard_score(model) -> float | None:
        return None if guard is None else guard_auc(feat.extract(model, guard[0], guard[1]), guard[2])

    data = {"cache_sha256": file_sha256(caches[0]), "init_sha256": file_sha256(init),
            "guard_sha256": file_sha256(guard_path) if guard_path else None,
            "replay_sha256": [file_sha256(p) for p in (opts.get("replay") or [])],
            "records_sha": hashlib.sha256(np.asarray(folds.records, "<i8").tobytes()).hexdigest()}
    common = {"format": FORMAT, "data": data, "criterion": criterion, "alphas": alphas,
              "declaration": declaration(mode), "source": source_digest(), "seed": seed}
    store = CandidateStore(out / "auto" / "candidates")
    fold_dir = out / "auto" / "folds"
    fold_files = []
    for f in range(FOLDS):
        path = fold_dir / f"fold-{f}-train.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(folds.training_names(f)) + "\n")
        fold_files.append(path)

    def fold_rows(f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = folds.validation(f)
        return rows, ident_all[rows], np.asarray(cache.age)[rows]

    # The init, per fold (cheap: one model; kept so a resumed search pairs with the same).
    init_scores = []
    for f in range(FOLDS):
        rows, ident, age = fold_rows(f)
        key = {**common, "what": "init", "fold": f, "fold_ids": folds.folds[f]}
        rec = store.get(key)
        if rec is None:
            rec = _scores(feat.extract(init_model, cache, rows), ident, age, criterion, seed * 1000 + f)
            store.put(key, rec)
        init_scores.append(rec)
    guard_init = guard_score(init_model)

    def candidate_options(tk: tuple, f: int) -> dict[str, Any]:
        depth, lr, lam = tk
        first = alphas[0]   # the lowest alpha: model.pt holds it, last.pt the trained weights
        run = out / "auto" / "runs" / f"fold{f}-{_slug(tk)}"
        o = {**base_opts, "recipe": BASE_RECIPE, "freeze_through": depth, "lr": lr, "wise": first,
             "train_identities": f"@{fold_files[f]}", "seed": seed, "out": str(run),
             "progress": False, "resume": True}
        if lam is not None:
            o["lambda_mim"] = lam
        return o

    jobs = [(tk, f) for tk in trained for f in range(FOLDS)]
    results: dict[tuple, dict] = {}
    keys = {}
    for tk, f in jobs:
        o = candidate_options(tk, f)
        keys[(tk, f)] = {**common, "what": "candidate", "fold": f, "fold_ids": folds.folds[f],
                         "settings": {k: v for k, v in resolved_settings(o).items()
                                      if k not in ("out", "train_identities")}}
        got = store.get(keys[(tk, f)])
        if got is not None:
            results[(tk, f)] = got
    say(f"auto recipe: {len(settings)} candidates ({len(trained)} trained settings, wise "
        f"{', '.join(f'{a:g}' for a in alphas)} from each), each trained on {FOLDS} folds: "
        f"{len(jobs) - len(results)} fine-tunes to run")
    done_here = 0
    with make_progress("candidate", disable=not progress) as bar:
        task = bar.add_task("auto recipe: candidates", total=len(jobs), completed=len(results))
        for tk, f in jobs:
            if (tk, f) in results:
                continue
            t0 = time.perf_counter()
            run = finetune(list(caches), init, candidate_options(tk, f))
            rows, ident, age = fold_rows(f)
            per_alpha = {}
            for a, model in wise_models(run, alphas).items():
                rec = _scores(feat.extract(model, cache, rows), ident, age, criterion, seed * 1000 + f)
                rec["guard"] = guard_score(model)
                per_alpha[f"{a:g}"] = rec
            result = {"per_wise": per_alpha, "seconds": round(time.perf_counter() - t0, 2)}
            store.put(keys[(tk, f)], result)
            results[(tk, f)] = result
            _prune(run, keep_model=(tk, f) == (trained[0], 0))
            bar.advance(task)
            done_here += 1
            if on_candidate is not None:
                on_candidate(done_here)

    cand = {s: [results[(s.train_key, f)]["per_wise"][f"{s.wise:g}"] for f in range(FOLDS)]
            for s in settings}
    fold_ids = [fold_rows(f)[1][_probes(fold_rows(f)[1])] if criterion == "rank1" else
                fold_rows(f)[1] for f in range(FOLDS)]
    rows = summarise(settings, init_scores, cand, criterion, guard_init, fold_ids)
    best = pick(rows)
    init_value = float(np.mean([i["value"] for i in init_scores])) if criterion == "auc" else \
        float(np.mean(np.concatenate([i["hits"] for i in init_scores])))
    what = (f"young (<= {YOUNG_MAX:g}) vs adult (>= {ADULT_MIN:g}) AUC" if criterion == "auc"
            else "leave-one-out rank-1")
    record = {"declaration": declaration(mode),
              "grid": {k: list(v) for k, v in grid.items()},
              "criterion": criterion, "criterion_text": what,
              "folds": [{"identities": ids, "images": int(len(folds.validation(f)))}
                        for f, ids in enumerate(folds.folds)],
              "init_value": init_value, "guard": str(guard_path) if guard_path else None,
              "guard_init": guard_init, "candidates": rows,
              "chosen": None if best is None else rows[best]["setting"],
              "chosen_label": None if best is None else f"c{best + 1:02d}"}
    record["summary"] = (
        f"validation: {what} on {FOLDS} folds of the {len(np.unique(folds.names))} training "
        f"identities, paired {LEVEL:.0%} identity-bootstrap intervals against the init"
        + (f"; guard: all-pairs AUC on {guard_path} may fall by at most {GUARD_TOLERANCE:g}"
           if guard_path else ""))
    record["table"] = table(rows, init_value, criterion, guard is not None)
    say(record["summary"])
    say(record["table"])
    search = {**record, "wall_seconds": round(time.perf_counter() - t_start, 1),
              "candidate_seconds": {f"fold{f}-{_slug(tk)}": results[(tk, f)]["seconds"]
                                    for tk, f in jobs}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "auto" / "search.json", json.dumps(search, indent=1, default=str))
    if best is None:
        say("auto recipe: no candidate beats the init on validation beyond its interval; "
            f"{out / 'model.pt'} equals the init")
        template = Path(candidate_options(trained[0], 0)["out"])
        if not (template / "model.pt").exists():   # pruned by an older search: train it again
            template = finetune(list(caches), init, candidate_options(trained[0], 0))
        write_init_model(out, init_model, candidate_run=template, init=init, caches=caches,
                         options=opts, record=record)
        return out
    chosen = settings[best]
    say(f"auto recipe: chose {record['chosen_label']} ({chosen.label()}); retraining on all "
        f"{len(np.unique(folds.names))} training identities into {out}")
    final = {**{k: v for k, v in opts.items() if k not in _SEARCH_KEYS + ("recipe",)},
             "recipe": "auto", **chosen.options(), "auto": record, "resume": True,
             "out": str(out)}
    final.setdefault("activation_cache", base_opts["activation_cache"])
    run = finetune(list(caches), init, final)
    _record_in_model(Path(run) / "model.pt", record)
    return Path(run)


def _prune(run: Path, keep_model: bool) -> None:
    """A scored candidate's weights are not needed again (its result is stored; an SFace
    candidate holds 130 MB): keep its config and metrics, and model.pt of the one whose
    checkpoint format the fallback copies."""
    for p in [run / "checkpoints" / "last.pt", run / "best.pt",
              *([] if keep_model else [run / "model.pt"])]:
        p.unlink(missing_ok=True)


def _slug(tk: tuple) -> str:
    depth, lr, lam = tk
    return f"{depth.replace(':', '')}-lr{lr:g}" + ("" if lam is None else f"-lam{lam:g}")


def wise_models(run: Path, alphas: Sequence[float]) -> dict[float, Any]:
    """The run's model at each WiSE alpha, from one training: model.pt holds the lowest
    alpha a0 = (1 - a0) w0 + a0 w, checkpoints/last.pt the trained w, so w0 follows and
    any alpha is w0 + alpha (w - w0). Weights the training left unchanged (the frozen trunk)
    are kept bit for bit, so the trunk memo still recognises them."""
    import torch

    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.train.checkpoint import load_checkpoint

    a0 = float(alphas[0])
    model = load_identity_model(run / "model.pt")
    if all(float(a) == a0 for a in alphas):
        return {a0: model}
    at_a0 = load_checkpoint(run / "model.pt")["objective"]
    trained = load_checkpoint(run / "checkpoints" / "last.pt")["objective"]
    out = {}
    for a in alphas:
        a = float(a)
        if a == a0:
            out[a] = model
            continue
        state = {}
        for k, m in at_a0.items():
            if not k.startswith(("encoder.", "factorize.")):
                continue
            t = trained[k]
            if not m.is_floating_point() or torch.equal(m, t) or a == 1.0:
                state[k] = t
            else:
                w0 = (m - a0 * t) / (1.0 - a0)
                state[k] = w0 + a * (t - w0)
        other = copy.deepcopy(model)
        other.encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items()
                                       if k.startswith("encoder.")})
        other.factorize.load_state_dict({k[len("factorize."):]: v for k, v in state.items()
                                         if k.startswith("factorize.")})
        out[a] = other.eval()
    return out


def write_init_model(out: Path, init_model, *, candidate_run: Path, init: str | os.PathLike,
                     caches: Sequence[str | os.PathLike], options: dict, record: dict) -> None:
    """model.pt equal to the init: a candidate's checkpoint (its format and heads) with the
    init's encoder weights and a factorization unit of zero weight and bias, so
    x_id = x - 0 = the init's features exactly. It records no training images (it was
    trained on none) and the search's record; config.json says the same."""
    import torch

    from mtmim_cli.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(candidate_run / "model.pt")
    obj = {k: v for k, v in state["objective"].items() if not k.startswith("encoder.")}
    for k, v in init_model.encoder.state_dict().items():
        obj[f"encoder.{k}"] = v.detach().clone()
    for k in [k for k in obj if k.startswith("factorize.")]:
        obj[k] = torch.zeros_like(obj[k])
    meta = {k: v for k, v in state["meta"].items() if k not in ("trained_on", "wise")}
    meta.update({"init": str(init), "auto": record, "equals_init": True})
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "model.pt", {"meta": meta, "objective": obj})
    # an earlier search's retrained run in this folder no longer describes model.pt
    for stale in (out / "checkpoints" / "last.pt", out / "best.pt", out / "validation.csv"):
        stale.unlink(missing_ok=True)
    config = {"extra": {"recipe": "auto", "mode": options.get("mode", "mtmim"),
                        "caches": [str(c) for c in caches], "init": str(init), "equals_init": True, "auto": record}}
    atomic_write_text(out / "config.json", json.dumps(config, indent=1, default=str))
    # a run folder `mtmim report` reads (it was trained for no step)
    atomic_write_text(out / "metrics.csv", "step,epoch,loss,accuracy\n")


def _record_in_model(path: Path, record: dict) -> None:
    from mtmim_cli.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(path)
    save_checkpoint(path, {**state, "meta": {**state["meta"], "auto": record}})

