"""The options a user gave on the command line, under the library's names: the training
commands pass on only these, and the library's settings layer (train/finetune_options.py,
train/pretrain_options.py) resolves the rest, so its defaults and checks are the only ones."""

from __future__ import annotations

from collections.abc import Container, Mapping
from pathlib import Path
from typing import Any

import typer


def given_settings(ctx: typer.Context, rename: Mapping[str, str],
                   skip: Container[str]) -> dict[str, Any]:
    """`ctx`'s parameters not left at their default (paths as strings), renamed by `rename`,
    without those in `skip` (arguments and options that are not settings)."""
    out = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)   # an enum of (typer's vendored) click
        if name in skip or source is None or source.name == "DEFAULT":
            continue
        if isinstance(value, list):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[rename.get(name, name)] = str(value) if isinstance(value, Path) else value
    return out
