"""`mtmim pretrain`: general-face pretraining (torch is imported inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer

from mtmim_cli.app import app
from mtmim_cli.atomic import ensure_writable
from mtmim_cli.commands.given import given_settings
from mtmim_cli.models.margin_names import MARGINS
from mtmim_cli.train.pretrain_options import default as D

# Options whose library name differs from the option's, and parameters that are not settings.
_LIBRARY_NAME = {"scale": "s", "margin_m": "m"}
_NOT_SETTINGS = ("caches", "threads")


@app.command()
def pretrain(
    ctx: typer.Context,
    caches: list[Path] = typer.Argument(..., help="Training caches from `mtmim align`."),
    out: Path = typer.Option(Path(D("out")), "--out", "-o", help="Run folder (config.json, metrics.csv, model.pt, ...)."),
    backbone: str = typer.Option(D("backbone"), "--backbone", help="Encoder: iresnet18/34/50/100, resnet50, mobilefacenet, tiny."),
    embedding_size: int = typer.Option(D("embedding_size"), "--embedding-size", help="Embedding size (default: the backbone's native size)."),
    init: Path = typer.Option(D("init"), "--init", help="Start from these encoder weights (loaded strictly)."),
    margin: str = typer.Option(D("margin"), "--margin", help=f"Margin head: {', '.join(MARGINS)} (arcface: the paper)."),
    scale: float = typer.Option(D("s"), "--scale", help="Logit scale s of the margin head."),
    margin_m: float = typer.Option(D("m"), "--margin-m", help="Margin (default 0.35; 1.35 for sphereface)."),
    epochs: int = typer.Option(D("epochs"), "--epochs", help="Passes over the training data."),
    batch_size: int = typer.Option(D("batch_size"), "--batch-size", help="Global batch size."),
    optimizer: str = typer.Option(D("optimizer"), "--optimizer", help="adam (the paper) or sgd (arcface_torch)."),
    lr: float = typer.Option(D("lr"), "--lr", help="Base learning rate."),
    momentum: float = typer.Option(D("momentum"), "--momentum", help="SGD momentum."),
    weight_decay: float = typer.Option(D("weight_decay"), "--weight-decay", help="Weight decay."),
    schedule: str = typer.Option(D("schedule"), "--schedule", help="plateau (the paper), poly, cosine or constant."),
    warmup_steps: int = typer.Option(D("warmup_steps"), "--warmup-steps", help="Linear warm-up steps."),
    warmup_epochs: float = typer.Option(D("warmup_epochs"), "--warmup-epochs", help="Linear warm-up in epochs (without --warmup-steps)."),
    poly_power: float = typer.Option(D("poly_power"), "--poly-power", help="Power of the poly schedule's decay to 0."),
    preset: str = typer.Option(D("preset"), "--preset", help="arcface: arcface_torch's recipe for options not given."),
    accumulate: int = typer.Option(D("accumulate"), "--accumulate", help="Micro-batches per global batch (memory / N)."),
    plateau_patience: int = typer.Option(D("plateau_patience"), "--plateau-patience", help="Epochs without improvement before the lr drops."),
    identities: str = typer.Option(D("identities"), "--identities", help="Identity names across caches: auto, by-name, per-cache."),
    partial_fc: float = typer.Option(D("partial_fc"), "--partial-fc", metavar="RATE", help="Partial FC share of class centres per step (0 = off)."),
    amp: str = typer.Option(D("amp"), "--amp", help="Mixed precision: none, bf16, fp16 (CUDA)."),
    clip_grad: float = typer.Option(D("clip_grad"), "--clip-grad", help="Clip the global gradient norm (0 = off)."),
    seed: int = typer.Option(D("seed"), "--seed", help="Seed of weights, sampling and flips."),
    workers: int = typer.Option(D("workers"), "--workers", help="DataLoader workers per process (-1: automatic)."),
    max_steps: int = typer.Option(D("max_steps"), "--max-steps", help="Stop after this many steps (0 = all epochs)."),
    ckpt_every: int = typer.Option(D("ckpt_every"), "--ckpt-every", help="Steps between full-state checkpoints."),
    val_cache: Path = typer.Option(D("val_cache"), "--val-cache", help="Held-out cache for cross-age verification."),
    val_pairs: int = typer.Option(D("val_pairs"), "--val-pairs", help="Number of validation pairs (half genuine)."),
    val_every: int = typer.Option(D("val_every"), "--val-every", help="Steps between validations (0 = before and after only)."),
    sync_bn: bool = typer.Option(D("sync_bn"), "--sync-bn", help="Under torchrun, BatchNorm over the global batch."),
    resume: bool = typer.Option(D("resume"), "--resume", help="Continue the run in --out (same options)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch per process."),
    progress: bool = typer.Option(D("progress"), "--progress/--no-progress", " /--quiet", " /-q", help="Live display of loss, accuracy, images/s and ETA."),
) -> None:
    """General-face pretraining of an encoder with a margin softmax (torchrun-ready).

    --backbone: iresnet18/34/50/100 (default iresnet50), resnet50 (the paper's),
    mobilefacenet (112x96 crop), tiny (tests and the demo); onnx:SPEC for an --init ONNX
    file's input (see `mtmim evaluate --help`). --init takes the shared MobileFaceNet ckpt,
    an insightface backbone.pth, an ONNX face encoder or one of our checkpoints. Margins:
    arcface cos(theta+m) (the paper), cosface cos(theta)-m, sphereface cos(m*theta).

    --preset arcface fills the options not given with insightface arcface_torch's recipe:
    SGD, momentum 0.9, weight decay 5e-4, lr 0.1 x batch/512, 2 warm-up epochs, poly decay
    power 2, 25 epochs, gradient clip 5, ArcFace m 0.5 (docs/SCALE.md).

    --identities: auto (the caches of one align job, e.g. its shards, share names; other
    caches keep theirs apart; refuses when two align runs of one dataset folder share a
    name), by-name (a name is one person in every cache) or per-cache (docs/SCALE.md).
    --partial-fc RATE splits the class centres over the torchrun processes and keeps that
    share per step (every class of the batch plus sampled negatives; 1.0 = split only).
    --batch-size is global (split over torchrun processes); --accumulate N sums N
    micro-batches' gradients (BatchNorm sees micro-batches). --amp bf16 runs on CUDA or CPU,
    fp16 on CUDA with loss scaling. --workers -1 = the cores per process less one, at most 8.
    A checkpoint is also written at every epoch end.
    """
    ensure_writable(out, folder=True)

    from mtmim_cli.threads import set_torch_threads
    from mtmim_cli.train.pretrain import pretrain as run

    # Defaults, the preset and the checks are the library's (train/pretrain_options.py).
    settings = given_settings(ctx, _LIBRARY_NAME, _NOT_SETTINGS)
    set_torch_threads(threads)
    run(caches, settings)
