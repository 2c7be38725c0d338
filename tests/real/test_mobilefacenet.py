"""The shared MobileFaceNet checkpoint: strict load, and it tells FG-NET people apart on real
photos aligned from FG-NET's hand-marked landmarks (no detector, so this stays fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtmim_cli.data.align import warp_face
from mtmim_cli.data.dataset import preprocess
from mtmim_cli.data.landmarks import fgnet_five
from mtmim_cli.models.backbones import build_backbone, load_backbone_weights
from mtmim_cli.models.identity import load_identity_model

pytestmark = pytest.mark.real


def test_every_key_used_every_shape_equal(mobilefacenet_ckpt: Path) -> None:
    raw = torch.load(mobilefacenet_ckpt, map_location="cpu", weights_only=True)
    assert set(raw) == {"epoch", "net_state_dict"}
    saved = raw["net_state_dict"]
    model = build_backbone("mobilefacenet")
    own = model.state_dict()
    assert len(saved) == len(own)
    assert sorted(saved) == sorted(own)
    assert all(tuple(saved[k].shape) == tuple(own[k].shape) for k in own)
    load_backbone_weights(model, mobilefacenet_ckpt)
    assert all(torch.equal(v.cpu(), model.state_dict()[k]) for k, v in saved.items())


@pytest.mark.slow
def test_separates_fgnet_identities(mobilefacenet_ckpt: Path, fgnet_dir: Path) -> None:
    model = load_identity_model(mobilefacenet_ckpt)
    assert model.input_width == 96 and model.embedding_size == 128
    people = ["001", "002", "003", "004", "005", "006"]
    faces, ids = [], []
    for p in people:
        photos = sorted((fgnet_dir / "images").glob(f"{p}A*.JPG"))
        for photo in photos[-4:]:          # the four oldest photos of each subject
            pts = fgnet_dir / "points" / (photo.stem.lower() + ".pts")
            image = np.asarray(Image.open(photo).convert("RGB"))
            faces.append(warp_face(image, fgnet_five(pts)))
            ids.append(p)
    x = preprocess(np.stack(faces), 96)
    with torch.no_grad():
        f = model(x) + model(torch.flip(x, dims=[3]))
    f = torch.nn.functional.normalize(f).numpy()
    sim = f @ f.T
    ids_a = np.array(ids)
    same = ids_a[:, None] == ids_a[None, :]
    off = ~np.eye(len(ids), dtype=bool)
    genuine, impostor = sim[same & off], sim[~same]
    # A random encoder gives overlapping distributions; this one separates them clearly.
    assert genuine.mean() - impostor.mean() > 0.2, (genuine.mean(), impostor.mean())
    # nearest neighbour (rank-1) among these 24 photos
    nn = np.where(off, sim, -np.inf).argmax(1)
    assert (ids_a[nn] == ids_a).mean() >= 0.7


def test_stage_split_at_conv2_reproduces_the_shared_model(mobilefacenet_ckpt: Path) -> None:
    """Freezing through conv2 (train linear7 + linear1) splits the real model exactly:
    tail(trunk(x)) == model(x) bit for bit, on the shared weights in eval mode."""
    from mtmim_cli.models.backbones import split_stages

    model = load_identity_model(mobilefacenet_ckpt).encoder.eval()
    trunk, tail = split_stages(model, "conv2")
    x = torch.randn(3, 3, 112, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = x
        for m in trunk:
            h = m(h)
        assert tuple(h.shape) == (3, 512, 7, 6)
        for m in tail:
            h = m(h)
        assert torch.equal(h, model(x))
