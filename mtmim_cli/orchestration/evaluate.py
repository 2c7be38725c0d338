"""`mtmim evaluate` as a library function: check the config, read the inputs once, score
every model on the protocol (FG-NET with `--refit head|full` through `orchestration.refit`,
everything else through `eval.runners`), then write the tables with their provenance.
The CLI only parses options into an `EvalConfig`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.digest import file_sha256
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import benchmarks
from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.analysis import (
    AnalysisOptions,
    cross_model_analysis,
    model_analysis,
    shared_bins,
)
from mtmim_cli.eval.analysis_tables import analysis_markdown
from mtmim_cli.eval.config import EvalConfig, ModelArg, check_config, variant_text
from mtmim_cli.eval.feature_file import factor_parts, write_feature_file
from mtmim_cli.eval.heldout import check_model, scored_image_digests, scored_indices
from mtmim_cli.eval.inputs import EvalInputs, is_synthetic, open_inputs, pairs_origin_text
from mtmim_cli.eval.loading import load_model
from mtmim_cli.eval.metrics import min_impostors
from mtmim_cli.eval.outcomes import write_outcomes
from mtmim_cli.eval.output_set import output_paths
from mtmim_cli.eval.provenance import file_record, run_header
from mtmim_cli.eval.runners import FeatureOptions, Scored, run_protocol
from mtmim_cli.orchestration.refit import check_refit_options


def evaluate(cfg: EvalConfig, progress: bool = True,
             echo: Callable[[str], None] | None = None) -> dict:
    """Run `cfg.protocol` for every model; write the tables when `cfg.out` is set.
    Returns the results payload (what results.json holds)."""
    from mtmim_cli.eval.tables import markdown_table, write_results

    say = echo or (lambda s: None)
    check_config(cfg)
    check_refit_options(cfg)   # the re-fit's settings too, before any file is read
    if cfg.distractors is not None:   # a table of its own: rank-1 and CMC against N
        from mtmim_cli.orchestration.distractors import evaluate_distractors

        return evaluate_distractors(cfg, progress, echo)
    inputs = open_inputs(cfg)
    files = [file_record(Path(p)) for p in (cfg.cache, cfg.pairs, cfg.meta) if p is not None]
    if inputs.cache is not None:
        files[0]["synthetic"] = is_synthetic(inputs.cache)   # the cache is listed first
    extra: dict = {}
    split_writer = None
    if inputs.split is not None and cfg.split_out is None and cfg.out is not None:
        # one of the output set: named after --out's stem, listed in the manifest
        extra["split_file"] = str(output_paths(cfg.out)["split"])
        split_writer = _split_writer(inputs.split)
    elif inputs.split is not None:
        extra["split_file"] = str(_write_split(cfg, inputs.split, say))
    feat = FeatureOptions(cfg.flip, cfg.batch_size, cfg.device, progress)
    opts = analysis_options(cfg)

    # Every model is checked against the test images before any is scored, so a refused
    # one stops the run before hours of re-fitting.
    digests, names = scored_image_digests(cfg.protocol, inputs)
    feature_idx = scored_indices(cfg.protocol, inputs) if cfg.features else None
    if cfg.features and feature_idx is None:
        raise MtmimError("--features: the scored faces must come from --cache, not a .bin pair list")
    loaded, faces = {}, {}
    for m in cfg.models:
        model = load_model(m.path, m.backbone, cfg.device)
        faces[m.label] = check_model(getattr(model, "meta", None), m.path, digests, names,
                                     cfg.allow_trained_on).to_dict()
        loaded[m.label] = model if cfg.refit == "none" else None  # the re-fit loads its own

    rows, models_info, parts, scored, bins = [], [], {}, [], None
    for m in cfg.models:
        sha = file_sha256(m.path)
        t0 = time.perf_counter()
        model = loaded.pop(m.label)
        results = _score(cfg, inputs, m, sha, files, feat, model)
        if cfg.refit != "none":
            t0 = time.perf_counter()   # each mode's re-fit time comes with it (refit_seconds)
        for label, sc in results.items():
            metrics = sc.metrics
            if not metrics.get("partial"):
                bins = bins if bins is not None else shared_bins(sc, inputs.cache, opts)
                metrics.update(model_analysis(sc, inputs.cache, opts, bins))
            # scoring and analysis; a re-fit mode's own training time comes on top
            metrics["wall_seconds"] = round(time.perf_counter() - t0, 2) + \
                metrics.pop("refit_seconds", 0.0)
            t0 = time.perf_counter()
            if feature_idx is not None and cfg.refit == "none":
                parts[m.label] = _parts_over(sc, feature_idx)
            sc.features = sc.parts = None  # the age probe is done; outcomes are all we keep
            scored.append((label, sc))
            rows.append({"model": label, "metrics": metrics, "test_faces": faces[m.label]})
            say(_summary_line(cfg.protocol, label, metrics))
        if feature_idx is not None and parts.get(m.label) is None:
            # A re-fit scores its rounds' models; the file holds the given model's parts.
            parts[m.label] = factor_parts(model or load_model(m.path, m.backbone, cfg.device),
                                          inputs.cache, feature_idx, cfg.batch_size, cfg.device)
        models_info.append({"label": m.label, "path": str(m.path), "backbone": m.backbone,
                            "sha256": sha})

    verdict = benchmarks.for_run(cfg, inputs)
    if verdict is not None:
        verdict = benchmarks.with_training_overlap(
            verdict, {label: f["trained_on"] for label, f in faces.items()})
    n_images = int(inputs.cache.usable.sum()) if inputs.cache is not None else None
    pairs_text = pairs_origin_text(inputs.pairs) if inputs.pairs is not None else ""
    payload = {
        **run_header(cfg.command),
        "protocol": cfg.protocol, "variant_text": variant_text(cfg, n_images, pairs_text),
        "variant": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                    if k not in ("models", "command", "out")},
        "pairs_origin": inputs.pairs.origin if inputs.pairs is not None else None,
        "benchmark": verdict.to_dict() if verdict is not None else None,
        "inputs": files, "models": models_info, "results": rows, **extra,
    }
    partial = any(r["metrics"].get("partial") for r in rows)
    if not partial:
        comparisons = cross_model_analysis([label for label, _ in scored],
                                           [sc for _, sc in scored], inputs.cache, opts, bins)
        if comparisons:
            payload["comparisons"] = comparisons
    if cfg.out is not None and not partial:
        siblings: dict[str, Callable[[Path], object]] = {}
        if scored and scored[0][1].outcomes:
            siblings["outcomes"] = lambda path: write_outcomes(
                path, cfg.protocol, scored[0][1].context.get("kind", ""),
                {label: sc.outcomes for label, sc in scored})
        if parts:
            siblings["features"] = lambda path: write_feature_file(path, inputs.cache,
                                                                   feature_idx, parts)
        if split_writer is not None:
            siblings["split"] = split_writer
        paths = write_results(cfg.out, payload, siblings)   # results.json, the manifest, last
        say("wrote " + ", ".join(str(p) if k in ("md", "json") else p.name
                                 for k, p in paths.items()))
        if parts:
            say(f"{paths['features'].name}: x_id, x_age of {len(feature_idx)} faces per model")
        if split_writer is not None:
            say(f"{paths['split'].name}: the subject split ({len(inputs.split['train'])} train, "
                f"{len(inputs.split['test'])} test)")
    if not partial:
        say(markdown_table(cfg.protocol, rows, payload["variant_text"], payload["benchmark"]))
        say(analysis_markdown(payload))
    return payload


def _parts_over(sc: Scored, indices) -> dict | None:
    """The scored image view's parts when they cover exactly `indices` (in that order)."""
    if sc.parts is None or sc.rows is None or not np.array_equal(sc.rows, indices):
        return None
    return sc.parts


