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
   cache (`auto_guard`: people neither trained nor tested on), the leave-one-out rank-1 on
   its photos may not fall by more than GUARD_TOLERANCE, nor fall with a paired
   identity-bootstrap interval wholly below zero (auto_validation.guard_difference).
   The guard is scored only for candidates whose interval clears the init (no other can be
   chosen): on SFace it was most of the search's evaluation time. The init is scored after
   the first candidates, so it runs only the tail of the trunk they cached.
4. Safe by construction: a candidate may be chosen only if its interval's lower bound is
   above zero and it passes the guard; among those, the highest criterion. When none
   qualifies the run says so in one line and writes a model equal to the init (the init's
   encoder, a factorization unit that passes x through: x_id = x), exit 0.
5. The chosen setting is retrained on all training identities into --out, and the guard
   scores the retrained model itself: a fold candidate trains on part of the people and
   drifts less (on CASIA the chosen candidates lost 0.0004 of guard AUC, their retrained
   models 0.0023). A retrained model the guard refuses is removed and the best eligible
   candidate of a lower WiSE alpha (nearer the init: the refusal says the fine-tune moved
   too far) is retrained, FINAL_TRIES at most; when none is left the init is written. The grid, every
   candidate's validation scores, the final checks and the choice go into config.json
   (extra.auto) and search.json; model.pt's meta (auto) holds the record as its training
   began (the checks before it).

