"""Commands registered on mtmim_cli.app.app (import heavy modules inside the commands)."""

from __future__ import annotations

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
