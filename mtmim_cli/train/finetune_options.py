"""The fine-tuning settings layer: the defaults, the recipes, their resolution under the
options given (`resolve_settings`) and the checks that need no file. `finetune`, `--recipe
auto`, `evaluate --refit full` and the benches resolve a run's settings here, so they refuse
a bad setting alike and before any data loads; `mtmim finetune` shows the defaults as its
options' and passes on only the options the user gave. No torch here, so `mtmim finetune
--help` stays light."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from mtmim_cli.data.identities import MODES as IDENTITY_MODES
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.margin_names import check_margin
from mtmim_cli.train.config import RESUME_FREE, TrainConfig, layered_default
from mtmim_cli.train.setting_checks import choose, number

MODES = ("baseline", "age", "mtmim")
# What the MI penalty (mode mtmim) measures x_id against: the paper's x_age (CLUB with a
# Gaussian q), or the age group (CLUB, or the lautum information, with a categorical q).
MI_TARGETS = ("features", "age-group", "lautum")
# The small-set tools' choices (train/transfer.py acts on them).
FREEZE_BN = ("off", "stats", "all")
CENTRE_INITS = ("random", "mean", "mean-mirror")
ACTIVATION_DTYPES = ("float16", "float32")

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
    "train_identities": None, "replay_identities": None, "wise": 1.0,
    # --recipe auto's record of its search (grid, validation scores, choice), set by the
    # search for the run it retrains (orchestration/auto_recipe.py), and its general-face
    # guard cache
    "auto": None, "auto_guard": None,
}
# TrainConfig fields where fine-tuning differs from TrainConfig's own defaults (pretraining).
TRAIN_DEFAULTS: dict[str, Any] = {"out": "runs/finetune", "lr": 0.02, "optimizer": "adam",
                                  "schedule": "plateau", "batch_size": 400, "epochs": 10}


# Named bundles of settings (`--recipe`), over the defaults and under explicit options.
# "small": for fine-tuning a general-face model on a few thousand cross-age photos (FG-NET).
# Chosen on validation identities carved out of FG-NET subjects 1-60 (4 folds of 15 subjects,
# and a 10-fold closed-set split of the same 720 photos), never on subjects 61-82. The choice
# of trained parts, lr, L2-SP and centres was first made with a script outside the toolkit that
# trained the same parts, and is not reproduced by a command here; wise and the MI penalty were
# chosen through the toolkit (docs/results.md, "Fine-tuning on a small cross-age set", blocks
# refit-full-k10-val, mi-sweep, mi-folds). Against the shared CASIA MobileFaceNet (validation
# rank-1 +1.1 to +1.2 points on held-out people; the other CelebA people -0.3 points, -0.04
# with wise 0.5):
# - train linear7 + linear1 on the frozen trunk's cached activations, BatchNorm frozen
#   (statistics and affine): unfreezing conv2 or training BatchNorm did not do better;
# - margin-head centres start at the class means: a random head (loss ~40) wrecks the model;
# - Adam, lr 1e-3 for 5 epochs of batch 64: 3e-3 cost 1.4 points on CelebA, 3e-4 gained less;
# - L2-SP 1e-2 (no difference at this lr, kept as a guard), no weight decay;
# - wise 0.5: the same gain on FG-NET, most of the CelebA cost given back; on the 10-round
#   protocol of subjects 1-60 (3 seeds) rank-1 was baseline 92.20 / mtmim 92.89 at wise 0.5
#   and 92.71 / 92.43 at wise 1 (`evaluate --refit full --folds 10 --refit-options`);
# - the MI penalty against the age group (mi_target age-group, lambda 1, q lr 1e-3, 5 q
#   steps), chosen through bench/open_set.py --val-fold 0..3, 3 seeds each (docs/results.md's sweep
#   and fold blocks): the age R^2 of an identity-grouped probe from x_id, lambda 0 / 0.1 / 1 / 3,
#   fold 0: 0.26 / 0.19 / 0.04 / -; fold 1: 0.53 / 0.33 / -0.07 / 0.31; fold 2: 0.60 / 0.54 /
#   0.40 / 0.49; fold 3: 0.36 / 0.25 / -0.02 / 0.12, with validation rank-1 within 0.2 points
#   of lambda 0 and the CelebA people within 0.12. At lambda 3 age comes back (the encoder
#   hides it from the current q); the paper's CLUB between x_id and x_age lowered CLUB without
#   lowering the probe's R^2 (fold 0). It only acts in mode mtmim; baseline and age ignore it.
#
# "small-sface": "small" for an imported MS1M-class encoder, chosen for SFace (ONNX, 10M
# parameters, its last layer a 50176 -> 128 fully connected one) on validation folds 0 and 1 of
# subjects 1-60 and the CelebA training identities, 3 seeds each (docs/sface.md, blocks
# sface-val-k and sface-val-mi, bench/open_set.py --val-fold); what differs from "small":
# - train the last stage only (last:1: pre_fc1 and the frozen BatchNorm after it): at lr 1e-3
#   on fold 0, FG-NET validation rank-1 +1.58 / +1.40 / +1.23 points over SFace training the
#   last 1 / 2 / 3 stages, CelebA -0.57 / -0.77 / -0.92; at lr 3e-4 the last 2 stages did no
#   better than the last one (fold 1: +0.36 [-0.71, +1.49]) and cost CelebA as much;
# - lr 3e-4: against lr 1e-3, +0.35 (fold 0) and +2.00 [+0.54, +3.68] (fold 1) points on
#   FG-NET, CelebA cost 0.30 instead of 0.57 (fold 0); wise 0.25 kept CelebA as well but
#   gained less on FG-NET;
# - the MI penalty at lambda 0.1: the age R^2 of x_id, lambda 0 / 0.1 / 0.3 / 1, fold 0:
#   0.47 / 0.30 / 0.47 / 0.70; fold 1: 0.58 / 0.38 / 0.57 / 0.71, with FG-NET rank-1 +0.35
#   and +0.00 against lambda 0 and CelebA within 0.05. At lambda 1 (small's) age came back
#   above lambda 0 and rank-1 fell 1.23 and 0.91 points (folds 0, 1); at 3 and 10 more so. The paper's CLUB
#   between x_id and x_age (features, 1e-4) changed nothing measurable (fold 1).
RECIPES: dict[str, dict[str, Any]] = {
    "small": {"freeze_through": "auto", "freeze_bn": "all", "init_centres": "mean-mirror",
              "margin": "arcface", "s": 64.0, "m": 0.35, "optimizer": "adam", "epochs": 5,
              "lr": 1e-3, "l2sp": 1e-2, "weight_decay": 0.0, "batch_size": 64,
              "schedule": "constant", "wise": 0.5, "mi_target": "age-group", "lambda_mim": 1.0,
              "q_lr": 1e-3, "q_steps": 5},
}
RECIPES["small-sface"] = {**RECIPES["small"], "freeze_through": "last:1", "lr": 3e-4,
                          "lambda_mim": 0.1}
# "auto" is not a fixed bundle: a search over small's bundle (trainable depth, lr, lambda,
# WiSE) chosen on validation folds of the run's own training identities
# (orchestration/auto_recipe.py, which declares the grid and the criterion).
AUTO_RECIPE = "auto"
RECIPE_NAMES = (*RECIPES, AUTO_RECIPE)


def default(name: str) -> Any:
    """A fine-tuning option's or training setting's default, as `finetune` resolves it
    without a recipe."""
    return layered_default(name, [DEFAULTS, TRAIN_DEFAULTS], "fine-tuning")


def split_options(config: TrainConfig | dict[str, Any] | None,
                  options: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """A TrainConfig (fine-tuning defaults: Adam, lr 0.02, plateau, batch 400) and the
    fine-tuning options, from a TrainConfig or one flat dict of both kinds of keys; unchecked
    (`resolve_settings` checks them)."""
    train_keys = {f.name for f in fields(TrainConfig)}
    opts = dict(DEFAULTS)
    recipe = _recipe(options.get("recipe", None if isinstance(config, TrainConfig)
                                 else (config or {}).get("recipe")))
    if isinstance(config, TrainConfig):
        if any(k in train_keys for k in recipe):
            raise MtmimError("finetune: a recipe sets training settings too; pass them as a dict, "
                             "not a TrainConfig")
        cfg = config
    else:
        d = {**TRAIN_DEFAULTS, **recipe, **(config or {})}
        unknown = [k for k in d if k not in train_keys and k not in DEFAULTS]
        if unknown:
            raise MtmimError(f"finetune: unknown option(s) {', '.join(sorted(unknown))}")
        cfg = TrainConfig(**{k: v for k, v in d.items() if k in train_keys})
        opts.update({k: v for k, v in d.items() if k in DEFAULTS})
    unknown = [k for k in options if k not in DEFAULTS]
    if unknown:
        raise MtmimError(f"finetune: unknown option(s) {', '.join(sorted(unknown))}")
    opts.update(options)
    return cfg, opts


def check_settings(cfg: TrainConfig, o: dict[str, Any]) -> None:
    """The refusals a fine-tune's settings get before any file is read: each names the
    option and the reason on one line. The objective and the transfer tools keep their own
    checks for callers that build them directly."""
    cfg.validate()
    choose("--mode", o["mode"], MODES)
    check_margin(o["margin"])
    choose("--mi-target", o["mi_target"], MI_TARGETS)
    # q is fitted only by its own steps: with none, the penalty reads an untrained q
    number("--q-steps", o["q_steps"], low=1, whole=True)
    number("--q-lr", o["q_lr"], low=0, low_open=True)
    number("--age-groups", o["age_groups"], low=1, whole=True)
    if o["encoder_lr"] is not None:
        number("--encoder-lr", o["encoder_lr"], low=0, low_open=True)
    number("--partial-fc", o["partial_fc"] or 0.0, low=0, high=1)
    number("--wise", o["wise"], low=0, high=1, low_open=True)
    choose("--identities", o["identities"], IDENTITY_MODES)
    choose("--init-centres", o["init_centres"], CENTRE_INITS)
    choose("--freeze-bn", o["freeze_bn"], FREEZE_BN)
    choose("--activation-dtype", o["activation_dtype"], ACTIVATION_DTYPES)


def resolve_settings(config: TrainConfig | dict[str, Any] | None,
                     options: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """What a fine-tune trains with (`split_options`), checked (`check_settings`)."""
    cfg, o = split_options(config, options)
    check_settings(cfg, o)
    return cfg, o


def resolved_settings(options: dict[str, Any]) -> dict[str, Any]:
    """What a fine-tune given this flat dict of options trains with, checked: the options
    over their recipe over the defaults, training settings and fine-tuning options in one
    JSON-plain dict, without the settings a run may change on resume (RESUME_FREE). Stores
    of finished work compare it, so that a changed recipe or default never passes for the
    same run."""
    train, fine = resolve_settings(dict(options), {})
    both = {**{k: v for k, v in asdict(train).items() if k not in RESUME_FREE}, **fine}
    return json.loads(json.dumps(both, sort_keys=True, default=str))


def _recipe(name: str | None) -> dict[str, Any]:
    if not name:
        return {}
    if name not in RECIPE_NAMES:
        raise MtmimError(f"--recipe {name}: choose from {', '.join(RECIPE_NAMES)}")
    # auto searches over small's bundle; the setting it retrains overrides the searched keys
    return RECIPES["small" if name == AUTO_RECIPE else name]
