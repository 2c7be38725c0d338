"""Fine-tuning judged on people it never saw: the open-set check of issue 10, through the
toolkit's own `finetune` and `evaluate`.

From the shared CASIA MobileFaceNet, fine-tune on FG-NET's training subjects (the fixed
split in open-set.json, or, with --val-fold K, 45 of subjects 1-60 with the other 15 held
out for validation) once per setting and seed, then evaluate every model and the
pretrained one on the held-out FG-NET subjects (leave-one-out rank-1 within them, paired
comparisons, age-leakage probe, InfoNCE and CLUB between x_id and x_age) and on the held-out
CelebA identities (rank-1 within them: what the fine-tune forgot of general faces).

A setting is a mode plus optional fine-tune options, written NAME=MODE[:JSON], e.g.
  baseline=baseline  mtmim=mtmim  paper-mim=mtmim:{"mi_target":"features"}
Runs are kept in --out and reused when rerun (a killed run resumes) if the same settings,
split and code made them (bench/_runs.py; --reuse-stale also takes runs of other code, and
the table counts them).

    .venv/bin/python bench/open_set.py --out runs/openset --seeds 0,1,2
    .venv/bin/python bench/open_set.py --out runs/sweep --val-fold 0 --seeds 0 \\
        --setting 'l0=mtmim:{"lambda_mim":0}' --setting 'l1e-2=mtmim:{"lambda_mim":0.01}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._runs import reusable, write_settings  # noqa: E402


def _settings(texts: list[str]) -> list[tuple[str, str, dict]]:
    out = []
    for t in texts:
        name, _, rest = t.partition("=")
        mode, _, js = rest.partition(":")
        out.append((name, mode, json.loads(js) if js else {}))
    return out


def _val_split(split: dict, fold: int, folds: int = 4, seed: int = 12345) -> dict:
    """Validation carved out of the train side: `folds` seeded groups of its subjects
    (and CelebA identities); fold K is held out, the rest train."""
    rng = np.random.default_rng(seed)
    fg = rng.permutation(split["fgnet"]["train_subjects"])
    cb = rng.permutation(split["celeba_subset"]["train_identities"])
    fg_val, cb_val = np.array_split(fg, folds)[fold], np.array_split(cb, folds)[fold]
    return {"fgnet": {"train_subjects": sorted(int(s) for s in fg if s not in fg_val),
                      "test_subjects": sorted(int(s) for s in fg_val)},
            "celeba_subset": {"train_identities": sorted(str(s) for s in cb if s not in cb_val),
                              "test_identities": sorted(str(s) for s in cb_val)}}


def _run_inputs(paths: dict[str, str | Path]) -> dict:
    """What the settings name only by path (the training cache, the init weights, the split
    file, a replay cache): their contents' sha256."""
    from mtmim_cli.digest import file_sha256

    return {f"{name}_sha256": file_sha256(p) for name, p in paths.items()}


