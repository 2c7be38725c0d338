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


def test_every_readme_block_is_well_formed() -> None:
    blocks = RF.parse_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 5
    for b in blocks:
        assert b.time and RF.command_problems(b) == [], (b.id, RF.command_problems(b))
    # Every block carries its command visibly, not only in the HTML comment.
    text = (REPO / "README.md").read_text()
    for b in blocks:
        body = text[b.span[0]:b.span[1]]
        assert "$ " in body, b.id


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
    assert [(b.id, b.time) for b in RF.parse_blocks(text)] == [("answer", "about 0 s"),
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
    assert RF.markdown_spacing(lines) == ["Caption.", "", "| A | B |", "|---|---|", "| 1 | 2 |",
                                          "", "| C |", "|:-:|", "| 3 |", "", "After."]
    # a row that merely follows another row is not a new table
    assert RF.markdown_spacing(["| a |", "|---|", "| 1 |", "| 2 |"]) == ["| a |", "|---|",
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
        RF.parse_blocks("<!-- figure id=a cmd: echo 1 -->\nx\n<!-- /figure -->\n")
    with pytest.raises(RF.FigureError, match="used twice"):
        RF.parse_blocks('<!-- figure id=a time="1" cmd: echo 1 -->\n<!-- /figure -->\n' * 2)
    with pytest.raises(RF.FigureError, match="unknown attribute"):
        RF.parse_blocks('<!-- figure id=a time="1" colour=red cmd: echo 1 -->\n<!-- /figure -->\n')


def test_measured_time_replaces_the_time_attribute() -> None:
    assert [RF.human_duration(s) for s in (42, 600, 5400)] == ["about 42 s", "about 10 min",
                                                                "about 1.5 h"]
    text = '<!-- figure time="not timed yet" id=a cmd: echo 1 -->\nx\n<!-- /figure -->\n'
    new = RF.replace_body(text, "a", "y\n", time_text="about 3 s")
    assert new == '<!-- figure time="about 3 s" id=a cmd: echo 1 -->\ny\n<!-- /figure -->\n'
