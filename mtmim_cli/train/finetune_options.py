"""The fine-tuning settings and their defaults, in one place. `finetune` resolves a run's
settings from these (under a `--recipe` and the options given); `mtmim finetune` shows them
as its options' defaults and passes on only the options the user gave. No torch here, so
`mtmim finetune --help` stays light."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from mtmim_cli.train.config import TrainConfig

MODES = ("baseline", "age", "mtmim")
# What the MI penalty (mode mtmim) measures x_id against: the paper's x_age (CLUB with a
# Gaussian q), or the age group (CLUB, or the lautum information, with a categorical q).
MI_TARGETS = ("features", "age-group", "lautum")

# The paper's settings; every one is an option of `finetune` and `mtmim finetune`.
DEFAULTS: dict[str, Any] = {
    "mode": "mtmim", "age_groups": 8, "lambda_age": 0.1, "lambda_mim": 1e-4, "q_steps": 5,
    "q_lr": 1e-5, "q_hidden": 512, "mi_target": "features", "logvar_bound": 7.0, "factorize_gain": 0.1,
    "margin": "arcface", "s": 64.0, "m": None, "backbone": None, "embedding_size": None,
    "val_cache": None, "val_pairs": 3000, "exclude": None, "warn_negative_after": 50,
    "head_warmup_steps": 0, "partial_fc": 0.0, "identities": "auto",
    # transfer tools for small sets (train/transfer.py); off by default: the paper has none
    "recipe": None, "freeze_through": None, "freeze_bn": "off", "init_centres": "random",
    "encoder_lr": None, "l2sp": 0.0, "augment": "none", "replay": None, "replay_ratio": 0.25,
    "val_identities": 0, "activation_cache": None, "activation_dtype": "float16",
    "train_identities": None, "replay_identities": None,
}
# TrainConfig fields where fine-tuning differs from TrainConfig's own defaults (pretraining).
TRAIN_DEFAULTS: dict[str, Any] = {"out": "runs/finetune", "lr": 0.02, "optimizer": "adam",
                                  "schedule": "plateau", "batch_size": 400, "epochs": 10}


# Named bundles of settings (`--recipe`), over the defaults and under explicit options.
# PROVISIONAL: the values are those issue 10 reports as working in one experiment outside
# the toolkit (one seed); they are to be set by validation on identities carved out of the
# training side.
RECIPES: dict[str, dict[str, Any]] = {
    "small": {"freeze_through": "auto", "freeze_bn": "stats", "init_centres": "mean-mirror",
              "margin": "arcface", "s": 64.0, "m": 0.35, "optimizer": "adam", "epochs": 5,
              "lr": 1e-3, "l2sp": 1e-2, "batch_size": 64, "schedule": "constant"},
}


def recipe_summary() -> str:
    """The recipes and their values, for --help."""
    return "; ".join(f"{name} = " + ", ".join(f"{k} {v}" for k, v in r.items())
                     for name, r in RECIPES.items())


def default(name: str) -> Any:
    """A fine-tuning option's or training setting's default, as `finetune` resolves it
    without a recipe."""
    if name in DEFAULTS:
        return DEFAULTS[name]
    if name in TRAIN_DEFAULTS:
        return TRAIN_DEFAULTS[name]
    for f in fields(TrainConfig):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise KeyError(f"{name}: not a fine-tuning setting")
