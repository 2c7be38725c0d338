"""An ONNX face encoder as a trainable torch module (`OnnxEncoder`).

onnx2torch converts the prepared float graph (models/onnx_graph.py) into a torch.fx
GraphModule of ordinary modules (Conv2d, BatchNorm, Linear, ...). Two things are then
changed so that the rest of the toolkit treats it like its own backbones:

- every constant the graph reads by `get_attr` becomes a module that owns it, and PReLU's
  slope becomes that module's Parameter (onnx2torch keeps slopes as buffers of a shared
  container: they would not train, and a stage could not own what it uses);
- `stages()` cuts the graph where one tensor carries everything forward (every layer of a
  chain; block outputs of a residual net), each stage holding at least one weight layer
  (Conv, Gemm/Linear, MatMul), named after its first one. A frozen trunk's activations are
  cached and the last stages train, as for MobileFaceNet's linear7/linear1.

The encoder takes mtmim's normalised crops, (v - 127.5) / 128 RGB, like every encoder here,
and turns them into what the graph was trained on (`InputConvention`) with fixed buffers in
front of the graph. The prepared graph (weights zeroed) is a uint8 buffer `onnx_graph`, so
every checkpoint that holds the encoder's state holds what rebuilds it
(`encoder_from_state`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mtmim_cli.data.dataset import MEAN, SCALE
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.onnx_graph import (
    PreparedGraph,
    check_embedding_size,
    graph_blob,
    graph_from_blob,
    load_onnx,
    parse_spec,
)

GRAPH_KEY = "onnx_graph"
# Module types whose weight makes a stage worth its own name (a "parametric layer").
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)


class _PReLU(nn.Module):
    """ONNX PRelu with its slope (any shape broadcasting against the input) as a Parameter.
    A slope that broadcasts along the channel axis alone ((C, 1, 1) against (N, C, H, W),
    numpy-style from the right) runs as F.prelu, which exports back to a PRelu node; any
    other shape as relu(x) - w * relu(-x), the same function."""

    def __init__(self, slope: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(slope.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        shape = (1,) * (x.ndim - w.ndim) + tuple(w.shape)
        if x.ndim >= 2 and len(shape) == x.ndim and shape[1] == x.shape[1] \
                and all(d == 1 for k, d in enumerate(shape) if k != 1):
            return F.prelu(x, w.reshape(-1))
        return torch.relu(x) - w * torch.relu(-x)


class _Constant(nn.Module):
    """A constant of the graph, owned by a module so every stage that reads it holds it."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.detach().clone())

    def forward(self) -> Tensor:
        return self.value


class _InputAdapter(nn.Module):
    """mtmim's (v - 127.5) / 128 RGB -> (v - mean) / std in the graph's channel order, as
    fixed buffers (they belong to the state, so a trunk digest sees the convention)."""

    def __init__(self, channels: str, mean: float, std: float) -> None:
        super().__init__()
        order = [0, 1, 2] if channels == "rgb" else [2, 1, 0]
        self.register_buffer("order", torch.tensor(order, dtype=torch.long))
        # v = SCALE * x + MEAN, so (v - mean) / std = x * SCALE / std + (MEAN - mean) / std.
        self.register_buffer("scale", torch.full((1, 3, 1, 1), SCALE / std))
        self.register_buffer("shift", torch.full((1, 3, 1, 1), (MEAN - mean) / std))

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.order) * self.scale + self.shift


