"""The embedded cross-age face set: `mtmim synth` builds it offline from photos the installed
packages ship, so `make demo` runs on a machine without any dataset.

Sources. Two frontal portraits that come with installed packages: the astronaut photograph of
scikit-image (`skimage.data.astronaut()`, Eileen Collins, public domain) and matplotlib's
`grace_hopper.jpg` sample (public domain). Their five MTCNN landmarks were measured once and
are stored below; each base is scaled so its eyes sit on fixed points of a 160x160 frame.

Identity (constant over one identity's photos, drawn from `rng(seed, identity)`):
- a base portrait (identities alternate between the two);
- a smooth landmark-driven shape warp: ten shape modes (eye spacing and height, nose length
  and width, mouth width and height, jaw width, chin length, brow height, a tilt), each moving
  a few of 17 facial control points; the displacement field is a sum of Gaussian bumps
  (sigma 0.3 inter-ocular distances) centred on the control points, so it is smooth,
  invertible (gradient well below 1) and fades to zero away from the face;
- colour: per-channel skin gains, a hair tint, and one or two moles at fixed face positions.

Age (a in years, drawn independently of the identity, see below), applied after the identity:
- children (a < 18): cardioidal strain (Todd, Mark, Shaw and Pittenger 1980, the growth
  model of head shape), R' = R (1 + k (1 - cos theta)) about a centre between eyes and nose,
  theta from the upward vertical, k = -0.18 (1 - a/18)^2 (a shorter lower face and a larger
  cranium relative to it), faded out beyond 3 inter-ocular distances; larger eyes
  (a local radial bulge, a < 12); smoother skin (a < 15);
- adults (a > 30): wrinkles (forehead lines, crow's feet, nasolabial folds, under-eye
  shadows) with strength ((a - 30)/35)^1.2 capped at 1; sagging of jaw, chin, cheeks and
  mouth corners (a > 40); greying hair ((a - 35)/30); paler, less saturated skin; age spots
  (a > 55).

Identity and age are independent by construction: every identity draws its ages from the
same stratified uniform distribution over [age_min, age_max], and the ageing transform takes
only the age (never the identity) as its parameter. Per photo nuisances (pose jitter,
lighting gradient, sensor noise, JPEG) are drawn from `rng(seed, identity, photo)`, so one
photo does not depend on how many others are generated.

Output: `images/<identity>/<identity>_<nn>.jpg`, `labels.csv` (path, identity, age, split:
the `csv` manifest layout `mtmim align --format csv` reads) and the same rows split into
`train.csv` and `test.csv` (held-out identities), `landmarks.csv` (the five
ground-truth landmarks of each photo, forward-mapped through every warp) and `synth.json`
(the parameters). The base portraits are real faces, so MTCNN finds the face in virtually
every photo (tests require at least 95%).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.errors import MtmimError

SIZE = 160  # output photos are SIZE x SIZE
IOD = 40.0  # inter-ocular distance in the output frame (pixels)
EYES = np.array([[60.0, 68.0], [100.0, 68.0]])  # where the base eyes are put
SYNTH_VERSION = 1

# Five MTCNN landmarks (left eye, right eye, nose, left and right mouth corner) of each
# base photo in its own pixels, measured once with facenet-pytorch's MTCNN.
BASE_LANDMARKS = {
    "astronaut": [[205.01, 101.73], [246.76, 103.71], [224.67, 128.96], [201.72, 139.25],
                  [245.27, 141.86]],
    "hopper": [[221.67, 192.21], [309.83, 186.13], [269.36, 239.17], [232.65, 279.65],
               [306.64, 275.93]],
}
BASE_NAMES = tuple(BASE_LANDMARKS)


def load_base(name: str) -> np.ndarray:
    """The base portrait `name` as float RGB in [0, 1], from the installed package that ships it."""
    try:
        if name == "astronaut":
            import skimage.data

            img = skimage.data.astronaut()
        elif name == "hopper":
            import matplotlib.cbook as cbook
            from PIL import Image

            path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
            img = np.asarray(Image.open(path).convert("RGB"))
        else:
            raise MtmimError(f"{name}: unknown base portrait (known: {', '.join(BASE_NAMES)})")
    except (OSError, ValueError) as exc:
        raise MtmimError(f"{name}: base portrait not available from the installed packages ({exc})") from None
    return np.asarray(img, dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# geometry: point maps with a forward direction and a numerically inverted backward direction


def _similarity_from_eyes(src_eyes: np.ndarray, dst_eyes: np.ndarray) -> tuple[complex, complex]:
    """z -> a z + b mapping the two source eyes exactly onto the two destination eyes."""
    s = src_eyes[:, 0] + 1j * src_eyes[:, 1]
    d = dst_eyes[:, 0] + 1j * dst_eyes[:, 1]
    a = (d[1] - d[0]) / (s[1] - s[0])
    return a, d[0] - a * s[0]


def _apply_sim(a: complex, b: complex, pts: np.ndarray) -> np.ndarray:
    z = a * (pts[..., 0] + 1j * pts[..., 1]) + b
    return np.stack([z.real, z.imag], axis=-1)


class BumpField:
    """p -> p + sum_k v_k exp(-|p - c_k|^2 / (2 sigma^2)): a smooth local warp."""

    def __init__(self, centres: np.ndarray, vectors: np.ndarray, sigma: float) -> None:
        self.c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
        self.v = np.asarray(vectors, dtype=np.float64).reshape(-1, 2)
        self.sigma = sigma

    def displacement(self, p: np.ndarray) -> np.ndarray:
        # |p - c|^2 expanded so the work is one matrix product, not an (N, K, 2) tensor
        d2 = (p**2).sum(-1)[..., None] - 2 * p @ self.c.T + (self.c**2).sum(-1)
        w = np.exp(-np.maximum(d2, 0) / (2 * self.sigma**2))
        return w @ self.v

    def forward(self, p: np.ndarray) -> np.ndarray:
        return p + self.displacement(p)


class Cardioid:
    """Cardioidal strain about `origin`: R' = R (1 + k f(R) (1 - cos theta)), theta from the
    upward vertical, faded by f(R) = exp(-(R / fade)^2) so the far background stays put."""

    def __init__(self, origin: np.ndarray, k: float, fade: float) -> None:
        self.o = np.asarray(origin, dtype=np.float64)
        self.k = k
        self.fade = fade

    def forward(self, p: np.ndarray) -> np.ndarray:
        d = p - self.o
        r = np.sqrt((d**2).sum(-1, keepdims=True)) + 1e-9
        cos_t = -d[..., 1:2] / r  # image y points down
        scale = 1 + self.k * np.exp(-((r / self.fade) ** 2)) * (1 - cos_t)
        return self.o + d * scale


class Bulge:
    """A local radial magnification around `centre` (children's larger eyes)."""

    def __init__(self, centre: np.ndarray, amount: float, radius: float) -> None:
        self.c = np.asarray(centre, dtype=np.float64)
        self.b = amount
        self.r = radius

    def forward(self, p: np.ndarray) -> np.ndarray:
        d = p - self.c
        w = np.exp(-(d**2).sum(-1, keepdims=True) / (2 * self.r**2))
        return p + self.b * d * w


def forward_chain(maps: list, p: np.ndarray) -> np.ndarray:
    for m in maps:
        p = m.forward(p)
    return p


def _invert(m, q: np.ndarray, iters: int = 8) -> np.ndarray:
    """Solve m.forward(p) = q by fixed-point iteration p <- q - (forward(p) - p); it converges
    because every map here moves points by a field whose gradient is well below 1."""
    p = q.copy()
    for _ in range(iters):
        p = q - (m.forward(p) - p)
    return p


def backward_chain(maps: list, q: np.ndarray) -> list[np.ndarray]:
    """Points after each stage, from the output back to the base: [q, ..., p0]."""
    out = [q]
    for m in reversed(maps):
        q = _invert(m, q)
        out.append(q)
    return out


# ---------------------------------------------------------------------------------------------
# the face model: control points, identity shape modes, ageing


CONTROL_NAMES = ("eye_l", "eye_r", "nose", "mouth_l", "mouth_r", "brow_l", "brow_r", "nose_l",
                 "nose_r", "cheek_l", "cheek_r", "jaw_l", "jaw_r", "chin", "forehead",
                 "temple_l", "temple_r")
_CI = {n: i for i, n in enumerate(CONTROL_NAMES)}

# Identity shape modes: (name, amplitude in IODs, {control point: unit direction}).
SHAPE_MODES = (
    ("eye_spacing", 0.06, {"eye_l": (-1, 0), "eye_r": (1, 0), "brow_l": (-0.7, 0), "brow_r": (0.7, 0)}),
    ("eye_height", 0.05, {"eye_l": (0, 1), "eye_r": (0, 1), "brow_l": (0, 0.6), "brow_r": (0, 0.6)}),
    ("nose_length", 0.07, {"nose": (0, 1), "nose_l": (0, 0.8), "nose_r": (0, 0.8)}),
    ("nose_width", 0.06, {"nose_l": (-1, 0), "nose_r": (1, 0)}),
    ("mouth_width", 0.07, {"mouth_l": (-1, 0), "mouth_r": (1, 0)}),
    ("mouth_height", 0.06, {"mouth_l": (0, 1), "mouth_r": (0, 1)}),
    ("jaw_width", 0.08, {"jaw_l": (-1, 0), "jaw_r": (1, 0), "cheek_l": (-0.5, 0), "cheek_r": (0.5, 0)}),
    ("chin_length", 0.08, {"chin": (0, 1), "jaw_l": (0, 0.4), "jaw_r": (0, 0.4)}),
    ("brow_height", 0.05, {"brow_l": (0, -1), "brow_r": (0, -1), "forehead": (0, -0.5)}),
    ("tilt", 0.03, {"eye_l": (0, 1), "eye_r": (0, -1), "mouth_l": (0, 0.6), "mouth_r": (0, -0.6)}),
)

HAIR_TINTS = np.array([[0.10, 0.07, 0.05], [0.35, 0.22, 0.12], [0.75, 0.60, 0.35],
                       [0.55, 0.25, 0.12], [0.20, 0.18, 0.17], [0.50, 0.40, 0.30]])


def control_points(lm5: np.ndarray) -> np.ndarray:
    """17 control points (CONTROL_NAMES) derived from five landmarks in the output frame."""
    le, re, nose, lm, rm = lm5
    u = np.linalg.norm(re - le)
    ec, mc = (le + re) / 2, (lm + rm) / 2
    pts = {
        "eye_l": le, "eye_r": re, "nose": nose, "mouth_l": lm, "mouth_r": rm,
        "brow_l": le + [0, -0.35 * u], "brow_r": re + [0, -0.35 * u],
        "nose_l": nose + [-0.22 * u, -0.05 * u], "nose_r": nose + [0.22 * u, -0.05 * u],
        "cheek_l": np.array([le[0] - 0.45 * u, nose[1]]), "cheek_r": np.array([re[0] + 0.45 * u, nose[1]]),
        "jaw_l": np.array([le[0] - 0.3 * u, mc[1] + 0.15 * u]),
        "jaw_r": np.array([re[0] + 0.3 * u, mc[1] + 0.15 * u]),
        "chin": mc + [0, 0.65 * u], "forehead": ec + [0, -0.9 * u],
        "temple_l": le + [-0.55 * u, -0.3 * u], "temple_r": re + [0.55 * u, -0.3 * u],
    }
    return np.array([pts[n] for n in CONTROL_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Identity:
    index: int
    name: str
    base: str
    shape: tuple[float, ...]  # one coefficient per SHAPE_MODES entry, in standard deviations
    skin_gain: tuple[float, float, float]
    hair_tint: tuple[float, float, float]
    hair_strength: float
    moles: tuple[tuple[float, float, float], ...]  # (dx, dy, radius) in IODs from the nose


def draw_identity(seed: int, index: int) -> Identity:
    rng = np.random.default_rng([seed, 1, index])
    shape = np.clip(rng.standard_normal(len(SHAPE_MODES)), -2.5, 2.5)
    # skin tone varies along lightness and a red-yellow axis, as real skin tones do
    skin = np.exp(rng.normal(0, 0.12) + rng.normal(0, 0.07) * np.array([1.0, 0.2, -0.8]))
    tint = HAIR_TINTS[rng.integers(len(HAIR_TINTS))] * np.exp(rng.normal(0, 0.1, 3))
    n_moles = int(rng.integers(0, 3))
    moles = tuple((float(rng.uniform(-0.8, 0.8)), float(rng.uniform(-0.7, 0.9)),
                   float(rng.uniform(0.025, 0.045))) for _ in range(n_moles))
    return Identity(index=index, name=f"s{index:03d}", base=BASE_NAMES[index % len(BASE_NAMES)],
                    shape=tuple(float(x) for x in shape), skin_gain=tuple(float(x) for x in skin),
                    hair_tint=tuple(float(x) for x in np.clip(tint, 0, 1)),
                    hair_strength=float(rng.uniform(0.4, 0.8)), moles=moles)


def identity_warp(ident: Identity, ctrl: np.ndarray) -> BumpField:
    vec = np.zeros_like(ctrl)
    for coef, (_, amp, moves) in zip(ident.shape, SHAPE_MODES, strict=True):
        for name, direction in moves.items():
            vec[_CI[name]] += coef * amp * IOD * np.asarray(direction, dtype=np.float64)
    return BumpField(ctrl, vec, sigma=0.3 * IOD)


def _ramp(x: float) -> float:
    return float(min(max(x, 0.0), 1.0))


def ageing_maps(age: float, ctrl: np.ndarray) -> list:
    """The geometric part of the ageing transform, applied to identity-warped control points."""
    maps: list = []
    sag = _ramp((age - 40) / 30) * 0.07 * IOD
    if sag > 0:
        moves = {"jaw_l": (-0.3, 1), "jaw_r": (0.3, 1), "chin": (0, 0.6), "mouth_l": (0, 0.5),
                 "mouth_r": (0, 0.5), "cheek_l": (0, 0.5), "cheek_r": (0, 0.5), "nose": (0, 0.3)}
        vec = np.zeros_like(ctrl)
        for name, d in moves.items():
            vec[_CI[name]] = sag * np.asarray(d, dtype=np.float64)
        maps.append(BumpField(ctrl, vec, sigma=0.3 * IOD))
    if age < 18:
        k = -0.18 * (1 - age / 18) ** 2
        origin = (ctrl[_CI["eye_l"]] + ctrl[_CI["eye_r"]]) / 2 * 0.6 + ctrl[_CI["nose"]] * 0.4
        maps.append(Cardioid(origin, k, fade=3 * IOD))
    if age < 12:
        amount = 0.12 * (1 - age / 12)
        for eye in ("eye_l", "eye_r"):
            maps.append(Bulge(ctrl[_CI[eye]], amount, radius=0.18 * IOD))
    return maps


# ---------------------------------------------------------------------------------------------
# texture and colour


def _soft_ellipse(p: np.ndarray, centre, radii, edge: float = 0.15) -> np.ndarray:
    d = np.sqrt((((p - centre) / radii) ** 2).sum(-1))
    return np.clip((1 + edge - d) / (2 * edge), 0, 1)


def _line_mask(p: np.ndarray, a: np.ndarray, b: np.ndarray, width: float) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0, 1)
    d = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)
    return np.exp(-(d**2) / (2 * width**2))


def wrinkle_pattern(p: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    """Darkening pattern in [0, 1] of an old face, in face coordinates `p` (identity frame)."""
    c = {n: ctrl[i] for i, n in enumerate(CONTROL_NAMES)}
    ec = (c["eye_l"] + c["eye_r"]) / 2
    out = np.zeros(p.shape[:-1])
    # forehead lines: thin, slightly curved horizontal lines
    fy = (p[..., 1] - (ec[1] - 0.55 * IOD) + 0.08 * ((p[..., 0] - ec[0]) / IOD) ** 2 * IOD) / (0.13 * IOD)
    lines = np.exp(-((fy - np.round(fy)) ** 2) / (2 * 0.12**2))
    region = _soft_ellipse(p, ec + [0, -0.75 * IOD], np.array([0.75, 0.3]) * IOD, edge=0.3)
    out = np.maximum(out, lines * region)
    # crow's feet: short rays from the outer eye corners
    for eye, side in (("eye_l", -1), ("eye_r", 1)):
        corner = c[eye] + [side * 0.32 * IOD, 0]
        d = p - corner
        ang = np.arctan2(d[..., 1], side * d[..., 0])
        ray = np.cos(9 * ang) ** 8
        reg = _soft_ellipse(p, corner + [side * 0.12 * IOD, 0], np.array([0.17, 0.2]) * IOD, edge=0.3)
        out = np.maximum(out, ray * reg * (side * d[..., 0] > 0))
    # nasolabial folds and under-eye shadows
    for nose_side, mouth in (("nose_l", "mouth_l"), ("nose_r", "mouth_r")):
        a = c[nose_side] + (c[nose_side] - c["nose"]) * 0.3
        b = c[mouth] + (c[mouth] - (c["mouth_l"] + c["mouth_r"]) / 2) * 0.15 + [0, 0.05 * IOD]
        out = np.maximum(out, 0.7 * _line_mask(p, a, b, 0.035 * IOD))
    for eye in ("eye_l", "eye_r"):
        out = np.maximum(out, 0.6 * _line_mask(p, c[eye] + [-0.18 * IOD, 0.2 * IOD],
                                                c[eye] + [0.18 * IOD, 0.2 * IOD], 0.04 * IOD))
    return out


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], dtype=img.dtype)


