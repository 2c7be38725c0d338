"""A face-recognition ONNX file read into the float graph that `onnx_encoder` turns into a
trainable torch module, with every refusal a one-line MtmimError naming the file.

What a model zoo ships is rarely what a converter takes: weights quantized block-wise
(`DequantizeLinear` + `Reshape` feeding every Conv/Gemm, as OpenCV's SFace int8 file), the
initializers listed as graph inputs too (IR < 4 habit), a fixed batch of 1, and opsets newer
than the converter registers. `prepare` folds every node whose inputs are all constant into a
float initializer, keeps the one image input, frees the batch size and moves the graph to
`OPSET`. It refuses what mtmim's crops cannot feed or what is not an embedding.

The input convention (size, channel order, pixel scaling) is read from the file where it can
be: the size from the input's shape; the scaling from a leading Sub/Mul (or Div) by constants
(the graph then takes raw 0..255 pixels, as MXNet-exported insightface models and SFace do),
else insightface's (v - 127.5) / 127.5; both from `mtmim.input` metadata when mtmim wrote the
file (`mtmim export`). The channel order is in no graph: RGB unless the user says otherwise
(insightface feeds RGB, and so does OpenCV's FaceRecognizerSF for SFace: blobFromImage with
swapRB). `--backbone onnx:SPEC` overrides any of it (see `parse_spec`).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtmim_cli.errors import MtmimError

# onnx2torch 1.5 registers every op a face encoder uses up to this opset (Flatten 13,
# Dropout 13, BatchNormalization 15); graphs are moved here before conversion.
OPSET = 17
# The crops mtmim makes: 112x112, and the 112x96 of older models (8 columns off each side).
CROP_SIZES = ((112, 112), (112, 96))
# An embedding, not class scores: face encoders give 128-1024 values per image.
EMBEDDING_SIZES = (32, 1024)
CLASSIFIER_OPS = ("Softmax", "LogSoftmax", "Sigmoid", "ArgMax", "TopK")
METADATA_KEY = "mtmim.input"
CHANNELS = ("rgb", "bgr")
# Float initializers at least this large are zeroed in the graph a checkpoint carries
# (their values are in its state dict); small ones (shapes, scalars) stay as they are.
STRIP_MIN_ELEMENTS = 256


def is_onnx_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def is_onnx_spec(backbone: str | None) -> bool:
    """True for `--backbone onnx` and `onnx:SPEC`."""
    return bool(backbone) and (backbone == "onnx" or backbone.startswith("onnx:"))


@dataclass(frozen=True)
class InputConvention:
    """What the graph's input holds: (v - mean) / std of 0..255 pixels v, in this channel
    order, height x width. `decided` says where each came from (graph, metadata, option,
    default), so tables and checkpoints can say what was assumed."""
    height: int
    width: int
    channels: str = "rgb"
    mean: float = 127.5
    std: float = 127.5
    decided: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        how = ", ".join(f"{k} from {v}" for k, v in self.decided)
        return (f"{self.height}x{self.width} {self.channels.upper()}, (v - {self.mean:g}) / "
                f"{self.std:g}" + (f" ({how})" if how else ""))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decided"] = dict(self.decided)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputConvention:
        return cls(int(d["height"]), int(d["width"]), str(d["channels"]), float(d["mean"]),
                   float(d["std"]), tuple(sorted(dict(d.get("decided", {})).items())))


def parse_spec(backbone: str | None, where: str = "--backbone") -> dict[str, Any]:
    """`onnx` -> {}; `onnx:bgr` -> channels; `onnx:rgb,127.5,127.5` -> channels, mean, std;
    `onnx:,0,1` -> mean and std only."""
    if not is_onnx_spec(backbone):
        return {}
    _, _, spec = backbone.partition(":")
    if not spec:
        return {}
    parts = [p.strip() for p in spec.split(",")]
    bad = f"{where} {backbone}: expected onnx[:CHANNELS[,MEAN,STD]], e.g. onnx:bgr or onnx:rgb,127.5,127.5"
    if len(parts) not in (1, 3):
        raise MtmimError(bad)
    out: dict[str, Any] = {}
    if parts[0]:
        if parts[0].lower() not in CHANNELS:
            raise MtmimError(f"{where} {backbone}: channel order {parts[0]!r}: choose rgb or bgr")
        out["channels"] = parts[0].lower()
    if len(parts) == 3:
        try:
            out["mean"], out["std"] = float(parts[1]), float(parts[2])
        except ValueError:
            raise MtmimError(bad) from None
        if not np.isfinite(out["mean"]) or not out["std"] > 0:
            raise MtmimError(f"{where} {backbone}: std must be > 0 and mean finite")
    return out


@dataclass
class PreparedGraph:
    model: Any                      # onnx.ModelProto: float, OPSET, one input, one output
    convention: InputConvention
    embedding_size: int | None      # None until a forward pass finds it (graph leaves it unknown)
    source: dict[str, Any]          # file name, sha256, folded/quantized counts

    def describe(self) -> str:
        return f"{self.source['file']}: {self.embedding_size}-d, input {self.convention.describe()}"


def load_onnx(path: str | os.PathLike, spec: dict[str, Any] | None = None) -> PreparedGraph:
    """Read and prepare `path` (see the module docstring); MtmimError on anything the tool
    cannot use."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise MtmimError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the user's input
        raise MtmimError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not len(model.graph.node):
        raise MtmimError(f"{path}: not a readable ONNX model (no graph nodes)")
    from mtmim_cli.digest import file_sha256

    source = {"file": path.name, "sha256": file_sha256(path)}
    return prepare(model, path, spec or {}, source)