class OnnxEncoder(nn.Module):
    """`net` (the converted graph) behind `adapter`; `input_width`, `embedding_size`,
    `convention` and `source` describe it; `stages()` as the other backbones have."""

    def __init__(self, prepared: PreparedGraph, where: str = "") -> None:
        super().__init__()
        self.convention = prepared.convention
        self.input_height = prepared.convention.height
        self.input_width = prepared.convention.width
        c = prepared.convention
        self.adapter = _InputAdapter(c.channels, c.mean, c.std)
        where = where or prepared.source.get("file", "ONNX model")
        self.net = _convert(prepared.model, where)
        if prepared.embedding_size is None:
            prepared.embedding_size = self._measured_width(where)
            prepared.source = {**prepared.source, "embedding_size_from": "forward pass"}
        self.source = dict(prepared.source)
        self.embedding_size = int(prepared.embedding_size)
        blob = np.frombuffer(graph_blob(prepared), dtype=np.uint8).copy()
        self.register_buffer(GRAPH_KEY, torch.from_numpy(blob))
        self._stage_cache: tuple[tuple[int, ...], list[tuple[str, nn.Module]]] | None = None

    def _measured_width(self, where: str) -> int:
        """D of a graph whose output width shape inference leaves open, from one forward pass
        on two blank crops (in eval mode: BatchNorm statistics stay as they are)."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                y = self.net(self.adapter(torch.zeros(2, 3, self.input_height, self.input_width)))
        except Exception as exc:  # noqa: BLE001 - any failure of a foreign graph on a batch
            raise MtmimError(f"{where}: the graph does not run on a batch of 2 images "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        finally:
            self.train(was)
        if not isinstance(y, Tensor) or y.ndim != 2 or y.shape[0] != 2:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise MtmimError(f"{where}: gives {shape} for 2 images; expected (2, D), one "
                             "embedding per image")
        return check_embedding_size(int(y.shape[1]), "its output", where)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.input_height, self.input_width):
            raise ValueError(f"this ONNX encoder takes {self.input_height}x{self.input_width} "
                             f"crops, got {tuple(x.shape[-2:])}")
        return self.net(self.adapter(x))

    def describe(self) -> dict[str, Any]:
        return {**self.source, "input": self.convention.to_dict(),
                "embedding_size": self.embedding_size}

    def stages(self) -> list[tuple[str, nn.Module]]:
        """forward() as named steps applied in order. Rebuilt when a module of `net` was
        swapped (SyncBatchNorm conversion), so a stage always runs the modules in use."""
        key = tuple(id(m) for m in self.net.modules())
        if self._stage_cache is None or self._stage_cache[0] != key:
            self._stage_cache = (key, _split(self.net, self.adapter))
        return self._stage_cache[1]

    def __getstate__(self) -> dict:   # deepcopy/pickle: the stage cache rebuilds itself
        state = self.__dict__.copy()
        state["_stage_cache"] = None
        return state


def load_onnx_encoder(path: str | os.PathLike, backbone: str | None = None) -> OnnxEncoder:
    """The ONNX file at `path` as an encoder in eval mode; `backbone` may be `onnx:SPEC`
    (onnx_graph.parse_spec) to give what the graph cannot say."""
    prepared = load_onnx(path, parse_spec(backbone))
    enc = OnnxEncoder(prepared, str(path))
    _check_batch(enc, Path(path))
    remember(enc)
    return enc.eval()


# Converted encoders by the digest of their graph: a checkpoint of a known graph is a copy of
# one with its weights loaded, not a second conversion (seconds for SFace; every round of a
# --refit full loads its init and its model).
_TEMPLATES: dict[str, OnnxEncoder] = {}


def _blob_key(blob: Tensor) -> str:
    return hashlib.sha1(blob.numpy().tobytes()).hexdigest()


def remember(enc: OnnxEncoder) -> None:
    """Keep `enc`'s structure as the template for checkpoints of the same graph."""
    if len(_TEMPLATES) >= 4:
        _TEMPLATES.pop(next(iter(_TEMPLATES)))
    _TEMPLATES[_blob_key(getattr(enc, GRAPH_KEY))] = copy.deepcopy(enc).cpu()


def encoder_from_state(state: dict[str, Tensor], where: str) -> OnnxEncoder:
    """Rebuild an OnnxEncoder from a state dict that holds its `onnx_graph` buffer and load
    the state (strictly)."""
    blob = state.get(GRAPH_KEY)
    if not isinstance(blob, Tensor) or blob.dtype != torch.uint8:
        raise MtmimError(f"{where}: an ONNX-based checkpoint without its {GRAPH_KEY}")
    key = _blob_key(blob)
    if key in _TEMPLATES:
        enc = copy.deepcopy(_TEMPLATES[key])
    else:
        enc = OnnxEncoder(graph_from_blob(blob.numpy().tobytes(), where), where)
        remember(enc)
    try:
        enc.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise MtmimError(f"{where}: ONNX encoder weights do not fit ({first})") from None
    return enc


def is_onnx_state(state: dict) -> bool:
    return GRAPH_KEY in state


