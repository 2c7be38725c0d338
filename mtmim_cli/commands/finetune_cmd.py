"""`mtmim groups` and `mtmim finetune` (torch and h5py are imported inside the commands)."""

from __future__ import annotations

from pathlib import Path

import typer

from mtmim_cli.app import app
from mtmim_cli.atomic import ensure_writable


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


@app.command()
def finetune(
    caches: list[Path] = typer.Argument(..., help="Training caches with ages (from `mtmim align`)."),
    init: Path = typer.Option(None, "--init", help="Start from a pretrain checkpoint of ours, an insightface iresnet backbone.pth (with --backbone) or the shared MobileFaceNet ckpt."),
    backbone: str = typer.Option(None, "--backbone", help="Encoder name; read from --init when it is our checkpoint or MobileFaceNet; needed without --init."),
    embedding_size: int = typer.Option(0, "--embedding-size", help="Embedding size of a freshly built encoder (0 = native)."),
    mode: str = typer.Option("mtmim", "--mode", help="baseline (L_ID), age (L_ID + L_AGE) or mtmim (L_ID + L_AGE + L_MIM): the paper's ablation rows."),
    out: Path = typer.Option(Path("runs/finetune"), "--out", "-o", help="Run folder: config.json, metrics.csv, checkpoints/, model.pt."),
    age_groups: int = typer.Option(8, "--age-groups", help="K equal-frequency age groups from the training ages."),
    lambda_age: float = typer.Option(0.1, "--lambda-age", help="Weight of the age-group loss."),
    lambda_mim: float = typer.Option(1e-4, "--lambda-mim", help="Weight of the CLUB mutual-information penalty."),
    q_steps: int = typer.Option(5, "--q-steps", help="Steps of q on its log-likelihood after each encoder step."),
    q_lr: float = typer.Option(1e-5, "--q-lr", help="Adam learning rate of q (divided by 10 with the encoder's on plateau)."),
    q_hidden: int = typer.Option(512, "--q-hidden", help="Hidden units of q's mean and log-variance MLPs."),
    logvar_bound: float = typer.Option(7.0, "--logvar-bound", help="q's log-variance is B*tanh(raw/B): variance in [e^-B, e^B]."),
    factorize_gain: float = typer.Option(0.1, "--factorize-gain", help="Initial scale of x_age relative to x (x_id starts near the pretrained x)."),
    margin: str = typer.Option("arcface", "--margin", help="Identity head: arcface (the paper), cosface, sphereface."),
    scale: float = typer.Option(64.0, "--scale", help="Logit scale s of the margin head."),
    margin_m: float = typer.Option(None, "--margin-m", help="Margin (default 0.35 for arcface/cosface)."),
    epochs: int = typer.Option(10, "--epochs", help="Passes over the training data."),
    batch_size: int = typer.Option(400, "--batch-size", help="Global batch (the paper: 400; split over torchrun processes)."),
    lr: float = typer.Option(0.02, "--lr", help="Adam learning rate of encoder, factorization and heads (the paper: 0.02)."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", help="Weight decay of the main optimiser."),
    schedule: str = typer.Option("plateau", "--schedule", help="plateau (lr/10 when the epoch loss stalls, the paper), poly, cosine, constant."),
    plateau_patience: int = typer.Option(1, "--plateau-patience", help="Epochs without improvement before the lr drops."),
    partial_fc: float = typer.Option(0.0, "--partial-fc", metavar="RATE", help="Partial FC: split the class centres over the torchrun processes and keep this share of them per step (every class of the batch, plus sampled negatives); 1.0 = split only, 0 = off (every process holds all centres)."),
    amp: str = typer.Option("none", "--amp", help="Mixed precision: none, bf16, fp16 (CUDA). CLUB always runs in float32."),
    clip_grad: float = typer.Option(0.0, "--clip-grad", help="Clip the global gradient norm (0 = off)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the new layers, sampling and flips."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    max_steps: int = typer.Option(0, "--max-steps", help="Stop after this many steps (0 = all epochs)."),
    ckpt_every: int = typer.Option(200, "--ckpt-every", help="Steps between full-state checkpoints."),
    val_cache: Path = typer.Option(None, "--val-cache", help="Held-out cache for 10-fold cross-age verification before, during and after."),
    val_pairs: int = typer.Option(3000, "--val-pairs", help="Number of validation pairs."),
    val_every: int = typer.Option(0, "--val-every", help="Steps between validations (0 = before and after only)."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="Under torchrun, BatchNorm statistics over the global batch."),
    head_warmup_steps: int = typer.Option(0, "--head-warmup-steps", help="First steps with the encoder's lr at 0, so new heads fit before they move a pretrained encoder (0 = the paper)."),
    warn_negative_after: int = typer.Option(50, "--warn-negative-after", help="Warn when the CLUB estimate stays negative this many steps (0 = never)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch per process (default: one per core; under torchrun give cores / processes)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live display of loss, accuracy, images/s and ETA."),
) -> None:
    """MT-MIM fine-tuning: factorization, age groups, CLUB penalty with alternating q updates."""
    ensure_writable(out, folder=True)

    from mtmim_cli.errors import MtmimError
    from mtmim_cli.threads import set_torch_threads
    from mtmim_cli.train.config import TrainConfig
    from mtmim_cli.train.finetune import MODES
    from mtmim_cli.train.finetune import finetune as run

    if mode not in MODES:
        raise MtmimError(f"--mode {mode}: choose from {', '.join(MODES)}")
    if margin not in ("arcface", "cosface", "sphereface"):
        raise MtmimError(f"--margin {margin}: choose from arcface, cosface, sphereface")
    if q_steps < 0 or q_lr <= 0:
        raise MtmimError(f"--q-steps {q_steps} / --q-lr {q_lr}: need q-steps >= 0 and q-lr > 0")
    set_torch_threads(threads)
    config = TrainConfig(out=str(out), epochs=epochs, batch_size=batch_size, optimizer="adam",
                         lr=lr, weight_decay=weight_decay, schedule=schedule,
                         plateau_patience=plateau_patience, amp=amp, clip_grad=clip_grad,
                         seed=seed, workers=workers, max_steps=max_steps, ckpt_every=ckpt_every,
                         val_every=val_every, sync_bn=sync_bn, resume=resume, progress=progress)
    run(caches, init, config, mode=mode, age_groups=age_groups, lambda_age=lambda_age,
        lambda_mim=lambda_mim, q_steps=q_steps, q_lr=q_lr, q_hidden=q_hidden,
        logvar_bound=logvar_bound, factorize_gain=factorize_gain, margin=margin, s=scale,
        m=margin_m, backbone=backbone, embedding_size=embedding_size or None,
        val_cache=str(val_cache) if val_cache else None, val_pairs=val_pairs,
        warn_negative_after=warn_negative_after, head_warmup_steps=head_warmup_steps,
        partial_fc=partial_fc)
