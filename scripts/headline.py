#!/usr/bin/env python
"""The README's "Results at a glance": one Markdown table whose every figure is read from the
figure block (in README.md or docs/*.md) that printed it, with a link to that block; the
published rows come from the code that prints them beside evaluate's tables
(`mtmim_cli.eval.tables.REPORTED`). A figure whose block has not printed it yet shows as "–",
and so does every figure of a block made by other code than this checkout's (stale: its
figures may not be what the code prints now); the table names those blocks and how to rerun
them (the block is `partial` in readme_figures' terms).

    python scripts/headline.py
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("readme_figures", REPO / "scripts" / "readme_figures.py")
RF = importlib.util.module_from_spec(_spec)
sys.modules["readme_figures"] = RF
_spec.loader.exec_module(RF)
import figure_blocks as FB  # noqa: E402  (beside readme_figures, on the path it set)

NUM = r"[+-]?\d+(?:\.\d+)?"


def read_blocks(current: str) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """Block id -> (body text, document path relative to the repository), and the ids of the
    blocks whose recorded source is not `current` (or none is recorded): one parse."""
    out, stale = {}, set()
    for doc in RF.default_documents():
        text = doc.read_text()
        for b in FB.parse_text(text, str(doc)):
            out[b.id] = (text[b.span[0]:b.span[1]], str(doc.relative_to(REPO)))
            if RF.staleness(b, current) is not None:
                stale.add(b.id)
    return out, stale


class Reader:
    def __init__(self) -> None:
        self.blocks, self.stale = read_blocks(RF.current_source())
        self.used: list[str] = []
        self.left_out: list[str] = []   # stale blocks whose figures were asked for

    def find(self, block: str, pattern: str, group: int = 1) -> str:
        """The first match of `pattern` (a regular expression, multiline) in the block's body;
        "–" if the block is stale."""
        if block not in self.blocks:
            return "–"
        if block in self.stale:
            if block not in self.left_out:
                self.left_out.append(block)
            return "–"
        if block not in self.used:
            self.used.append(block)
        m = re.search(pattern, self.blocks[block][0], re.M)
        return m.group(group) if m else "–"

    def row(self, block: str, name: str, column: int) -> str:
        """Column `column` (0 = the first cell) of the Markdown table row whose first cell is
        `name`, in the block's body."""
        cells = self.find(block, rf"^\| {re.escape(name)} \|(.*)\|\s*$")
        if cells == "–":
            return "–"
        parts = [c.strip() for c in cells.split("|")]
        return parts[column - 1] if 0 < column <= len(parts) else "–"

    def link(self, block: str) -> str:
        if block not in self.blocks:
            return f"{block} (no such block)"
        return f"[{block}]({self.blocks[block][1]})"


def mean(cell: str) -> str:
    """'93.21 ± 0.36' -> '93.21'."""
    return cell.split("±")[0].strip() if cell != "–" else cell


def main() -> None:
    from mtmim_cli.eval.tables import REPORTED

    r = Reader()
    rows = []

    def add(what: str, casia: str, sface: str, blocks: list[str]) -> None:
        rows.append(f"| {what} | {casia} | {sface} | {', '.join(r.link(b) for b in blocks)} |")

    add("FG-NET leave-one-out rank-1 %, as released",
        r.find("casia-loo", rf"^casia: rank-1 ({NUM})%"),
        r.find("sface-loo", rf"^sface: rank-1 ({NUM})%"), ["casia-loo", "sface-loo"])
    heads = [(r.find("refit-head", rf"^casia/{m}: rank-1 ({NUM})%"),
              r.find("sface-refit-head", rf"^sface/{m}: rank-1 ({NUM})%"))
             for m in ("baseline", "age", "mtmim")]
    add("FG-NET, heads re-fitted in every one of the 1002 rounds (the paper's protocol): "
        "baseline / +age / MT-MIM", " / ".join(c for c, _ in heads),
        " / ".join(s for _, s in heads), ["refit-head", "sface-refit-head"])
    pooled = r"^  pooled over \d+ seeds: (.*?); "
    add("FG-NET, fine-tuned in each of 10 rounds, 3 seeds pooled: MT-MIM vs baseline "
        "(difference, 95% interval)", r.find("k10-pooled", pooled),
        r.find("sface-k10-pooled", pooled), ["k10-pooled", "sface-k10-pooled"])
    for what, col, fmt in (("Open set, FG-NET subjects 61-82 rank-1 %", 2, mean),
                           ("Open set, the 60 CelebA test people rank-1 %", 3, mean),
                           ("Open set, age R² of x_id on subjects 61-82", 4, mean)):
        cells = []
        for block in ("open-set", "sface-open-set"):
            pre = fmt(r.row(block, "pretrained", col))
            base, mt = fmt(r.row(block, "baseline", col)), fmt(r.row(block, "mtmim", col))
            cells.append(f"{pre} → {base} / {mt}")
        add(f"{what}: released → baseline / MT-MIM (fine-tuned on subjects 1-60, mean of 3 "
            "seeds)", *cells, ["open-set", "sface-open-set"])
    cross = [r.find(b, rf"^\| {m} \| pretrained \| [^|]+\| ({NUM} \[{NUM}, {NUM}\]) \|")
             for b in ("age-subspace", "sface-cross-age") for m in ("baseline", "mtmim")]
    add("Cross-age AUC (photos aged ≤ 10 against ≥ 18, subjects 61-82), fine-tune − released: "
        "baseline / MT-MIM", f"{cross[0]} / {cross[1]}", f"{cross[2]} / {cross[3]}",
        ["age-subspace", "sface-cross-age"])
    cacd = []
    for block in ("cacd-vs", "sface-cacd-vs"):
        init = mean(r.row(block, "init", 1))
        acc = [mean(r.row(block, s, 2)) for s in ("baseline", "mtmim")]
        diff = [r.row(block, s, 3) for s in ("baseline", "mtmim")]
        cacd.append(f"{init} → {acc[0]} / {acc[1]} ({diff[0]} / {diff[1]})")
    add("CACD-VS accuracy %, 4 of its 10 folds: released → baseline / MT-MIM (fine-tuned on "
        "FG-NET subjects 1-60, mean of 3 seeds; difference pooled over seeds)", *cacd,
        ["cacd-vs", "sface-cacd-vs"])

    print("| Measurement | CASIA MobileFaceNet (1M parameters) | SFace (ONNX, 10M, MS1M) | Blocks |")
    print("|---|---|---|---|")
    for line in rows:
        print(line)
    if r.left_out:
        ids = ",".join(r.left_out)
        print()
        print(f"Not shown (\"–\"), made by older code than this checkout's: {', '.join(r.left_out)}; "
              f"`python scripts/readme_figures.py --only {ids} --with-inputs` reruns them.")
    published = "; ".join(f"{name} {m['rank1']:.2f}" for name, m in REPORTED["fgnet-loo"])
    print()
    print(f"As published (ResNet-50 pretrained on MS1M and CASIA-WebFace), FG-NET leave-one-out "
          f"rank-1 %: {published} (the rows `mtmim evaluate` prints beside its FG-NET tables).")


if __name__ == "__main__":
    main()
