"""Geometry of the synthetic faces (demo/faces.py): point maps with a forward direction and
a numerically inverted backward direction. A photo is rendered by pulling every output pixel
back through the chain of maps (identity warp, ageing, pose) to the base portrait, and its
landmarks are pushed forward through the same chain."""

from __future__ import annotations

import numpy as np


def similarity_from_eyes(src_eyes: np.ndarray, dst_eyes: np.ndarray) -> tuple[complex, complex]:
    """z -> a z + b mapping the two source eyes exactly onto the two destination eyes."""
    s = src_eyes[:, 0] + 1j * src_eyes[:, 1]
    d = dst_eyes[:, 0] + 1j * dst_eyes[:, 1]
    a = (d[1] - d[0]) / (s[1] - s[0])
    return a, d[0] - a * s[0]


def apply_similarity(a: complex, b: complex, pts: np.ndarray) -> np.ndarray:
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


class Similarity:
    """The per-photo pose jitter as a point map (rotation and scale about the centre, shift)."""

    def __init__(self, a: complex, b: complex) -> None:
        self.a, self.b = a, b

    def forward(self, p: np.ndarray) -> np.ndarray:
        return apply_similarity(self.a, self.b, p)
