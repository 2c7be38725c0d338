"""The Typer application object; command modules register on it (no torch import here)."""

import typer

app = typer.Typer(
    name="mtmim",
    help="Age-invariant face recognition (MT-MIM): align -> pretrain -> finetune -> evaluate -> report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
