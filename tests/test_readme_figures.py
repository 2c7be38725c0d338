"""scripts/readme_figures.py: every README figure block names a well-formed command, and the
script rewrites a block from what its command printed (and leaves it alone on failure)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("readme_figures", REPO / "scripts" / "readme_figures.py")
RF = importlib.util.module_from_spec(_spec)
sys.modules["readme_figures"] = RF  # dataclasses look their module up while the class is built
_spec.loader.exec_module(RF)
import figure_blocks as FB  # noqa: E402  (readme_figures' parts, on the path it set)
import figure_commands as FC  # noqa: E402


def test_every_block_of_the_readme_and_docs_is_well_formed() -> None:
    blocks = RF.parse_documents(RF.default_documents())
    assert len(blocks) >= 5
    for b in blocks:
        assert b.time and RF.command_problems(b) == [], (b.id, RF.command_problems(b))
    # Every block that has run carries its command visibly, not only in the HTML comment.
    for b in blocks:
        body = Path(b.doc).read_text()[b.span[0]:b.span[1]]
        assert not body.strip() or "$ " in body, b.id


SAMPLE = """# Title

Some prose with no figure.

<!-- figure id=answer time="instant" tags=cheap keep="^figure" cmd: printf 'noise 1\\nfigure 42\\n' -->
```console
$ old   # instant
figure 41
```
<!-- /figure -->

Between.

