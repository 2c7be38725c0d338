"""Commands registered on mtmim_cli.app.app (import heavy modules inside the commands)."""

from __future__ import annotations

from pathlib import Path

import typer

from mtmim_cli import __version__
from mtmim_cli.app import app


@app.command()
def version(full: bool = typer.Option(False, "--full", help="Also report torch, CUDA and devices.")) -> None:
    """Print the tool version (and with --full the torch build and visible devices)."""
    typer.echo(f"mtmim {__version__}")
    if full:
        import torch

        typer.echo(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
                   f"devices: {torch.cuda.device_count()}")


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to create (must be new or empty)."),
    identities: int = typer.Option(24, help="Number of synthetic identities."),
    per_identity: int = typer.Option(10, "--per-identity", help="Photos per identity (ages spread over the range)."),
    age_min: float = typer.Option(1.0, "--age-min", help="Youngest age drawn (years)."),
    age_max: float = typer.Option(70.0, "--age-max", help="Oldest age drawn (years)."),
    test_fraction: float = typer.Option(0.25, "--test-fraction", help="Share of identities marked split=test."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same photos."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Generate the embedded cross-age face set (offline) with labels.csv for `align --format csv`."""
    from mtmim_cli.data.synth import SynthConfig, synthesize

    cfg = SynthConfig(identities=identities, per_identity=per_identity, age_min=age_min,
                      age_max=age_max, test_fraction=test_fraction, seed=seed)
    summary = synthesize(out, cfg, progress=not quiet)
    typer.echo(f"{summary['photos']} photos of {summary['identities']} identities "
               f"({summary['test_identities']} held out) -> {summary['labels']}")


@app.command()
def report(
    inputs: list[Path] = typer.Argument(..., help="Training run folders (metrics.csv) and evaluation outputs (results.json or its folder)."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for report.md and its PNG figures."),
    cache: Path = typer.Option(None, "--cache", help="Held-out cache: project x_id and x_age of its faces under each fine-tuned run's model."),
    max_images: int = typer.Option(400, "--max-images", help="Faces of --cache to project (an even spread)."),
) -> None:
    """Markdown report with training curves, CLUB over training, x_id/x_age projections, CMC and ROC."""
    from mtmim_cli.report import build_report

    path = build_report(inputs, out, cache=cache, max_images=max_images)
    typer.echo(f"report: {path}")
