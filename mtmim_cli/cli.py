"""Entry point of the `mtmim` command. Importing this must stay cheap: no torch here."""

from __future__ import annotations

import sys

from rich.console import Console

from mtmim_cli.app import app
from mtmim_cli.commands import (  # noqa: F401  (each module registers its commands)
    align_cmd,
    evaluate_cmd,
    finetune_cmd,
    gallery_cmd,
    tools_cmd,
    train_cmd,
)
from mtmim_cli.errors import MtmimError
from mtmim_cli.threads import passive_openmp


def main() -> None:
    passive_openmp()   # before any command imports torch
    try:
        app()
    except MtmimError as exc:
        _fail(str(exc))
    except OSError as exc:
        # a write that fails mid-run (disk full, a folder removed): the OS's reason on one line
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or str(exc).splitlines()[0]}")


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