def prepare(model, path: Path, spec: dict[str, Any], source: dict[str, Any]) -> PreparedGraph:
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    opsets = {o.domain or "": o.version for o in model.opset_import}
    foreign = sorted({n.domain for n in g.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        ops = sorted({f"{n.domain}.{n.op_type}" for n in g.node if n.domain in foreign})
        raise MtmimError(f"{path}: unsupported op {ops[0]} (a runtime-specific domain; "
                         f"{len(ops)} such op type(s))")
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    nodes, folded, quantized = [], 0, 0
    for node in g.node:
        if node.op_type == "Constant" or (node.input and all(i in consts or not i for i in node.input)
                                          and node.op_type not in ("Dropout", "RandomNormalLike")):
            values = _evaluate(node, consts, opsets.get("", OPSET), path)
            if values is not None:
                consts.update(zip(node.output, values, strict=True))
                folded += 1
                quantized += node.op_type == "DequantizeLinear"
                continue
        nodes.append(node)
    used = {i for n in nodes for i in n.input if i}
    feeds = [i for i in g.input if i.name not in consts and i.name in used]
    if len(feeds) != 1:
        names = ", ".join(i.name for i in feeds) or "none"
        raise MtmimError(f"{path}: {len(feeds)} image inputs ({names}); a face encoder takes one "
                         "batch of images")
    if len(g.output) != 1:
        raise MtmimError(f"{path}: {len(g.output)} outputs; expected one embedding per image")
    feed, out = feeds[0], g.output[0]
    size = _input_size(feed, path)
    graph_scales = _leading_scaling(nodes, feed.name, consts)
    meta = _metadata(model, path)
    convention = _convention(size, graph_scales, meta, spec)

    inits = [numpy_helper.from_array(_float_or_int(consts[k]), k) for k in consts if k in used]
    new_in = helper.make_tensor_value_info(feed.name, feed.type.tensor_type.elem_type,
                                           ["N", 3, *size])
    new_out = helper.make_tensor_value_info(out.name, out.type.tensor_type.elem_type or 1, None)
    graph = helper.make_graph(nodes, g.name or "encoder", [new_in], [new_out], inits)
    prepared = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opsets.get("", OPSET))],
                                 producer_name="mtmim")
    prepared.ir_version = max(model.ir_version, 7)
    try:
        if opsets.get("", OPSET) != OPSET:
            from onnx import version_converter
            prepared = version_converter.convert_version(prepared, OPSET)
        prepared = onnx.shape_inference.infer_shapes(prepared, strict_mode=False)
        freed = free_fixed_batch(prepared)
        if freed:
            prepared = onnx.shape_inference.infer_shapes(prepared, strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises many types for a graph it cannot move
        raise MtmimError(f"{path}: cannot bring the graph to opset {OPSET} ({_first_line(exc)})") from None
    dim = _embedding_size(prepared, nodes, path)
    source = {**source, "folded_nodes": folded, "dequantized_tensors": quantized,
              "opset": opsets.get("", OPSET), "freed_batch_reshapes": freed}
    return PreparedGraph(prepared, convention, dim, source)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _float_or_int(a: np.ndarray) -> np.ndarray:
    """Weights become float32 (a dequantized tensor is float already; fp16 weights train in
    float32); integer tensors (shapes, axes) stay as they are."""
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1,
               block_size: int = 0) -> np.ndarray:
    """ONNX DequantizeLinear: (x - zero_point) * scale, per tensor (scalar scale), per axis
    (1-D scale along `axis`), or block-wise (scale's `axis` dimension ceil(n / block_size),
    each scale covering block_size consecutive entries along `axis`)."""
    x = x.astype(np.float32)
    s = np.asarray(scale, np.float32)
    z = np.zeros_like(s) if zero_point is None else np.asarray(zero_point).astype(np.float32)
    if s.size == 1 and s.ndim <= 1:
        return (x - z.reshape(())) * s.reshape(())
    axis = axis % x.ndim
    if block_size:
        s = np.repeat(s, block_size, axis=axis)
        z = np.repeat(z, block_size, axis=axis)
        keep = tuple(slice(0, n) if d == axis else slice(None) for d, n in enumerate(x.shape))
        s, z = s[keep], z[keep]
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return (x - z) * s