def analysis_options(cfg: EvalConfig) -> AnalysisOptions:
    return AnalysisOptions(age_edges=tuple(cfg.age_edges), gap_edges=tuple(cfg.gap_edges),
                           resample=cfg.resample, resamples=cfg.resamples, seed=cfg.seed,
                           age_probe=cfg.age_probe, mi_steps=cfg.mi_steps, far=P.FAR_LEVEL)


def _score(cfg: EvalConfig, inputs: EvalInputs, m: ModelArg, model_sha256: str,
           files: list[dict], feat: FeatureOptions, model) -> dict[str, Scored]:
    """Row label -> scored model: one row per model, or per model and re-fit mode
    ("LABEL/baseline", ...) when FG-NET is re-fitted."""
    if cfg.refit != "none":
        from mtmim_cli.orchestration.refit import run_refit

        per_mode = run_refit(cfg, inputs.cache, m, cache_sha256=files[0]["sha256"],  # cache first
                             model_sha256=model_sha256, feat=feat)
        return {f"{m.label}/{mode}": sc for mode, sc in per_mode.items()}
    return {m.label: run_protocol(cfg.protocol, model, inputs, feat, cfg.max_rank)}


def _split_writer(split: dict) -> Callable[[Path], None]:
    return lambda path: atomic_write_text(path, json.dumps(split, indent=1) + "\n")


