"""ONNX export of the identity encoder (x_id for a fine-tuned model), checked after writing.

The graph takes `images` (B, 3, 112, W) RGB normalised (v - 127.5) / 128 (W = 112, or 96 for
MobileFaceNet), which its `mtmim.input` metadata says, and returns `features` (B, D), the raw
identity features (L2-normalise them before comparing, as `mtmim evaluate` does). The batch
dimension is dynamic. The check runs the same batch through torch and onnxruntime and
compares the outputs. The file is itself a model every command takes (an ONNX encoder).

torch's default exporter (dynamo) needs the onnxscript package; the TorchScript-based one
needs only onnx and handles these convolutional encoders, so it is used here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from mtmim_cli.errors import MtmimError


def check_batch(width: int, n: int = 8, seed: int = 0, cache: str | os.PathLike | None = None):
    """A float32 batch: real aligned faces from `cache` when given, else seeded noise."""
    import torch

    from mtmim_cli.data.dataset import preprocess

    if cache is not None:
        from mtmim_cli.data.cache import Cache

        c = Cache(cache)
        idx = np.flatnonzero(c.usable)[:n]
        if len(idx):
            return preprocess(c.images(idx), width)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 112, width, generator=g).clamp(-1, 1)


def _record_input(path: Path) -> None:
    """Say in the file what its input is, so `mtmim` reads it back as written (an ONNX file
    given as a model reads this metadata; other runtimes ignore it)."""
    import json

    import onnx

    from mtmim_cli.data.dataset import MEAN, SCALE
    from mtmim_cli.models.onnx_graph import METADATA_KEY

    m = onnx.load(str(path))
    prop = m.metadata_props.add()
    prop.key = METADATA_KEY
    prop.value = json.dumps({"channels": "rgb", "mean": MEAN, "std": SCALE})
    onnx.save(m, str(path))


def export_onnx(model_path: str | os.PathLike, out: str | os.PathLike, *,
                backbone: str | None = None, opset: int = 17, check_cache: str | os.PathLike | None = None,
                atol: float = 1e-4) -> dict:
    """Write the ONNX model (atomically) and return the torch-vs-onnxruntime comparison."""
    import torch

    from mtmim_cli.atomic import atomic_write
    from mtmim_cli.models.identity import load_identity_model

    try:
        import onnxruntime as ort
    except ImportError:
        raise MtmimError("export: onnxruntime is not installed (pip install onnx onnxruntime)") from None
    model = load_identity_model(model_path, backbone)
    width = model.input_width
    dummy = torch.zeros(2, 3, 112, width)
    out = Path(out)
    with atomic_write(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, input_names=["images"],
                          output_names=["features"], opset_version=opset,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
        _record_input(tmp)
    batch = check_batch(width, cache=check_cache)
    with torch.no_grad():
        ref = model(batch).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["features"], {"images": batch.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    cos = float(np.min((got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))))
    result = {"out": str(out), "input": [None, 3, 112, width], "dim": int(ref.shape[1]),
              "batch": int(len(batch)), "max_abs_diff": diff, "min_cosine": cos,
              "max_abs_value": float(np.abs(ref).max())}
    if not diff <= atol * max(1.0, result["max_abs_value"]):
        out.unlink()
        raise MtmimError(f"{out}: onnxruntime output differs from torch by {diff:.3g} "
                         f"(tolerance {atol:g}); file removed")
    return result
