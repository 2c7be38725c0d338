"""An ONNX face encoder as mtmim runs it (converted to torch) against onnxruntime running the
file as shipped, on real aligned crops: per-face cosine and max abs difference of the raw
embeddings. (Speed is bench/embed.py's business.)

For a file with initializers listed as graph inputs (SFace), onnxruntime is fed them; inputs
nothing uses get zeros. The channel order and scaling are the ones mtmim reads or is given
(`--backbone onnx:SPEC`), so the comparison checks that convention as well as the graph.

    .venv/bin/python bench/onnx_agreement.py --cache fgnet.h5 \\
        --model ../shared/weights/face_recognition_sface_2021dec_int8bq.onnx [--images 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._reference import load_avg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="fgnet.h5")
    ap.add_argument("--model", required=True)
    ap.add_argument("--backbone", default=None, help="onnx:SPEC, as the commands take it")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from mtmim_cli.threads import passive_openmp

    passive_openmp()   # as `mtmim` does, before torch loads

    import torch

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.data.dataset import preprocess
    from mtmim_cli.models.identity import load_identity_model
    from tests.onnx_models import ort_features  # onnxruntime on the file as shipped

    torch.set_num_threads(a.threads)
    cache = Cache(a.cache)
    idx = np.flatnonzero(cache.usable)
    idx = idx[np.linspace(0, len(idx) - 1, min(a.images, len(idx))).astype(int)]
    crops = cache.images(idx)
    print(f"load average {load_avg()}; {len(idx)} crops of {a.cache}; {a.threads} thread(s)")
    t0 = time.perf_counter()
    model = load_identity_model(a.model, a.backbone)
    print(f"converted in {time.perf_counter() - t0:.1f} s: input {model.meta['onnx']['input']}")
    conv = model.meta["onnx"]["input"]
    w = int(conv["width"])
    cut = (112 - w) // 2
    pixels = crops[:, :, cut:cut + w].astype(np.float32)
    if conv["channels"] == "bgr":
        pixels = pixels[..., ::-1]
    feed = ((pixels - conv["mean"]) / conv["std"]).transpose(0, 3, 1, 2).copy()

    with torch.inference_mode():
        got = np.concatenate([model(preprocess(crops[i:i + 32], w)).numpy()
                              for i in range(0, len(crops), 32)])
    want = ort_features(Path(a.model), feed)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    print(f"cosine per face: min {cos.min():.7f}, median {np.median(cos):.7f}")
    print(f"max abs difference {np.abs(got - want).max():.3g} (largest |value| "
          f"{np.abs(want).max():.3g})")


if __name__ == "__main__":
    main()
