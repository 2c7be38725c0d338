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
