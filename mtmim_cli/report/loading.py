"""The report's inputs: training run folders and `mtmim evaluate`'s outputs, recognised by
what they hold and read into `Run` and `Evaluation`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.feature_file import read_feature_file
from mtmim_cli.eval.tables import manifest_files


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
    """One `mtmim evaluate` output (results.md and its siblings)."""

    path: Path
    results: dict
    markdown: str
    cmc: Any | None  # DataFrame (protocol, model, rank, rate)
    roc: Any | None  # DataFrame (protocol, model, far, tar)
    features: dict | None = None  # model label -> features.npz entry (evaluate --features)
    ignored: list[str] = field(default_factory=list)  # listed files missing or changed

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
    """`path` is the folder of results.json (or results.json / results.md itself)."""
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        stem = path.stem
    else:  # results.json, else the one <stem>.json beside a <stem>.md that evaluate wrote
        stems = [p.stem for p in sorted(folder.glob("*.json"))
                 if (folder / f"{p.stem}.md").is_file() and not p.name.endswith(".outcomes.json")]
        stem = "results" if (folder / "results.json").is_file() or len(stems) != 1 else stems[0]
    rj = folder / f"{stem}.json"
    try:
        results = json.loads(rj.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MtmimError(f"{rj}: not a readable results file ({exc})") from None
    if not isinstance(results, dict):
        raise MtmimError(f"{rj}: not a results file of `mtmim evaluate` (not a JSON object)")
    # Only what the manifest (results.json) lists with a matching sha256 is attached: files
    # of another evaluation in the folder, or left by a run that died, are not this one's.
    files, ignored = manifest_files(folder, results)
    markdown = files["md"].read_text() if "md" in files else ""
    cmc = _read_csv(files["cmc"]) if "cmc" in files else None
    roc = _read_csv(files["roc"]) if "roc" in files else None
    return Evaluation(path=folder, results=results, markdown=markdown,
                      cmc=cmc if cmc is not None and len(cmc) else None,
                      roc=roc if roc is not None and len(roc) else None,
                      features=read_feature_file(files["features"]) if "features" in files else None,
                      ignored=[f"{rj}: {line}" for line in ignored])

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
