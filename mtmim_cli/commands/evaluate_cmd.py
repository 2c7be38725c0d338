"""`mtmim evaluate`: the field's protocols, written as Markdown tables and results.json."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mtmim_cli.app import app
from mtmim_cli.atomic import ensure_writable
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.flip import FLIP_MODES


@app.command()
def evaluate(
    protocol: str = typer.Option(..., "--protocol", "-p", help="One of the protocols listed above."),
    model: list[str] = typer.Option(..., "--model", "-m",
                                    help="[LABEL=]CHECKPOINT; repeat to compare models."),
    backbone: str = typer.Option(None, "--backbone",
                                 help="Backbone of plain weights; onnx:SPEC for *.onnx."),
    cache: Path = typer.Option(None, "--cache", "-c", help="Aligned HDF5 cache of the test set."),
    pairs: Path = typer.Option(None, "--pairs", help="Pair list: .bin, LFW pairs.txt or CSV."),
    meta: Path = typer.Option(None, "--meta", help="CACD metadata CSV: path,year,test."),
    out: Path = typer.Option(None, "--out", "-o",
                             help="results.md to write (results.json etc. beside it)."),
    flip: str = typer.Option(FLIP_MODES[0], "--flip",
                             help=f"Mirror features: {', '.join(FLIP_MODES)} (concat: the paper)."),
    refit: str = typer.Option("none", "--refit",
                              help="fgnet-loo: none, head or full re-fit per round."),
    folds: int = typer.Option(None, "--folds",
                              help="fgnet-loo re-fit: K grouped rounds (default: one per image)."),
    shard: str = typer.Option(None, "--shard", help="I/N: only the rounds r with r mod N == I."),
    merge: bool = typer.Option(False, "--merge", help="Only merge rounds already stored."),
    reuse_stale: bool = typer.Option(False, "--reuse-stale",
                                     help="Use stored rounds made by other code (flagged)."),
    rounds_dir: Path = typer.Option(None, "--rounds-dir",
                                    help="Where rounds are stored (default: rounds/ by --out)."),
    refit_modes: str = typer.Option("", "--refit-modes",
                                    help="Re-fit modes, comma-separated (default: all three)."),
    recipe: str = typer.Option(None, "--recipe",
                               help="--refit full: a `mtmim finetune` recipe (e.g. small)."),
    refit_options: str = typer.Option("{}", "--refit-options",
                                      help="JSON dict of re-fit settings (see above)."),
    seed: int = typer.Option(0, "--seed", help="Seed of pairs, subject splits and rounds."),
    n_pairs: int = typer.Option(6000, "--n-pairs", help="Pairs to draw without --pairs."),
    min_gap: float = typer.Option(0.0, "--min-gap", help="Minimum age gap of drawn pairs."),
    test_subjects: int = typer.Option(None, "--test-subjects",
                                      help="MORPH test subjects (s1: 10,000, s2: 3,000)."),
    train_subjects: int = typer.Option(None, "--train-subjects",
                                       help="MORPH training subjects (s2: 10,000)."),
    split_out: Path = typer.Option(None, "--split-out",
                                   help="MORPH: subject split JSON (default: <stem>.split.json by --out)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1,
                                    help="Images per forward pass with their mirrors (default: sized to the model)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    max_rank: int = typer.Option(20, "--max-rank", help="Longest rank of the CMC curve."),
    allow_trained_on: bool = typer.Option(
        False, "--allow-trained-on",
        help="Score models fitted on test faces (flagged)."),
    features: bool = typer.Option(False, "--features",
                                  help="Also write <stem>.features.npz (x_id, x_age) by --out."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch."),
    resample: str = typer.Option("identity", "--resample",
                                 help="Bootstrap unit: identity, probe (or fold: pairs)."),
    resamples: int = typer.Option(10_000, "--resamples", help="Bootstrap resamples (seeded)."),
    age_bins: str = typer.Option("0,6,11,16,21,31", "--age-bins",
                                 help="Lower edges (years) of the probe age groups."),
    gap_bins: str = typer.Option("0,6,11,21", "--gap-bins",
                                 help="Lower edges (years) of the age gap bins."),
    age_probe: bool = typer.Option(True, "--age-probe/--no-age-probe",
                                   help="Probe the identity features for age."),
    mi_steps: int = typer.Option(0, "--mi-steps",
                                 help="InfoNCE steps for I(x_id; x_age), e.g. 2000 (0: skip)."),
    distractors: Path = typer.Option(None, "--distractors",
                                     help="fgnet-loo: a cache of other people's faces added to the gallery."),
    distractor_counts: str = typer.Option(None, "--distractor-counts",
                                          help="Distractor counts N, e.g. 10,100,1000 (default: powers of 10)."),
    distractor_index: str = typer.Option("auto", "--distractor-index",
                                         help="exact, ivf, hnsw, ivfpq; auto: exact unless > 40,000 probes and > 100,000 distractors (then hnsw)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Evaluate one or more models on a protocol; print and write the result tables.

    \b
    Protocols:
      fgnet-loo           leave-one-out rank-1 (every photo against all others)
      morph-s1, morph-s2  rank-1 of each subject's largest-age-gap probe/gallery
      cacd-map            MAP per database (needs --meta)
      cacd-vs, agedb30, lfw, calfw, pairs
                          10-fold verification from --pairs (.bin, LFW pairs.txt
                          or CSV path_a,path_b,same[,fold] of the cache's paths);
                          with --cache alone, seeded cross-age pairs; cacd-vs:
                          the pairs and folds of a --format cacd-vs cache

    Models: ours, released weights (a plain state dict such as an insightface backbone.pth
    needs --backbone) or a *.onnx face encoder (--backbone onnx:CHANNELS[,MEAN,STD]; default
    rgb, scaling from the graph, else 127.5,127.5). Several --model give paired intervals and
    McNemar p for every pair; labels SETTING@SEED (mtmim@s0, mtmim@s1) group checkpoints of
    one setting into mean and sd over seeds, and settings are compared.

    FG-NET re-fit (--refit): head re-fits the factorization and heads on cached encoder
    features per round; full fine-tunes the whole model per round (--recipe and
    --refit-options: the options of `mtmim finetune`, e.g. '{"epochs": 2}'; for head: epochs,
    batch_size, lr, s, m, margin, factorize_gain, centres, age_groups, lambda_age,
    lambda_mim, q_hidden, q_steps, q_lr, rounds_per_chunk). Each mode (default baseline, age,
    mtmim: the paper's rows) runs over the same rounds and seeds. Rounds are stored and
    reused on resume; --shard I/N splits them over processes and a run without --shard (or
    with --merge) merges them. Stored rounds made by other code are refused unless
    --reuse-stale, which flags them in the tables.

    A model whose recorded training data (or a remove-age subspace's fitting faces) holds
    test images is refused; --allow-trained-on scores it and the tables say how many.
    --distractors D.h5 (fgnet-loo): every FG-NET photo against the other FG-NET photos plus
    N faces of D.h5, for each N of --distractor-counts (nested subsets drawn with --seed):
    rank-1 and CMC against N in results.md and distractors.png; the table says which N used
    the exact scan and which an index (with its recall@1).
    Intervals: --resample identity is a cluster bootstrap (a person's probes move together);
    verification resamples pairs, or whole folds with --resample fold. The age probe fits identity-grouped linear probes of age
    group and log(1+age) on the identity features (caches with ages).
    """
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
    if recipe is not None:   # the recipe's name is checked with the other re-fit settings
        if refit != "full":
            raise MtmimError(f"--recipe {recipe}: applies to --refit full (each round fine-tunes)")
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
        distractors=distractors, distractor_counts=distractor_counts,
        distractor_index=distractor_index,
    )
    run_evaluate(cfg, progress=not quiet, echo=typer.echo)
