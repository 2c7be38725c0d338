"""The shared SFace file (int8, block-quantized, initializers listed as inputs) as a torch
encoder: per-face cosine against onnxruntime running the file as shipped, on real FG-NET
crops (aligned from the hand-marked landmarks, so no detector runs), in both channel orders;
and its stages compose to forward()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtmim_cli.data.align import warp_face
from mtmim_cli.data.dataset import preprocess
from mtmim_cli.data.landmarks import fgnet_five
from mtmim_cli.models.identity import load_identity_model
from tests.conftest import _need
from tests.onnx_models import ort_features

pytestmark = pytest.mark.real

SFACE = "face_recognition_sface_2021dec_int8bq.onnx"


@pytest.fixture(scope="module")
def sface(shared: Path) -> Path:
    return _need(shared / "weights" / SFACE, "SFace ONNX weights")


def _crops(fgnet_dir: Path, n: int) -> np.ndarray:
    photos = sorted((fgnet_dir / "images").glob("*.JPG"))[::97][:n]
    faces = []
    for photo in photos:
        pts = fgnet_dir / "points" / (photo.stem.lower() + ".pts")
        faces.append(warp_face(np.asarray(Image.open(photo).convert("RGB")), fgnet_five(pts)))
    return np.stack(faces)


@pytest.mark.slow
def test_sface_matches_onnxruntime_on_real_crops(sface: Path, fgnet_dir: Path) -> None:
    crops = _crops(fgnet_dir, 8)
    raw = crops.transpose(0, 3, 1, 2).astype(np.float32)
    for spec, pixels in ((None, raw), ("onnx:bgr", raw[:, ::-1].copy())):
        model = load_identity_model(sface, spec)
        assert (model.input_width, model.embedding_size) == (112, 128)
        assert model.meta["onnx"]["dequantized_tensors"] == 29
        with torch.no_grad():
            got = model(preprocess(crops, 112)).numpy()
        want = ort_features(sface, pixels)
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() >= 0.9999, (spec, cos)
    stages = model.encoder.stages()
    assert [n for n, _ in stages][-2:] == ["conv_14_conv2d", "pre_fc1"] and len(stages) == 28
    h = preprocess(crops, 112)
    with torch.no_grad():
        for _, m in stages:
            h = m(h)
    assert torch.equal(h, torch.from_numpy(got))
