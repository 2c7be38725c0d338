"""`--recipe auto`'s files: the store of finished candidates (resume), a candidate run's
models at each WiSE alpha from one training, pruning, and the model equal to the init."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtmim_cli.atomic import atomic_write_text


class CandidateStore:
    """One JSON file per finished (fold, training setting), named by its key's digest and
    holding the key, written atomically: a killed search keeps every finished candidate,
    and a file under another key (other data, settings or code) is never read as this one."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, key: dict) -> Path:
        text = json.dumps(key, sort_keys=True, default=str)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"

    def get(self, key: dict) -> dict | None:
        path = self._path(key)
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        same = json.loads(json.dumps(key, sort_keys=True, default=str))
        return stored.get("result") if stored.get("key") == same else None

    def put(self, key: dict, result: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(key), json.dumps(
            {"key": json.loads(json.dumps(key, sort_keys=True, default=str)), "result": result}))


def _prune(run: Path, keep_model: bool) -> None:
    """A scored candidate's weights are not needed again (its result is stored; an SFace
    candidate holds 130 MB): keep its config and metrics, and model.pt of the one whose
    checkpoint format the fallback copies."""
    for p in [run / "checkpoints" / "last.pt", run / "best.pt",
              *([] if keep_model else [run / "model.pt"])]:
        p.unlink(missing_ok=True)


def _slug(tk: tuple) -> str:
    depth, lr, lam = tk
    return f"{depth.replace(':', '')}-lr{lr:g}" + ("" if lam is None else f"-lam{lam:g}")


def wise_models(run: Path, alphas: Sequence[float]) -> dict[float, Any]:
    """The run's model at each WiSE alpha, from one training: model.pt holds the lowest
    alpha a0 = (1 - a0) w0 + a0 w, checkpoints/last.pt the trained w, so w0 follows and
    any alpha is w0 + alpha (w - w0). Weights the training left unchanged (the frozen trunk)
    are kept bit for bit, so the trunk memo still recognises them."""
    import torch

    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.train.checkpoint import load_checkpoint

    a0 = float(alphas[0])
    model = load_identity_model(run / "model.pt")
    if all(float(a) == a0 for a in alphas):
        return {a0: model}
    at_a0 = load_checkpoint(run / "model.pt")["objective"]
    trained = load_checkpoint(run / "checkpoints" / "last.pt")["objective"]
    out = {}
    for a in alphas:
        a = float(a)
        if a == a0:
            out[a] = model
            continue
        state = {}
        for k, m in at_a0.items():
            if not k.startswith(("encoder.", "factorize.")):
                continue
            t = trained[k]
            if not m.is_floating_point() or torch.equal(m, t) or a == 1.0:
                state[k] = t
            else:
                w0 = (m - a0 * t) / (1.0 - a0)
                state[k] = w0 + a * (t - w0)
        other = copy.deepcopy(model)
        other.encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items()
                                       if k.startswith("encoder.")})
        other.factorize.load_state_dict({k[len("factorize."):]: v for k, v in state.items()
                                         if k.startswith("factorize.")})
        out[a] = other.eval()
    return out


def write_init_model(out: Path, init_model, *, candidate_run: Path, init: str | os.PathLike,
                     caches: Sequence[str | os.PathLike], options: dict, record: dict) -> None:
    """model.pt equal to the init: a candidate's checkpoint (its format and heads) with the
    init's encoder weights and a factorization unit of zero weight and bias, so
    x_id = x - 0 = the init's features exactly. It records no training images (it was
    trained on none) and the search's record; config.json says the same."""
    import torch

    from mtmim_cli.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(candidate_run / "model.pt")
    obj = {k: v for k, v in state["objective"].items() if not k.startswith("encoder.")}
    for k, v in init_model.encoder.state_dict().items():
        obj[f"encoder.{k}"] = v.detach().clone()
    for k in [k for k in obj if k.startswith("factorize.")]:
        obj[k] = torch.zeros_like(obj[k])
    meta = {k: v for k, v in state["meta"].items() if k not in ("trained_on", "wise")}
    meta.update({"init": str(init), "auto": record, "equals_init": True})
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "model.pt", {"meta": meta, "objective": obj})
    # an earlier search's retrained run in this folder no longer describes model.pt
    for stale in (out / "checkpoints" / "last.pt", out / "best.pt", out / "validation.csv"):
        stale.unlink(missing_ok=True)
    config = {"extra": {"recipe": "auto", "mode": options.get("mode", "mtmim"),
                        "caches": [str(c) for c in caches], "init": str(init), "equals_init": True, "auto": record}}
    atomic_write_text(out / "config.json", json.dumps(config, indent=1, default=str))
    # a run folder `mtmim report` reads (it was trained for no step)
    atomic_write_text(out / "metrics.csv", "step,epoch,loss,accuracy\n")