def _write_split(cfg: EvalConfig, split: dict, say: Callable[[str], None]) -> Path:
    """MORPH: the subject split, written so another tool can train on its other side: at
    --split-out, else (no --out, so no output set) in the working folder."""
    path = cfg.split_out or Path(f"{cfg.protocol}-split-seed{cfg.seed}.json")
    _split_writer(split)(path)
    say(f"subject split written to {path} ({len(split['train'])} train, "
        f"{len(split['test'])} test)")
    return path


def _summary_line(protocol: str, label: str, m: dict) -> str:
    if m.get("partial"):
        return (f"{label}: this shard's rounds done ({m['rounds_done']}/{m['rounds']} rounds "
                "stored); run the other shards, then rerun without --shard to merge")
    secs = f" in {m['wall_seconds']:.1f} s"
    leak = m.get("age_leakage")
    if leak:
        secs += (f"; age probe of its features: group accuracy {100 * leak['age_group_accuracy']:.1f}% "
                 f"(chance {100 * leak['age_group_chance']:.1f}%), R^2 of {leak['age_target']} "
                 f"{leak['age_r2']:.3f} (chance 0)")
        if "infonce_lower" in leak:
            secs += f", InfoNCE I(x_id; x_age) >= {leak['infonce_lower']:.3f} nats"
    if "rank1" in m:
        line = f"{label}: rank-1 {100 * m['rank1']:.2f}% over {m['queries']} queries"
        if m.get("images_without_face"):
            line += (f" ({100 * m['rank1_faces']:.2f}% over the {m['ranked']} with a face; the "
                     f"{m['images_without_face']} without one count as failures)")
        if m.get("stale_rounds"):
            line += (f" ({m['stale_rounds']} of {m['rounds']} rounds made by other code, "
                     "--reuse-stale)")
        return line + secs
    if protocol == "cacd-map":
        maps = ", ".join(f"{k} {100 * m[k]['map']:.2f}" for k in P.CACD_DATABASES)
        return f"{label}: MAP {maps}{secs}"
    return (f"{label}: accuracy {100 * m['accuracy']:.2f} ± {100 * m['std']:.2f}% over "
            f"{m.get('folds_used', '?')} folds{_dropped_text(m)}, {_tar_text(m)}, "
            f"AUC {m['auc']:.4f}{secs}")


def _tar_text(m: dict) -> str:
    """TAR at every FAR the impostors resolve, or the note for the headline FAR when none."""
    entries = [e for e in m.get("tar_at_fars", []) if e["tar_at_far"] is not None]
    if not entries:
        tar = (f"{100 * m['tar_at_far']:.2f}%" if m.get("tar_at_far") is not None
               else m.get("tar_at_far_note", "n/a"))
        return f"TAR@FAR={m['far']:g} {tar}"
    text = ", ".join(f"TAR@FAR={e['far']:g} {100 * e['tar_at_far']:.2f}%" for e in entries)
    unresolved = [e for e in m["tar_at_fars"] if e["tar_at_far"] is None]
    if unresolved:
        text += f" (lower FARs need >= {min_impostors(unresolved[0]['far'])} impostor pairs)"
    return text


def _dropped_text(m: dict) -> str:
    if not m.get("pairs_dropped"):
        return ""
    return (f" ({m['pairs_dropped']} pairs with a photo without a face left out; counted as "
            f"errors: {100 * m['accuracy_all_pairs']:.2f} ± {100 * m['std_all_pairs']:.2f}%)")
