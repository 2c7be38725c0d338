"""The figure blocks of README.md and docs/*.md (scripts/readme_figures.py runs them): the
block format read (`parse_documents`), checked (ids, reads, cycles) and ordered, and a
block's new body written from what its command printed (`render`, `replace_body`)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

BLOCK_RE = re.compile(r"^<!-- figure (?P<head>.*?) -->\n(?P<body>.*?)^<!-- /figure -->$",
                      re.M | re.S)
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
SOURCE_RE = re.compile(r"^[0-9a-f]{12}$")
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
    return validate(parse_text(text, source), source)


def parse_documents(paths: list[Path]) -> list[Block]:
    """The figure blocks of several documents (README.md and docs/*.md), in order: ids are
    unique across them and a block may read a block of another document."""
    blocks = [b for p in paths for b in parse_text(p.read_text(), str(p))]
    return validate(blocks, ", ".join(str(p) for p in paths))


def parse_text(text: str, source: str) -> list[Block]:
    """The blocks of one document as written, each head checked on its own (ids, reads and
    cycles across blocks are `validate`'s)."""
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
    for b in parse_text(text, source):
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
