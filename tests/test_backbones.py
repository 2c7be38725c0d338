"""Encoders: insightface-identical iresnet keys/shapes, input widths, strict weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtmim_cli.errors import MtmimError
from mtmim_cli.models.backbones import (
    BACKBONES,
    build_backbone,
    input_width,
    load_backbone_weights,
)
from mtmim_cli.models.identity import load_identity_model

DEPTHS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
          "iresnet100": (3, 13, 30, 3)}


def _bn(prefix: str, c: int) -> list[tuple[str, tuple]]:
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def insightface_iresnet_keys(layers: tuple[int, ...], d: int = 512) -> list[tuple[str, tuple]]:
    """Written from the description of arcface_torch's iresnet (not from our module): stem
    conv3x3(3->64) bn1 prelu; four stages of IBasicBlocks (bn1, conv1 3x3, bn2, prelu, conv2
    3x3 with the stride, bn3; downsample = conv1x1 + BN on the first block of each stage);
    bn2 on the 512x7x7 map, fc 25088 -> d, features = BatchNorm1d(d)."""
    keys = [("conv1.weight", (64, 3, 3, 3)), *_bn("bn1", 64), ("prelu.weight", (64,))]
    inp = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            keys += [*_bn(f"{p}.bn1", inp), (f"{p}.conv1.weight", (planes, inp, 3, 3)),
                     *_bn(f"{p}.bn2", planes), (f"{p}.prelu.weight", (planes,)),
                     (f"{p}.conv2.weight", (planes, planes, 3, 3)), *_bn(f"{p}.bn3", planes)]
            if b == 0:
                keys += [(f"{p}.downsample.0.weight", (planes, inp, 1, 1)),
                         *_bn(f"{p}.downsample.1", planes)]
            inp = planes
    keys += [*_bn("bn2", 512), ("fc.weight", (d, 512 * 7 * 7)), ("fc.bias", (d,)),
             *_bn("features", d)]
    return keys


@pytest.mark.parametrize("name", list(DEPTHS))
def test_iresnet_state_dict_matches_insightface(name: str) -> None:
    with torch.device("meta"):   # no memory, no init cost, even for iresnet100
        model = build_backbone(name)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert sorted(ours) == sorted(insightface_iresnet_keys(DEPTHS[name]))
    # arcface_torch freezes the scale of the output BN
    assert not model.features.weight.requires_grad


@pytest.mark.slow
def test_released_style_backbone_pth_loads(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) if s else torch.tensor(7))
             for k, s in insightface_iresnet_keys(DEPTHS["iresnet18"])}
    state = {k: (v.abs() if k.endswith("running_var") else v) for k, v in state.items()}
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = build_backbone("iresnet18")
    load_backbone_weights(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    ident = load_identity_model(path)   # depth read from the keys
    assert ident.meta["backbone"] == "iresnet18" and ident.input_width == 112
    assert not ident.training
    for k, v in ident.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_wrong_weights_fail_with_a_clear_message(tmp_path: Path) -> None:
    model = build_backbone("tiny")
    state = model.state_dict()
    state["fc.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(MtmimError, match="of other shape.*fc.weight"):
        load_backbone_weights(build_backbone("tiny"), tmp_path / "w.pth")
    del state["fc.weight"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(MtmimError, match="missing"):
        load_backbone_weights(build_backbone("tiny"), tmp_path / "w.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MtmimError, match="junk.pth"):
        load_backbone_weights(build_backbone("tiny"), tmp_path / "junk.pth")


@pytest.mark.parametrize("name", ["mobilefacenet", "resnet50", "tiny", "iresnet18"])
def test_output_shape_and_width(name: str) -> None:
    # Shapes only: the meta device propagates them without computing anything.
    with torch.device("meta"):
        model = build_backbone(name, 96).eval()
        w = input_width(name)
        assert w == (96 if name == "mobilefacenet" else 112)
        assert model(torch.randn(2, 3, 112, w)).shape == (2, 96)


def test_resnet50_reaches_7x7_and_mobilefacenet_7x6() -> None:
    seen = {}
    with torch.device("meta"):
        r = build_backbone("resnet50").eval()
        r.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("r", o.shape))
        m = build_backbone("mobilefacenet").eval()
        m.conv2.register_forward_hook(lambda mod, i, o: seen.__setitem__("m", o.shape))
        r(torch.randn(1, 3, 112, 112))
        m(torch.randn(1, 3, 112, 96))
    assert seen["r"][-2:] == (7, 7) and seen["r"][1] == 2048
    assert seen["m"][-2:] == (7, 6)


def test_registry_names() -> None:
    assert {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "resnet50", "mobilefacenet"} <= set(BACKBONES)
    with pytest.raises(MtmimError, match="unknown backbone"):
        build_backbone("vgg")


def _staged(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    for _, m in model.stages():
        x = m(x)
    return x


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "iresnet18",
                                  pytest.param("resnet50", marks=pytest.mark.slow)])
def test_stages_compose_to_forward_exactly(name: str) -> None:
    """stages() applied in order is forward() bit for bit (eval and train mode), its names
    are the registry's (the --help list), and the split keeps references, not copies."""
    import copy

    from mtmim_cli.models.backbones import split_stages

    torch.manual_seed(0)
    model = build_backbone(name)
    assert tuple(n for n, _ in model.stages()) == BACKBONES[name].stages
    x = torch.randn(2, 3, 112, input_width(name))
    with torch.no_grad():
        model.eval()
        assert torch.equal(_staged(model, x), model(x))
        twin = copy.deepcopy(model).train()
        model.train()
        assert torch.equal(_staged(model, x), twin(x))
    names = BACKBONES[name].stages
    trunk, tail = split_stages(model, names[-3])
    assert len(trunk) + len(tail) == len(names) and len(tail) == 2
    owned = {id(p) for p in model.parameters()}
    assert all(id(p) in owned for m in trunk + tail for p in m.parameters())
    with pytest.raises(MtmimError, match="not a stage"):
        split_stages(model, "nope")
    with pytest.raises(MtmimError, match="nothing would be left"):
        split_stages(model, names[-1])
