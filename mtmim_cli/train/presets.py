"""Named bundles of pretraining settings: `mtmim pretrain --preset NAME`. A preset fills the
options the user did not give; options given on the command line win. No torch here.

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

from typing import Any

from mtmim_cli.errors import MtmimError

PRESETS = ("arcface",)


def preset_settings(name: str, batch_size: int) -> dict[str, Any]:
    """The preset's values under the `pretrain` option names (lr from the global batch)."""
    if name != "arcface":
        raise MtmimError(f"--preset {name}: choose from {', '.join(PRESETS)}")
    return {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
            "lr": 0.1 * batch_size / 512, "schedule": "poly", "poly_power": 2.0,
            "warmup_epochs": 2.0, "epochs": 25, "clip_grad": 5.0, "margin": "arcface",
            "margin_m": 0.5}
