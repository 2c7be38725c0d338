"""The report's inputs: training run folders and `mtmim evaluate`'s outputs, recognised by
what they hold and read into `Run` and `Evaluation`."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.feature_file import read_feature_file
from mtmim_cli.eval.output_set import NO_MANIFEST, read_manifest, verified_files
from mtmim_cli.eval.tables import curve_csvs, results_markdown


@dataclass
class Run:
    """One training run folder."""

    path: Path
    label: str
    mode: str
    kind: str
    metrics: Any  # pandas.DataFrame
    config: dict = field(default_factory=dict)
    validation: Any | None = None  # DataFrame (step, accuracy, std, best_accuracy) or None

    @property
    def model(self) -> Path | None:
        for name in ("model.pt", "best.pt", "checkpoints/last.pt"):
            if (self.path / name).is_file():
                return self.path / name
        return None

@dataclass
class Evaluation:
    """One `mtmim evaluate` output (results.json and the siblings it lists)."""

    path: Path
    results: dict
    markdown: str
    cmc: Any | None  # DataFrame (protocol, model, rank, rate)
    roc: Any | None  # DataFrame (protocol, model, far, tar)
    features: dict | None = None  # model label -> features.npz entry (evaluate --features)
    ignored: list[str] = field(default_factory=list)  # one line per file not attached
    manifest: Path | None = None  # its results.json (a folder may hold several stems')

    def test_faces(self, label: str) -> dict | None:
        """The evaluation's record of how `label`'s training data relates to its test faces."""
        for row in self.results.get("results", []):
            if row.get("model") == label:
                return row.get("test_faces")
        return None

def _read_csv(path: Path):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise MtmimError(f"{path}: not a readable CSV ({exc})") from None

def load_run(path: Path) -> Run:
    metrics_path = path / "metrics.csv"
    df = _read_csv(metrics_path)
    if "step" not in df.columns:
        raise MtmimError(f"{metrics_path}: no 'step' column (not written by the training loop)")
    config: dict = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise MtmimError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    extra = config.get("extra", {}) if isinstance(config.get("extra"), dict) else {}
    mode = str(extra.get("mode") or config.get("mode") or "")
    kind = "finetune" if mode else str(extra.get("kind") or config.get("kind") or "pretrain")
    label = path.name if not mode or mode in path.name else f"{path.name} ({mode})"
    val = _read_csv(path / "validation.csv") if (path / "validation.csv").is_file() else None
    if val is not None and not {"step", "accuracy"} <= set(val.columns):
        val = None
    return Run(path=path, label=label, mode=mode, kind=kind, metrics=df, config=config,
               validation=val if val is not None and len(val) else None)

def load_evaluation(path: Path) -> Evaluation:
    """`path` is the folder of results.json (or a results .json / .md itself). Only what the
    manifest (results.json) lists with a matching sha256 is attached: files of another
    evaluation in the folder, or left by a run that died, are not this one's. The tables and
    curves a listed file would hold are redrawn from results.json itself when that file
    cannot be attached; the features cannot, and stay out."""
    rj, results = read_manifest(path)
    files, ignored = verified_files(rj, results)
    if ignored == [NO_MANIFEST]:
        ignored = [f"{NO_MANIFEST}: its results.md, CSVs and features not attached, tables "
                   "and curves drawn from results.json itself; rerun evaluate for features"]
    markdown = files["md"].read_text() if "md" in files else ""
    cmc = _read_csv(files["cmc"]) if "cmc" in files else None
    roc = _read_csv(files["roc"]) if "roc" in files else None
    if not {"md", "cmc", "roc"} <= set(files):
        md_text, cmc_text, roc_text = _from_results(results)
        markdown = markdown if "md" in files else md_text
        cmc = cmc if "cmc" in files or cmc_text is None else _read_csv(io.StringIO(cmc_text))
        roc = roc if "roc" in files or roc_text is None else _read_csv(io.StringIO(roc_text))
    return Evaluation(path=rj.parent, results=results, markdown=markdown,
                      cmc=cmc if cmc is not None and len(cmc) else None,
                      roc=roc if roc is not None and len(roc) else None,
                      features=read_feature_file(files["features"]) if "features" in files else None,
                      ignored=[f"{rj}: {line}" for line in ignored], manifest=rj)


def _from_results(results: dict) -> tuple[str, str | None, str | None]:
    """results.md, cmc.csv and roc.csv as evaluate would write them from `results`; empty
    where it is not a protocol's table (a distractor run, an older layout of the file)."""
    if not isinstance(results.get("results"), list) or "protocol" not in results:
        return "", None, None
    try:
        return results_markdown(results), *curve_csvs(results)
    except (KeyError, TypeError, ValueError, AttributeError):
        # an older results.json may lack a field the tables read: show none rather than fail
        return "", None, None


def classify_inputs(paths: list[Path]) -> tuple[list[Run], list[Evaluation]]:
    runs, evals = [], []
    for p in paths:
        if not p.exists():
            raise MtmimError(f"{p}: no such file or folder")
        if p.is_dir() and (p / "metrics.csv").is_file():
            runs.append(load_run(p))
        elif (p.is_dir() and list(p.glob("*.json"))) or p.suffix in (".json", ".md"):
            evals.append(load_evaluation(p))
        else:
            raise MtmimError(f"{p}: neither a training run (metrics.csv) nor an evaluation "
                             "(results.json)")
    return runs, evals
