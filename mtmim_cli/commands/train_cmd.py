"""`mtmim pretrain`: general-face pretraining (torch is imported inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer

from mtmim_cli.app import app
from mtmim_cli.atomic import ensure_writable


@app.command()
def pretrain(
    ctx: typer.Context,
    caches: list[Path] = typer.Argument(..., help="Training caches from `mtmim align`."),
    out: Path = typer.Option(Path("runs/pretrain"), "--out", "-o", help="Run folder (config.json, metrics.csv, model.pt, ...)."),
    backbone: str = typer.Option(None, "--backbone", help="Encoder: iresnet18/34/50/100, resnet50, mobilefacenet, tiny."),
    embedding_size: int = typer.Option(0, "--embedding-size", help="Embedding size; 0 = the backbone's native size."),
    init: Path = typer.Option(None, "--init", help="Start from these encoder weights (loaded strictly)."),
    margin: str = typer.Option("arcface", "--margin", help="Margin head: arcface (the paper), cosface, sphereface."),
    scale: float = typer.Option(64.0, "--scale", help="Logit scale s of the margin head."),
    margin_m: float = typer.Option(None, "--margin-m", help="Margin (default 0.35; 1.35 for sphereface)."),
    epochs: int = typer.Option(10, "--epochs", help="Passes over the training data."),
    batch_size: int = typer.Option(128, "--batch-size", help="Global batch size."),
    optimizer: str = typer.Option("adam", "--optimizer", help="adam (the paper) or sgd (arcface_torch)."),
    lr: float = typer.Option(1e-3, "--lr", help="Base learning rate."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", help="Weight decay."),
    schedule: str = typer.Option("plateau", "--schedule", help="plateau (the paper), poly, cosine or constant."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear warm-up steps."),
    warmup_epochs: float = typer.Option(0.0, "--warmup-epochs", help="Linear warm-up in epochs (without --warmup-steps)."),
    poly_power: float = typer.Option(2.0, "--poly-power", help="Power of the poly schedule's decay to 0."),
    preset: str = typer.Option(None, "--preset", help="arcface: arcface_torch's recipe for options not given."),
    accumulate: int = typer.Option(1, "--accumulate", help="Micro-batches per global batch (memory / N)."),
    plateau_patience: int = typer.Option(1, "--plateau-patience", help="Epochs without improvement before the lr drops."),
    identities: str = typer.Option("auto", "--identities", help="Identity names across caches: auto, by-name, per-cache."),
    partial_fc: float = typer.Option(0.0, "--partial-fc", metavar="RATE", help="Partial FC share of class centres per step (0 = off)."),
    amp: str = typer.Option("none", "--amp", help="Mixed precision: none, bf16, fp16 (CUDA)."),
    clip_grad: float = typer.Option(0.0, "--clip-grad", help="Clip the global gradient norm (0 = off)."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights, sampling and flips."),
    workers: int = typer.Option(-1, "--workers", help="DataLoader workers per process (-1: automatic)."),
    max_steps: int = typer.Option(0, "--max-steps", help="Stop after this many steps (0 = all epochs)."),
    ckpt_every: int = typer.Option(200, "--ckpt-every", help="Steps between full-state checkpoints."),
    val_cache: Path = typer.Option(None, "--val-cache", help="Held-out cache for cross-age verification."),
    val_pairs: int = typer.Option(3000, "--val-pairs", help="Number of validation pairs (half genuine)."),
    val_every: int = typer.Option(0, "--val-every", help="Steps between validations (0 = before and after only)."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="Under torchrun, BatchNorm over the global batch."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (same options)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch per process."),
    progress: bool = typer.Option(True, "--progress/--no-progress", " /--quiet", " /-q", help="Live display of loss, accuracy, images/s and ETA."),
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
    from mtmim_cli.train.config import TrainConfig
    from mtmim_cli.train.pretrain import pretrain as run

    set_torch_threads(threads)
    if preset:   # the preset fills what the command line left at its default
        from mtmim_cli.train.presets import preset_settings

        given = {n for n in ctx.params if (src := ctx.get_parameter_source(n)) is not None
                 and src.name != "DEFAULT"}
        chosen = {k: v for k, v in preset_settings(preset, batch_size).items() if k not in given}
        optimizer, momentum = chosen.get("optimizer", optimizer), chosen.get("momentum", momentum)
        weight_decay, lr = chosen.get("weight_decay", weight_decay), chosen.get("lr", lr)
        schedule, poly_power = chosen.get("schedule", schedule), chosen.get("poly_power", poly_power)
        warmup_epochs, epochs = chosen.get("warmup_epochs", warmup_epochs), chosen.get("epochs", epochs)
        clip_grad, margin = chosen.get("clip_grad", clip_grad), chosen.get("margin", margin)
        if "margin" not in given:   # the preset's margin value belongs to its margin
            margin_m = chosen.get("margin_m", margin_m)
    config = TrainConfig(out=str(out), epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                         lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                         warmup_steps=warmup_steps, warmup_epochs=warmup_epochs,
                         poly_power=poly_power, plateau_patience=plateau_patience, amp=amp,
                         clip_grad=clip_grad, seed=seed, workers=workers, max_steps=max_steps,
                         ckpt_every=ckpt_every, val_every=val_every, sync_bn=sync_bn,
                         accumulate=accumulate, resume=resume, progress=progress)
    if margin not in ("arcface", "cosface", "sphereface"):
        from mtmim_cli.errors import MtmimError
        raise MtmimError(f"--margin {margin}: choose from arcface, cosface, sphereface")
    run(caches, config, backbone=backbone, embedding_size=embedding_size or None, init=init,
        margin=margin, s=scale, m=margin_m, val_cache=val_cache, val_pairs=val_pairs,
        partial_fc=partial_fc, identities=identities, preset=preset)
