"""`mtmim evaluate`: the field's protocols, written as Markdown tables and results.json."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mtmim_cli.app import app
from mtmim_cli.atomic import ensure_writable
from mtmim_cli.errors import MtmimError

_PROTOCOL_HELP = (
    "fgnet-loo (leave-one-out rank-1), morph-s1 / morph-s2 (largest-age-gap probe vs gallery "
    "rank-1), cacd-map (MAP per database; needs --meta), cacd-vs / agedb30 / lfw / calfw / pairs "
    "(10-fold verification from --pairs .bin or .csv; with --cache alone, seeded cross-age pairs)."
)


@app.command()
def evaluate(
    protocol: str = typer.Option(..., "--protocol", "-p", help=_PROTOCOL_HELP),
    model: list[str] = typer.Option(..., "--model", "-m",
                                    help="[LABEL=]CHECKPOINT (ours, released weights, or a *.onnx face encoder); repeat to compare models side by side "
                                         "(e.g. --model baseline=a.pt --model mtmim=b.pt): every pair "
                                         "gets a paired interval and McNemar p. Labels "
                                         "SETTING@SEED (mtmim@s0, mtmim@s1) group checkpoints of "
                                         "one setting: mean and sd over seeds, settings compared."),
    backbone: str = typer.Option(None, "--backbone",
                                 help="Backbone name for plain state dicts such as an insightface "
                                      "backbone.pth (our checkpoints record it); for a *.onnx "
                                      "model, onnx:CHANNELS[,MEAN,STD] gives its input (default "
                                      "rgb; scaling read from the graph, else 127.5,127.5)."),
    cache: Path = typer.Option(None, "--cache", "-c", help="Aligned HDF5 cache of the test set."),
    pairs: Path = typer.Option(None, "--pairs",
                               help="Pair list: insightface .bin (images inside), LFW pairs.txt, "
                                    "or CSV with path_a,path_b,same[,fold] matching the cache's paths."),
    meta: Path = typer.Option(None, "--meta", help="CACD metadata CSV: path,year,test."),
    out: Path = typer.Option(None, "--out", "-o",
                             help="results.md to write; results.json, cmc.csv and roc.csv go beside it."),
    flip: str = typer.Option("concat", "--flip",
                             help="Mirror features: concat (the paper), sum, or none."),
    refit: str = typer.Option("none", "--refit",
                              help="fgnet-loo only: none (the model as given), head (re-fit the "
                                   "factorization and heads on cached encoder features per round), "
                                   "full (fine-tune the whole model per round)."),
    folds: int = typer.Option(None, "--folds",
                              help="fgnet-loo refit: K grouped rounds instead of one per image "
                                   "(K = 1002 is exact)."),
    shard: str = typer.Option(None, "--shard",
                              help="I/N: run only rounds r with r mod N == I; rerun without "
                                   "--shard (or with --merge) to merge the stored rounds."),
    merge: bool = typer.Option(False, "--merge",
                               help="Only merge rounds already stored (fails if any is missing)."),
    reuse_stale: bool = typer.Option(False, "--reuse-stale",
                                     help="Use stored rounds made by other code (flagged)."),
    rounds_dir: Path = typer.Option(None, "--rounds-dir",
                                    help="Where per-round results are stored (default: rounds/ "
                                         "beside --out); reused on resume."),
    refit_modes: str = typer.Option("", "--refit-modes",
                                    help="fgnet-loo refit: comma-separated modes, each re-fitted over the "
                                         "same rounds and seeds and reported as its own row "
                                         "(default baseline,age,mtmim: the paper's ablation rows)."),
    recipe: str = typer.Option(None, "--recipe",
                               help="fgnet-loo --refit full: fine-tune each round with this named "
                                    "bundle of `mtmim finetune` settings (e.g. small; see "
                                    "`mtmim finetune --help`); --refit-options override it."),
    refit_options: str = typer.Option("{}", "--refit-options",
                                      help="JSON dict of re-fit settings. head: epochs, batch_size, "
                                           "lr, s, m, margin, factorize_gain, centres, age_groups, "
                                           "lambda_age, lambda_mim, q_hidden, q_steps, q_lr, "
                                           "rounds_per_chunk (train/round_heads.py); full: the "
                                           "options of `mtmim finetune` (e.g. '{\"epochs\": 2}')."),
    seed: int = typer.Option(0, "--seed", help="Seed for pairs, subject splits and round groups."),
    n_pairs: int = typer.Option(6000, "--n-pairs",
                                help="Pairs to draw when --cache is given without --pairs."),
    min_gap: float = typer.Option(0.0, "--min-gap",
                                  help="Minimum age gap (years) of drawn pairs."),
    test_subjects: int = typer.Option(None, "--test-subjects",
                                      help="MORPH: test subjects (default 10,000 for s1, 3,000 for s2)."),
    train_subjects: int = typer.Option(None, "--train-subjects",
                                       help="MORPH: training subjects (default: s2 10,000, s1 the rest)."),
    split_out: Path = typer.Option(None, "--split-out",
                                   help="MORPH: where to write the subject split (JSON)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Images per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    max_rank: int = typer.Option(20, "--max-rank", help="Longest rank of the CMC curve."),
    allow_trained_on: bool = typer.Option(
        False, "--allow-trained-on",
        help="Score a model even when its recorded training data holds test images (it is "
             "refused otherwise); the tables then say how many it trained on."),
    features: bool = typer.Option(
        False, "--features",
        help="Also write features.npz beside --out: each model's x_id (and x_age for a "
             "fine-tuned, factorized model) on the scored faces, for `mtmim report`'s "
             "projections."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: one per core)."),
    resample: str = typer.Option("identity", "--resample",
                                 help="Bootstrap unit of identification intervals: identity "
                                      "(a cluster bootstrap: a person's probes move together) or "
                                      "probe. Verification always resamples pairs."),
    resamples: int = typer.Option(10_000, "--resamples", help="Bootstrap resamples (seeded by --seed)."),
    age_bins: str = typer.Option("0,6,11,16,21,31", "--age-bins",
                                 help="Lower edges (years) of the probe age groups; the last is "
                                      "open (default FG-NET's 0-5, 6-10, 11-15, 16-20, 21-30, 31+)."),
    gap_bins: str = typer.Option("0,6,11,21", "--gap-bins",
                                 help="Lower edges (years) of the age gap bins (default 0-5, 6-10, "
                                      "11-20, 21+)."),
    age_probe: bool = typer.Option(True, "--age-probe/--no-age-probe",
                                   help="Measure age leakage: identity-grouped cross-validated "
                                        "linear probes of age group and log(1+age) from the "
                                        "identity features (caches with ages)."),
    mi_steps: int = typer.Option(2000, "--mi-steps",
                                 help="Training steps of the InfoNCE estimator of I(x_id; x_age) "
                                      "for factorized models (0: skip it)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Evaluate one or more models on a protocol; print and write the result tables."""
    for path, option in ((out, "--out"), (split_out, "--split-out")):
        if path is not None:
            ensure_writable(path, option=option)
    if rounds_dir is not None:
        ensure_writable(rounds_dir, folder=True, option="--rounds-dir")

    from mtmim_cli.eval.agebins import parse_edges
    from mtmim_cli.eval.config import EvalConfig, parse_model_arg
    from mtmim_cli.eval.provenance import command_line
    from mtmim_cli.orchestration.evaluate import evaluate as run_evaluate
    from mtmim_cli.threads import set_torch_threads

    try:
        opts = json.loads(refit_options)
    except json.JSONDecodeError as exc:
        raise MtmimError(f"--refit-options: not JSON ({exc})") from None
    if not isinstance(opts, dict):
        raise MtmimError("--refit-options: must be a JSON object")
    if flip not in ("concat", "sum", "none"):
        raise MtmimError(f"--flip {flip}: choose concat, sum or none")
    if recipe is not None:
        from mtmim_cli.train.finetune_options import RECIPES

        if refit != "full":
            raise MtmimError(f"--recipe {recipe}: applies to --refit full (each round fine-tunes)")
        if recipe not in RECIPES:
            raise MtmimError(f"--recipe {recipe}: choose from {', '.join(RECIPES)}")
        opts = {"recipe": recipe, **opts}
    set_torch_threads(threads)
    cfg = EvalConfig(
        protocol=protocol, models=[parse_model_arg(m, backbone) for m in model], cache=cache,
        pairs=pairs, meta=meta, out=out, flip=flip, refit=refit, folds=folds, shard=shard,
        rounds_dir=rounds_dir, merge_only=merge, reuse_stale=reuse_stale, seed=seed, batch_size=batch_size, device=device,
        max_rank=max_rank, n_pairs=n_pairs, min_gap=min_gap, test_subjects=test_subjects,
        train_subjects=train_subjects, split_out=split_out, refit_options=opts,
        refit_modes=tuple(x.strip() for x in refit_modes.split(",") if x.strip()),
        allow_trained_on=allow_trained_on, features=features, command=command_line(),
        resample=resample, resamples=resamples, age_edges=parse_edges(age_bins, "--age-bins"),
        gap_edges=parse_edges(gap_bins, "--gap-bins"), age_probe=age_probe, mi_steps=mi_steps,
    )
    run_evaluate(cfg, progress=not quiet, echo=typer.echo)