# --------------------------------------------------------------------------------------
def _convert(model, where: str) -> fx.GraphModule:
    """onnx2torch's GraphModule, with constants and PReLU slopes owned by modules."""
    from onnx2torch import convert
    from onnx2torch.node_converters import get_converter

    opset = {o.domain or "": o.version for o in model.opset_import}.get("", 17)
    for node in model.graph.node:
        try:
            get_converter(operation_type=node.op_type, version=opset, domain=node.domain or "")
        except NotImplementedError:
            raise MtmimError(f"{where}: unsupported op {node.op_type} (opset {opset}; node "
                             f"{node.name or node.output[0]})") from None
    try:
        gm = convert(model)
    except NotImplementedError as exc:
        raise MtmimError(f"{where}: unsupported ONNX construct ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # noqa: BLE001 - a graph onnx2torch cannot take is the user's input
        raise MtmimError(f"{where}: cannot convert the graph ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return _own_constants(gm)


def _own_constants(gm: fx.GraphModule) -> fx.GraphModule:
    from onnx2torch.node_converters.activations import OnnxPReLU
    from onnx2torch.node_converters.dropout import OnnxDropoutDynamic

    graph = gm.graph
    taken = {n for n, _ in gm.named_children()}

    def fresh(base: str) -> str:
        name = re.sub(r"\W", "_", base)
        k, out = 0, name
        while out in taken:
            k += 1
            out = f"{name}_{k}"
        taken.add(out)
        return out

    def attr_value(node: fx.Node) -> Tensor:
        return gm.get_buffer(node.target)

    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, OnnxPReLU) and len(node.args) == 2 and getattr(node.args[1], "op", "") == "get_attr":
            setattr(gm, node.target, _PReLU(attr_value(node.args[1])))
            node.args = (node.args[0],)
        elif isinstance(mod, OnnxDropoutDynamic) and len(node.args) >= 2 \
                and getattr(node.args[1], "op", "") == "get_attr":
            setattr(gm, node.target, nn.Dropout(float(attr_value(node.args[1]).reshape(()))))
            node.args = (node.args[0],)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
        elif node.op == "get_attr":
            name = fresh("const_" + str(node.target).rsplit(".", 1)[-1])
            gm.add_submodule(name, _Constant(attr_value(node)))
            with graph.inserting_before(node):
                new = graph.call_module(name)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    if hasattr(gm, "initializers"):
        delattr(gm, "initializers")
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _split(net: fx.GraphModule, adapter: nn.Module) -> list[tuple[str, nn.Module]]:
    """Cut `net` into stages (see the module docstring); the adapter runs in the first."""
    nodes = list(net.graph.nodes)
    placeholder = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    pos = {n: k for k, n in enumerate(body)}
    last_use = {n: max((pos.get(u, len(body)) for u in n.users), default=-1) for n in body}
    for p in placeholder:
        last_use[p] = max((pos.get(u, len(body)) for u in p.users), default=-1)

    def is_const(n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(net.get_submodule(n.target), _Constant)

    # After body[k]: the values still needed later, constants aside (every stage may call
    # its own constant modules). A cut is where that is body[k] alone.
    cuts = []
    live = set(placeholder)
    for k, n in enumerate(body):
        live.add(n)
        live = {v for v in live if last_use[v] > k and not is_const(v)}
        if live == {n} and k < len(body) - 1:
            cuts.append(k)
    bounds = [-1, *cuts, len(body) - 1]
    segments = [body[a + 1:b + 1] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def weight_layer(n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(net.get_submodule(n.target), _WEIGHT_LAYERS)

    groups: list[list[fx.Node]] = []
    for seg in segments:
        if groups and not any(weight_layer(n) for n in seg):
            groups[-1] += seg          # a stage without a weight layer joins the one before
        elif groups and not any(weight_layer(n) for n in groups[-1]):
            groups[-1] += seg          # leading parameter-free ops join the first weight stage
        else:
            groups.append(list(seg))
    out = []
    for k, group in enumerate(groups):
        first = next((n for n in group if weight_layer(n)), group[0])
        sub = _subgraph_module(net, group)
        out.append((str(first.target), nn.Sequential(adapter, sub) if k == 0 else sub))
    if output.args[0] is not groups[-1][-1]:
        raise MtmimError("ONNX encoder: the graph's output is not its last node; cannot cut stages")
    return out


def _subgraph_module(net: fx.GraphModule, group: list[fx.Node]) -> fx.GraphModule:
    """The nodes `group` as a module of their own: one input (the value entering the group
    from before), one output (its last node); it holds the same submodules as `net`."""
    members = set(group)
    outside = {a for n in group for a in n.all_input_nodes if a not in members}
    consts = {a for a in outside
              if a.op == "call_module" and isinstance(net.get_submodule(a.target), _Constant)}
    inputs = outside - consts
    if len(inputs) != 1:
        raise MtmimError(f"ONNX encoder: a stage would take {len(inputs)} inputs; cannot cut stages")
    graph = fx.Graph()
    env = {next(iter(inputs)): graph.placeholder("x")}
    for c in consts:                   # a constant read by more than one stage: each calls it
        env[c] = graph.call_module(c.target)
    for n in group:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[group[-1]])
    return fx.GraphModule(net, graph)


def _check_batch(enc: OnnxEncoder, path: Path) -> None:
    """A graph that mixes the batch (a Reshape with a fixed batch size of 1, say) would give
    each face another face's features in batches: refuse it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, enc.input_height, enc.input_width, generator=g) * 2 - 1
    enc.eval()
    try:
        with torch.no_grad():
            together = enc(x)
            alone = torch.cat([enc(x[i:i + 1]) for i in range(3)])
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign graph on a batch
        raise MtmimError(f"{path}: the graph does not run on a batch of 3 images "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if together.shape != (3, enc.embedding_size):
        raise MtmimError(f"{path}: gives {tuple(together.shape)} for 3 images, not "
                         f"(3, {enc.embedding_size})")
    if not torch.allclose(together, alone, rtol=1e-3, atol=1e-4 * float(alone.abs().max()) + 1e-6):
        raise MtmimError(f"{path}: a batch of images does not give each image's own features "
                         "(the graph fixes or mixes the batch dimension)")