def _evaluate(node, consts: dict[str, np.ndarray], opset: int, path: Path) -> list[np.ndarray] | None:
    """The outputs of a node whose inputs are all constant (None if it cannot be evaluated:
    the node then stays in the graph)."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ins = [consts[i] if i else None for i in node.input]
    if node.op_type == "Constant":
        if "value" in attrs:
            return [numpy_helper.to_array(attrs["value"])]
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                           ("value_int", np.int64), ("value_ints", np.int64)):
            if key in attrs:
                return [np.asarray(attrs[key], dtype)]
        return None
    if node.op_type == "DequantizeLinear":
        zp = ins[2] if len(ins) > 2 else None
        return [dequantize(ins[0], ins[1], zp, attrs.get("axis", 1), attrs.get("block_size", 0))]
    if node.op_type == "Reshape":
        shape = [d if d != 0 or attrs.get("allowzero", 0) else ins[0].shape[k]
                 for k, d in enumerate(ins[1].tolist())]
        return [ins[0].reshape(shape)]
    try:
        from onnx.reference import ReferenceEvaluator

        ev = ReferenceEvaluator(helper.make_graph(
            [node], "fold", [helper.make_tensor_value_info(i, 0, None) for i in node.input if i],
            [helper.make_tensor_value_info(o, 0, None) for o in node.output]),
            opsets={"": opset})
        return list(ev.run(None, {i: consts[i] for i in node.input if i}))
    except Exception:  # noqa: BLE001 - an op the reference evaluator lacks stays a graph node
        return None


def _input_size(feed, path: Path) -> tuple[int, int]:
    dims = feed.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    if len(shape) != 4:
        raise MtmimError(f"{path}: input {feed.name} has shape {shape}; expected (N, 3, H, W)")
    c, h, w = shape[1:]
    if c != 3:
        raise MtmimError(f"{path}: input {feed.name} has {c} channels; expected 3 (N, 3, H, W)")
    if not isinstance(h, int) or not isinstance(w, int):
        raise MtmimError(f"{path}: input {feed.name} has a dynamic size ({h} x {w}); mtmim's "
                         "crops are 112x112 (or 112x96): fix the size in the graph")
    if (h, w) not in CROP_SIZES:
        kind = "non-square " if h != w else ""
        raise MtmimError(f"{path}: input {feed.name} is {kind}{h}x{w}; mtmim's crops are 112x112 "
                         "(or 112x96) on the five-point template, which this model was not "
                         "trained on")
    return h, w


def _leading_scaling(nodes, feed: str, consts: dict[str, np.ndarray]) -> tuple[float, float] | None:
    """(mean, std) when the graph itself scales its input: the input's only consumer a
    Sub (or Add) by a constant scalar and then a Mul (or Div) by one, in either order; None
    when it does not. The map so far is y = (v - mean) / std."""
    def scalar(name: str) -> float | None:
        v = consts.get(name)
        return float(v.reshape(())) if v is not None and v.size == 1 else None

    value, mean, std, kinds = feed, 0.0, 1.0, set()
    for _ in range(2):
        users = [n for n in nodes if value in n.input]
        if len(users) != 1:
            break
        n = users[0]
        kind = {"Sub": "shift", "Add": "shift", "Mul": "scale", "Div": "scale"}.get(n.op_type)
        c = scalar(n.input[1]) if len(n.input) == 2 and n.input[0] == value else None
        if kind is None or kind in kinds or c is None or c == 0:
            break
        kinds.add(kind)
        if n.op_type == "Sub":
            mean += c * std
        elif n.op_type == "Add":
            mean -= c * std
        elif n.op_type == "Mul":
            std /= c
        else:
            std *= c
        value = n.output[0]
    return (mean, std) if kinds == {"shift", "scale"} and std > 0 else None


def _metadata(model, path: Path) -> dict[str, Any]:
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                d = json.loads(p.value)
                return {k: d[k] for k in ("channels", "mean", "std") if k in d}
            except (ValueError, TypeError, AttributeError):
                raise MtmimError(f"{path}: unreadable {METADATA_KEY} metadata") from None
    return {}


def _convention(size: tuple[int, int], graph_scales: tuple[float, float] | None,
                meta: dict[str, Any], spec: dict[str, Any]) -> InputConvention:
    decided = {}
    channels, mean, std = "rgb", 127.5, 127.5
    decided["channels"] = "default (rgb)"
    decided["scaling"] = "default (insightface's)"
    if graph_scales is not None:
        # The graph does its own (v - m) / s: it takes raw pixels.
        mean, std = 0.0, 1.0
        decided["scaling"] = "graph"
    if meta:
        channels = meta.get("channels", channels)
        mean, std = float(meta.get("mean", mean)), float(meta.get("std", std))
        decided.update({"channels": "metadata", "scaling": "metadata"})
    if "channels" in spec:
        channels = spec["channels"]
        decided["channels"] = "option"
    if "mean" in spec:
        mean, std = spec["mean"], spec["std"]
        decided["scaling"] = "option"
    return InputConvention(size[0], size[1], channels, float(mean), float(std),
                           tuple(sorted(decided.items())))


def free_fixed_batch(model) -> int:
    """Let Reshapes whose target was exported with a batch of 1 take any batch; returns how
    many were changed (in place).

    A graph exported at batch 1 and then constant-folded (onnx-simplifier's habit, common in
    the field's MobileFaceNet files) carries `Reshape(x, [1, -1])` where the model said
    `x.view(x.size(0), -1)`: on a batch of B it makes one row of B embeddings. Where shape
    inference shows that the reshaped tensor's first dimension is the graph's free batch
    (a symbolic dimension) and the constant target's first entry is 1, that entry becomes 0,
    which ONNX reads as "copy this dimension from the input". Shapes are inferred again
    after each change, since a freed Reshape lets the batch reach the next one; `model`
    comes with its shapes inferred (prepare's), which serve the first pass."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    changed = 0
    for _ in range(sum(n.op_type == "Reshape" for n in g.node)):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph \
            if changed else g
        first_dim = {}
        for vi in (*inferred.input, *inferred.value_info, *inferred.output):
            dims = vi.type.tensor_type.shape.dim
            if len(dims):
                first_dim[vi.name] = dims[0]
        inits = {t.name: k for k, t in enumerate(g.initializer)}
        fixed = None
        for node in g.node:
            if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in inits:
                continue
            allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
            target = numpy_helper.to_array(g.initializer[inits[node.input[1]]])
            d0 = first_dim.get(node.input[0])
            if allowzero or target.ndim != 1 or not target.size or int(target[0]) != 1 \
                    or d0 is None or d0.HasField("dim_value"):
                continue
            fixed = node, target
            break
        if fixed is None:
            break
        node, target = fixed
        freed = target.astype(np.int64).copy()
        freed[0] = 0
        # A new initializer: the old one may be shared by a Reshape that is not on the batch.
        names = {t.name for t in g.initializer}
        name, k = f"{node.input[1]}_any_batch", 0
        while name in names:
            k += 1
            name = f"{node.input[1]}_any_batch{k}"
        g.initializer.append(numpy_helper.from_array(freed, name))
        node.input[1] = name
        changed += 1
        # The shapes inferred so far hold the batch of 1: infer afresh from here on.
        del g.value_info[:]
        for o in g.output:
            o.type.tensor_type.ClearField("shape")
    if changed:
        used = {i for n in g.node for i in n.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    return changed


def _embedding_size(model, nodes, path: Path) -> int | None:
    """D of the (N, D) output, or None when shape inference leaves it unknown (the encoder
    then finds it by a forward pass: `check_embedding_size`)."""
    out = model.graph.output[0]
    producer = next((n for n in reversed(nodes) if out.name in n.output), None)
    if producer is not None and producer.op_type in CLASSIFIER_OPS:
        raise MtmimError(f"{path}: output {out.name} comes from {producer.op_type}: class "
                         "scores, not an embedding")
    dims = out.type.tensor_type.shape.dim
    if not out.type.tensor_type.HasField("shape"):
        return None
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 2:
        raise MtmimError(f"{path}: output {out.name} has shape {shape or 'unknown'}; expected "
                         "(N, D), one embedding per image")
    if shape[1] is None:
        return None
    return check_embedding_size(int(shape[1]), out.name, path)


def check_embedding_size(d: int, name: str, path: str | os.PathLike) -> int:
    """`d` when it is an embedding's width; else a one-line refusal naming the file."""
    lo, hi = EMBEDDING_SIZES
    if d == 1000 or not lo <= d <= hi:
        what = "ImageNet class scores" if d == 1000 else "not an embedding size"
        raise MtmimError(f"{path}: output {name} has {d} values per image ({what}); a face "
                         f"embedding has {lo}-{hi}")
    return d


# --------------------------------------------------------------------------------------
def graph_blob(prepared: PreparedGraph) -> bytes:
    """The prepared graph as a checkpoint carries it: large float initializers zeroed (the
    state dict holds their values), convention and source in metadata, zlib-compressed.
    A few hundred kB for SFace instead of 38 MB."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(prepared.model)
    for k, init in enumerate(m.graph.initializer):
        a = numpy_helper.to_array(init)
        if np.issubdtype(a.dtype, np.floating) and a.size >= STRIP_MIN_ELEMENTS:
            m.graph.initializer[k].CopyFrom(numpy_helper.from_array(np.zeros_like(a), init.name))
    del m.metadata_props[:]
    for key, value in ((METADATA_KEY, prepared.convention.to_dict()),
                       ("mtmim.source", {**prepared.source, "embedding_size": prepared.embedding_size})):
        p = m.metadata_props.add()
        p.key, p.value = key, json.dumps(value, sort_keys=True)
    return zlib.compress(m.SerializeToString(), 9)


def graph_from_blob(blob: bytes, where: str) -> PreparedGraph:
    """Inverse of `graph_blob` (weights zeroed: load the state dict after converting)."""
    import onnx

    try:
        m = onnx.load_from_string(zlib.decompress(blob))
        props = {p.key: json.loads(p.value) for p in m.metadata_props}
        convention = InputConvention.from_dict(props[METADATA_KEY])
        source = dict(props["mtmim.source"])
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is the user's input
        raise MtmimError(f"{where}: its ONNX graph is unreadable ({_first_line(exc)})") from None
    return PreparedGraph(m, convention, int(source.pop("embedding_size")), source)
