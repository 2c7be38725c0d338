"""Small generated photo trees for the align tests: real faces from the astronaut photograph
that scikit-image ships, plus deliberately bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def face_variants(n: int, size: int = 200) -> list[np.ndarray]:
    """n different photos of one face: crops around it at several offsets and scales, some
    mirrored, some turned a little, all resized to `size` px on the longer side."""
    base = astronaut()
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        side = int(rng.integers(220, 330))
        x0 = int(np.clip(215 - side // 2 + rng.integers(-30, 30), 0, 512 - side))
        y0 = int(np.clip(110 - side // 2 + rng.integers(-20, 30), 0, 512 - side))
        crop = Image.fromarray(base[y0:y0 + side, x0:x0 + side])
        if k % 3 == 1:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if k % 4 == 2:
            crop = crop.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
        out.append(np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)))
    return out


def write_jpeg(path: Path, image: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=92, **kw)
    return path


def bad_files(folder: Path, names: dict[str, str]) -> None:
    """Write the bad inputs named in `names` (kind -> file name) into `folder`.

    kinds: corrupt (a JPEG cut short), text (a text file named .jpg), pixel (1x1),
    blank (a flat grey photo without a face), grey (greyscale face).
    """
    folder.mkdir(parents=True, exist_ok=True)
    good = face_variants(1)[0]
    for kind, name in names.items():
        p = folder / name
        if kind == "corrupt":
            write_jpeg(p, good)
            p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
        elif kind == "text":
            p.write_text("this is not a photo\n")
        elif kind == "pixel":
            Image.new("RGB", (1, 1), (120, 80, 60)).save(p)
        elif kind == "blank":
            write_jpeg(p, np.full((200, 160, 3), 128, np.uint8))
        elif kind == "grey":
            Image.fromarray(good).convert("L").save(p, quality=92)
        else:
            raise ValueError(kind)
