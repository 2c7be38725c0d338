"""FG-NET leave-one-out with a re-fit per round (`--refit head` / `--refit full`).

Each round trains without its held-out images (`train/`), then ranks them against all other
images (`eval/`), which is why this lives above both. A round is a `round_fn(r, held) ->
record` (`head_round_fn`, `full_round_fn`); `run_refit` runs the rounds this shard owns into
a `RoundStore`, so a killed run resumes and shards merge. The store is keyed by
`round_key`: everything that changes a round's result, so stale rounds are never merged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from mtmim_cli import __version__
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.eval.loading import load_model
from mtmim_cli.eval.runners import FeatureOptions, image_counts, with_all_images

# Bump when what a stored round means changes without the tool version changing.
ROUND_FORMAT = 2

RoundFn = Callable[[int, np.ndarray], dict]


def run_refit(cfg: EvalConfig, cache, m: ModelArg, *, cache_sha256: str, model_sha256: str,
              feat: FeatureOptions) -> dict:
    """FG-NET rank-1 and CMC of model `m` re-fitted per round as `cfg.refit` says; with
    `--shard I/N` and rounds missing, a partial record instead."""
    import time

    idx = np.flatnonzero(cache.usable)
    ident = cache.identity[idx]
    model = load_model(m.path, m.backbone, cfg.device)
    encoder = encoder_of(model)
    width, dim = _feature_shape(encoder, cache, idx, feat)
    key = round_key(cfg, m, cache_sha256=cache_sha256, model_sha256=model_sha256,
                    input_width=width, features=(len(idx), dim))
    store = P.RoundStore(rounds_dir(cfg, m), key)
    rounds = P.loo_rounds(len(idx), cfg.folds, cfg.seed)
    if cfg.refit == "head":
        from mtmim_cli.eval.features import extract_views

        f, ff = stored_views(store.folder / "views.npz", lambda: extract_views(
            encoder, cache, idx, mirror=cfg.flip != "none", batch_size=feat.batch_size,
            device=feat.device, progress=feat.progress))
        round_fn = head_round_fn(f, ff, ident, cache.age[idx], flip=cfg.flip, seed=cfg.seed,
                                 options=cfg.refit_options)
    else:
        round_fn = full_round_fn(cache, idx, ident, m, base=rounds_dir(cfg, m) / "runs",
                                 seed=cfg.seed, options=cfg.refit_options,
                                 feat=replace(feat, progress=False))
    t0 = time.perf_counter()
    shard = P.parse_shard(cfg.shard)
    done = store.done() if cfg.merge_only else P.run_rounds(
        rounds, round_fn, store, shard, feat.progress, f"{m.label}: refit {cfg.refit}")
    if shard[1] > 1 and len(done) < len(rounds):
        return {"partial": True, "rounds_done": len(done), "rounds": len(rounds),
                "wall_seconds": time.perf_counter() - t0, **image_counts(cache)}
    metrics = P.merge_rounds(done, len(rounds), len(idx), cfg.max_rank)
    metrics["rounds_dir"] = str(store.folder)
    return with_all_images(metrics, cache)


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
    the inputs' digests, the crop and feature shape, the extraction settings, the tool."""
    return {"protocol": cfg.protocol, "refit": cfg.refit, "folds": cfg.folds, "seed": cfg.seed,
            "flip": cfg.flip, "cache_sha256": cache_sha256, "model_sha256": model_sha256,
            "backbone": m.backbone, "refit_options": cfg.refit_options,
            "input_width": input_width, "features": list(features),
            "batch_size": cfg.batch_size, "device": str(cfg.device).split(":")[0],
            "tool_version": __version__, "round_format": ROUND_FORMAT}


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
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, f=f, **({"ff": ff} if ff is not None else {}))
    os.replace(tmp, path)
    return f, ff


def head_round_fn(f: np.ndarray, ff: np.ndarray | None, ident: np.ndarray, age: np.ndarray, *,
                  flip: str, seed: int, options: dict) -> RoundFn:
    """A round re-fits the factorization unit and heads (`fit_heads_on_features`) on the
    encoder features of every image but the held-out ones, then ranks the held-out images
    by their x_id against all others."""
    import torch

    from mtmim_cli.eval.features import combine_views
    from mtmim_cli.train.finetune import fit_heads_on_features

    opts = dict(options)

    def round_fn(r: int, held: np.ndarray) -> dict:
        train = np.ones(len(f), bool)
        train[held] = False
        # Both views train the heads, as the random flip does in image training.
        x = f[train] if ff is None else np.concatenate([f[train], ff[train]])
        reps = 1 if ff is None else 2
        torch.manual_seed(seed * 100_003 + r)
        try:
            unit = fit_heads_on_features(
                torch.from_numpy(x), torch.from_numpy(np.tile(ident[train], reps)),
                torch.from_numpy(np.tile(age[train], reps)),
                **{**opts, "seed": seed * 100_003 + r})
        except TypeError as exc:  # an option fit_heads_on_features does not know
            raise MtmimError(f"--refit-options: {exc}") from None
        with torch.no_grad():
            xid = unit(torch.from_numpy(f))[0].numpy()
            xid_f = unit(torch.from_numpy(ff))[0].numpy() if ff is not None else None
        feats = combine_views(xid, xid_f, flip)
        return P.rank_held_out(feats, ident, held)

    return round_fn


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
        run_dir = finetune([cache.path], m.path, {**options, "out": str(run),
                                                  "exclude": exclude.tolist(), "seed": seed,
                                                  "progress": False, "resume": True})
        model = load_model(_final_checkpoint(Path(run_dir)), None, feat.device)
        return P.rank_held_out(feat.extract(model, cache, idx), ident, held)

    return round_fn


def _final_checkpoint(run_dir: Path) -> Path:
    for name in ("model.pt", "final.pt"):
        if (run_dir / name).exists():
            return run_dir / name
    raise MtmimError(f"{run_dir}: fine-tuning left no model.pt")
