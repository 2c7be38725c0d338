"""MTCNN face detection (facenet-pytorch) with five landmarks, made cheap and robust.

Speed levers (MTCNN's cost is its image pyramid, which starts at the scale that turns the
minimum face into PNet's 12 px):

- `min_face` relative to the photo: below 1 it is a fraction of the photo's shorter side, so
  a 400x500 portrait is not searched for 20-px faces. When nothing is found at that size the
  detector retries at MTCNN's default 20 px, so a small face costs time but is not lost.
- channels-last weights on the CPU (see `FaceDetector.__init__`).
- `det_size`: photos whose longer side exceeds it are downscaled (antialiased) for detection;
  boxes and landmarks are mapped back to source pixels, and the warp uses the full-resolution
  photo.

Tight crops (a 100x100 photo that is all face) defeat MTCNN: its pyramid ends where the
photo shrinks below PNet's 12-px window, before a frame-filling face does, and its box and
landmark regressions expect context around the face. Such photos are missed, or worse, found
with landmarks off by a third of the inter-ocular distance. `pad` (a fraction of the photo's
longer side, on every side, in the photo's mean colour) gives the face that context; boxes and
landmarks are mapped back to the photo, whose own pixels are warped. A miss that the 20-px
search does not fix (or that a search already at or below 20 px could not) is retried once
more with `RETRY_PAD`, and so is a face whose box reaches beyond the photo's edge by more than
`OVERFLOW` of its side (FG-NET's photos: at most 0.01; crops of 0.85 box or less: 0.13 and
more, with landmarks off by 0.13-0.74 of the inter-ocular distance; padded, 0.02-0.1).

Which face when there are several: the one with the largest box area minus twice the squared
distance of its centre from the photo centre (facenet-pytorch's and insightface's
"center_weighted_size" rule): the large, central face a user means, not a big face at the edge.

Guards for facenet-pytorch 2.5.3: landmarks come back as object arrays (cast), a faceless image
gives `(None, [None], None)`, and a photo smaller than the pyramid's 12 px would crash it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtmim_cli.errors import MtmimError

PNET_SIZE = 12           # PNet's receptive field: the smallest face MTCNN can see, in pixels
DEFAULT_MIN_FACE = 0.15  # fraction of the shorter side
RETRY_MIN_FACE = 20.0    # MTCNN's own default, used for the first retry after a miss
RETRY_PAD = 0.5          # padding of the last retry after a miss (fraction of the longer side)
OVERFLOW = 0.1           # a box this far (fraction of its side) past the photo's edge: a tight crop
DEFAULT_DET_SIZE = 640
# What detection does beyond its settings, stored in a cache's settings so that a partial
# cache is never finished by a build that detects differently. 1: the 20-px retry after a
# miss; 2: also the retry framed by RETRY_PAD and the framed re-search of a face past the
# photo's edge. Bump it with any change that finds other faces for the same settings.
BEHAVIOUR = 2


def check_pad(pad: float) -> float:
    """`--pad` (align, verify, embed): a fraction of the photo's longer side, 0 to 2."""
    if not 0 <= pad <= 2:
        raise MtmimError(f"--pad {pad:g}: must lie between 0 and 2 (a fraction of the longer side)")
    return float(pad)


@dataclass(frozen=True)
class Detection:
    """One face. Coordinates in source-photo pixels (pixel centres on integers).

    `landmarks`: (5, 2) x, y of eye, eye, nose tip, mouth corner, mouth corner, image-left first.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def landmarks5(self) -> np.ndarray:
        return self.landmarks


@dataclass
class Prepared:
    """A photo made ready for detection: the (possibly downscaled) copy and its scale."""

    image: np.ndarray        # full-resolution RGB uint8
    det_image: np.ndarray    # what MTCNN sees
    scale: float             # det_image pixels per source pixel (<= 1)


def choose_face(boxes: np.ndarray, width: float, height: float) -> int:
    """Index of the face a user means: max area - 2 * squared offset of the centre."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 - width / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 - height / 2
    return int(np.argmax(area - 2.0 * (cx * cx + cy * cy)))


