"""`mtmim groups` and `mtmim finetune` (torch and h5py are imported inside the commands)."""

from __future__ import annotations

from pathlib import Path

import typer

from mtmim_cli.app import app
from mtmim_cli.atomic import ensure_writable
from mtmim_cli.commands.finetune_help import finetune_text, show_recipes
from mtmim_cli.commands.given import given_settings
from mtmim_cli.train.finetune_options import default as D


@app.command()
def groups(
    caches: list[Path] = typer.Argument(..., help="Training caches with ages (from `mtmim align`)."),
    k: int = typer.Option(8, "--k", help="Number of equal-frequency age groups (the paper uses 8 to 10)."),
) -> None:
    """Print the K equal-frequency age groups of the caches: boundary ages and image counts."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.data.groups import equal_frequency_groups, group_table
    from mtmim_cli.errors import MtmimError

    ages = np.concatenate([c.age[c.usable] for c in (Cache(p) for p in caches)])
    try:
        boundaries = equal_frequency_groups(ages, k)
    except ValueError as exc:
        raise MtmimError(f"{caches[0]}: {exc}") from None
    table = Table(title=f"{k} equal-frequency age groups over {int(np.isfinite(ages).sum())} images "
                        f"of known age ({int((~np.isfinite(ages)).sum())} unknown, no age loss)")
    for col in ("group", "ages from", "ages below", "youngest", "oldest", "images"):
        table.add_column(col, justify="right")
    for r in group_table(ages, boundaries):
        table.add_row(str(r["group"]), _age(r["from"]), _age(r["to"]), _age(r["min_age"]),
                      _age(r["max_age"]), str(r["count"]))
    Console().print(table)
    Console().print("boundaries: " + ", ".join(f"{b:g}" for b in boundaries))


def _age(v: float) -> str:
    return "-" if v != v or abs(v) == float("inf") else f"{v:g}"


# Options whose library name differs from the option's.
_LIBRARY_NAME = {"scale": "s", "margin_m": "m"}
_NOT_SETTINGS = ("caches", "init", "threads", "help_recipes")


@app.command(help=finetune_text())
def finetune(
    ctx: typer.Context,
    caches: list[Path] = typer.Argument(..., help="Training caches with ages (from `mtmim align`)."),
    init: Path = typer.Option(None, "--init", help="Start from: ours, MobileFaceNet, a backbone.pth or a *.onnx."),
    backbone: str = typer.Option(D("backbone"), "--backbone", help="Encoder name (read from --init when it records one)."),
    embedding_size: int = typer.Option(D("embedding_size"), "--embedding-size", help="Embedding size of a fresh encoder (default: native)."),
    mode: str = typer.Option(D("mode"), "--mode", help="baseline, age or mtmim: the paper's ablation rows."),
    out: Path = typer.Option(Path(D("out")), "--out", "-o", help="Run folder (config.json, metrics.csv, model.pt, ...)."),
    age_groups: int = typer.Option(D("age_groups"), "--age-groups", help="K equal-frequency age groups from the training ages."),
    lambda_age: float = typer.Option(D("lambda_age"), "--lambda-age", help="Weight of the age-group loss."),
    lambda_mim: float = typer.Option(D("lambda_mim"), "--lambda-mim", help="Weight of the mutual-information penalty."),
    q_steps: int = typer.Option(D("q_steps"), "--q-steps", help="Steps of q after each encoder step."),
    q_lr: float = typer.Option(D("q_lr"), "--q-lr", help="Adam learning rate of q."),
    q_hidden: int = typer.Option(D("q_hidden"), "--q-hidden", help="Hidden units of q's MLPs."),
    mi_target: str = typer.Option(D("mi_target"), "--mi-target", help="MI penalty against: features, age-group or lautum."),
    logvar_bound: float = typer.Option(D("logvar_bound"), "--logvar-bound", help="q's log-variance bound B (variance in e^-B..e^B)."),
    factorize_gain: float = typer.Option(D("factorize_gain"), "--factorize-gain", help="Initial scale of x_age relative to x."),
    margin: str = typer.Option(D("margin"), "--margin", help="Identity head: arcface (the paper), cosface, sphereface."),
    scale: float = typer.Option(D("s"), "--scale", help="Logit scale s of the margin head."),
    margin_m: float = typer.Option(D("m"), "--margin-m", help="Margin (default 0.35 for arcface/cosface)."),
    epochs: int = typer.Option(D("epochs"), "--epochs", help="Passes over the training data."),
    batch_size: int = typer.Option(D("batch_size"), "--batch-size", help="Global batch (the paper: 400)."),
    lr: float = typer.Option(D("lr"), "--lr", help="Adam learning rate (the paper: 0.02)."),
    weight_decay: float = typer.Option(D("weight_decay"), "--weight-decay", help="Weight decay of the main optimiser."),
    schedule: str = typer.Option(D("schedule"), "--schedule", help="plateau (the paper), poly, cosine or constant."),
    plateau_patience: int = typer.Option(D("plateau_patience"), "--plateau-patience", help="Epochs without improvement before the lr drops."),
    identities: str = typer.Option(D("identities"), "--identities", help="Identity names across caches: auto, by-name, per-cache."),
    partial_fc: float = typer.Option(D("partial_fc"), "--partial-fc", metavar="RATE", help="Partial FC share of class centres per step (0 = off)."),
    amp: str = typer.Option(D("amp"), "--amp", help="Mixed precision: none, bf16, fp16 (CUDA)."),
    clip_grad: float = typer.Option(D("clip_grad"), "--clip-grad", help="Clip the global gradient norm (0 = off)."),
    seed: int = typer.Option(D("seed"), "--seed", help="Seed of the new layers, sampling and flips."),
    workers: int = typer.Option(D("workers"), "--workers", help="DataLoader workers per process (-1: automatic)."),
    accumulate: int = typer.Option(D("accumulate"), "--accumulate", help="Micro-batches per global batch (memory / N)."),
    max_steps: int = typer.Option(D("max_steps"), "--max-steps", help="Stop after this many steps (0 = all epochs)."),
    ckpt_every: int = typer.Option(D("ckpt_every"), "--ckpt-every", help="Steps between full-state checkpoints."),
    val_cache: Path = typer.Option(D("val_cache"), "--val-cache", help="Held-out cache for cross-age verification."),
    val_pairs: int = typer.Option(D("val_pairs"), "--val-pairs", help="Number of validation pairs."),
    val_every: int = typer.Option(D("val_every"), "--val-every", help="Steps between validations (0 = before and after only)."),
    sync_bn: bool = typer.Option(D("sync_bn"), "--sync-bn", help="Under torchrun, BatchNorm over the global batch."),
    head_warmup_steps: int = typer.Option(D("head_warmup_steps"), "--head-warmup-steps", help="First steps with the encoder held (0 = the paper)."),
    recipe: str = typer.Option(D("recipe"), "--recipe", help="A named bundle of settings for small sets (--help-recipes)."),
    help_recipes: bool = typer.Option(False, "--help-recipes", is_eager=True, callback=show_recipes(_LIBRARY_NAME), help="Print recipes, stages, small-set options."),
    freeze_through: str = typer.Option(D("freeze_through"), "--freeze-through", help="Freeze the encoder through this stage (--help-recipes)."),
    activation_cache: str = typer.Option(D("activation_cache"), "--activation-cache", help="Folder of the frozen trunk's activations (off: none)."),
    activation_dtype: str = typer.Option(D("activation_dtype"), "--activation-dtype", help="Cached activations: float16 or float32."),
    freeze_bn: str = typer.Option(D("freeze_bn"), "--freeze-bn", help="Encoder BatchNorm: off, stats or all (--help-recipes)."),
    init_centres: str = typer.Option(D("init_centres"), "--init-centres", help="Margin-head centres: random, mean or mean-mirror."),
    encoder_lr: float = typer.Option(D("encoder_lr"), "--encoder-lr", help="Learning rate of the encoder (default: --lr)."),
    l2sp: float = typer.Option(D("l2sp"), "--l2sp", metavar="ALPHA", help="L2-SP pull toward the initial weights (0 = off)."),
    augment: str = typer.Option(D("augment"), "--augment", help="none, light, or key=value over it (--help-recipes)."),
    train_identities: str = typer.Option(D("train_identities"), "--train-identities", help="Train only on these identities: NAMES, @FILE, @F.json:key."),
    replay: list[Path] = typer.Option(D("replay"), "--replay", help="General-face cache(s) mixed into every batch (repeat)."),
    replay_identities: str = typer.Option(D("replay_identities"), "--replay-identities", help="Replay only these identities (as --train-identities)."),
    auto_guard: Path = typer.Option(D("auto_guard"), "--auto-guard", help="--recipe auto: general-face cache of untested people (guard)."),
    wise: float = typer.Option(D("wise"), "--wise", metavar="ALPHA", help="WiSE-FT: weight of the trained weights in model.pt."),
    replay_ratio: float = typer.Option(D("replay_ratio"), "--replay-ratio", help="Share of each batch drawn from --replay."),
    val_identities: float = typer.Option(D("val_identities"), "--val-identities", help="Validate on this many identities carved from the data."),
    early_stop: int = typer.Option(D("early_stop"), "--early-stop", metavar="PATIENCE", help="Stop after this many validations without gain (0 = off)."),
    keep: str = typer.Option(D("keep"), "--keep", help="model.pt = the last or the best validated weights."),
    max_bad_steps: int = typer.Option(D("max_bad_steps"), "--max-bad-steps", help="Non-finite steps in a row that stop the run."),
    warn_negative_after: int = typer.Option(D("warn_negative_after"), "--warn-negative-after", help="Warn when CLUB stays negative this many steps."),
    resume: bool = typer.Option(D("resume"), "--resume", help="Continue the run in --out from its last checkpoint."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch per process."),
    progress: bool = typer.Option(D("progress"), "--progress/--no-progress", " /--quiet", " /-q", help="Live display of loss, accuracy, images/s and ETA."),
) -> None:
    """MT-MIM fine-tuning (the command's text is `finetune_help.finetune_text`)."""
    ensure_writable(out, folder=True)

    from mtmim_cli.threads import set_torch_threads
    from mtmim_cli.train.finetune import finetune as run

    # The settings are checked by the library (train/finetune_options.py), before any data.
    settings = given_settings(ctx, _LIBRARY_NAME, _NOT_SETTINGS)
    set_torch_threads(threads)
    if recipe == "auto":   # a search over fine-tunes, chosen on validation identities
        from mtmim_cli.orchestration.auto_recipe import auto_finetune

        auto_finetune(caches, init, settings)
        return
    run(caches, init, settings)

