"""Feature extraction on the CPU: mtmim's path against the fastest alternatives found, in one
process, on real aligned crops.

Candidates, each computing image + mirror features, concatenated and L2-normalised:
- ours: `extract_features` (the path evaluate, embed, calibrate and the re-fits use);
- torch: a bare loop, inference_mode, channels-last input, the mirror in the same batch as
  the image (one forward pass of 2B), at a few batch sizes;
- torch-bf16: the same under CPU autocast to bfloat16 (reported with its feature error:
  too far from float32 to be adopted unless it keeps rank-1);
- onnxruntime: the model exported by `mtmim export`'s code (same graph, float32), run by
  onnxruntime with as many intra-op threads as torch has, batches of 2B.
Rounds alternate in order; the medians give img/s (faces per second, both views counted once
per face) and the ratio of ours to the fastest (>= 0.95 means ours is as fast). Features are
compared with ours: max abs difference of the normalised features, and rank-1 of FG-NET
leave-one-out over the faces used (unchanged = equal).

    .venv/bin/python bench/extract_speed.py --cache fgnet.h5 \\
        [--model ../shared/weights/mobilefacenet-casia-arcface.ckpt] [--images 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._reference import load_avg  # noqa: E402
from mtmim_cli.paths import shared_path  # noqa: E402


def _rank1(f: np.ndarray, ident: np.ndarray) -> float:
    s = f @ f.T
    np.fill_diagonal(s, -np.inf)
    return float(np.mean(ident[s.argmax(1)] == ident))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="fgnet.h5")
    ap.add_argument("--model", default=str(shared_path("weights", "mobilefacenet-casia-arcface.ckpt")))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="16,32,64,128")
    a = ap.parse_args()
    from mtmim_cli.threads import passive_openmp

    passive_openmp()   # as `mtmim` does, before torch loads

    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.data.dataset import preprocess
    from mtmim_cli.deploy.export import export_onnx
    from mtmim_cli.eval.features import extract_features
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.threads import set_torch_threads

    set_torch_threads(a.threads)
    ort.set_default_logger_severity(3)
    model = load_identity_model(a.model).eval()
    cache = Cache(a.cache)
    idx = np.flatnonzero(cache.usable)[: a.images]
    images = cache.images(idx)
    ident = cache.identity[idx]
    width = model.input_width

    def ours() -> np.ndarray:
        return extract_features(model, cache, idx, flip="concat")   # rows per pass: its default

    def torch_loop(bs: int, bf16: bool = False):
        def run() -> np.ndarray:
            out = []
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                for s in range(0, len(images), bs):
                    x = preprocess(images[s:s + bs], width)
                    n = len(x)
                    x = torch.cat([x, torch.flip(x, dims=[3])]).contiguous(
                        memory_format=torch.channels_last)
                    y = model(x).float()
                    out.append(F.normalize(torch.cat([y[:n], y[n:]], 1)).numpy())
            return np.concatenate(out)
        return run

    tmp = Path(tempfile.mkdtemp()) / "m.onnx"
    export_onnx(a.model, tmp)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])

    def onnxruntime(bs: int = 64):
        def run() -> np.ndarray:
            out = []
            for s in range(0, len(images), bs):
                x = preprocess(images[s:s + bs], width).numpy()
                n = len(x)
                y = sess.run(["features"], {"images": np.concatenate([x, x[..., ::-1]])})[0]
                f = np.concatenate([y[:n], y[n:]], 1)
                out.append(f / np.linalg.norm(f, axis=1, keepdims=True))
            return np.concatenate(out)
        return run

    paths = {"ours": ours, **{f"torch b{b}": torch_loop(int(b)) for b in a.batches.split(",")},
             "torch-bf16 b64": torch_loop(64, True), "onnxruntime b64": onnxruntime(64)}
    ref = ours()
    agree = {}
    for name, fn in paths.items():
        f = fn()
        agree[name] = (float(np.abs(f - ref).max()), _rank1(f, ident))
    times: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(a.rounds):
        names = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in names:
            t0 = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - t0)
    n = len(idx)
    speed = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"{Path(a.model).name}: {n} faces of {a.cache}, image + mirror, torch threads "
          f"{torch.get_num_threads()}, {a.rounds} alternating rounds, load average {load_avg()}")
    for name in paths:
        d, r1 = agree[name]
        print(f"  {name:16s} {speed[name]:7.1f} img/s   max |f - ours| {d:.1e}   rank-1 "
              f"{100 * r1:.2f}%")
    best = max((k for k in paths if k != "ours" and "bf16" not in k), key=speed.get)
    print(f"ratio ours / fastest float32 ({best}): {speed['ours'] / speed[best]:.3f}")


if __name__ == "__main__":
    main()
