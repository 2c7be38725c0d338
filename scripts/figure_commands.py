"""Would a figure block's command run as written (`command_problems`), and which blocks'
outputs does it read (`undeclared_reads`)? The checks `scripts/readme_figures.py --check`
makes, without running anything."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from figure_blocks import Block

REPO = Path(__file__).resolve().parents[1]
SHELL_WORDS = {"for", "in", "do", "done", "if", "then", "else", "elif", "fi", "while",
               "until", "time", "!", "{", "}"}


# ---------------------------------------------------------------- well-formedness
def _mtmim_options() -> dict[str, set[str]]:
    """Every `mtmim` subcommand and the option names it accepts (no torch import)."""
    import typer.main

    from mtmim_cli.cli import app

    group = typer.main.get_command(app)
    out = {}
    for name, cmd in group.commands.items():
        opts = {"--help"}
        for p in cmd.params:
            opts.update(p.opts)
            opts.update(getattr(p, "secondary_opts", []))
        out[name] = opts
    return out


def _make_targets(repo: Path) -> set[str]:
    text = (repo / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", text, re.M))


def _simple_commands(cmd: str) -> list[list[str]]:
    """Words of each simple command of a shell line (split at ; && || | and parentheses;
    redirections and their targets dropped)."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out, cur, skip_next = [], [], False
    for tok in lex:
        if skip_next:
            skip_next = False
            continue
        if tok in (";", "&&", "||", "|", "&", "(", ")", ";;"):
            if cur:
                out.append(cur)
            cur = []
        elif tok in (">", ">>", "<", "2>", ">&", "2>&1", "&>"):
            skip_next = tok != "2>&1"
        else:
            cur.append(tok)
    if cur:
        out.append(cur)
    return out


def _check_mtmim(words: list[str], options: dict[str, set[str]]) -> list[str]:
    if not words:
        return ["mtmim without a subcommand"]
    sub, *args = words
    if sub not in options:
        return [f"mtmim {sub}: no such command"]
    bad = [a.split("=")[0] for a in args
           if a.startswith("-") and len(a) > 1 and not a[1].isdigit() and not a.startswith("-.")
           and a.split("=")[0] not in options[sub]]
    return [f"mtmim {sub}: no option {b}" for b in bad]


def command_problems(block: Block, repo: Path = REPO) -> list[str]:
    """Why a block's command would not run as written ([] when it is well-formed): shell
    syntax, `mtmim` subcommands and options, scripts and make targets that must exist."""
    syntax = subprocess.run(["bash", "-n", "-c", block.cmd], capture_output=True, text=True)
    if syntax.returncode:
        return [f"shell syntax: {syntax.stderr.strip().splitlines()[-1]}"]
    try:
        commands = _simple_commands(block.cmd)
    except ValueError as exc:
        return [f"cannot split the command: {exc}"]
    problems: list[str] = []
    options = None
    for words in commands:
        if words[0] in ("for", "case", "select"):  # `for VAR in WORDS`: no program runs
            continue
        while words and (words[0] in SHELL_WORDS or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
            words = words[1:]
        if not words:
            continue
        prog, rest = words[0], words[1:]
        name = Path(prog).name
        if name == "mtmim" or (name.startswith("python") and rest[:2] == ["-m", "mtmim_cli.cli"]):
            options = options if options is not None else _mtmim_options()
            problems += _check_mtmim(rest[2:] if name != "mtmim" else rest, options)
        elif name.startswith("python"):
            script = next((w for w in rest if not w.startswith("-")), None)
            if rest[:1] == ["-m"] or rest[:1] == ["-c"]:
                continue
            if script is None:
                problems.append(f"{prog}: no script given")
            elif not (repo / script).is_file():
                problems.append(f"{script}: no such file in the repository")
        elif name == "make":
            targets = _make_targets(repo)
            for t in rest:
                if not t.startswith("-") and "=" not in t and t not in targets:
                    problems.append(f"make {t}: no such target in the Makefile")
        elif shutil.which(prog) is None and not (repo / prog).exists():
            problems.append(f"{prog}: not a command on PATH nor a file in the repository")
    return problems


# ---------------------------------------------------------------- what blocks read
OUT_RE = re.compile(r"--out\s+([^\s;&|)]+)")
FOR_RE = re.compile(r"\bfor\s+([A-Za-z_]\w*)\s+in\s+([^;]*);")


def expanded_commands(cmd: str) -> list[str]:
    """The command once per value of its `for VAR in WORDS` loop variables ($VAR, ${VAR}
    replaced), so that paths built in a loop can be matched; the command itself without a
    loop."""
    out = [cmd]
    for var, words in FOR_RE.findall(cmd):
        rx = re.compile(rf"\$(?:{var}\b|\{{{var}\}})")
        out = [rx.sub(w, c) for c in out for w in shlex.split(words)]
    return out


def output_paths(block: Block) -> set[str]:
    """What a block's command writes for others to read: each `--out PATH` (a results.md's
    folder rather than the file, since readers name the folder)."""
    paths = set()
    for c in expanded_commands(block.cmd):
        for p in OUT_RE.findall(c):
            p = p.strip("'\"").rstrip("/")
            paths.add(str(Path(p).parent) if p.endswith(".md") else p)
    return paths


def undeclared_reads(blocks: list[Block]) -> list[str]:
    """Blocks whose command names another block's output path (as a whole path component)
    without declaring `reads=` that block."""
    problems = []
    for b in blocks:
        text = "\n".join(expanded_commands(b.cmd))
        for other in blocks:
            if other.id == b.id or other.id in b.reads:
                continue
            hits = sorted(p for p in output_paths(other)
                          if re.search(rf"(?<![\w./-]){re.escape(p)}(?=$|[\s/;'\"])", text, re.M))
            if hits:
                problems.append(f"{b.doc}: figure {b.id}: reads {hits[0]}, an output of "
                                f"figure {other.id}, without reads={other.id}")
    return problems
