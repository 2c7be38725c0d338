"""`evaluate --protocol fgnet-loo --distractors D.h5`: the FG-NET cache and the distractor
cache embedded once per model, then `eval.distractors` scores every N; results.md (the
table), results.distractors.png and, last, results.json (the manifest) beside it, each
named after --out's stem."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.digest import file_sha256
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import distractors as D
from mtmim_cli.eval.config import EvalConfig
from mtmim_cli.eval.loading import load_model
from mtmim_cli.eval.provenance import file_record, run_header
from mtmim_cli.eval.runners import FeatureOptions, image_counts


def evaluate_distractors(cfg: EvalConfig, progress: bool = True,
                         echo: Callable[[str], None] | None = None) -> dict:
    from mtmim_cli.data.cache import Cache

    say = echo or (lambda s: None)
    if cfg.protocol != "fgnet-loo" or cfg.refit != "none":
        raise MtmimError("--distractors: applies to --protocol fgnet-loo without --refit")
    if cfg.cache is None:
        raise MtmimError("fgnet-loo: needs --cache")
    for p in (cfg.cache, cfg.distractors):
        if not Path(p).is_file():
            raise MtmimError(f"{p}: no such file")
    cache, dcache = Cache(cfg.cache), Cache(cfg.distractors)
    idx = np.flatnonzero(cache.usable)
    didx = np.flatnonzero(dcache.usable)
    if not len(didx):
        raise MtmimError(f"{cfg.distractors}: no distractor record holds a face")
    counts = D.parse_counts(cfg.distractor_counts, len(didx))
    order = didx[D.nested_order(len(didx), cfg.seed)]
    feat = FeatureOptions(cfg.flip, cfg.batch_size, cfg.device, progress)
    n_all = len(cache)
    scale = len(idx) / n_all
    per_model, models_info = {}, []
    for m in cfg.models:
        t0 = time.perf_counter()
        model = load_model(m.path, m.backbone, cfg.device)
        f = feat.extract(model, cache, idx)
        # only as many distractors as the largest N: in join order, so subset N is f_d[:N]
        fd = feat.extract(model, dcache, order[:max(counts)]) if max(counts) else \
            np.zeros((0, f.shape[1]), np.float32)
        rows = D.score_with_distractors(f, cache.identity[idx], fd, counts,
                                        max_rank=cfg.max_rank, index=cfg.distractor_index,
                                        seed=cfg.seed)
        for r in rows:   # FG-NET's figure is over all its photos (a faceless one fails)
            r["cmc"] = [c * scale for c in r["cmc"]]
            r["rank1"] = r["cmc"][0]
        per_model[m.label] = rows
        models_info.append({"label": m.label, "path": str(m.path), "backbone": m.backbone,
                            "sha256": file_sha256(m.path),
                            "wall_seconds": round(time.perf_counter() - t0, 2)})
        for r in rows:
            say(f"{m.label}: N={r['distractors']:,} rank-1 {100 * r['rank1']:.2f}% "
                f"({D._search_text(r)})")
    table = D.markdown(per_model, len(idx), n_all, Path(cfg.distractors).name)
    payload = {**run_header(cfg.command), "protocol": "fgnet-loo+distractors",
               "inputs": [file_record(cfg.cache), file_record(cfg.distractors)],
               "distractors_available": int(len(didx)), "seed": cfg.seed, "counts": counts,
               "images": image_counts(cache), "models": models_info,
               "results": {label: [{k: v for k, v in r.items() if k != "rank"} for r in rows]
                           for label, rows in per_model.items()}}
    if cfg.out is not None:
        from mtmim_cli.eval.output_set import output_paths, write_output_set

        out = Path(cfg.out)
        png = output_paths(out)["png"]   # named after --out's stem, like every output
        md = ["# mtmim evaluate: fgnet-loo with distractors", "",
              f"Command: `{payload['command']}`  ",
              "Caches: " + ", ".join(f"`{c['path']}` (sha256 {c['sha256'][:12]})"
                                     for c in payload["inputs"]), "", table,
              f"![rank-1 against N]({png.name})", ""]
        paths = write_output_set(out, payload, {
            "png": lambda p: D.plot(p, per_model),
            "md": lambda p: atomic_write_text(p, "\n".join(md))})   # the manifest last
        say(f"wrote {out}, " + ", ".join(p.name for k, p in paths.items() if k != "md"))
    say(table)
    return payload
