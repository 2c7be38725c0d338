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


HELP_LINES = 160   # a command's --help at 80 columns: about three screens, no more


def _commands() -> list[str]:
    """Every command registered on the app (new ones are covered without listing them)."""
    from typer.main import get_command

    from mtmim_cli.cli import app

    return list(get_command(app).list_commands(None))  # type: ignore[arg-type]


def _help_at_80(args: list[str]) -> str:
    """What `COLUMNS=80 mtmim ARGS` prints, in process: in a terminal click formats help two
    columns narrower than the terminal (78), while the test runner's default is 80."""
    from typer.testing import CliRunner

    from mtmim_cli.cli import app

    result = CliRunner().invoke(app, args, prog_name="mtmim", terminal_width=78)
    assert result.exit_code == 0, (args, result.output)
    return result.output


def test_every_commands_help_fits_in_160_lines_at_80_columns() -> None:
    """`COLUMNS=80 mtmim CMD --help | wc -l` <= 160 for every command: tables and long
    detail go to a page of their own (finetune --help-recipes) or to docs."""
    names = _commands()
    assert {"align", "evaluate", "finetune", "pretrain"} <= set(names)
    counts = {name: len(_help_at_80([name, "--help"]).splitlines()) for name in names}
    counts["(mtmim)"] = len(_help_at_80(["--help"]).splitlines())
    long = [f"{name}: {n} lines" for name, n in counts.items() if n > HELP_LINES]
    assert not long, "\n".join(long)


def test_help_at_80_is_what_an_80_column_terminal_shows() -> None:
    """The in-process text above is the one `COLUMNS=80 mtmim finetune --help` prints (a real
    subprocess), so its line count is what `wc -l` counts."""
    import os

    code = "import sys; sys.argv[0] = 'mtmim'\nfrom mtmim_cli.cli import main\nmain()"
    out = subprocess.run([sys.executable, "-c", code, "finetune", "--help"], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "80"}, check=True).stdout
    assert out == _help_at_80(["finetune", "--help"])


def test_finetune_help_recipes_prints_every_recipe_and_stage_and_exits_0() -> None:
    """The page needs no caches argument, fits 80 columns and shows each recipe's values as
    `finetune` resolves them, beside the paper's."""
    from mtmim_cli.models.backbones import stage_table
    from mtmim_cli.train.finetune_options import RECIPES, default

    text = _help_at_80(["finetune", "--help-recipes"])
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line.split() for line in lines if line.split()[:2] == ["setting", "paper"])
    assert header[2:] == list(RECIPES)
    table = lines[lines.index(next(x for x in lines if x.split()[:2] == ["setting", "paper"])):]
    table = table[:table.index("")]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    option = {"s": "--scale", "m": "--margin-m"}
    for key in {k for r in RECIPES.values() for k in r} - {"optimizer"}:
        name = option.get(key, "--" + key.replace("_", "-"))
        paper = "-" if default(key) is None else str(default(key))
        assert rows[name] == [paper, *(str(r.get(key, default(key))) for r in RECIPES.values())], name
    # a setting a recipe sets that the command has no option for is named as such
    assert rows["optimizer"] == ["(no", "option)", str(default("optimizer")),
                                 *(str(r["optimizer"]) for r in RECIPES.values())]
    joined = " ".join(text.split())
    for family, stages in stage_table().items():
        assert f"{family} {stages}" in joined, family
    assert "mobilefacenet conv1, dw_conv1, blocks.0..blocks.14, conv2, linear7, linear1" in joined
    for opt in ("--freeze-bn stats", "--init-centres mean", "--augment:", "--replay caches"):
        assert opt in joined


def test_finetune_help_recipes_imports_no_heavy_module() -> None:
    code = (
        "import sys; sys.argv=['mtmim','finetune','--help-recipes']\n"
        "from mtmim_cli import cli\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        f"print('LOADED:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--recipe NAME" in out.stdout
    loaded = out.stdout.strip().splitlines()[-1].removeprefix("LOADED:")
    assert loaded == "", f"--help-recipes imported {loaded}"