<!-- figure id=broken time="instant" cmd: echo partial; exit 3 -->
```console
untouched
```
<!-- /figure -->
"""


def test_script_rewrites_a_block_from_its_command(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(SAMPLE)
    rc = RF.main(["--readme", str(readme), "--only", "answer", "--quiet",
                  "--venv", str(tmp_path / "none"), "--workdir", str(tmp_path)])
    assert rc == 0
    text = readme.read_text()
    body = text[text.index("```console"):text.index("<!-- /figure -->")].splitlines()
    assert body[1] == "$ printf 'noise 1\\nfigure 42\\n'   # about 0 s"  # the time measured
    assert body[2] == "figure 42" and body[3].startswith("# ") and "load average" in body[3]
    assert len(body) == 5 and body[4] == "```"  # the old figure and the unkept line are gone
    # Everything outside the block is as it was, and the block still parses.
    assert text.startswith("# Title\n\nSome prose with no figure.\n") and "untouched" in text
    assert [(b.id, b.time) for b in FB.parse_blocks(text)] == [("answer", "about 0 s"),
                                                                ("broken", "instant")]
    # A failing command leaves its block alone and fails the run.
    rc = RF.main(["--readme", str(readme), "--only", "broken", "--quiet",
                  "--venv", str(tmp_path / "none"), "--workdir", str(tmp_path)])
    assert rc == 1 and readme.read_text() == text


def test_raw_blocks_insert_markdown(tmp_path: Path) -> None:
    readme = tmp_path / "R.md"
    readme.write_text('<!-- figure id=t time="1 s" raw keep="^\\|" cmd: printf "| a |\\n|---|\\n| 1 |\\n" -->\n'
                      "old\n<!-- /figure -->\n")
    with pytest.raises(SystemExit):  # a tag no block has selects nothing: a usage error
        RF.main(["--readme", str(readme), "--tag", "none", "--quiet"])
    assert RF.main(["--readme", str(readme), "--only", "t", "--quiet", "--workdir", str(tmp_path)]) == 0
    text = readme.read_text()
    assert "| a |\n|---|\n| 1 |\n" in text and "```" not in text and '`$ printf' in text


def test_raw_blocks_keep_captions_and_back_to_back_tables_apart() -> None:
    lines = ["Caption.", "| A | B |", "|---|---|", "| 1 | 2 |", "| C |", "|:-:|", "| 3 |", "After."]
    assert FB.markdown_spacing(lines) == ["Caption.", "", "| A | B |", "|---|---|", "| 1 | 2 |",
                                          "", "| C |", "|:-:|", "| 3 |", "", "After."]
    # a row that merely follows another row is not a new table
    assert FB.markdown_spacing(["| a |", "|---|", "| 1 |", "| 2 |"]) == ["| a |", "|---|",
                                                                        "| 1 |", "| 2 |"]


@pytest.mark.parametrize("cmd,problem", [
    ("mtmim evaluate --protocol fgnet-loo --no-such-option 3", "no option --no-such-option"),
    ("mtmim frobnicate x", "no such command"),
    ("python bench/no_such_bench.py --x 1", "no such file"),
    ("make no-such-target", "no such target"),
    ("mtmim evaluate --protocol (", "shell syntax"),
    ("no-such-program-xyz --go", "not a command"),
    ("for f in a b; do mtmim evaluate --flip $f --bogus; done", "no option --bogus"),
])
def test_check_catches_malformed_commands(cmd: str, problem: str) -> None:
    block = RF.Block(id="x", cmd=cmd, time="1 s")
    problems = RF.command_problems(block)
    assert problems and problem in problems[0], problems


def test_check_accepts_loops_env_and_make() -> None:
    for cmd in ("for f in concat sum; do echo flip $f; mtmim evaluate --flip $f -q; done",
                "OMP_NUM_THREADS=1 python bench/fgnet_align.py --step 2",
                "make demo && grep -c x README.md > /dev/null",
                "python -m mtmim_cli.cli evaluate --help"):
        assert RF.command_problems(RF.Block(id="x", cmd=cmd, time="1 s")) == [], cmd


def test_parse_rejects_bad_heads() -> None:
    with pytest.raises(RF.FigureError, match="needs time"):
        FB.parse_blocks("<!-- figure id=a cmd: echo 1 -->\nx\n<!-- /figure -->\n")
    with pytest.raises(RF.FigureError, match="used twice"):
        FB.parse_blocks('<!-- figure id=a time="1" cmd: echo 1 -->\n<!-- /figure -->\n' * 2)
    with pytest.raises(RF.FigureError, match="unknown attribute"):
        FB.parse_blocks('<!-- figure id=a time="1" colour=red cmd: echo 1 -->\n<!-- /figure -->\n')


def test_measured_time_replaces_the_time_attribute() -> None:
    assert [RF.human_duration(s) for s in (42, 600, 5400)] == ["about 42 s", "about 10 min",
                                                                "about 1.5 h"]
    text = '<!-- figure time="not timed yet" id=a cmd: echo 1 -->\nx\n<!-- /figure -->\n'
    new = RF.replace_body(text, "a", "y\n", time_text="about 3 s")
    assert new == '<!-- figure time="about 3 s" id=a cmd: echo 1 -->\ny\n<!-- /figure -->\n'


# ---------------------------------------------------------------- blocks that read blocks
def _chain(source_b: str | None, source_c: str | None = None) -> str:
    """Three blocks: a reads b, b reads c; each prints its name into log.txt and the README."""
    def head(i: str, reads: str, src: str | None) -> str:
        extra = (f" reads={reads}" if reads else "") + (f" source={src}" if src else "")
        return (f'<!-- figure id={i} time="1 s"{extra} cmd: echo {i} >> log.txt; echo {i} -->\n'
                f"old {i}\n<!-- /figure -->\n")
    return head("a", "b", None) + head("b", "c", source_b) + head("c", "", source_c)


def _run(readme: Path, *args: str) -> int:
    return RF.main(["--readme", str(readme), "--quiet", "--venv", str(readme.parent / "none"),
                    "--workdir", str(readme.parent), *args])


def test_reads_and_source_attributes_parse_and_bad_ones_are_refused() -> None:
    blocks = FB.parse_blocks(_chain("0123456789ab"))
    assert [(b.id, b.reads, b.source) for b in blocks] == [
        ("a", ("b",), None), ("b", ("c",), "0123456789ab"), ("c", (), None)]
    assert [b.id for b in RF.dependency_order(blocks)] == ["c", "b", "a"]
    with pytest.raises(RF.FigureError, match="reads nope: no such block"):
        FB.parse_blocks('<!-- figure id=a time="1" reads=nope cmd: echo 1 -->\n<!-- /figure -->\n')
    with pytest.raises(RF.FigureError, match="cycle: a -> b -> a"):
        FB.parse_blocks('<!-- figure id=a time="1" reads=b cmd: echo 1 -->\n<!-- /figure -->\n'
                        '<!-- figure id=b time="1" reads=a cmd: echo 1 -->\n<!-- /figure -->\n')
    with pytest.raises(RF.FigureError, match="12 hex digits"):
        FB.parse_blocks('<!-- figure id=a time="1" source=xyz cmd: echo 1 -->\n<!-- /figure -->\n')


def test_a_run_records_the_code_that_made_it(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(_chain(None))
    assert _run(readme, "--only", "c") == 0
    (c,) = [b for b in FB.parse_blocks(readme.read_text()) if b.id == "c"]
    assert c.source == RF.current_source() and c.time == "about 0 s"
    # rewritten in place the next time, not added twice
    old = FB.parse_blocks(readme.read_text())
    text = RF.replace_body(readme.read_text(), "c", "x\n", source_text="ffffffffffff")
    assert text.count("source=") == 1 and FB.parse_blocks(text)[2].source == "ffffffffffff"
    assert [b.source for b in old[:2]] == [None, None]


def test_a_block_reading_a_stale_block_is_refused_or_its_inputs_rerun_first(tmp_path) -> None:
    readme = tmp_path / "README.md"
    log = tmp_path / "log.txt"
    now = RF.current_source()
    # b was made by other code: a, which reads it, is refused, naming b and why
    readme.write_text(_chain("0123456789ab", now))
    before = readme.read_text()
    assert _run(readme, "--only", "a") == 2
    assert readme.read_text() == before and not log.exists()
    with pytest.raises(RF.FigureError, match=r"figure a reads figure b, made by other code "
                                             r"\(source 0123456789ab, now [0-9a-f]{12}\): rerun "
                                             r"it first \(--only b,a\) or pass --with-inputs"):
        RF.plan(FB.parse_blocks(before), [FB.parse_blocks(before)[0]], now)
    # chosen together they run inputs first, whatever order they are named in
    assert _run(readme, "--only", "a,b") == 0
    assert log.read_text().split() == ["b", "a"]
    assert {b.id: b.source for b in FB.parse_blocks(readme.read_text())} == {
        "a": now, "b": now, "c": now}
    # now b is current: a alone runs
    log.unlink()
    assert _run(readme, "--only", "a") == 0 and log.read_text().split() == ["a"]


def test_a_stale_input_further_up_reruns_everything_below_it(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    log = tmp_path / "log.txt"
    now = RF.current_source()
    readme.write_text(_chain(now, None))      # b is current, but c, which b reads, is not
    with pytest.raises(RF.FigureError, match="figure a reads figure b, it reads blocks that rerun"):
        RF.plan(FB.parse_blocks(readme.read_text()), FB.parse_blocks(readme.read_text())[:1], now)
    assert _run(readme, "--only", "a", "--with-inputs") == 0
    assert log.read_text().split() == ["c", "b", "a"]


def test_a_failed_input_skips_its_readers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text('<!-- figure id=r time="1" reads=w cmd: echo reader -->\nold r\n<!-- /figure -->\n'
                      '<!-- figure id=w time="1" cmd: exit 3 -->\nold w\n<!-- /figure -->\n')
    before = readme.read_text()
    assert _run(readme, "--only", "r,w") == 1 and readme.read_text() == before


def test_check_reports_stale_blocks_and_undeclared_reads(tmp_path: Path, capsys) -> None:
    readme = tmp_path / "README.md"
    now = RF.current_source()
    readme.write_text(f'<!-- figure id=w time="1" source={now} cmd: mtmim evaluate --out eval/x/results.md -->\n'
                      "x\n<!-- /figure -->\n"
                      '<!-- figure id=r time="1" source=0123456789ab cmd: cat eval/x/results.md -->\n'
                      "y\n<!-- /figure -->\n")
    assert RF.main(["--readme", str(readme), "--check"]) == 1
    out = capsys.readouterr().out
    assert "figure r: reads eval/x, an output of figure w, without reads=w" in out
    assert "figure r: stale, made by other code (source 0123456789ab" in out
    assert "figure w: stale" not in out and "1 problem(s), 1 stale" in out
    readme.write_text(readme.read_text().replace("id=r ", "id=r reads=w "))
    assert RF.main(["--readme", str(readme), "--check"]) == 0   # stale alone does not fail it
    assert "0 problem(s), 1 stale" in capsys.readouterr().out


def test_loops_expand_when_matching_paths() -> None:
    w = RF.Block(id="w", cmd="for k in 1 2; do mtmim evaluate --out runs/f$k; done", time="1")
    assert FC.output_paths(w) == {"runs/f1", "runs/f2"}
    r = RF.Block(id="r", cmd="for d in f2 g; do cat runs/$d/split.json; done", time="1")
    prefix = RF.Block(id="p", cmd="cat runs/f10/x", time="1")    # runs/f1 is not runs/f10
    assert RF.undeclared_reads([w, r, prefix]) == [
        "README.md: figure r: reads runs/f2, an output of figure w, without reads=w"]


def test_the_readmes_blocks_declare_what_they_read() -> None:
    blocks = {b.id: b for b in RF.parse_documents(RF.default_documents())}
    assert RF.undeclared_reads(list(blocks.values())) == []
    assert set(blocks["k10-pooled"].reads) == {"refit-full-k10", "refit-full-k10-seeds",
                                              "refit-full-k10-val"}
    assert blocks["age-subspace"].reads == ("open-set",)
    assert set(blocks["cross-age-folds"].reads) == {"mi-sweep", "mi-folds"}
    assert blocks["cacd-vs"].reads == ("open-set",)
    assert blocks["cacd-vs-levers"].reads == ("cacd-vs",)


def test_blocks_of_several_documents_read_each_other(tmp_path: Path) -> None:
    """A block in docs/ may read a block of README.md: ids are unique across the documents
    given, each block is rewritten in its own document, and inputs run first."""
    log = tmp_path / "log.txt"
    readme, doc = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text(f"<!-- figure id=w time=1 cmd: echo w >> {log}; echo made w -->\n"
                      "<!-- /figure -->\n")
    doc.write_text(f"Results.\n\n<!-- figure id=r reads=w time=1 cmd: echo r >> {log}; "
                   "echo made r -->\n<!-- /figure -->\n")
    args = ["--readme", str(readme), "--readme", str(doc), "--quiet",
            "--venv", str(tmp_path / "none"), "--workdir", str(tmp_path)]
    assert RF.main([*args, "--only", "r,w"]) == 0
    assert log.read_text().split() == ["w", "r"]
    assert "made w" in readme.read_text() and "made r" not in readme.read_text()
    assert "made r" in doc.read_text() and doc.read_text().startswith("Results.\n")
    # alone, the read is unknown; a second document may not reuse an id
    with pytest.raises(RF.FigureError, match="figure r reads w: no such block"):
        RF.parse_documents([doc])
    (tmp_path / "dup.md").write_text("<!-- figure id=w time=1 cmd: echo x -->\n<!-- /figure -->\n")
    with pytest.raises(RF.FigureError, match="figure id.s. used twice: w"):
        RF.parse_documents([readme, tmp_path / "dup.md"])


def test_the_default_documents_are_the_readme_and_the_docs_with_figures() -> None:
    docs = RF.default_documents()
    assert docs[0] == REPO / "README.md" and (REPO / "docs" / "sface.md") in docs
    assert (REPO / "docs" / "DEVELOPING.md") not in docs
    blocks = RF.parse_documents(docs)
    assert RF.undeclared_reads(blocks) == []
    assert all(RF.command_problems(b) == [] for b in blocks)


def test_a_partial_block_runs_beside_stale_inputs_and_reruns_them_on_request(tmp_path) -> None:
    readme = tmp_path / "README.md"
    log = tmp_path / "log.txt"
    now = RF.current_source()
    readme.write_text(_chain("0123456789ab", now).replace("id=a ", "id=a partial ", 1))
    (a,) = [b for b in FB.parse_blocks(readme.read_text()) if b.id == "a"]
    assert a.partial
    assert _run(readme, "--only", "a") == 0 and log.read_text().split() == ["a"]
    log.unlink()
    assert _run(readme, "--only", "a", "--with-inputs") == 0
    assert log.read_text().split() == ["b", "a"]
