"""Features of models that share a frozen trunk, with the trunk run once.

A recipe fine-tune (`--freeze-through`) leaves its encoder's first stages bit-identical to
its init's, and so do its siblings (other modes, seeds, leave-out rounds). Evaluating ten of
them on the same photos would run that trunk ten times: for an imported 10M-parameter
encoder on a CPU, nearly all the time. So the trunk's output (image and mirror view, float32)
is kept per (photos, crop, stage, trunk weights) in this process, and a model whose stages
up to that point hash to the same weights runs only its own remaining stages on it.

Which cut: the one a model records (`meta["frozen_through"]`, written by finetune), else any
cut already kept for the same photos (so the init, or an encoder view, evaluated after its
fine-tunes shares too). The kept activations are bounded (MTMIM_TRUNK_MEMO_MB, default 3072;
0 turns sharing off); an entry that would not fit is not kept and the model runs in full.
The result equals the full forward pass up to float rounding (tests/test_trunk_memo.py).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from mtmim_cli.data.cache import Cache
from mtmim_cli.data.dataset import preprocess
from mtmim_cli.eval.views import forward_views, read_images
from mtmim_cli.progress import make_progress

_MEMO: OrderedDict[tuple, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()


def limit_bytes() -> int:
    return int(float(os.environ.get("MTMIM_TRUNK_MEMO_MB", "3072")) * (1 << 20))


def clear() -> None:
    _MEMO.clear()


def _source_key(source: Cache | np.ndarray) -> tuple:
    if isinstance(source, Cache):
        p = Path(source.path)
        st = p.stat()
        return ("cache", str(p.resolve()), st.st_size, st.st_mtime_ns)
    a = np.ascontiguousarray(source)
    return ("array", a.shape, hashlib.sha1(a.view(np.uint8).reshape(-1)).hexdigest())


def _parts(model) -> tuple[list[tuple[str, torch.nn.Module]], object] | None:
    """(the encoder's stages, what the model applies after its encoder), or None for a
    model without named stages."""
    encoder = getattr(model, "encoder", None)
    after = getattr(model, "after_encoder", None)
    if encoder is None or not callable(after) or not hasattr(encoder, "stages"):
        return None
    return encoder.stages(), after


def shared_views(model, source: Cache | np.ndarray, indices: np.ndarray, *, mirror: bool,
                 width: int, batch_size: int, device: str | torch.device, progress: bool,
                 description: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The model's raw outputs (image, mirror) through a kept trunk, or None when there is
    none to share (the caller then runs the model in full). The model is in eval mode."""
    from mtmim_cli.models.backbones import state_digest

    if limit_bytes() <= 0 or len(indices) == 0:
        return None
    parts = _parts(model)
    if parts is None:
        return None
    stages, after = parts
    names = [n for n, _ in stages]
    base = (_source_key(source), hashlib.sha1(np.asarray(indices, "<i8").tobytes()).hexdigest(),
            bool(mirror), int(width))
    recorded = (getattr(model, "meta", None) or {}).get("frozen_through")
    kept = {k[4] for k in _MEMO if k[:4] == base}
    candidates = sorted({s for s in (recorded, *kept) if s in names}, key=names.index, reverse=True)
    for stage in candidates:
        k = names.index(stage) + 1
        if k == len(names):
            continue
        key = (*base, stage, state_digest([m for _, m in stages[:k]]))
        if key not in _MEMO:
            if stage != recorded:
                continue
            acts = _trunk(stages[:k], source, indices, mirror, width, batch_size, device,
                          progress, f"{description}: trunk through {stage}")
            if acts is None:
                return None
            _MEMO[key] = acts
        _MEMO.move_to_end(key)
        return _tail(_MEMO[key], stages[k:], after, batch_size, device, progress, description)
    return None


@torch.no_grad()
def _trunk(trunk, source, indices, mirror, width, batch_size, device, progress, description):
    on_cpu = torch.device(device).type == "cpu"
    a = b = None
    with make_progress("img", transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=len(indices))
        for lo in range(0, len(indices), batch_size):
            idx = indices[lo:lo + batch_size]
            x = preprocess(read_images(source, idx), width).to(device)
            if on_cpu:
                x = x.contiguous(memory_format=torch.channels_last)
            h, h_flip = forward_views(lambda v: _run(trunk, v), x, mirror)
            outs = [h.float().cpu().numpy()]
            if mirror:
                outs.append(h_flip.float().cpu().numpy())
            if a is None:   # the first batch tells the size: keep it only if it fits
                shape = (len(indices), *outs[0].shape[1:])
                need = int(np.prod(shape)) * 4 * len(outs)
                if need > limit_bytes():
                    return None
                _make_room(need)
                a = np.empty(shape, np.float32)
                b = np.empty(shape, np.float32) if mirror else None
            a[lo:lo + len(idx)] = outs[0]
            if mirror:
                b[lo:lo + len(idx)] = outs[1]
            bar.advance(task, len(idx))
    return a, b


def _run(stages, h: torch.Tensor) -> torch.Tensor:
    for _, m in stages:
        h = m(h)
    return h


def _make_room(need: int) -> None:
    """Drop the least recently used entries until `need` more bytes fit under the limit."""
    def used() -> int:
        return sum(a.nbytes + (b.nbytes if b is not None else 0) for a, b in _MEMO.values())

    while _MEMO and used() + need > limit_bytes():
        _MEMO.popitem(last=False)


@torch.no_grad()
def _tail(acts, tail, after, batch_size, device, progress, description):
    """The stages after the trunk on the kept activations, image and mirror rows in one pass."""
    a, b = acts
    n = len(a)
    out, out_flip = [], []
    with make_progress("img", transient=True, disable=not progress) as bar:
        task = bar.add_task(f"{description} (shared trunk)", total=n)
        for lo in range(0, n, batch_size):
            h = torch.from_numpy(a[lo:lo + batch_size])
            if b is not None:
                h = torch.cat([h, torch.from_numpy(b[lo:lo + batch_size])])
            y = after(_run(tail, h.to(device))).float().cpu().numpy()
            k = min(batch_size, n - lo)
            out.append(y[:k])
            if b is not None:
                out_flip.append(y[k:])
            bar.advance(task, k)
    return (np.concatenate(out).astype(np.float32),
            np.concatenate(out_flip).astype(np.float32) if b is not None else None)