def _bilinear(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    coords = [pts[..., 1], pts[..., 0]]
    return np.stack([map_coordinates(img[..., ch], coords, order=1, mode="nearest")
                     for ch in range(img.shape[2])], axis=-1)


def _upsample(grid: np.ndarray) -> np.ndarray:
    """A point map sampled every second pixel, interpolated (bilinear) to every pixel."""
    from scipy.ndimage import map_coordinates

    ys, xs = np.mgrid[0:SIZE, 0:SIZE] / 2.0
    return np.stack([map_coordinates(grid[..., c], [ys, xs], order=1, mode="nearest")
                     for c in range(2)], axis=-1)


@dataclass(frozen=True)
class Photo:
    identity: Identity
    index: int
    age: float


def render(photo: Photo, base: np.ndarray, base_lm5: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic photo as uint8 (SIZE, SIZE, 3) and its five ground-truth landmarks."""
    ident, age = photo.identity, photo.age
    rng = np.random.default_rng([seed, 2, ident.index, photo.index])
    a_b, b_b = _similarity_from_eyes(base_lm5[:2], EYES)  # base pixels -> output frame
    lm0 = _apply_sim(a_b, b_b, base_lm5)
    ctrl0 = control_points(lm0)
    id_map = identity_warp(ident, ctrl0)
    ctrl1 = id_map.forward(ctrl0)
    age_maps = ageing_maps(age, ctrl1)
    angle = np.deg2rad(rng.uniform(-8, 8))
    scale = float(np.exp(rng.uniform(-0.06, 0.06)))
    shift = rng.uniform(-4, 4, 2)
    centre = SIZE / 2 - 0.5
    a_p = scale * complex(math.cos(angle), math.sin(angle))
    b_p = complex(centre, centre) * (1 - a_p) + complex(*shift)
    pose = _Sim(a_p, b_p)
    maps = [id_map, *age_maps, pose]

    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    q = np.stack([xs, ys], axis=-1)
    # the maps are smooth, so invert them on a grid of every second pixel and interpolate
    coarse = np.stack(np.meshgrid(np.arange(0, SIZE + 1, 2.0), np.arange(0, SIZE + 1, 2.0)), -1)
    stages = backward_chain(maps, coarse)
    p_id, p0 = (_upsample(stages[-2]), _upsample(stages[-1]))  # identity frame, base frame
    a_inv = 1 / a_b
    src = _apply_sim(a_inv, -b_b * a_inv, p0)
    img = _bilinear(base, src).astype(np.float64)

    # identity colour: skin tone within the face, hair tint around it
    c1 = {n: ctrl1[i] for i, n in enumerate(CONTROL_NAMES)}
    ec = (c1["eye_l"] + c1["eye_r"]) / 2
    mc = (c1["mouth_l"] + c1["mouth_r"]) / 2
    face = _soft_ellipse(p_id, (ec + mc) / 2 + [0, 0.1 * IOD], np.array([0.8, 1.05]) * IOD)
    skin_like = np.clip((img[..., 0] - img[..., 2] - 0.03) / 0.1, 0, 1)
    skin = (face * skin_like)[..., None]
    img = img * (1 + skin * (np.asarray(ident.skin_gain) - 1))
    head = _soft_ellipse(p_id, ec + [0, -0.35 * IOD], np.array([1.45, 1.8]) * IOD, edge=0.2)
    above_mouth = np.clip((mc[1] - p_id[..., 1]) / (0.3 * IOD), 0, 1)
    # a blue sky or backdrop is not hair (the hopper portrait has one right beside the head)
    not_blue = 1 - np.clip((img[..., 2] - img[..., 0] - 0.05) / 0.1, 0, 1)
    not_backdrop = 1 - np.clip((_luma(img) - 0.7) / 0.1, 0, 1)  # pale studio backdrop
    hair = (head * (1 - face) * above_mouth * not_blue * not_backdrop)[..., None]
    lum = _luma(img)[..., None]
    tinted = np.clip(np.asarray(ident.hair_tint) * (0.4 + 1.6 * lum), 0, 1)
    img = img + hair * ident.hair_strength * (tinted - img)
    for dx, dy, r in ident.moles:
        spot = np.exp(-(((p_id - (c1["nose"] + np.array([dx, dy]) * IOD)) ** 2).sum(-1))
                      / (2 * (r * IOD) ** 2))
        img = img * (1 - 0.45 * (spot * face)[..., None])

    # ageing texture and colour
    wr = _ramp((age - 30) / 35) ** 1.2
    if wr > 0:
        img = img * (1 - 0.3 * wr * (wrinkle_pattern(p_id, ctrl1) * face)[..., None])
        grey = _luma(img)[..., None]
        img = img + (0.3 * wr * skin) * (grey + 0.05 - img)  # paler, less saturated skin
    grey_hair = _ramp((age - 35) / 30)
    if grey_hair > 0:
        silver = 0.55 + 0.45 * _luma(img)[..., None]
        img = img + hair * grey_hair * 0.85 * (silver - img)
    if age > 55:
        n_spots = int(round((age - 55) / 3))
        for _ in range(n_spots):
            pos = c1["nose"] + rng.uniform([-0.8, -1.0], [0.8, 0.3]) * IOD
            spot = np.exp(-(((p_id - pos) ** 2).sum(-1)) / (2 * (0.04 * IOD) ** 2))
            img = img * (1 - 0.25 * (spot * face)[..., None] * np.array([0.6, 0.8, 1.0]))
    smooth = _ramp((15 - age) / 15)
    if smooth > 0:
        from scipy.ndimage import gaussian_filter

        blurred = np.stack([gaussian_filter(img[..., ch], 1.2) for ch in range(3)], -1)
        rosy = np.array([1.04, 0.99, 0.98])
        img = img + skin * smooth * (blurred * rosy - img)

    # nuisances: lighting gradient, exposure, sensor noise
    g_dir = rng.normal(0, 1, 2)
    g_dir /= np.linalg.norm(g_dir) + 1e-9
    grad = ((q - centre) @ g_dir) / SIZE
    img = img * (float(np.exp(rng.normal(0, 0.1))) * (1 + rng.uniform(0, 0.3) * grad))[..., None]
    img = img + rng.normal(0, 0.01, img.shape)
    out = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    landmarks = forward_chain(maps, lm0)
    return out, landmarks


class _Sim:
    """The per-photo pose jitter as a point map (rotation and scale about the centre, shift)."""

    def __init__(self, a: complex, b: complex) -> None:
        self.a, self.b = a, b

    def forward(self, p: np.ndarray) -> np.ndarray:
        return _apply_sim(self.a, self.b, p)


# ---------------------------------------------------------------------------------------------
# the data set


@dataclass(frozen=True)
class SynthConfig:
    identities: int = 24
    per_identity: int = 10
    age_min: float = 1.0
    age_max: float = 70.0
    test_fraction: float = 0.25
    seed: int = 0
    jpeg_quality: int = 92


def draw_ages(seed: int, index: int, n: int, lo: float, hi: float) -> list[float]:
    """Stratified uniform ages over [lo, hi], the same distribution for every identity."""
    rng = np.random.default_rng([seed, 3, index])
    u = (np.arange(n) + rng.uniform(0, 1, n)) / n
    ages = lo + u * (hi - lo)
    return [float(round(a)) for a in rng.permutation(ages)]


def plan(config: SynthConfig) -> list[Photo]:
    if config.identities < 2 or config.per_identity < 2:
        raise MtmimError("synth: need at least 2 identities and 2 photos per identity")
    if not 0 <= config.age_min < config.age_max <= 100:
        raise MtmimError(f"synth: age range [{config.age_min}, {config.age_max}] must lie in [0, 100]")
    photos = []
    for i in range(config.identities):
        ident = draw_identity(config.seed, i)
        for j, age in enumerate(draw_ages(config.seed, i, config.per_identity, config.age_min, config.age_max)):
            photos.append(Photo(ident, j, age))
    return photos


def held_out_identities(config: SynthConfig) -> set[str]:
    """The held-out identities: the last ones (identities alternate between the base
    portraits, so from two held-out identities on both portraits appear on both sides)."""
    n_test = min(config.identities - 1, max(1, round(config.identities * config.test_fraction)))
    return {f"s{i:03d}" for i in range(config.identities - n_test, config.identities)}


@functools.cache
def _base(name: str) -> tuple[np.ndarray, np.ndarray]:
    return load_base(name), np.asarray(BASE_LANDMARKS[name], dtype=np.float64)


def _render_and_save(job: tuple[Photo, str, int, int]) -> tuple[str, np.ndarray]:
    """Render one photo and write its JPEG; returns its relative path and landmarks."""
    from PIL import Image

    ph, folder, seed, quality = job
    base, base_lm = _base(ph.identity.base)
    img, lm = render(ph, base, base_lm, seed)
    rel = f"images/{ph.identity.name}/{ph.identity.name}_{ph.index:02d}.jpg"
    Image.fromarray(img).save(Path(folder) / rel, quality=quality)
    return rel, lm


def _workers(requested: int | None, photos: int) -> int:
    """Processes to render with: the CPUs this process may use, none beyond one per 16
    photos (starting a worker costs about as much as rendering a dozen photos)."""
    if requested is not None:
        return max(1, requested)
    from mtmim_cli.threads import usable_cores

    return max(1, min(usable_cores(), photos // 16))


def synthesize(out: str | Path, config: SynthConfig | None = None, progress: bool = True,
               workers: int | None = None) -> dict:
    """Write the cross-age face set into `out` (built in a temporary sibling, then renamed).
    `workers`: rendering processes (default: the CPUs available, see `_workers`); the files
    are the same for any number.

    Returns a summary: folder, number of photos and identities, the labels file.
    """
    from mtmim_cli.progress import make_progress

    config = config or SynthConfig()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MtmimError(f"{out}: exists and is not empty (choose a new folder)")
    photos = plan(config)
    test_ids = held_out_identities(config)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    rows, lm_rows = [], []
    for ident in {ph.identity.name for ph in photos}:
        (tmp / "images" / ident).mkdir()
    jobs = [(ph, str(tmp), config.seed, config.jpeg_quality) for ph in photos]
    workers = _workers(workers, len(photos))
    with contextlib.ExitStack() as stack:
        if workers > 1:
            # every photo has its own seed, so the pool writes the same files as one process;
            # spawn, not fork: the caller may hold torch's OpenMP threads (the in-process demo)
            import concurrent.futures
            import multiprocessing

            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn")))
            done = pool.map(_render_and_save, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
        else:
            done = map(_render_and_save, jobs)
        bar = stack.enter_context(make_progress("img", disable=not progress))
        task = bar.add_task("synth", total=len(photos))
        for ph, (rel, lm) in zip(photos, done, strict=True):
            split = "test" if ph.identity.name in test_ids else "train"
            rows.append([rel, ph.identity.name, f"{ph.age:g}", split])
            lm_rows.append([rel, *(f"{v:.2f}" for v in lm.reshape(-1))])
            bar.advance(task)
    # labels.csv lists every photo; train.csv and test.csv the two splits, so each aligns
    # into its own cache with `mtmim align DIR/train.csv --format csv`
    for name, keep in (("labels.csv", ("train", "test")), ("train.csv", ("train",)),
                       ("test.csv", ("test",))):
        with open(tmp / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "identity", "age", "split"])
            w.writerows(r for r in rows if r[3] in keep)
    with open(tmp / "landmarks.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", *(f"{p}_{c}" for p in ("eye_l", "eye_r", "nose", "mouth_l", "mouth_r")
                              for c in ("x", "y"))])
        w.writerows(lm_rows)
    meta = {"synth_version": SYNTH_VERSION, "config": asdict(config), "size": SIZE,
            "bases": {"astronaut": "skimage.data.astronaut()",
                      "hopper": "matplotlib sample_data/grace_hopper.jpg"},
            "identities": [asdict(draw_identity(config.seed, i)) for i in range(config.identities)],
            "test_identities": sorted(test_ids)}
    atomic_write_text(tmp / "synth.json", json.dumps(meta, indent=1))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return {"out": str(out), "photos": len(rows), "identities": config.identities,
            "test_identities": len(test_ids), "labels": str(out / "labels.csv")}
