"""The pretraining settings layer: the defaults, the presets (`--preset`), their resolution
under the options given (`resolve_settings`) and the checks that need no file. `pretrain`
resolves every run's settings here, so a library call with a preset trains with the preset's
settings and a bad setting is refused before any data loads; `mtmim pretrain` shows the
defaults as its options' and passes on only the options the user gave. No torch here, so
`mtmim --help` stays light.

arcface: insightface's arcface_torch recipe for MS1M-size training (recognition/arcface_torch:
configs/ms1mv3_r50.py, train_v2.py, lr_scheduler.py PolyScheduler):

- SGD, momentum 0.9, weight decay 5e-4 (train_v2.py; configs/base.py);
- learning rate 0.1 x global batch / 512 (ms1mv3_r50.py: 0.2 at 8 GPUs x 128 = 1024);
- linear warm-up from 0 over the first 2 epochs, then polynomial decay to 0 with power 2
  (PolyScheduler; ms1mv3_r50.py: warmup_epoch 2);
- 25 epochs (ms1mv3_r50.py: num_epoch 25);
- gradient norm clipped at 5 (train_v2.py clips the backbone's; here every parameter's);
- ArcFace margin 0.5 at scale 64 (margin_list (1.0, 0.5, 0.0)); the MT-MIM paper's 0.35
  stays the default without the preset.

arcface_torch also trains in fp16; give `--amp bf16` (or fp16) on GPUs yourself, since it
depends on the device.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from mtmim_cli.data.identities import MODES as IDENTITY_MODES
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.margin_names import check_margin
from mtmim_cli.train.config import TrainConfig, layered_default
from mtmim_cli.train.setting_checks import choose, number

# The options of `pretrain` beside TrainConfig's fields, whose own defaults are pretraining's
# (runs/pretrain, Adam at lr 1e-3, plateau, batch 128, 10 epochs).
DEFAULTS: dict[str, Any] = {
    "backbone": None,          # iresnet50, unless an ONNX --init fixes the architecture
    "embedding_size": None,    # the backbone's native size
    "init": None, "margin": "arcface", "s": 64.0,
    "m": None,                 # the margin head's own (0.35; 1.35 for sphereface)
    "val_cache": None, "val_pairs": 3000, "partial_fc": 0.0, "identities": "auto",
    "preset": None,
}
PRESETS = ("arcface",)


def preset_settings(name: str, batch_size: int) -> dict[str, Any]:
    """The preset's values under the library's setting names (lr from the global batch)."""
    choose("--preset", name, PRESETS)
    return {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
            "lr": 0.1 * batch_size / 512, "schedule": "poly", "poly_power": 2.0,
            "warmup_epochs": 2.0, "epochs": 25, "clip_grad": 5.0, "margin": "arcface", "m": 0.5}


def default(name: str) -> Any:
    """A pretraining option's or training setting's default, as `pretrain` resolves it
    without a preset."""
    return layered_default(name, [DEFAULTS], "pretraining")


def split_options(config: TrainConfig | dict[str, Any] | None,
                  options: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """A TrainConfig and the pretraining options, from a TrainConfig or one flat dict of both
    kinds of keys, with `options` over them; a preset fills the settings neither gives (its
    margin value only with its own margin). Unchecked (`resolve_settings` checks them)."""
    train_keys = {f.name for f in fields(TrainConfig)}
    given = {**({} if isinstance(config, TrainConfig) else dict(config or {})), **options}
    unknown = sorted(k for k in given if k not in train_keys and k not in DEFAULTS)
    if unknown:
        raise MtmimError(f"pretrain: unknown option(s) {', '.join(unknown)}")
    if given.get("preset"):
        choose("--preset", given["preset"], PRESETS)
    if isinstance(config, TrainConfig):
        if given.get("preset"):   # a TrainConfig cannot say which fields were given
            raise MtmimError("pretrain: a preset sets training settings too; pass them as a "
                             "dict, not a TrainConfig")
        if both := sorted(k for k in given if k in train_keys):
            raise MtmimError(f"pretrain: {', '.join(both)}: training settings; set them in "
                             "the TrainConfig")
        train = config
    else:
        d = dict(given)
        if d.get("preset"):
            batch = d.get("batch_size", default("batch_size"))
            filled = preset_settings(d["preset"], number("--batch-size", batch, low=1))
            if "margin" in given:   # the preset's margin value belongs to its margin
                filled.pop("m")
            d = {**filled, **d}
        train = TrainConfig(**{k: v for k, v in d.items() if k in train_keys})
        given = d
    opts = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}}
    return train, opts


def check_settings(cfg: TrainConfig, o: dict[str, Any]) -> None:
    """The refusals a pretraining run's settings get before any file is read."""
    cfg.validate()
    if o["preset"]:
        choose("--preset", o["preset"], PRESETS)
    check_margin(o["margin"])
    choose("--identities", o["identities"], IDENTITY_MODES)
    number("--partial-fc", o["partial_fc"] or 0.0, low=0, high=1)


def resolve_settings(config: TrainConfig | dict[str, Any] | None,
                     options: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """What a pretraining run trains with (`split_options`), checked (`check_settings`)."""
    cfg, o = split_options(config, options)
    check_settings(cfg, o)
    return cfg, o
