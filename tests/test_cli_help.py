"""`mtmim --help` stays fast: no heavy imports at the top of any command module."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "h5py", "skimage", "facenet_pytorch", "matplotlib", "pandas", "sklearn")


def test_help_imports_no_heavy_module() -> None:
    code = (
        "import sys; sys.argv=['mtmim','--help']\n"
        "from mtmim_cli import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        f"print('LOADED:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.strip().splitlines()[-1].removeprefix("LOADED:")
    assert loaded == "", f"--help imported {loaded}"


def test_every_command_has_help() -> None:
    from typer.main import get_command

    from mtmim_cli.cli import app

    group = get_command(app)
    names = group.list_commands(None) if hasattr(group, "list_commands") else []  # type: ignore[arg-type]
    for name in names:
        out = subprocess.run([sys.executable, "-m", "mtmim_cli.cli", name, "--help"],
                             capture_output=True, text=True)
        assert out.returncode == 0, (name, out.stderr)
        assert "Usage" in out.stdout


def _option_blocks(text: str) -> list[list[str]]:
    """The lines of each option (or argument) entry of a plain --help text: an entry starts
    two spaces in, its wrapped help continues further in."""
    blocks: list[list[str]] = []
    listing = False
    for line in text.splitlines():
        if line.startswith(("Options:", "Arguments:")):
            listing = True
        elif listing and line.startswith("  ") and not line.startswith("   "):
            blocks.append([line])
        elif listing and line.startswith("   ") and blocks:
            blocks[-1].append(line)
        elif line and not line.startswith(" "):
            listing = False
    return blocks


def test_every_commands_help_reads_in_an_80_column_terminal() -> None:
    """At 80 columns every line fits and no option's help (with its default) runs past three
    lines: the detail belongs in the command's text above the options."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from mtmim_cli.cli import app

    group = get_command(app)
    long = []
    for name in group.list_commands(None):  # type: ignore[arg-type]
        text = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "80"}).output
        assert max(len(line) for line in text.splitlines()) <= 80, name
        blocks = _option_blocks(text)
        assert blocks, name                                  # the parser found the options
        long += [f"{name} {b[0].split()[0].rstrip(',')}: {len(b)} lines"
                 for b in blocks if len(b) > 3]
    assert not long, "\n".join(long)


def test_option_blocks_are_told_apart() -> None:
    text = ("Usage: x\n\n  Text.\n\nOptions:\n  -a, --alpha <int>  One\n                     two\n"
            "  --beta             Three\n\nMore text\n  not an option\n")
    assert _option_blocks(text) == [["  -a, --alpha <int>  One", "                     two"],
                                    ["  --beta             Three"]]


def test_long_running_commands_take_q() -> None:
    from typer.main import get_command

    from mtmim_cli.cli import app

    group = get_command(app)
    for name in ("align", "merge", "subset", "evaluate", "finetune", "pretrain", "synth",
                 "embed", "remove-age", "calibrate"):
        opts = {o for p in group.commands[name].params
                for o in (*p.opts, *getattr(p, "secondary_opts", []))}
        assert {"-q", "--quiet"} <= opts, name