def downscale_for_detection(image: np.ndarray, det_size: int | None) -> tuple[np.ndarray, float]:
    """(copy whose longer side is at most det_size, scale). No copy when already small enough."""
    h, w = image.shape[:2]
    if not det_size or max(h, w) <= det_size:
        return image, 1.0
    from PIL import Image

    scale = det_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR,
                                                      reducing_gap=2.0))
    return small, size[0] / w


def box_overflow(box: np.ndarray, width: float, height: float) -> float:
    """How far the box reaches past the photo's nearest edge, as a fraction of its longer side
    (negative: inside by that much)."""
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64).reshape(4)
    side = max(x1 - x0, y1 - y0, 1e-9)
    return float(max(-x0, -y0, x1 - (width - 1), y1 - (height - 1)) / side)


def pad_image(image: np.ndarray, pad: float) -> tuple[np.ndarray, int]:
    """(photo framed on every side by `pad` x its longer side in its mean colour, the frame's
    width in pixels)."""
    h, w = image.shape[:2]
    px = int(round(pad * max(h, w)))
    if px <= 0:
        return image, 0
    out = np.empty((h + 2 * px, w + 2 * px, 3), np.uint8)
    out[:] = image.reshape(-1, 3).mean(0).round().astype(np.uint8)
    out[px:px + h, px:px + w] = image
    return out, px