def _subset_key(cache: str | Path, identities: list[str]) -> str:
    """12 hex digits naming a test subset by what it holds (the source cache's content and
    the identities kept), so another split or fold in the same --out never reuses it."""
    import hashlib

    from mtmim_cli.digest import file_sha256

    text = json.dumps({"cache": file_sha256(cache), "identities": sorted(identities)})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from mtmim_cli.paths import shared_dir

    shared = shared_dir()
    ap.add_argument("--fgnet", default="fgnet.h5", help="aligned FG-NET cache (all 1002 photos)")
    ap.add_argument("--celeba", default="celeba.h5", help="aligned CelebA-subset cache")
    ap.add_argument("--split", default=str(shared / "data/splits/open-set.json"))
    ap.add_argument("--init", default=str(shared / "weights/mobilefacenet-casia-arcface.ckpt"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--setting", action="append", default=[],
                    help="NAME=MODE[:JSON] (repeat); default: baseline, age, mtmim")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipe", default="small")
    ap.add_argument("--options", default="{}", help="JSON options for every fine-tune")
    ap.add_argument("--replay", action="store_true",
                    help="replay the CelebA training identities in every batch")
    ap.add_argument("--val-fold", type=int, default=None,
                    help="validation: hold out fold K (0-3) of the training subjects instead "
                         "of using the test subjects")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mi-steps", type=int, default=1000)
    ap.add_argument("--activations", default=None,
                    help="folder of frozen-trunk activations (default OUT/activations); they are "
                         "keyed by trunk weights, images and stage, so --out folders may share one")
    ap.add_argument("--reuse-stale", action="store_true",
                    help="reuse finished runs made by other code (the table says which)")
    ap.add_argument("--allow-trained-on", action="store_true",
                    help="score models whose training images include a test image (e.g. "
                         "replay of CelebA photos duplicated under two identities); the "
                         "full tables say how many")
    a = ap.parse_args()
    from mtmim_cli.threads import passive_openmp

    passive_openmp()   # as `mtmim` does, before torch loads

    from mtmim_cli.atomic import atomic_write_text
    from mtmim_cli.data.subset import subset_cache
    from mtmim_cli.eval.config import EvalConfig, ModelArg
    from mtmim_cli.orchestration.auto_recipe import auto_finetune
    from mtmim_cli.orchestration.evaluate import evaluate
    from mtmim_cli.threads import set_torch_threads
    from mtmim_cli.train.finetune import finetune
    from mtmim_cli.train.finetune_options import resolved_settings

    set_torch_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    split = json.loads(Path(a.split).read_text())
    if a.val_fold is not None:
        split = _val_split(split, a.val_fold)
    split_path = out / "split.json"
    atomic_write_text(split_path, json.dumps(split, indent=1))
    inputs = _run_inputs({"fgnet": a.fgnet, "init": a.init, "split": split_path,
                          **({"replay": a.celeba} if a.replay else {})})
    settings = _settings(a.setting) or [("baseline", "baseline", {}), ("age", "age", {}),
                                        ("mtmim", "mtmim", {})]
    seeds = [int(s) for s in a.seeds.split(",")]
    print(f"split: FG-NET train {len(split['fgnet']['train_subjects'])} subjects, test "
          f"{len(split['fgnet']['test_subjects'])}; CelebA test "
          f"{len(split['celeba_subset']['test_identities'])} identities"
          + (f" (validation fold {a.val_fold} of the train side)" if a.val_fold is not None
             else " (the fixed test side)"), flush=True)

    tests = {}
    for name, cache, key in (("fgnet", a.fgnet, "fgnet.test_subjects"),
                             ("celeba", a.celeba, "celeba_subset.test_identities")):
        node = split
        for part in key.split("."):
            node = node[part]
        wanted = [str(v) for v in node]
        path = out / f"{name}_test-{_subset_key(cache, wanted)}.h5"
        if not path.exists():
            subset_cache(cache, path, wanted, progress=False)
        tests[name] = path

    models = [ModelArg("pretrained", Path(a.init))]
    base_opts = {"recipe": a.recipe, **json.loads(a.options),
                 "train_identities": f"@{split_path}:fgnet.train_subjects",
                 "activation_cache": str(a.activations or out / "activations"), "progress": False,
                 "resume": True}
    if a.replay:
        base_opts.update(replay=[a.celeba],
                         replay_identities=f"@{split_path}:celeba_subset.train_identities")
    stale: set[str] = set()
    for name, mode, opts in settings:
        for seed in seeds:
            run = out / "runs" / f"{name}-s{seed}"
            t0 = time.perf_counter()
            run_opts = {**base_opts, **opts, "mode": mode, "seed": seed, "out": str(run)}
            if run_opts.get("recipe") != "auto":   # a named recipe beside auto ones: no search
                run_opts.pop("auto_guard", None)
            state = reusable(run, resolved_settings(run_opts), inputs, a.reuse_stale)
            if state is None and run_opts.get("recipe") == "auto":
                # A search over fine-tunes on validation folds of the training subjects.
                auto_finetune([a.fgnet], a.init, run_opts, echo=print)
                write_settings(run, resolved_settings(run_opts), inputs)
            elif state is None:
                finetune([a.fgnet], a.init, run_opts)
                write_settings(run, resolved_settings(run_opts), inputs)
            elif state == "stale":
                stale.add(f"{name}@s{seed}")
            print(f"{name} seed {seed}: {run / 'model.pt'} ({time.perf_counter() - t0:.0f} s"
                  f"{'; made by other code, reused under --reuse-stale' if state == 'stale' else ''})",
                  flush=True)
            models.append(ModelArg(f"{name}@s{seed}", run / "model.pt"))

    payloads = {}
    for name, path in tests.items():
        cfg = EvalConfig(protocol="fgnet-loo", models=models, cache=path,
                         out=out / f"eval-{name}" / "results.md", mi_steps=a.mi_steps,
                         allow_trained_on=a.allow_trained_on, command=" ".join(sys.argv))
        payloads[name] = evaluate(cfg, progress=False)
        print(f"{name}: full tables in {out / f'eval-{name}' / 'results.md'}", flush=True)
    print(summary(payloads, "the validation fold" if a.val_fold is not None else "the test side",
                  reference=settings[0][0], stale=stale))


def summary(payloads: dict[str, dict], side: str, reference: str = "baseline",
            stale: set[str] = frozenset()) -> str:
    """One row per setting (mean ± sd over its seeds): rank-1 on the held-out FG-NET and
    CelebA identities, and the age leakage of its identity features on FG-NET; then each
    setting against the pretrained model and against the reference setting (the first
    --setting: the baseline, or lambda 0 in a sweep), paired (95% interval, identities and
    seeds resampled). Models in `stale` (LABEL@sK) were made by other code and reused under
    --reuse-stale: their setting's Seeds cell counts them."""
    fg, cb = payloads["fgnet"], payloads["celeba"]
    by_setting: dict[str, list[dict]] = {}
    for r_fg, r_cb in zip(fg["results"], cb["results"], strict=True):
        by_setting.setdefault(r_fg["model"].split("@")[0], []).append(
            {"fg": r_fg["metrics"]["rank1"], "cb": r_cb["metrics"]["rank1"],
             **{k: r_fg["metrics"].get("age_leakage", {}).get(k, np.nan)
                for k in ("age_r2", "age_group_accuracy", "infonce_lower", "club_upper")}})

    def ms(vals: list[float], scale: float = 100.0, digits: int = 2) -> str:
        v = np.array(vals, float) * scale
        if np.isnan(v).all():
            return "–"
        return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")

    lines = [f"Held-out identities of {side}; mean ± sd over seeds.", "",
             "| Setting | Seeds | FG-NET rank-1 % | CelebA rank-1 % | Age R² (x_id) | "
             "Age group acc. % | InfoNCE I(x_id;x_age) | CLUB |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in by_setting.items():
        old = sum(1 for m in stale if m.split("@")[0] == name)
        seeds = f"{len(rows)}" + (f", {old} made by other code (--reuse-stale)" if old else "")
        lines.append(f"| {name} | {seeds} | {ms([r['fg'] for r in rows])} | "
                     f"{ms([r['cb'] for r in rows])} | {ms([r['age_r2'] for r in rows], 1, 3)} | "
                     f"{ms([r['age_group_accuracy'] for r in rows], 100, 1)} | "
                     f"{ms([r['infonce_lower'] for r in rows], 1, 2)} | "
                     f"{ms([r['club_upper'] for r in rows], 1, 0)} |")
    seen = [f"{test}: {r['model']} trained on {r['test_faces']['trained_on']} of its "
            f"{r['test_faces']['test_images']} test photos (--allow-trained-on)"
            for test, payload in (("FG-NET", fg), ("CelebA", cb)) for r in payload["results"]
            if r.get("test_faces", {}).get("trained_on")]
    lines += [""] + seen if seen else []
    lines += ["", "| Test | A | B | A − B (points) | 95% interval |", "|---|---|---|---|---|"]
    for test, payload in (("FG-NET", fg), ("CelebA", cb)):
        for p in (payload.get("comparisons") or {}).get("pairs", []):
            # the pairs come as (earlier, later) settings; shown as later - earlier
            if p["a"] in ("pretrained", reference):
                lines.append(f"| {test} | {p['b']} | {p['a']} | {-100 * p['diff']:+.2f} | "
                             f"[{-100 * p['high']:+.2f}, {-100 * p['low']:+.2f}] |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
