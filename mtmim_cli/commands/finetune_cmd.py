"""`mtmim groups` and `mtmim finetune` (torch and h5py are imported inside the commands)."""

from __future__ import annotations

from pathlib import Path

import typer

from mtmim_cli.app import app
from mtmim_cli.atomic import ensure_writable
from mtmim_cli.models.backbones import stage_summary
from mtmim_cli.train.finetune_options import MI_TARGETS, MODES, recipe_summary
from mtmim_cli.train.finetune_options import default as D


@app.command()
def groups(
    caches: list[Path] = typer.Argument(..., help="Caches whose usable images' ages define the groups (the training caches)."),
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
_NOT_SETTINGS = ("caches", "init", "threads")


@app.command()
def finetune(
    ctx: typer.Context,
    caches: list[Path] = typer.Argument(..., help="Training caches with ages (from `mtmim align`)."),
    init: Path = typer.Option(None, "--init", help="Start from a pretrain checkpoint of ours, an insightface iresnet backbone.pth (with --backbone), the shared MobileFaceNet ckpt, or an ONNX face encoder (*.onnx; --backbone onnx:SPEC for its input)."),
    backbone: str = typer.Option(D("backbone"), "--backbone", help="Encoder name; read from --init when it is our checkpoint or MobileFaceNet; needed without --init."),
    embedding_size: int = typer.Option(D("embedding_size"), "--embedding-size", help="Embedding size of a freshly built encoder (default: the backbone's native size)."),
    mode: str = typer.Option(D("mode"), "--mode", help="baseline (L_ID), age (L_ID + L_AGE) or mtmim (L_ID + L_AGE + L_MIM): the paper's ablation rows."),
    out: Path = typer.Option(Path(D("out")), "--out", "-o", help="Run folder: config.json, metrics.csv, checkpoints/, model.pt."),
    age_groups: int = typer.Option(D("age_groups"), "--age-groups", help="K equal-frequency age groups from the training ages."),
    lambda_age: float = typer.Option(D("lambda_age"), "--lambda-age", help="Weight of the age-group loss."),
    lambda_mim: float = typer.Option(D("lambda_mim"), "--lambda-mim", help="Weight of the CLUB mutual-information penalty."),
    q_steps: int = typer.Option(D("q_steps"), "--q-steps", help="Steps of q on its log-likelihood after each encoder step."),
    q_lr: float = typer.Option(D("q_lr"), "--q-lr", help="Adam learning rate of q (divided by 10 with the encoder's on plateau)."),
    q_hidden: int = typer.Option(D("q_hidden"), "--q-hidden", help="Hidden units of q's MLPs."),
    mi_target: str = typer.Option(D("mi_target"), "--mi-target", help="What the MI penalty measures x_id against: features (the paper: CLUB between x_id and x_age with a Gaussian q), age-group (CLUB between x_id and the age group, categorical q) or lautum (mean KL from the group prior to q(group | x_id): zero when x_id tells nothing about the group). The paper's linear factorization makes x_age a function of x_id, so 'features' can fall without age leaving x_id; see README."),
    logvar_bound: float = typer.Option(D("logvar_bound"), "--logvar-bound", help="q's log-variance is B*tanh(raw/B): its variance lies between e^-B and e^B."),
    factorize_gain: float = typer.Option(D("factorize_gain"), "--factorize-gain", help="Initial scale of x_age relative to x (x_id starts near the pretrained x)."),
    margin: str = typer.Option(D("margin"), "--margin", help="Identity head: arcface (the paper), cosface, sphereface."),
    scale: float = typer.Option(D("s"), "--scale", help="Logit scale s of the margin head."),
    margin_m: float = typer.Option(D("m"), "--margin-m", help="Margin (default 0.35 for arcface/cosface)."),
    epochs: int = typer.Option(D("epochs"), "--epochs", help="Passes over the training data."),
    batch_size: int = typer.Option(D("batch_size"), "--batch-size", help="Global batch (the paper: 400; split over torchrun processes)."),
    lr: float = typer.Option(D("lr"), "--lr", help="Adam learning rate of factorization and heads, and of the encoder unless --encoder-lr (the paper: 0.02)."),
    weight_decay: float = typer.Option(D("weight_decay"), "--weight-decay", help="Weight decay of the main optimiser (the encoder takes none under --l2sp)."),
    schedule: str = typer.Option(D("schedule"), "--schedule", help="plateau (lr/10 when the epoch loss stalls, the paper), poly, cosine, constant."),
    plateau_patience: int = typer.Option(D("plateau_patience"), "--plateau-patience", help="Epochs without improvement before the lr drops."),
    identities: str = typer.Option(D("identities"), "--identities", help="How identity names match across caches: auto (the caches of one align job, e.g. its shards, share names; other caches keep theirs apart; refuses when two align runs of one dataset folder share a name), by-name (a name is one person in every cache), per-cache (never shared). See docs/SCALE.md."),
    partial_fc: float = typer.Option(D("partial_fc"), "--partial-fc", metavar="RATE", help="Partial FC: split the class centres over the torchrun processes and keep this share of them per step (every class of the batch, plus sampled negatives); 1.0 = split only, 0 = off (every process holds all centres)."),
    amp: str = typer.Option(D("amp"), "--amp", help="Mixed precision: none, bf16, fp16 (CUDA). CLUB always runs in float32."),
    clip_grad: float = typer.Option(D("clip_grad"), "--clip-grad", help="Clip the global gradient norm (0 = off)."),
    seed: int = typer.Option(D("seed"), "--seed", help="Seed of the new layers, sampling and flips."),
    workers: int = typer.Option(D("workers"), "--workers", help="DataLoader worker processes per training process, kept across epochs (-1: the cores per process less one, at most 8)."),
    accumulate: int = typer.Option(D("accumulate"), "--accumulate", help="Split each global batch into N micro-batches whose gradients are summed before one optimiser step (memory / N; BatchNorm sees micro-batches; q fits the whole batch)."),
    max_steps: int = typer.Option(D("max_steps"), "--max-steps", help="Stop after this many steps (0 = all epochs)."),
    ckpt_every: int = typer.Option(D("ckpt_every"), "--ckpt-every", help="Steps between full-state checkpoints."),
    val_cache: Path = typer.Option(D("val_cache"), "--val-cache", help="Held-out cache for 10-fold cross-age verification before, during and after."),
    val_pairs: int = typer.Option(D("val_pairs"), "--val-pairs", help="Number of validation pairs."),
    val_every: int = typer.Option(D("val_every"), "--val-every", help="Steps between validations (0 = before and after only)."),
    sync_bn: bool = typer.Option(D("sync_bn"), "--sync-bn", help="Under torchrun, BatchNorm statistics over the global batch."),
    head_warmup_steps: int = typer.Option(D("head_warmup_steps"), "--head-warmup-steps", help="First steps with the encoder out of the optimiser (no gradient, BatchNorm statistics fixed; fresh Adam state at release), so new heads fit before they move a pretrained encoder (0 = the paper)."),
    recipe: str = typer.Option(D("recipe"), "--recipe", help=f"A named bundle of the options below for small training sets; options given explicitly override it, and without it the paper's settings apply. {recipe_summary()}."),
    freeze_through: str = typer.Option(D("freeze_through"), "--freeze-through", help=f"Freeze the encoder up to and including this stage (eval mode, no gradient) and train the rest; its activations are computed once and cached (see --activation-cache). last:K = all but the last K stages; auto = last:2. Stages: {stage_summary()}; an ONNX encoder's are its weight layers, named in the refusal of a wrong name."),
    activation_cache: str = typer.Option(D("activation_cache"), "--activation-cache", help="Folder for the frozen trunk's cached activations, keyed by its weights, the images, stage, crop and dtype so runs share them (default: --out/activations); off = train the frozen trunk on images (needed for --augment)."),
    activation_dtype: str = typer.Option(D("activation_dtype"), "--activation-dtype", help="Storage of cached activations: float16 (half the disk and memory) or float32."),
    freeze_bn: str = typer.Option(D("freeze_bn"), "--freeze-bn", help="off; stats = every encoder BatchNorm in eval mode (running statistics fixed, affine weight and bias still trained); all = statistics and affine parameters fixed."),
    init_centres: str = typer.Option(D("init_centres"), "--init-centres", help="Margin-head class centres: random (the paper); mean = each class's mean x_id under the initial encoder (eval mode); mean-mirror = the same with each image averaged with its mirror."),
    encoder_lr: float = typer.Option(D("encoder_lr"), "--encoder-lr", help="Learning rate of the encoder (default: --lr); factorization and heads train at --lr."),
    l2sp: float = typer.Option(D("l2sp"), "--l2sp", metavar="ALPHA", help="L2-SP: the penalty (alpha/2)||w - w0||^2 pulls the encoder's trainable weights toward their initial values, instead of weight decay toward zero (heads keep --weight-decay). 0 = off."),
    augment: str = typer.Option(D("augment"), "--augment", help="Augmentation of the aligned crops, drawn per (seed, epoch, image) so resume stays exact: none, light, or key=value pairs over it (brightness, contrast, saturation, scale: max relative change; translate: pixels; rotate: degrees; grey: probability), e.g. 'light,grey=0.3'. Image path only: not on cached activations (use --activation-cache off)."),
    train_identities: str = typer.Option(D("train_identities"), "--train-identities", help="Train only on these identities of the training caches: comma-separated names, @FILE (one per line) or @FILE.json:key.path (a list in a JSON split file, e.g. @open-set.json:fgnet.train_subjects); whole numbers match by value (1 = '001')."),
    replay: list[Path] = typer.Option(D("replay"), "--replay", help="General-face cache(s) mixed into every batch: their identities get their own classes; ages unknown, so no age loss; left out of CLUB and of q's fit. Repeat for several."),
    replay_identities: str = typer.Option(D("replay_identities"), "--replay-identities", help="Replay only these identities of the --replay caches (same forms as --train-identities), e.g. @open-set.json:celeba_subset.train_identities."),
    wise: float = typer.Option(D("wise"), "--wise", metavar="ALPHA", help="model.pt = (1 - ALPHA) x the initial weights + ALPHA x the trained ones, for the encoder and factorization (WiSE-FT weight-space ensembling: keeps most of a small-set gain, gives back most of what it cost on other faces). 1 = the trained weights."),
    replay_ratio: float = typer.Option(D("replay_ratio"), "--replay-ratio", help="Share of each batch drawn from --replay (0 < R < 1); an epoch is one pass over the training images."),
    val_identities: float = typer.Option(D("val_identities"), "--val-identities", help="Carve this many identities (or this fraction, below 1) out of the first training cache by a seeded split and validate on their cross-age pairs (instead of --val-cache)."),
    early_stop: int = typer.Option(D("early_stop"), "--early-stop", metavar="PATIENCE", help="Stop after this many validations without a better accuracy (0 = off); validates every epoch unless --val-every is set."),
    keep: str = typer.Option(D("keep"), "--keep", help="model.pt = the last weights (last) or the best validation checkpoint (best; needs validation)."),
    max_bad_steps: int = typer.Option(D("max_bad_steps"), "--max-bad-steps", help="Steps whose gradients are not finite are skipped; this many in a row stop the run."),
    warn_negative_after: int = typer.Option(D("warn_negative_after"), "--warn-negative-after", help="Warn when the CLUB estimate stays negative this many steps (0 = never)."),
    resume: bool = typer.Option(D("resume"), "--resume", help="Continue the run in --out from its last checkpoint."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch per process (default: one per core; under torchrun give cores / processes)."),
    progress: bool = typer.Option(D("progress"), "--progress/--no-progress", help="Live display of loss, accuracy, images/s and ETA."),
) -> None:
    """MT-MIM fine-tuning: factorization, age groups, CLUB penalty with alternating q updates."""
    ensure_writable(out, folder=True)

    from mtmim_cli.errors import MtmimError
    from mtmim_cli.threads import set_torch_threads
    from mtmim_cli.train.finetune import finetune as run

    if mode not in MODES:
        raise MtmimError(f"--mode {mode}: choose from {', '.join(MODES)}")
    if margin not in ("arcface", "cosface", "sphereface"):
        raise MtmimError(f"--margin {margin}: choose from arcface, cosface, sphereface")
    if mi_target not in MI_TARGETS:
        raise MtmimError(f"--mi-target {mi_target}: choose from {', '.join(MI_TARGETS)}")
    if q_steps < 0 or q_lr <= 0:
        raise MtmimError(f"--q-steps {q_steps} / --q-lr {q_lr}: need q-steps >= 0 and q-lr > 0")
    set_torch_threads(threads)
    run(caches, init, given_settings(ctx))


def given_settings(ctx: typer.Context) -> dict:
    """The settings the user gave on the command line, under the library's names; the rest
    `finetune` resolves itself (defaults, then a recipe), so its defaults are the only ones."""
    out = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)   # an enum of (typer's vendored) click
        if name in _NOT_SETTINGS or source is None or source.name == "DEFAULT":
            continue
        if isinstance(value, list):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[_LIBRARY_NAME.get(name, name)] = str(value) if isinstance(value, Path) else value
    return out
