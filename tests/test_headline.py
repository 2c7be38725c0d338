"""scripts/headline.py: the README's headline table reads each figure from the block that
printed it, and says "–" where a block has not printed it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("headline", REPO / "scripts" / "headline.py")
H = importlib.util.module_from_spec(_spec)
sys.modules["headline"] = H
_spec.loader.exec_module(H)


def test_figures_come_from_their_blocks(tmp_path: Path, monkeypatch, capsys) -> None:
    doc = tmp_path / "results.md"
    now = "0123456789ab"
    monkeypatch.setattr(H.RF, "current_source", lambda: now)
    doc.write_text(
        f"<!-- figure id=casia-loo time=1 source={now} cmd: x -->\nflip concat\n"
        "casia: rank-1 89.82% over 1002 queries\nflip sum\ncasia: rank-1 89.92% over 1002\n"
        "<!-- /figure -->\n"
        f"<!-- figure id=open-set time=1 raw source={now} cmd: y -->\n"
        "| Setting | Seeds | FG-NET rank-1 % | CelebA rank-1 % | Age R² (x_id) |\n|---|---|---|---|---|\n"
        "| pretrained | 1 | 92.86 | 96.86 | 0.478 |\n| baseline | 3 | 93.21 ± 0.36 | 96.75 ± 0.10 | 0.271 ± 0.013 |\n"
        "| mtmim | 3 | 93.45 ± 0.21 | 96.75 ± 0.13 | -0.004 ± 0.066 |\n<!-- /figure -->\n")
    monkeypatch.setattr(H.RF, "default_documents", lambda: [doc])
    monkeypatch.setattr(H, "REPO", tmp_path)
    H.main()
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("| FG-NET leave-one-out"))
    assert "| 89.82 | – |" in line and "[casia-loo](results.md)" in line
    assert "sface-loo (no such block)" in line
    rank = next(ln for ln in out.splitlines() if "subjects 61-82 rank-1" in ln)
    assert "| 92.86 → 93.21 / 93.45 | – → – / – |" in rank
    r2 = next(ln for ln in out.splitlines() if "age R²" in ln)
    assert "0.478 → 0.271 / -0.004" in r2
    assert "MT-MIM 94.21" in out


def test_a_stale_blocks_figures_are_not_shown(tmp_path: Path, monkeypatch, capsys) -> None:
    """A block made by other code shows "–" and is named with the command that reruns it."""
    doc = tmp_path / "results.md"
    body = "casia: rank-1 89.82% over 1002 queries\n<!-- /figure -->\n"
    doc.write_text("<!-- figure id=casia-loo time=1 source=0123456789ab cmd: x -->\n" + body
                   + "<!-- figure id=sface-loo time=1 source=ffffffffffff cmd: x -->\n"
                   + body.replace("casia", "sface").replace("89.82", "92.81"))
    monkeypatch.setattr(H.RF, "default_documents", lambda: [doc])
    monkeypatch.setattr(H.RF, "current_source", lambda: "ffffffffffff")
    monkeypatch.setattr(H, "REPO", tmp_path)
    H.main()
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("| FG-NET leave-one-out"))
    assert "| – | 92.81 |" in line
    assert "made by older code than this checkout's: casia-loo;" in out
    assert "--only casia-loo --with-inputs" in out


def test_the_readmes_headline_may_run_while_its_inputs_are_stale() -> None:
    from tests.test_readme_figures import RF

    blocks = {b.id: b for b in RF.parse_documents(RF.default_documents())}
    head = blocks["headline"]
    assert head.partial and head.cmd == "python scripts/headline.py"
    assert RF.plan(list(blocks.values()), [head], "0" * 12) == [head]