def to_source(points: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Detection-image (x, y) points -> source pixels (resizing maps pixel edges onto edges)."""
    h, w = prepared.image.shape[:2]
    dh, dw = prepared.det_image.shape[:2]
    if (dh, dw) == (h, w):
        return np.asarray(points, dtype=np.float32)
    sx, sy = dw / w, dh / h
    pts = np.asarray(points, dtype=np.float64)
    out = np.empty_like(pts)
    out[..., 0] = (pts[..., 0] + 0.5) / sx - 0.5
    out[..., 1] = (pts[..., 1] + 0.5) / sy - 0.5
    return out.astype(np.float32)


class FaceDetector:
    """facenet-pytorch MTCNN returning the one face a user means, in source pixels.

    min_face: below 1, a fraction of the photo's shorter side; from 1 up, pixels of the source
    photo. det_size: longer side for detection (None: full resolution). pad: frame the photo
    by this fraction of its longer side before detecting (for tight crops). retry: after a
    miss, look again with MTCNN's default 20-px minimum face when the first search was
    coarser, then once more padded by RETRY_PAD when `pad` is smaller.
    """

    def __init__(self, device: str = "cpu", min_face: float = DEFAULT_MIN_FACE,
                 det_size: int | None = DEFAULT_DET_SIZE, retry: bool = True, pad: float = 0.0,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)) -> None:
        import torch
        from facenet_pytorch import MTCNN

        if min_face <= 0:
            raise ValueError(f"min_face must be positive, got {min_face}")
        if not 0 <= pad <= 2:
            raise ValueError(f"pad must lie in [0, 2], got {pad}")
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise MtmimError(f"--device {device}: not a torch device (cpu, cuda, cuda:1 ...)") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MtmimError(f"--device {device}: no CUDA device is available here (use cpu)")
        self.min_face = float(min_face)
        self.det_size = det_size
        self.retry = retry
        self.pad = float(pad)
        # keep_all=True: detect() must return every face so that we choose, not MTCNN
        self.mtcnn = MTCNN(keep_all=True, device=self.device, min_face_size=20,
                           thresholds=list(thresholds), post_process=False)
        self.mtcnn.eval()
        if self.device.type == "cpu":
            # PyTorch's CPU max-pool is ~10x slower on NCHW than on channels-last tensors here,
            # and MTCNN's nets are mostly max-pools; conv outputs follow the weights' layout.
            # Results match the NCHW nets to float rounding (landmarks within 1e-4 px).
            for net in (self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet):
                net.to(memory_format=torch.channels_last)

    def prepare(self, image: np.ndarray) -> Prepared:
        """The cheap, thread-safe part (no torch): runs in the decoding threads."""
        det, scale = downscale_for_detection(image, self.det_size)
        return Prepared(image=image, det_image=det, scale=scale)

    def _min_face_px(self, prepared: Prepared) -> float:
        """Minimum face in detection-image pixels."""
        if self.min_face < 1:
            return self.min_face * min(prepared.det_image.shape[:2])
        return self.min_face * prepared.scale

    def _run(self, det_image: np.ndarray, min_face_px: float) -> list[Detection]:
        h, w = det_image.shape[:2]
        if min(h, w) < PNET_SIZE:
            return []
        import torch
        from facenet_pytorch.models.utils.detect_face import detect_face

        # at least one pyramid level must exist, and a face below 12 px is invisible anyway
        min_size = float(np.clip(min_face_px, PNET_SIZE, min(h, w)))
        m = self.mtcnn
        # facenet-pytorch's own detect() reads the minimum face from the module; calling its
        # detect_face with it as an argument keeps this method safe to run in several threads
        with torch.no_grad():
            batch_boxes, batch_points = detect_face(det_image, min_size, m.pnet, m.rnet, m.onet,
                                                    m.thresholds, m.factor, self.device)
        found = np.asarray(batch_boxes[0], dtype=np.float64).reshape(-1, 5)
        if len(found) == 0:
            return []
        boxes, probs = found[:, :4], found[:, 4]
        points = np.asarray(batch_points[0], dtype=np.float64).reshape(-1, 5, 2)
        return [Detection(box=b, score=float(p), landmarks=q)
                for b, p, q in zip(boxes, probs, points, strict=True)]

    def _search(self, prepared: Prepared, min_face_px: float, pad: float) -> list[Detection]:
        """`_run` on the photo framed by `pad`, coordinates in source pixels."""
        det_image, px = pad_image(prepared.det_image, pad)
        return [Detection(box=to_source((d.box - px).reshape(2, 2), prepared).reshape(4),
                          score=d.score, landmarks=to_source(d.landmarks - px, prepared))
                for d in self._run(det_image, min_face_px)]

    def detect_all_prepared(self, prepared: Prepared) -> list[Detection]:
        """Every face found, in source pixels."""
        min_px = self._min_face_px(prepared)
        found = self._search(prepared, min_px, self.pad)
        if not found and self.retry and min_px > RETRY_MIN_FACE:
            found = self._search(prepared, RETRY_MIN_FACE, self.pad)
        if not found and self.retry and self.pad < RETRY_PAD:
            found = self._search(prepared, min(min_px, RETRY_MIN_FACE), RETRY_PAD)
        return found

    def detect_prepared(self, prepared: Prepared) -> Detection | None:
        h, w = prepared.image.shape[:2]
        faces = self.detect_all_prepared(prepared)
        if not faces:
            return None
        face = faces[choose_face(np.stack([f.box for f in faces]), w, h)]
        if self.retry and self.pad < RETRY_PAD and box_overflow(face.box, w, h) > OVERFLOW:
            # a tight crop: MTCNN found the face but misplaces its landmarks; frame it
            framed = self._search(prepared, self._min_face_px(prepared), RETRY_PAD)
            if framed:
                face = framed[choose_face(np.stack([f.box for f in framed]), w, h)]
        return face

    def detect_all(self, image_rgb: np.ndarray) -> list[Detection]:
        return self.detect_all_prepared(self.prepare(image_rgb))

    def detect_one(self, image_rgb: np.ndarray) -> Detection | None:
        """The face a user means (large and central), or None."""
        return self.detect_prepared(self.prepare(image_rgb))
