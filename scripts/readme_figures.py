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
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's mtmim_cli, installed or not
# its parts beside it, also when it is loaded from its path (scripts/headline.py, the tests):
# figure_blocks.py (the block format) and figure_commands.py (the command checks)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from figure_blocks import (  # noqa: E402
    Block,
    FigureError,
    dependency_order,
    human_duration,
    kept_lines,
    parse_documents,
    render,
    replace_body,
)
from figure_commands import command_problems, undeclared_reads  # noqa: E402


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