The grid and the constants are in auto_grid.py, the folds, criterion, guard and table in
auto_validation.py, the candidate store and the candidates' models in auto_models.py.

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
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.errors import MtmimError
from mtmim_cli.orchestration.auto_grid import (  # noqa: F401  (re-exported: tests, help page)
    _FORWARDED_AWAY,
    _SEARCH_KEYS,
    ADULT_MIN,
    BASE_RECIPE,
    FINAL_TRIES,
    FOLDS,
    FORMAT,
    GRID,
    GUARD_MAX_IMAGES,
    GUARD_RESAMPLES,
    GUARD_TOLERANCE,
    LEVEL,
    RESAMPLES,
    YOUNG_MAX,
    Setting,
    candidates,
    declaration,
    declared_grid,
)
from mtmim_cli.orchestration.auto_models import (  # noqa: F401
    CandidateStore,
    _prune,
    _slug,
    wise_models,
    write_init_model,
)
from mtmim_cli.orchestration.auto_validation import (  # noqa: F401
    Folds,
    GuardRef,
    _probes,
    _scores,
    choose_criterion,
    guard_accepts,
    guard_difference,
    guard_hits,
    guard_outcome,
    guard_pair_ident,
    guard_probe_ident,
    guard_rows,
    loo_hits,
    pick,
    ranked,
    summarise,
    table,
    validation_folds,
)
from mtmim_cli.progress import make_progress
from mtmim_cli.source import source_digest


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
    from mtmim_cli.train.loop import routine_messages_off

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
        grows = guard_rows(gcache, seed)
        gident = np.asarray(gcache.identity)[grows]
        guard = (gcache, grows, gident)

    def guard_score(model) -> dict[str, list[int]] | None:
        return None if guard is None else guard_outcome(feat.extract(model, guard[0], guard[1]),
                                                        guard[2])

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
    fold_ids = [fold_rows(f)[1][_probes(fold_rows(f)[1])] if criterion == "rank1" else
                fold_rows(f)[1] for f in range(FOLDS)]
    init_scores: list[dict] = []

    def score_init() -> list[dict]:
        # The init, per fold, kept so a resumed search pairs with the same. Scored after the
        # first candidates: its trunk is theirs, so eval's trunk memo runs only its tail.
        if not init_scores:
            for f in range(FOLDS):
                rows, ident, age = fold_rows(f)
                key = {**common, "what": "init", "fold": f, "fold_ids": folds.folds[f]}
                rec = store.get(key)
                if rec is None:
                    rec = _scores(feat.extract(init_model, cache, rows), ident, age, criterion,
                                  seed * 1000 + f)
                    store.put(key, rec)
                init_scores.append(rec)
        return init_scores

    def above_init(tk: tuple) -> list[float]:
        """The WiSE alphas at which training setting tk clears the init on the criterion (the
        guard is scored for these only: no other can be chosen)."""
        own = [s for s in settings if s.train_key == tk]
        per = {s: [results[(tk, f)]["per_wise"][f"{s.wise:g}"] for f in range(FOLDS)] for s in own}
        rows = summarise(own, score_init(), per, criterion, None, fold_ids)
        return [s.wise for s, r in zip(own, rows, strict=True) if r["low"] > 0]

    def finish_guard(tk: tuple) -> None:
        """Guard scores for tk's fold models at the alphas that need them, then prune them."""
        wanted = above_init(tk) if guard is not None else []
        for f in range(FOLDS):
            res = results[(tk, f)]
            missing = [a for a in wanted if res["per_wise"][f"{a:g}"].get("guard") is None]
            run = Path(candidate_options(tk, f)["out"])
            if missing:
                if not (run / "checkpoints" / "last.pt").exists():
                    # pruned before its guard was scored (killed between the two): train it
                    # again; seeded, so the guard scores the model validation scored
                    shutil.rmtree(run, ignore_errors=True)
                    with routine_messages_off():
                        run = finetune(list(caches), init, candidate_options(tk, f))
                models = wise_models(run, alphas)
                for a in missing:
                    res["per_wise"][f"{a:g}"]["guard"] = guard_score(models[a])
                store.put(keys[(tk, f)], res)
            _prune(run, keep_model=(tk, f) == (trained[0], 0))

    say(f"auto recipe: {len(settings)} candidates ({len(trained)} trained settings, wise "
        f"{', '.join(f'{a:g}' for a in alphas)} from each), each trained on {FOLDS} folds: "
        f"{len(jobs) - len(results)} fine-tunes to run")
    done_here = 0
    with make_progress("candidate", disable=not progress) as bar:
        task = bar.add_task("auto recipe: candidates", total=len(jobs), completed=len(results))
        for tk, f in jobs:
            if (tk, f) not in results:
                t0 = time.perf_counter()
                with routine_messages_off():
                    run = finetune(list(caches), init, candidate_options(tk, f))
                rows, ident, age = fold_rows(f)
                per_alpha = {}
                for a, model in wise_models(run, alphas).items():
                    rec = _scores(feat.extract(model, cache, rows), ident, age, criterion,
                                  seed * 1000 + f)
                    rec["guard"] = None
                    per_alpha[f"{a:g}"] = rec
                result = {"per_wise": per_alpha, "seconds": round(time.perf_counter() - t0, 2)}
                store.put(keys[(tk, f)], result)
                results[(tk, f)] = result
                bar.advance(task)
                done_here += 1
                if on_candidate is not None:
                    on_candidate(done_here)
            if f == FOLDS - 1:   # every fold of tk trained: its guard, then its weights go
                finish_guard(tk)

    guard_ref: GuardRef | None = None

    def guard_init() -> GuardRef:
        nonlocal guard_ref
        if guard_ref is None:
            key = {**common, "what": "guard-init"}
            outcome = store.get(key)
            if outcome is None:
                outcome = guard_score(init_model)
                store.put(key, outcome)
            guard_ref = GuardRef.of(outcome, guard[2])
        return guard_ref

    scored = any(r["per_wise"][a].get("guard") is not None for r in results.values()
                 for a in r["per_wise"])
    cand = {s: [results[(s.train_key, f)]["per_wise"][f"{s.wise:g}"] for f in range(FOLDS)]
            for s in settings}
    rows = summarise(settings, score_init(), cand, criterion,
                     guard_init() if scored else None, fold_ids)
    order = ranked(rows)
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
              "guard_init": None if guard_ref is None else float(guard_ref.hits.mean()),
              "candidates": rows, "final_checks": [], "chosen": None, "chosen_label": None}
    record["summary"] = (
        f"validation: {what} on {FOLDS} folds of the {len(np.unique(folds.names))} training "
        f"identities, paired {LEVEL:.0%} identity-bootstrap intervals against the init"
        + (f"; guard: leave-one-out rank-1 on {guard_path} may not fall by more than "
           f"{GUARD_TOLERANCE:g} nor beyond its {LEVEL:.0%} interval (scored for the candidates "
           "above the init, '-' for the others, and again for the retrained choice)"
           if guard_path else ""))
    record["table"] = table(rows, init_value, criterion, guard is not None)
    say(record["summary"])
    say(record["table"])
    out.mkdir(parents=True, exist_ok=True)

    def write_search() -> None:
        search = {**record, "wall_seconds": round(time.perf_counter() - t_start, 1),
                  "candidate_seconds": {f"fold{f}-{_slug(tk)}": results[(tk, f)]["seconds"]
                                        for tk, f in jobs}}
        atomic_write_text(out / "auto" / "search.json", json.dumps(search, indent=1, default=str))

    n_train = len(np.unique(folds.names))
    below = float("inf")   # after a refusal, only candidates nearer the init (lower alpha)
    for _ in range(FINAL_TRIES):
        k = next((k for k in order if settings[k].wise < below), None)
        if k is None:
            break
        chosen, label = settings[k], f"c{k + 1:02d}"
        fkey = {**common, "what": "final", "setting": chosen.to_dict(),
                "train_identities": opts.get("train_identities"),
                "exclude": [int(x) for x in (opts.get("exclude") or [])]}
        check = store.get(fkey)
        if check is not None and not check["ok"]:   # refused before a kill: not again
            record["final_checks"].append(check)
            below = chosen.wise
            continue
        record.update(chosen=chosen.to_dict(), chosen_label=label)
        _clear_other_final(out, chosen)
        done = check is not None and (out / "model.pt").exists()   # passed before a rerun
        if not done:
            say(f"auto recipe: {'chose' if not record['final_checks'] else 'next'} {label} "
                f"({chosen.label()}); retraining on all {n_train} training identities into {out}")
            final = {**{k2: v for k2, v in opts.items() if k2 not in _SEARCH_KEYS + ("recipe",)},
                     "recipe": "auto", **chosen.options(), "auto": copy.deepcopy(record),
                     "resume": True, "out": str(out)}
            final.setdefault("activation_cache", base_opts["activation_cache"])
            finetune(list(caches), init, final)
        if guard is None:
            write_search()
            return out
        if check is None:
            d = guard_difference([guard_score(load_identity_model(out / "model.pt"))],
                                 guard_init())
            check = {"candidate": label, "setting": chosen.to_dict(), **d}
            store.put(fkey, check)
        record["final_checks"].append(check)
        verdict = "passes" if check["ok"] else "fails"
        say(f"auto recipe: the retrained {label} {verdict} the guard: rank-1 "
            f"{check['diff']:+.4f} [{check['low']:+.4f}, {check['high']:+.4f}] against the init")
        if check["ok"]:
            _add_to_config(out, record)
            write_search()
            return out
        _clear_run(out)
        below = chosen.wise
    record.update(chosen=None, chosen_label=None)
    write_search()
    if order:
        say(f"auto recipe: no retrained candidate passes the guard ({len(record['final_checks'])} "
            f"tried); {out / 'model.pt'} equals the init")
    else:
        say("auto recipe: no candidate beats the init on validation beyond its interval; "
            f"{out / 'model.pt'} equals the init")
    template = Path(candidate_options(trained[0], 0)["out"])
    if not (template / "model.pt").exists():   # pruned by an older search: train it again
        with routine_messages_off():
            template = finetune(list(caches), init, candidate_options(trained[0], 0))
    write_init_model(out, init_model, candidate_run=template, init=init, caches=caches,
                     options=opts, record=record)
    return out


_RUN_FILES = ("model.pt", "best.pt", "config.json", "metrics.csv", "validation.csv")


def _clear_run(out: Path) -> None:
    """Remove a retrained (refused) run's files from --out, keeping the search in auto/."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _clear_other_final(out: Path, chosen: Setting) -> None:
    """An auto run in --out of another candidate (a kill after its refusal was stored, before
    its files went, or an earlier model equal to the init) is removed; this candidate's own
    interrupted run resumes, and a run that is not auto's is left for finetune to refuse."""
    try:
        extra = json.loads((out / "config.json").read_text()).get("extra") or {}
    except (OSError, json.JSONDecodeError):
        return
    if extra.get("recipe") == "auto" and (extra.get("auto") or {}).get("chosen") != chosen.to_dict():
        _clear_run(out)


def _add_to_config(out: Path, record: dict) -> None:
    """The record with the final checks into config.json's extra.auto (the run's own
    config.json, written when its training began)."""
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg.setdefault("extra", {})["auto"] = record
    atomic_write_text(path, json.dumps(cfg, indent=1, default=str))
