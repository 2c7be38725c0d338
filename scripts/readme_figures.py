#!/usr/bin/env python
"""Regenerate the README's figures (and those of docs/*.md) from the commands shown beside them.

Every figure in README.md and docs/*.md sits in a marked block whose opening comment names the command
that prints it:

    <!-- figure id=demo time="1-4 min" tags=cheap keep="total" cmd: make demo -->
    ```console
    $ make demo   # 1-4 min
      total         21.3 s
    # 2025-01-01, 21 s wall, load average 0.8 at start, 1.1 at end
    ```
    <!-- /figure -->

This script reruns the selected blocks' commands and rewrites their bodies with what the
command printed (the lines matching `keep`, a regular expression; all lines without it).
A failed command leaves its block as it was. The README is rewritten (atomically) after
each block, so a long session keeps what finished.

Attributes: id (unique), time (how long the command takes: some take hours; rewritten with
the measured wall time after each run), tags
(comma-separated, for `--tag`), keep, `raw` (insert the kept lines as Markdown, e.g. a
table the command prints, instead of a console block), `reads` (comma-separated ids of the
blocks whose outputs the command reads, e.g. the evaluate runs a pooling script pools),
`partial` (the command itself shows only the figures of the blocks it reads that are current
and names the others, as scripts/headline.py does: it may run while some are stale) and
`source` (written by this script: the first 12 hex digits of the mtmim_cli source digest,
mtmim_cli/source.py, of the code that made the block's figures). Commands run under bash
with `<venv>/bin` first on PATH, in the repository root as the README's walk-through does
(its step 1 writes fgnet.h5 there; ../shared sits beside it), or in `--workdir`.

A block is stale when its recorded source is not the current code's (or none is recorded).
A block is run after the blocks it reads when both are chosen; a chosen block that reads a
stale block that is not chosen (directly or through another input) is refused, naming it,
unless `--with-inputs` reruns the stale inputs first (and any input reading them), or the
block is `partial` (then its stale inputs stay as they are without `--with-inputs`). `--check`
lists stale blocks beside malformed commands; only malformed commands fail it (every code
change makes every block stale until rerun).

    python scripts/readme_figures.py --list                 # ids, times, commands
    python scripts/readme_figures.py --check                # commands well-formed; stale blocks
    python scripts/readme_figures.py --tag cheap            # the few-minute ones
    python scripts/readme_figures.py --only casia-loo
    python scripts/readme_figures.py --only k10-pooled --with-inputs
    python scripts/readme_figures.py --all                  # everything (hours)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's mtmim_cli, installed or not

BLOCK_RE = re.compile(r"^<!-- figure (?P<head>.*?) -->\n(?P<body>.*?)^<!-- /figure -->$",
                      re.M | re.S)
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
SOURCE_RE = re.compile(r"^[0-9a-f]{12}$")
SHELL_WORDS = {"for", "in", "do", "done", "if", "then", "else", "elif", "fi", "while",
               "until", "time", "!", "{", "}"}
KNOWN_ATTRS = {"id", "time", "tags", "keep", "raw", "reads", "partial", "source"}


@dataclass
class Block:
    id: str
    cmd: str
    time: str
    tags: tuple[str, ...] = ()
    keep: str | None = None
    raw: bool = False
    reads: tuple[str, ...] = ()      # ids of the blocks whose outputs the command reads
    partial: bool = False            # its command shows only current inputs' figures
    source: str | None = None        # short source digest of the code that made the figures
    span: tuple[int, int] = (0, 0)   # of the body in the text it was parsed from
    head_span: tuple[int, int] = (0, 0)
    doc: str = "README.md"           # the document the block stands in


class FigureError(Exception):
    pass


def parse_blocks(text: str, source: str = "README.md") -> list[Block]:
    """The figure blocks of a Markdown text, in order; FigureError on a malformed head, an
    id used twice, a read of no block in the text, or a cycle."""
    return validate(_parse_one(text, source), source)


def parse_documents(paths: list[Path]) -> list[Block]:
    """The figure blocks of several documents (README.md and docs/*.md), in order: ids are
    unique across them and a block may read a block of another document."""
    blocks = [b for p in paths for b in _parse_one(p.read_text(), str(p))]
    return validate(blocks, ", ".join(str(p) for p in paths))


def _parse_one(text: str, source: str) -> list[Block]:
    blocks: list[Block] = []
    for m in BLOCK_RE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        head = m.group("head")
        attrs_text, sep, cmd = head.partition(" cmd: ")
        if not sep or not cmd.strip():
            raise FigureError(f"{source}:{line}: figure block without 'cmd: <command>'")
        attrs: dict[str, str] = {}
        for tok in shlex.split(attrs_text):
            key, eq, value = tok.partition("=")
            attrs[key] = value if eq else "1"
        unknown = sorted(set(attrs) - KNOWN_ATTRS)
        if unknown:
            raise FigureError(f"{source}:{line}: unknown attribute(s) {', '.join(unknown)}")
        for need in ("id", "time"):
            if not attrs.get(need):
                raise FigureError(f"{source}:{line}: figure block needs {need}=...")
        if not ID_RE.match(attrs["id"]):
            raise FigureError(f"{source}:{line}: id {attrs['id']!r}: use a-z, 0-9 and -")
        if attrs.get("keep"):
            try:
                re.compile(attrs["keep"])
            except re.error as exc:
                raise FigureError(f"{source}:{line}: keep: {exc}") from None
        if "source" in attrs and not SOURCE_RE.match(attrs["source"]):
            raise FigureError(f"{source}:{line}: source {attrs['source']!r}: 12 hex digits")
        blocks.append(Block(id=attrs["id"], cmd=cmd.strip(), time=attrs["time"],
                            tags=tuple(t for t in attrs.get("tags", "").split(",") if t),
                            keep=attrs.get("keep") or None, raw="raw" in attrs,
                            reads=tuple(r for r in attrs.get("reads", "").split(",") if r),
                            partial="partial" in attrs,
                            source=attrs.get("source"), span=m.span("body"),
                            head_span=m.span("head"), doc=source))
    return blocks


def validate(blocks: list[Block], source: str) -> list[Block]:
    ids = [b.id for b in blocks]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise FigureError(f"{source}: figure id(s) used twice: {', '.join(dup)}")
    for b in blocks:
        unknown = [r for r in b.reads if r not in ids]
        if unknown:
            raise FigureError(f"{source}: figure {b.id} reads {', '.join(unknown)}: no such block")
    dependency_order(blocks, source)   # refuses a cycle
    return blocks


def dependency_order(blocks: list[Block], source: str = "README.md") -> list[Block]:
    """The blocks with every block after the blocks it reads (otherwise in README order);
    FigureError on a block that reads itself, directly or through others."""
    by_id = {b.id: b for b in blocks}
    out: list[Block] = []
    state: dict[str, str] = {}

    def visit(b: Block, path: tuple[str, ...]) -> None:
        if state.get(b.id) == "done":
            return
        if state.get(b.id) == "open":
            raise FigureError(f"{source}: figure blocks read each other in a cycle: "
                              + " -> ".join((*path, b.id)))
        state[b.id] = "open"
        for r in b.reads:
            visit(by_id[r], (*path, b.id))
        state[b.id] = "done"
        out.append(b)

    for b in blocks:
        visit(b, ())
    return out


def kept_lines(block: Block, output: str) -> list[str]:
    lines = [ANSI_RE.sub("", ln).rstrip() for ln in output.replace("\r", "\n").splitlines()]
    if block.keep:
        rx = re.compile(block.keep)
        lines = [ln for ln in lines if rx.search(ln)]
    return [ln for ln in lines if ln.strip()]


TABLE_RULE_RE = re.compile(r"^\|[\s:|-]+\|$")


def markdown_spacing(lines: list[str]) -> list[str]:
    """Kept lines as Markdown reads them: a blank line before each table (a header row is the
    line above a |---| rule) and after it, so a caption stays a paragraph and two tables
    printed back to back do not run into one."""
    out: list[str] = []
    for i, ln in enumerate(lines):
        is_row = ln.startswith("|")
        header = is_row and i + 1 < len(lines) and bool(TABLE_RULE_RE.match(lines[i + 1]))
        after_table = bool(out) and out[-1].startswith("|") and not is_row
        if out and out[-1] and (header or after_table):
            out.append("")
        out.append(ln)
    return out


def render(block: Block, lines: list[str], note: str) -> str:
    """The new body of a block: the command, what it printed, and when/how it ran."""
    if block.raw:
        return f"`$ {block.cmd}` ({block.time}; {note})\n\n" + "\n".join(markdown_spacing(lines)) + "\n"
    return "\n".join(["```console", f"$ {block.cmd}   # {block.time}", *lines, f"# {note}",
                      "```"]) + "\n"


def replace_body(text: str, block_id: str, body: str, source: str = "README.md",
                 time_text: str | None = None, source_text: str | None = None) -> str:
    """`text` with block `block_id`'s body replaced (and its time and source attributes, if
    given: rewritten in place, or added before `cmd:`)."""
    for b in _parse_one(text, source):
        if b.id == block_id:
            text = text[:b.span[0]] + body + text[b.span[1]:]
            head = text[b.head_span[0]:b.head_span[1]]
            if time_text is not None:
                head = set_attribute(head, "time", f'"{time_text}"')
            if source_text is not None:
                head = set_attribute(head, "source", source_text)
            return text[:b.head_span[0]] + head + text[b.head_span[1]:]
    raise FigureError(f"{source}: no figure block {block_id!r}")


def set_attribute(head: str, key: str, value: str) -> str:
    """A block head with attribute `key` set to `value` (already quoted if it needs it)."""
    attrs, sep, cmd = head.partition(" cmd: ")
    rx = re.compile(rf'(?<!\S){key}=("[^"]*"|\S+)')
    if rx.search(attrs):
        attrs = rx.sub(lambda _: f"{key}={value}", attrs, count=1)
    else:
        attrs = f"{attrs} {key}={value}"
    return attrs + sep + cmd


def human_duration(seconds: float) -> str:
    """'about 40 s', 'about 12 min', 'about 1.5 h': what a measured run took."""
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


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


# ---------------------------------------------------------------- running
def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def run_block(block: Block, workdir: Path, venv: Path | None,
              echo: bool = True) -> tuple[int, str, float]:
    """Run a block's command under bash; (exit code, combined output, wall seconds)."""
    env = dict(os.environ)
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", block.cmd], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []
    assert proc.stdout is not None
    for line in proc.stdout:
        chunks.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
    rc = proc.wait()
    return rc, "".join(chunks), time.perf_counter() - t0


def regenerate(readme: Path, block: Block, workdir: Path, venv: Path | None,
               echo: bool = True, source: str | None = None) -> bool:
    """Run one block and rewrite its body in `readme` (and its source attribute: `source`,
    the code that ran it); False (block untouched) on failure."""
    from mtmim_cli.atomic import atomic_write_text

    load0 = _load_average()
    rc, output, secs = run_block(block, workdir, venv, echo)
    if rc != 0:
        tail = "\n".join(output.splitlines()[-5:])
        print(f"[{block.id}] failed (exit {rc}); block left as it was:\n{tail}", file=sys.stderr)
        return False
    lines = kept_lines(block, output)
    if not lines:
        print(f"[{block.id}] printed nothing matching keep={block.keep!r}; block left as it was",
              file=sys.stderr)
        return False
    note = (f"{time.strftime('%Y-%m-%d')}, {secs:.0f} s wall, load average {load0} at start, "
            f"{_load_average()} at end")
    text = readme.read_text()  # fresh: another block may have been rewritten meanwhile
    # The block's time now says what this run took (the load average is in the note).
    took = human_duration(secs)
    block = Block(**{**block.__dict__, "time": took})
    atomic_write_text(readme, replace_body(text, block.id, render(block, lines, note),
                                           str(readme), time_text=took,
                                           source_text=source or current_source()))
    print(f"[{block.id}] rewritten ({secs:.0f} s)")
    return True


def select(blocks: list[Block], only: str | None, tag: str | None, everything: bool) -> list[Block]:
    if only:
        want = [s for s in only.split(",") if s]
        known = {b.id for b in blocks}
        missing = [w for w in want if w not in known]
        if missing:
            raise FigureError(f"no figure block {', '.join(missing)} (see --list)")
        return [b for b in blocks if b.id in want]
    if tag:
        return [b for b in blocks if tag in b.tags]
    return list(blocks) if everything else []


# ---------------------------------------------------------------- staleness
def current_source() -> str:
    """The short source digest of this checkout's mtmim_cli (what a block run now records)."""
    from mtmim_cli.source import short, source_digest

    return short(source_digest())


def staleness(block: Block, current: str) -> str | None:
    """Why the block's figures may not be the current code's; None when they are."""
    if block.source is None:
        return "no source recorded"
    if block.source != current:
        return f"made by other code (source {block.source}, now {current})"
    return None


def plan(blocks: list[Block], chosen: list[Block], current: str,
         with_inputs: bool = False) -> list[Block]:
    """The blocks to run, each after the blocks it reads. An input of a chosen block that is
    not chosen must be current and read nothing that reruns; otherwise FigureError names it,
    or with `with_inputs` it reruns too."""
    by_id = {b.id: b for b in blocks}
    want = {b.id for b in chosen}
    needs: dict[str, bool] = {}   # input id -> must rerun before its readers

    def must_rerun(i: str) -> bool:
        if i not in needs:
            b = by_id[i]
            needs[i] = (i in want or staleness(b, current) is not None
                        or any(must_rerun(r) for r in b.reads))
        return needs[i]

    # blocks added on the way were already known to rerun, so no earlier answer changes
    for b in dependency_order(blocks):
        if b.id not in want:
            continue
        for r in b.reads:
            if r in want or not must_rerun(r):
                continue
            if b.partial and not with_inputs:
                continue   # its command leaves out what is stale
            if not with_inputs:
                why = staleness(by_id[r], current) or "it reads blocks that rerun"
                raise FigureError(f"figure {b.id} reads figure {r}, {why}: rerun it first "
                                  f"(--only {r},{b.id}) or pass --with-inputs")
            want |= _rerun_closure(by_id, r, must_rerun)
    return [b for b in dependency_order(blocks) if b.id in want]


def _rerun_closure(by_id: dict[str, Block], start: str, must_rerun) -> set[str]:
    """`start` and every block it reads, directly or not, that must rerun."""
    out, todo = set(), [start]
    while todo:
        i = todo.pop()
        if i in out or not must_rerun(i):
            continue
        out.add(i)
        todo += list(by_id[i].reads)
    return out


def default_documents(repo: Path = REPO) -> list[Path]:
    """README.md and the docs/*.md that hold figure blocks."""
    docs = sorted(p for p in (repo / "docs").glob("*.md") if "<!-- figure " in p.read_text())
    return [repo / "README.md", *docs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", type=Path, action="append",
                    help="a document with figure blocks (repeat; default: README.md and every "
                         "docs/*.md that has one)")
    ap.add_argument("--list", action="store_true", help="list the blocks and exit")
    ap.add_argument("--check", action="store_true",
                    help="check every block's command, list stale blocks, and exit")
    ap.add_argument("--only", help="comma-separated block ids to regenerate")
    ap.add_argument("--tag", help="regenerate the blocks with this tag (e.g. cheap)")
    ap.add_argument("--all", action="store_true", help="regenerate every block (hours)")
    ap.add_argument("--with-inputs", action="store_true",
                    help="also rerun the stale blocks the chosen ones read (first)")
    ap.add_argument("--workdir", type=Path, default=REPO,
                    help="where the commands run (default: the repository root, where the "
                         "walk-through's fgnet.h5 is and ../shared beside it)")
    ap.add_argument("--venv", type=Path, default=REPO / ".venv",
                    help="its bin/ goes first on PATH (default: the checkout's .venv)")
    ap.add_argument("--quiet", action="store_true", help="do not echo the commands' output")
    a = ap.parse_args(argv)
    try:
        docs = a.readme or default_documents()
        blocks = parse_documents(docs)
        current = current_source()
        if a.list:
            for b in blocks:
                reads = f" (reads {','.join(b.reads)})" if b.reads else ""
                print(f"{b.id:<22} {b.time:<16} {','.join(b.tags) or '-':<12} {b.cmd}{reads}")
            return 0
        if a.check:
            bad, stale = 0, 0
            for b in blocks:
                for p in command_problems(b):
                    print(f"{b.doc}: figure {b.id}: {p}")
                    bad += 1
            for p in undeclared_reads(blocks):
                print(p)
                bad += 1
            for b in blocks:
                why = staleness(b, current)
                if why:
                    print(f"{b.doc}: figure {b.id}: stale, {why}")
                    stale += 1
            print(f"{len(blocks)} figure blocks, {bad} problem(s), {stale} stale "
                  f"(this code: source {current})")
            return 1 if bad else 0
        chosen = select(blocks, a.only, a.tag, a.all)
        if not chosen:
            ap.error("choose blocks with --only, --tag or --all (or --list / --check)")
        order = plan(blocks, chosen, current, a.with_inputs)
        venv = a.venv if a.venv.is_dir() else None
        ok: dict[str, bool] = {}
        for b in order:
            failed = [r for r in b.reads if ok.get(r) is False]
            if failed:
                print(f"[{b.id}] skipped: the block it reads ({', '.join(failed)}) failed",
                      file=sys.stderr)
                ok[b.id] = False
                continue
            ok[b.id] = regenerate(Path(b.doc), b, a.workdir, venv, echo=not a.quiet,
                                  source=current)
    except FigureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
