"""Photometric and geometric augmentation of aligned 112x112 crops, for small training sets.

Every draw is a pure function of (seed, epoch, index), like the dataset's flip, so a resumed
run and a run with worker processes see exactly the same images.

Order: a similarity warp about the image centre (rotation, scale, translation; bilinear,
edges replicated), then brightness, contrast and saturation jitter, then (with probability
`grey`) greyscale. Values stay float in [0, 255]; the dataset normalises them as usual.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from mtmim_cli.errors import MtmimError

LUMA = np.array([0.299, 0.587, 0.114], np.float32)   # ITU-R BT.601, as PIL's "L" mode

# Named settings for --augment; "light" keeps a face aligned (a few pixels, a few degrees).
PRESETS: dict[str, dict[str, float]] = {
    "none": {},
    "light": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "scale": 0.05,
              "translate": 3.0, "rotate": 5.0, "grey": 0.1},
}


@dataclass(frozen=True)
class Augment:
    """Maximum strengths: factors drawn uniformly in [1 - x, 1 + x] (brightness, contrast,
    saturation, scale), shifts in [-translate, translate] pixels per axis, angles in
    [-rotate, rotate] degrees; `grey` is the probability of a greyscale image."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    scale: float = 0.0
    translate: float = 0.0
    rotate: float = 0.0
    grey: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> Augment:
        """'none', 'light', or comma-separated key=value pairs (e.g. 'rotate=5,grey=0.1');
        a preset name may come first and be overridden: 'light,grey=0.3'."""
        values: dict[str, float] = {}
        names = {f.name for f in fields(cls)}
        for part in [p.strip() for p in (text or "none").split(",") if p.strip()]:
            if "=" not in part:
                if part not in PRESETS:
                    raise MtmimError(f"--augment {text}: unknown preset {part!r} "
                                     f"(choose from {', '.join(PRESETS)} or key=value)")
                values.update(PRESETS[part])
                continue
            key, _, raw = part.partition("=")
            key = key.strip()
            if key not in names:
                raise MtmimError(f"--augment {text}: unknown key {key!r} (choose from {', '.join(sorted(names))})")
            try:
                values[key] = float(raw)
            except ValueError:
                raise MtmimError(f"--augment {text}: {key}={raw} is not a number") from None
        aug = cls(**values)
        aug.check(text or "none")
        return aug

    def check(self, text: str) -> None:
        d = asdict(self)
        if any(v < 0 for v in d.values()):
            raise MtmimError(f"--augment {text}: strengths must be >= 0")
        if any(d[k] >= 1 for k in ("brightness", "contrast", "saturation", "scale")) or self.grey > 1:
            raise MtmimError(f"--augment {text}: brightness/contrast/saturation/scale must be "
                             "< 1 and grey a probability")

    def __bool__(self) -> bool:
        return any(v != 0 for v in asdict(self).values())

    def describe(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in asdict(self).items() if v) or "none"

    def __call__(self, image: np.ndarray, seed: int, epoch: int, index: int) -> np.ndarray:
        """One 112x112x3 uint8 (or float) image -> its augmented float32 copy."""
        rng = np.random.default_rng([seed, epoch, index, 0xA0C])
        u = rng.uniform(-1.0, 1.0, 7)    # always 7 draws + 1, whichever strengths are on
        to_grey = rng.random() < self.grey
        img = np.asarray(image, np.float32)
        if self.scale or self.translate or self.rotate:
            img = warp_similarity(img, angle_deg=self.rotate * u[0], scale=1.0 + self.scale * u[1],
                                  shift=(self.translate * u[2], self.translate * u[3]))
        return photometric(img, brightness=1.0 + self.brightness * u[4],
                           contrast=1.0 + self.contrast * u[5],
                           saturation=1.0 + self.saturation * u[6], grey=to_grey)


def warp_similarity(image: np.ndarray, angle_deg: float, scale: float,
                    shift: tuple[float, float]) -> np.ndarray:
    """Rotate by `angle_deg` (counter-clockwise on screen) and scale about the image centre,
    then shift by (dx, dy) pixels; bilinear sampling, border pixels replicated. float32 HWC."""
    img = np.asarray(image, np.float32)
    h, w = img.shape[:2]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    a = math.radians(angle_deg)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Inverse map: the source point whose image lands on each output pixel. y grows downward,
    # so a counter-clockwise screen rotation by a is a clockwise one in (x, y) maths axes.
    dx, dy = xx - cx - shift[0], yy - cy - shift[1]
    sx = cos * dx - sin * dy + cx
    sy = sin * dx + cos * dy + cy
    sx = np.clip(sx, 0, w - 1)
    sy = np.clip(sy, 0, h - 1)
    x0 = np.minimum(np.floor(sx).astype(np.int64), w - 2)
    y0 = np.minimum(np.floor(sy).astype(np.int64), h - 2)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
    bottom = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def photometric(image: np.ndarray, brightness: float = 1.0, contrast: float = 1.0,
                saturation: float = 1.0, grey: bool = False) -> np.ndarray:
    """Brightness (scale), contrast (about the mean luma), saturation (about each pixel's
    luma), optional greyscale; clipped to [0, 255]. float32 HWC."""
    img = np.asarray(image, np.float32) * np.float32(brightness)
    if contrast != 1.0:
        mean = np.float32((img @ LUMA).mean())
        img = (img - mean) * np.float32(contrast) + mean
    if saturation != 1.0 or grey:
        luma = (img @ LUMA)[..., None]
        img = np.repeat(luma, 3, axis=2) if grey else luma + (img - luma) * np.float32(saturation)
    return np.clip(img, 0.0, 255.0)
