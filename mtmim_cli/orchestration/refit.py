"""FG-NET leave-one-out with a re-fit per round (`--refit head` / `--refit full`).

Each round trains without its held-out images (`train/`), then ranks them against all other
images (`eval/`), which is why this lives above both. `--refit head` trains the rounds'
factorization and heads on fixed encoder features, many rounds at once
(`run_head_rounds` over `train.round_heads.fit_rounds`); `--refit full` fine-tunes the model
per round (`full_round_fn`). Each re-fit mode (baseline, age, mtmim) runs over the same
rounds and seeds into its own `RoundStore`, so a killed run resumes and shards merge. The
store is keyed by `round_key`: everything that changes a round's result, so stale rounds are
never merged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from mtmim_cli import __version__
from mtmim_cli.atomic import atomic_write
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.eval.loading import load_model
from mtmim_cli.eval.outcomes import features_from_rounds, from_rounds, mates_from_rounds
from mtmim_cli.eval.runners import (
    FeatureOptions,
    Scored,
    fgnet_units,
    image_counts,
    with_all_images,
)
from mtmim_cli.source import source_digest

# Bump when what a stored round means changes without the tool version changing.
ROUND_FORMAT = 3

RoundFn = Callable[[int, np.ndarray], dict]

# Rounds trained together by `--refit head` (memory grows with it: ~2 GB at 250 rounds
# of 2000 rows x 128-d features with q's 64 hidden units).
ROUNDS_PER_CHUNK = 250


def run_refit(cfg: EvalConfig, cache, m: ModelArg, *, cache_sha256: str, model_sha256: str,
              feat: FeatureOptions) -> dict[str, Scored]:
    """FG-NET rank-1 and CMC of model `m` re-fitted per round as `cfg.refit` says, one
    record per re-fit mode (`cfg.refit_modes`: baseline, age, mtmim; every mode over the same
    rounds and seeds) with the per-photo outcomes of its rounds; with `--shard I/N` and
    rounds missing, partial records."""
    import time

    idx = np.flatnonzero(cache.usable)
    ident = cache.identity[idx]
    model = load_model(m.path, m.backbone, cfg.device)
    encoder = encoder_of(model)
    width, dim = _feature_shape(encoder, cache, idx, feat)
    key = round_key(cfg, m, cache_sha256=cache_sha256, model_sha256=model_sha256,
                    input_width=width, features=(len(idx), dim))
    folder = rounds_dir(cfg, m)
    rounds = P.loo_rounds(len(idx), cfg.folds, cfg.seed)
    shard = P.parse_shard(cfg.shard)
    out: dict[str, Scored] = {}
    views = None
    if cfg.refit == "head":
        from mtmim_cli.eval.features import extract_views

        P.RoundStore(folder, key, cfg.reuse_stale)   # pins what views.npz was computed from
        views = stored_views(folder / "views.npz", lambda: extract_views(
            encoder, cache, idx, mirror=cfg.flip != "none", batch_size=feat.batch_size,
            device=feat.device, progress=feat.progress))
    for mode in refit_modes(cfg):
        t0 = time.perf_counter()
        store = P.RoundStore(folder / mode, {**key, "mode": mode}, cfg.reuse_stale)
        what = f"{m.label}: refit {cfg.refit} {mode}"
        if cfg.merge_only:
            done = store.done()
        elif cfg.refit == "head":
            done = run_head_rounds(views, ident, cache.age[idx], rounds, store, shard,
                                   flip=cfg.flip, seed=cfg.seed,
                                   options={**cfg.refit_options, "mode": mode},
                                   progress=feat.progress, description=what)
        else:
            round_fn = full_round_fn(cache, idx, ident, m, base=folder / mode / "runs",
                                     seed=cfg.seed, options={**cfg.refit_options, "mode": mode},
                                     feat=replace(feat, progress=False))
            done = P.run_rounds(rounds, round_fn, store, shard, feat.progress, what)
        if shard[1] > 1 and len(done) < len(rounds):
            out[mode] = Scored({"partial": True, "rounds_done": len(done), "rounds": len(rounds),
                                "wall_seconds": time.perf_counter() - t0, **image_counts(cache)})
            continue
        metrics = P.merge_rounds(done, len(rounds), len(idx), cfg.max_rank)
        metrics["rounds_dir"] = str(store.folder)
        metrics["refit_mode"] = mode
        if stale := store.stale_count(done):
            metrics["stale_rounds"] = stale   # reused under --reuse-stale; the tables say so
        # this mode's own time (the views are extracted once, before the first mode); the
        # caller adds it to the row's wall time, which otherwise counts from the last row
        metrics["refit_seconds"] = round(time.perf_counter() - t0, 2)
        out[mode] = scored_rounds(done, with_all_images(metrics, cache), cache, idx)
    return out


def scored_rounds(done: dict[int, dict], metrics: dict, cache, idx: np.ndarray) -> Scored:
    """The metrics with the per-photo outcomes of the rounds, in FG-NET's units (every photo
    of the cache), and when the rounds hold them the probe-mate successes and each photo's
    features from the round that held it out (what the age probe reads)."""
    mates = mates_from_rounds(done)
    if mates is not None:
        mates = {**mates, "probe": idx[mates["probe"]], "mate": idx[mates["mate"]]}
    feats = features_from_rounds(done, len(idx))
    return Scored(metrics, **fgnet_units(cache, idx, from_rounds(done, len(idx))), mates=mates,
                  rows=idx if feats is not None else None, features=feats,
                  feature_source="each photo's identity features from the re-fit round "
                                 "that held it out")


def refit_modes(cfg: EvalConfig) -> tuple[str, ...]:
    """The modes each round is re-fitted in: `--refit-modes`, or the mode a `--refit-options`
    names, or all three (the paper's ablation rows)."""
    if cfg.refit_modes:
        return tuple(cfg.refit_modes)
    if "mode" in cfg.refit_options:
        return (str(cfg.refit_options["mode"]),)
    return ("baseline", "age", "mtmim")


def encoder_of(model):
    """The module the head re-fit starts from (the encoder's x, before any factorization),
    carrying the model's input width so its crops are the ones the model was built for
    (MobileFaceNet takes 112x96). A model without a separate encoder is its own."""
    view = getattr(model, "encoder_view", None)
    return view() if callable(view) else model


def _feature_shape(encoder, cache, idx: np.ndarray, feat: FeatureOptions) -> tuple[int, int]:
    """(crop width, feature size) of the re-fit's input, from one image."""
    from mtmim_cli.eval.features import extract_views

    width = int(getattr(encoder, "input_width", 112))
    if len(idx) == 0:
        return width, 0
    f, _ = extract_views(encoder, cache, idx[:1], mirror=False, device=feat.device)
    return width, int(f.shape[1])


def round_key(cfg: EvalConfig, m: ModelArg, *, cache_sha256: str, model_sha256: str,
              input_width: int, features: tuple[int, int]) -> dict:
    """Everything that changes a round's result: the protocol's settings, the re-fit options,
    the inputs' digests, the crop and feature shape, the extraction settings, the tool and
    the digest of its source (`mtmim_cli.source`)."""
    return {"protocol": cfg.protocol, "refit": cfg.refit, "folds": cfg.folds, "seed": cfg.seed,
            "flip": cfg.flip, "cache_sha256": cache_sha256, "model_sha256": model_sha256,
            "backbone": m.backbone, "refit_options": cfg.refit_options,
            "resolved_options": resolved_refit_options(cfg.refit, cfg.refit_options),
            "input_width": input_width, "features": list(features),
            "batch_size": cfg.batch_size, "device": str(cfg.device).split(":")[0],
            "tool_version": __version__, "round_format": ROUND_FORMAT,
            P.SOURCE_KEY: source_digest()}


def check_refit_options(cfg: EvalConfig) -> None:
    """Resolve and check each re-fit mode's settings (`--refit-options`, a recipe) as its
    rounds will, so a bad one is refused on one line before any file is read, not in the
    first round after the model and the cache have loaded."""
    if cfg.refit == "none":
        return
    for mode in refit_modes(cfg):
        opts = {**cfg.refit_options, "mode": mode}
        if cfg.refit == "head":
            from mtmim_cli.train.round_heads import RoundHeadConfig

            rounds_per_chunk(opts)
            RoundHeadConfig.from_options({k: v for k, v in opts.items() if k != "rounds_per_chunk"})
        else:
            from mtmim_cli.train.finetune_options import resolve_settings

            resolve_settings(opts, {})


def rounds_per_chunk(options: dict) -> int:
    """`--refit head`'s rounds trained together (`rounds_per_chunk`, default ROUNDS_PER_CHUNK)."""
    from mtmim_cli.train.setting_checks import number

    return int(number("--refit-options rounds_per_chunk",
                      options.get("rounds_per_chunk", ROUNDS_PER_CHUNK), low=1, whole=True))


def resolved_refit_options(refit: str, options: dict) -> dict:
    """The settings a round actually trains with: the options over their defaults, with a
    named recipe expanded, so that a changed default or recipe never reuses stored rounds.
    The mode is left out (each mode has its own store, keyed by it)."""
    import json

    opts = {k: v for k, v in options.items() if k != "mode"}
    if refit == "head":
        from mtmim_cli.train.round_heads import RoundHeadConfig

        opts.pop("rounds_per_chunk", None)   # how rounds are batched, not what they compute
        resolved = RoundHeadConfig.from_options(opts).to_dict()
    elif refit == "full":
        from mtmim_cli.train.finetune_options import resolved_settings

        guard = opts.pop("auto_guard", None)
        resolved = {k: v for k, v in resolved_settings(opts).items() if k != "out"}
        if opts.get("recipe") == "auto":   # the search's grid and criterion change rounds too
            from mtmim_cli.orchestration.auto_recipe import declaration

            resolved["auto_search"] = {**declaration(), "guard": guard}
    else:
        return {}
    resolved.pop("mode", None)
    return json.loads(json.dumps(resolved, sort_keys=True, default=str))


def rounds_dir(cfg: EvalConfig, m: ModelArg) -> Path:
    if cfg.rounds_dir is not None:
        return Path(cfg.rounds_dir) / m.label
    base = cfg.out.parent if cfg.out else Path(".")
    folds = "exact" if cfg.folds is None else f"k{cfg.folds}"
    return base / "rounds" / f"{cfg.protocol}-{cfg.refit}-{folds}-{m.label}"


def stored_views(path: Path, compute: Callable[[], tuple[np.ndarray, np.ndarray | None]]
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Encoder features of a re-fit run, kept in its rounds folder (whose key pins the model,
    the cache and the crop) so resumed runs and later shards skip the extraction."""
    if path.exists():
        with np.load(path) as z:
            return z["f"], (z["ff"] if "ff" in z.files else None)
    f, ff = compute()
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:   # a handle: savez adds no suffix
        np.savez(fh, f=f, **({"ff": ff} if ff is not None else {}))
    return f, ff


def run_head_rounds(views: tuple[np.ndarray, np.ndarray | None], ident: np.ndarray,
                    age: np.ndarray, rounds: list[np.ndarray], store: P.RoundStore,
                    shard: tuple[int, int], *, flip: str, seed: int, options: dict,
                    progress: bool, description: str) -> dict[int, dict]:
    """Re-fit the factorization and heads for this shard's missing rounds, a chunk of rounds
    at a time as one batched computation (`train.round_heads.fit_rounds`), then rank each
    round's held-out images by their x_id against all others. Each chunk's rounds are stored
    as soon as it finishes, so a killed run loses one chunk at most."""
    import time

    import torch

    from mtmim_cli.eval.features import combine_views
    from mtmim_cli.progress import make_progress
    from mtmim_cli.train import round_heads as H

    opts = dict(options)
    chunk = rounds_per_chunk(opts)
    opts.pop("rounds_per_chunk", None)
    cfg = H.RoundHeadConfig.from_options(opts)
    f, ff = views
    view_list = [f] if ff is None else [f, ff]
    i, n = shard
    have = store.done()
    todo = [r for r in range(len(rounds)) if r % n == i and r not in have]
    mine = sum(1 for r in range(len(rounds)) if r % n == i)
    tag = f"{i}-of-{n}"
    with make_progress("round", disable=not progress) as bar:
        task = bar.add_task(description, total=mine, completed=mine - len(todo))
        for c in range(0, len(todo), chunk):
            part = todo[c:c + chunk]
            t0 = time.perf_counter()
            steps = bar.add_task(f"  rounds {part[0]}-{part[-1]}: steps", total=1)

            def on_step(done: int, total: int, steps=steps) -> None:
                bar.update(steps, completed=done, total=total)

            maps = H.fit_rounds(view_list, ident, age, [rounds[r] for r in part], cfg,
                                seed=seed, on_step=on_step)
            bar.remove_task(steps)
            secs = (time.perf_counter() - t0) / len(part)
            with torch.no_grad():
                for k, r in enumerate(part):
                    xid = [(torch.from_numpy(v) @ maps.A[k] + maps.b[k]).numpy() for v in view_list]
                    feats = combine_views(xid[0], xid[1] if ff is not None else None, flip)
                    rec = P.rank_held_out(feats, ident, rounds[r])
                    store.append(tag, {"round": r, **rec, "seconds": round(secs, 4),
                                       "final_loss": float(maps.last_loss[k])})
            bar.advance(task, len(part))
    return store.done()


def full_round_fn(cache, idx: np.ndarray, ident: np.ndarray, m: ModelArg, *, base: Path,
                  seed: int, options: dict, feat: FeatureOptions) -> RoundFn:
    """A round fine-tunes the whole model (`finetune`) without the held-out images, then
    ranks them by the fine-tuned model's features against all others."""
    from mtmim_cli.train.finetune import finetune

    def round_fn(r: int, held: np.ndarray) -> dict:
        run = base / f"round-{r:04d}"
        exclude = idx[held]  # cache record indices left out of this round's training
        # resume=True: a round killed mid-training continues from its last checkpoint.
        # progress=False: rich allows one live display, and the rounds bar is it.
        # A frozen trunk's activations (--freeze-through) are the same in every round and
        # mode: computed once into the model's rounds folder, unless the options name a place.
        shared = {"activation_cache": str(base.parent.parent / "activations"),
                  **({"backbone": m.backbone} if m.backbone else {})}
        round_opts = {**shared, **options, "out": str(run), "exclude": exclude.tolist(),
                      "seed": seed, "progress": False, "resume": True}
        if options.get("recipe") == "auto":   # chosen on this round's training identities
            from mtmim_cli.orchestration.auto_recipe import auto_finetune

            run_dir = auto_finetune([cache.path], m.path, round_opts, echo=None)
        else:
            run_dir = finetune([cache.path], m.path, round_opts)
        model = load_model(_final_checkpoint(Path(run_dir)), None, feat.device)
        return P.rank_held_out(feat.extract(model, cache, idx), ident, held)

    return round_fn


def _final_checkpoint(run_dir: Path) -> Path:
    for name in ("model.pt", "final.pt"):
        if (run_dir / name).exists():
            return run_dir / name
    raise MtmimError(f"{run_dir}: fine-tuning left no model.pt")
