"""ONNX face encoders the tests make themselves, as the model zoos ship them: torch models
with known (seeded) weights exported by torch's exporter, and small hand-built graphs for
the refusals. Nothing here reads ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def randomise_batchnorm(model: nn.Module, seed: int, height: int = 112,
                        width: int = 112) -> nn.Module:
    """Non-trivial BatchNorm affine weights, and running statistics set to those of the
    layers' inputs on a batch of noise (as training leaves them), so features vary from
    face to face at a trained model's scale, and a converter that drops or misreads a
    statistic shows."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            if m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None          # cumulative: one batch sets the statistics
        model.train()
        model(torch.rand(32, 3, height, width, generator=g) * 2 - 1)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


class PixelScaled(nn.Module):
    """Scales raw 0..255 pixels inside the graph (Sub, then Mul), as MXNet-exported
    insightface models and OpenCV's SFace do."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net, self.mean, self.inv = net, mean, 1.0 / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) * self.inv)


def export(model: nn.Module, path: Path, height: int = 112, width: int = 112,
           batch: int | str = 1) -> Path:
    """torch -> ONNX as a zoo ships it: fixed batch of 1 (or a named dynamic batch)."""
    import warnings

    dummy = torch.zeros(1, 3, height, width)
    axes = {"input.1": {0: batch}, "embedding": {0: batch}} if isinstance(batch, str) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (dummy,), str(path), dynamo=False, opset_version=13,
                          input_names=["input.1"], output_names=["embedding"], dynamic_axes=axes)
    return path


def insightface_iresnet(path: Path, seed: int = 0) -> tuple[Path, nn.Module]:
    """An iresnet18 as insightface's zoo ships its recognition models: RGB input normalised
    (v - 127.5) / 127.5 outside the graph, 512-d output, batch fixed at 1."""
    from mtmim_cli.models.backbones import build_backbone

    torch.manual_seed(seed)
    model = randomise_batchnorm(build_backbone("iresnet18"), seed)
    return export(model, path), model


def pixel_mobilefacenet(path: Path, seed: int = 0) -> tuple[Path, nn.Module]:
    """The toolkit's MobileFaceNet (112x96 input, 128-d) with (v - 127.5) / 128 inside the
    graph: it takes raw pixels."""
    from mtmim_cli.models.backbones import build_backbone

    torch.manual_seed(seed)
    model = PixelScaled(randomise_batchnorm(build_backbone("mobilefacenet"), seed, 112, 96),
                        127.5, 128.0)
    return export(model, path, 112, 96, batch="N"), model


def tiny_graph(path: Path, *, op: str = "Relu", height: object = 112, width: object = 112,
               out_dim: int = 128, final: str | None = None, domain: str = "") -> Path:
    """A small hand-built encoder: Conv 3->8 (4x4 stride 4), one op, Flatten, Gemm to
    `out_dim`, optionally a final op (Softmax). Dimensions may be names (dynamic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    h = height if isinstance(height, int) else 112
    w = width if isinstance(width, int) else 112
    flat = 8 * (h // 4) * (w // 4)
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (8, 3, 4, 4)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.normal(0, 0.01, (out_dim, flat)).astype(np.float32), "gw"),
             numpy_helper.from_array(np.zeros(out_dim, np.float32), "gb")]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node(op, ["c"], ["a"], domain=domain),
             helper.make_node("Flatten", ["a"], ["f"]),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["y" if final is None else "g"], transB=1)]
    if final is not None:
        nodes.append(helper.make_node(final, ["g"], ["y"], axis=1))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_dim])], inits)
    opsets = [helper.make_opsetid("", 13)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def ort_features(path: Path, images: np.ndarray) -> np.ndarray:
    """onnxruntime's output for a float32 batch fed one image at a time (zoo files fix the
    batch at 1); graph inputs that are not the image get their initializer (or zeros when
    unused), as the SFace file asks for them."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    ort.set_default_logger_severity(3)
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins = sess.get_inputs()
    image = next(i.name for i in ins if i.name not in inits and len(i.shape) == 4
                 and i.shape[1] == 3)
    out = []
    for k in range(len(images)):
        feeds = {}
        for i in ins:
            if i.name == image:
                feeds[i.name] = images[k:k + 1].astype(np.float32)
            elif i.name in inits:
                feeds[i.name] = inits[i.name]
            else:
                feeds[i.name] = np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
        out.append(sess.run(None, feeds)[0])
    return np.concatenate(out)


class BatchOneMobileFaceNet(nn.Module):
    """A MobileFaceNet-shaped net (strided convs, PReLU, a global depthwise conv down to
    (N, D, 1, 1), BatchNorm1d) whose flatten is written with the batch as a number when
    `exported_batch` is set: `x.reshape(1, -1)`, the constant Reshape target that
    constant-folded exports at batch 1 carry (the field's MobileFaceNet files). With
    `exported_batch=None` it is the same function for any batch (the reference)."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.PReLU(16),
            nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.PReLU(32),
            nn.Conv2d(32, 32, 28, groups=32, bias=False), nn.BatchNorm2d(32),
            nn.Conv2d(32, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.bn = nn.BatchNorm1d(dim)
        self.exported_batch: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        return self.bn(x.reshape(self.exported_batch or x.shape[0], -1))


def batch_one_mobilefacenet(path: Path, seed: int = 0) -> tuple[Path, nn.Module]:
    """`BatchOneMobileFaceNet` exported at a fixed batch of 1 with the batch baked into its
    Reshape target; returns the file and the reference model (any batch)."""
    torch.manual_seed(seed)
    model = randomise_batchnorm(BatchOneMobileFaceNet(), seed)
    model.exported_batch = 1
    export(model, path)
    model.exported_batch = None
    return path, model


def dynamic_width_graph(path: Path, out_dim: int = 64) -> Path:
    """Conv, then a Reshape whose target is computed in the graph ([N, -1] from Shape): shape
    inference leaves the output's width unknown, so only a forward pass tells it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (out_dim, 3, 112, 112)).astype(np.float32), "cw"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus")]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], kernel_shape=[112, 112]),
             helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
             helper.make_node("Concat", ["n", "minus"], ["t"], axis=0),
             helper.make_node("Reshape", ["c", "t"], ["y"])]
    graph = helper.make_graph(
        nodes, "dynamic_width", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
