"""The public Python API, the one `mtmim enroll` and `mtmim search` call:

    from mtmim_cli import api
    gallery = api.enroll("faces.h5", model="model.pt", out="gallery")
    for result in gallery.search("probe.jpg", top=5):
        print(result.probe, [(h.identity, round(h.score, 3), h.accepted) for h in result.hits])
    vector = api.embed_photo("probe.jpg", model="model.pt")

A gallery is a folder (see `mtmim_cli.deploy.gallery_store`); `api.open_gallery` opens one,
`api.remove` takes identities out of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mtmim_cli.deploy.enroll import enroll as _enroll
from mtmim_cli.deploy.enroll import remove_identities
from mtmim_cli.deploy.gallery import Gallery, Hit, ProbeResult
from mtmim_cli.errors import MtmimError

__all__ = ["Gallery", "Hit", "ProbeResult", "embed_photo", "enroll", "open_gallery", "remove"]


def open_gallery(path: str | os.PathLike) -> Gallery:
    """An enrolled gallery (MtmimError naming the folder when it is not a whole one)."""
    return Gallery(path)


def enroll(src: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, *,
           append: bool = False, index: str | None = None, progress: bool = False,
           **options) -> Gallery:
    """Enroll a cache, a folder of photos or a CSV into the gallery folder `out` and open it;
    `options` as `deploy.enroll.enroll` (flip, backbone, pad, on_miss, device, ...). What
    was done (counts, faces skipped, the index) is the gallery's `last_summary`."""
    summary = _enroll(src, model, out, append=append, index=index, progress=progress, **options)
    g = Gallery(out)
    g.last_summary = summary
    return g


def remove(gallery: str | os.PathLike, identities: Sequence[str]) -> Gallery:
    """The gallery without the faces of `identities`."""
    remove_identities(gallery, list(identities))
    return Gallery(gallery)


def embed_photo(photo: str | os.PathLike | np.ndarray, model: str | os.PathLike, *,
                flip: str = "concat", backbone: str | None = None, pad: float = 0.0,
                device: str = "cpu") -> np.ndarray:
    """The L2-normalised identity feature of one photo (aligned here) or one aligned
    112x112x3 uint8 face; MtmimError naming the photo when it holds no face."""
    from mtmim_cli.data.detect import FaceDetector, check_pad
    from mtmim_cli.deploy.embed import align_one
    from mtmim_cli.eval.features import extract_features
    from mtmim_cli.models.identity import load_identity_model

    if isinstance(photo, np.ndarray) and photo.shape == (112, 112, 3):
        face = photo
    else:
        face, _, reason = align_one(photo, FaceDetector(device=device, pad=check_pad(pad)))
        if face is None:
            raise MtmimError(f"{photo}: {reason}")
    m = load_identity_model(model, backbone)
    return extract_features(m, face[None], flip=flip, device=device)[0]
