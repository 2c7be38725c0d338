"""The settings of one training run; the resolved values are saved as `config.json` in the
run folder, and `--resume` checks that a continued run uses the same ones."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mtmim_cli.errors import MtmimError

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("plateau", "poly", "cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
KEEP = ("last", "best")

# Settings that may change between a killed run and its resumption without changing results.
RESUME_FREE = ("resume", "workers", "progress", "ckpt_every", "log_every", "max_bad_steps")


@dataclass
class TrainConfig:
    out: str = "runs/pretrain"
    epochs: int = 10
    batch_size: int = 128              # global: split evenly over the ranks
    optimizer: str = "adam"
    lr: float = 0.001
    momentum: float = 0.9              # SGD only
    weight_decay: float = 5e-4
    schedule: str = "plateau"          # reduce by plateau_factor when the epoch loss stalls
    warmup_steps: int = 0              # linear warm-up (poly, cosine, constant)
    warmup_epochs: float = 0.0         # the same in epochs (used when warmup_steps is 0)
    poly_power: float = 2.0
    plateau_patience: int = 1          # epochs without a better loss before the drop
    plateau_factor: float = 0.1
    plateau_threshold: float = 1e-3    # relative improvement that counts as better
    amp: str = "none"
    clip_grad: float = 0.0             # max global grad norm; 0 disables
    max_bad_steps: int = 10            # consecutive steps skipped for non-finite gradients before stopping
    seed: int = 0
    workers: int = -1                  # DataLoader workers per process; -1: loader.default_workers()
    accumulate: int = 1                # micro-batches per optimiser step (gradients summed)
    max_steps: int = 0                 # stop after this many steps (0: run all epochs)
    ckpt_every: int = 200              # steps between full-state checkpoints (also every epoch end)
    log_every: int = 1
    val_every: int = 0                 # steps between validations (0: before and after only)
    early_stop: int = 0                # stop after this many validations without a better accuracy (0: off)
    keep: str = "last"                 # model.pt: the last weights, or the best validation checkpoint
    sync_bn: bool = False              # BatchNorm statistics over the global batch when distributed
    resume: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)   # the command's own settings, recorded

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise MtmimError(f"--optimizer {self.optimizer}: choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise MtmimError(f"--schedule {self.schedule}: choose from {', '.join(SCHEDULES)}")
        if self.keep not in KEEP:
            raise MtmimError(f"--keep {self.keep}: choose from {', '.join(KEEP)}")
        if self.early_stop < 0:
            raise MtmimError(f"--early-stop {self.early_stop}: must be >= 0")
        if self.amp not in AMP_MODES:
            raise MtmimError(f"--amp {self.amp}: choose from {', '.join(AMP_MODES)}")
        if self.warmup_epochs < 0 or self.workers < -1:
            raise MtmimError(f"--warmup-epochs {self.warmup_epochs} / --workers {self.workers}: "
                             "must be >= 0")
        for name in ("epochs", "batch_size", "max_bad_steps", "accumulate"):
            if getattr(self, name) < 1:
                raise MtmimError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.lr <= 0:
            raise MtmimError(f"--lr {self.lr}: must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def write_config(path: Path, config: TrainConfig) -> None:
    from mtmim_cli.atomic import atomic_write_text
    atomic_write_text(path, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def check_resume_config(path: Path, config: TrainConfig) -> None:
    """Refuse to resume with settings that would change the result."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MtmimError(f"{path}: unreadable run config ({exc})") from None
    now = json.loads(json.dumps(config.to_dict()))  # same JSON round trip as the saved one
    saved, now = _flat(saved), _flat(now)
    diffs = [k for k in sorted(set(saved) | set(now))
             if k not in RESUME_FREE and saved.get(k) != now.get(k)]
    if diffs:
        show = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diffs[:3])
        raise MtmimError(f"{path}: --resume with different settings ({show}); "
                         "use the original options or a new --out folder")


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k != "extra"}
    out.update({f"{k}": v for k, v in (d.get("extra") or {}).items()})
    return out


def layered_default(name: str, layers: Sequence[Mapping[str, Any]], what: str) -> Any:
    """A setting's default as a command resolves it without a preset or recipe: the first of
    `layers` (the command's own defaults) that holds `name`, else TrainConfig's field default."""
    for layer in layers:
        if name in layer:
            return layer[name]
    for f in fields(TrainConfig):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise KeyError(f"{name}: not a {what} setting")
