"""The face model of the embedded cross-age set (`mtmim synth`, demo/synth.py): how one
synthetic photo is drawn from a base portrait, an identity and an age.

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

Identity and age are independent by construction (the ageing transform takes only the age,
never the identity, as its parameter); per photo nuisances (pose jitter, lighting gradient,
sensor noise) are drawn from `rng(seed, identity, photo)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mtmim_cli.demo.warps import (
    Bulge,
    BumpField,
    Cardioid,
    Similarity,
    apply_similarity,
    backward_chain,
    forward_chain,
    similarity_from_eyes,
)
from mtmim_cli.errors import MtmimError

SIZE = 160  # output photos are SIZE x SIZE
IOD = 40.0  # inter-ocular distance in the output frame (pixels)
EYES = np.array([[60.0, 68.0], [100.0, 68.0]])  # where the base eyes are put

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
    a_b, b_b = similarity_from_eyes(base_lm5[:2], EYES)  # base pixels -> output frame
    lm0 = apply_similarity(a_b, b_b, base_lm5)
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
    pose = Similarity(a_p, b_p)
    maps = [id_map, *age_maps, pose]

    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    q = np.stack([xs, ys], axis=-1)
    # the maps are smooth, so invert them on a grid of every second pixel and interpolate
    coarse = np.stack(np.meshgrid(np.arange(0, SIZE + 1, 2.0), np.arange(0, SIZE + 1, 2.0)), -1)
    stages = backward_chain(maps, coarse)
    p_id, p0 = (_upsample(stages[-2]), _upsample(stages[-1]))  # identity frame, base frame
    a_inv = 1 / a_b
    src = apply_similarity(a_inv, -b_b * a_inv, p0)
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
