"""The encoder registry: `build_backbone(name)`, each encoder's input width, and loading of
released weights (`--init`) into an encoder with every key and shape checked."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from mtmim_cli.errors import MtmimError


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[int], object]   # embedding size -> nn.Module
    input_width: int                 # 112, or 96 for the 112x96 crop
    embedding_size: int              # the native (released weights') embedding size
    stages: tuple[str, ...]          # names of the model's `stages()`, in forward order


_RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def _iresnet(name: str) -> Callable[[int], object]:
    def build(d: int) -> object:
        from mtmim_cli.models.backbones.iresnet import iresnet
        return iresnet(name, num_features=d)
    return build


def _resnet50(d: int) -> object:
    from mtmim_cli.models.backbones.resnet import FaceResNet50
    return FaceResNet50(num_features=d)


def _mobilefacenet(d: int) -> object:
    from mtmim_cli.models.backbones.mobilefacenet import MobileFaceNet
    return MobileFaceNet(num_features=d)


def _tiny(d: int) -> object:
    from mtmim_cli.models.backbones.tiny import TinyNet
    return TinyNet(num_features=d)


BACKBONES: dict[str, BackboneSpec] = {
    **{n: BackboneSpec(_iresnet(n), 112, 512, (*_RESNET_STAGES, "bn2", "fc", "features"))
       for n in ("iresnet18", "iresnet34", "iresnet50", "iresnet100")},
    "resnet50": BackboneSpec(_resnet50, 112, 512, (*_RESNET_STAGES, "pool", "fc", "features")),
    "mobilefacenet": BackboneSpec(_mobilefacenet, 96, 128,
                                  ("conv1", "dw_conv1", *[f"blocks.{i}" for i in range(15)],
                                   "conv2", "linear7", "linear1")),
    "tiny": BackboneSpec(_tiny, 112, 64, (*[f"body.{i}" for i in range(4)], "pool", "fc", "features")),
}


def stage_table() -> dict[str, str]:
    """The stages a trunk may be frozen through, per backbone family, numbered runs folded
    (`blocks.0..blocks.14`); for `mtmim finetune --help-recipes`, no torch."""
    def short(names: tuple[str, ...]) -> str:
        runs = groupby(names, key=lambda n: n.rsplit(".", 1)[0])   # blocks.0..blocks.14
        return ", ".join(r[0] if len(r) == 1 else f"{r[0]}..{r[-1]}"
                         for r in (list(g) for _, g in runs))
    return {("iresnet*" if k == "iresnet18" else k): short(v.stages)
            for k, v in BACKBONES.items() if not k.startswith("iresnet") or k == "iresnet18"}


def split_stages(encoder, stage: str) -> tuple[list, list]:  # -> (trunk, tail) module lists
    """The encoder's `stages()` cut after `stage`: (trunk modules, tail modules), references to
    the encoder's own submodules (nothing copied), so tail(trunk(x)) is forward(x) and the
    encoder's state dict is unchanged."""
    stages = encoder.stages()
    names = [n for n, _ in stages]
    if stage not in names:
        raise MtmimError(f"--freeze-through {stage}: not a stage of this encoder "
                         f"(choose from {', '.join(names)})")
    k = names.index(stage) + 1
    if k == len(names):
        raise MtmimError(f"--freeze-through {stage}: the last stage; nothing would be left to train")
    return [m for _, m in stages[:k]], [m for _, m in stages[k:]]


def state_digest(modules) -> str:  # modules: Sequence[nn.Module]
    """sha256 of the modules' state (names, dtypes, shapes, bytes), in order: what a frozen
    trunk's outputs are a function of, besides its inputs."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k, m in enumerate(modules):
        for name, v in m.state_dict().items():
            t = v.detach().cpu().contiguous()
            h.update(f"{k}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise MtmimError(f"{name}: unknown backbone (choose from {', '.join(BACKBONES)})")
    return BACKBONES[name]


def build_backbone(name: str, embedding_size: int | None = None):  # -> nn.Module
    """A freshly initialised encoder. `embedding_size` None means the backbone's native size
    (512 for the ResNets, 128 for MobileFaceNet, whose released weights are 128-d)."""
    spec = _spec(name)
    return spec.build(embedding_size or spec.embedding_size)


def input_width(name: str) -> int:
    """112 for the 112x112 crop, 96 for MobileFaceNet's 112x96 crop."""
    return _spec(name).input_width


def default_embedding_size(name: str) -> int:
    return _spec(name).embedding_size


def extract_backbone_state(obj: object, path: str | os.PathLike = "") -> dict:
    """The encoder's state dict inside a loaded file: the shared MobileFaceNet checkpoint
    (`net_state_dict`), one of our checkpoints (`objective` with `encoder.*`), or a plain
    state dict such as insightface's `backbone.pth`."""
    if not isinstance(obj, dict):
        raise MtmimError(f"{path}: not a state dict or checkpoint")
    if "net_state_dict" in obj:
        obj = obj["net_state_dict"]
    elif "objective" in obj:
        obj = {k[len("encoder."):]: v for k, v in obj["objective"].items()
               if k.startswith("encoder.")}
    if not obj:
        raise MtmimError(f"{path}: holds no encoder weights")
    # Weights saved from a DataParallel/DDP wrapper carry a "module." prefix.
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_backbone_weights(model, path: str | os.PathLike) -> None:
    """Load `path` into `model` strictly: every key used and every shape equal, else an
    MtmimError naming the first differences."""
    from mtmim_cli.models.weights_io import load_weights_file

    path = Path(path)
    obj = load_weights_file(path)
    state = extract_backbone_state(obj, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} of other shape (e.g. {shapes[0]})")
        raise MtmimError(f"{path}: does not fit this backbone: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
