"""Five-point alignment onto the standard 112x112 template, one photo or a whole dataset.

Geometry: a similarity transform (rotation, uniform scale, translation; no reflection)
estimated by least squares in closed form (Umeyama 1991) from the five MTCNN points to
`TEMPLATE_112`, then a bilinear warp (Pillow's affine transform). Pixel centres sit on integer
coordinates, as in MTCNN's output and the template's usual use with OpenCV.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtmim_cli.errors import MtmimError

IMAGE_SIZE = 112

# insightface's 112x112 ArcFace template: left eye, right eye, nose tip, left and right mouth
# corner (image left first). The 112x96 crop of older models is the same with x - 8.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

MIN_SIDE = 12  # a photo smaller than PNet's 12-px window cannot hold a detectable face


def estimate_similarity(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama) mapping src points onto dst points, as a 2x3 matrix.

    Minimises sum ||dst_i - (s R src_i + t)||^2 over scale s > 0, rotation R (det +1), t.
    """
    src = np.asarray(src_pts, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst_pts, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets of at least 2 points, got {src.shape}, {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = (sc**2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("source points are all equal")
    cov = dc.T @ sc / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0  # the best fit would reflect: take the nearest rotation instead
    rot = u @ np.diag(sign) @ vt
    scale = (d * sign).sum() / var_s
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Warp `image` by the 2x3 forward map `matrix` (source -> output pixels) into size x size.

    When the map shrinks by more than 2x, the face region is first box-reduced by an integer
    factor so the bilinear warp does not alias.
    """
    from PIL import Image

    m = np.vstack([np.asarray(matrix, dtype=np.float64), [0, 0, 1]])
    h, w = image.shape[:2]
    pil = _pil(image)
    scale = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    k = int(0.5 / scale) if scale > 0 else 1
    if k >= 2:
        inv = np.linalg.inv(m)
        corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]])
        src = (inv @ corners.T)[:2].T
        x0 = int(np.clip(np.floor(src[:, 0].min()) - 2 * k, 0, w))
        y0 = int(np.clip(np.floor(src[:, 1].min()) - 2 * k, 0, h))
        x1 = int(np.clip(np.ceil(src[:, 0].max()) + 2 * k, 0, w))
        y1 = int(np.clip(np.ceil(src[:, 1].max()) + 2 * k, 0, h))
        if x1 - x0 >= k and y1 - y0 >= k:
            pil = pil.reduce(k, box=(x0, y0, x1, y1))
            # reduced pixel j averages source [x0 + jk, x0 + (j+1)k): its centre is x0 + jk + (k-1)/2
            to_src = np.array([[k, 0, x0 + (k - 1) / 2], [0, k, y0 + (k - 1) / 2], [0, 0, 1.0]])
            m = m @ to_src
    inv = np.linalg.inv(m)
    # Pillow samples at pixel centres x + 0.5: shift into and out of its convention
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])
    unshift = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1.0]])
    pinv = shift @ inv @ unshift
    out = pil.transform((size, size), Image.Transform.AFFINE, data=tuple(pinv[:2].ravel()),
                        resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out)


def warp_face(image_rgb_uint8: np.ndarray, landmarks5: np.ndarray) -> np.ndarray:
    """The 112x112 aligned face: five landmarks (source pixels) mapped onto TEMPLATE_112."""
    matrix = estimate_similarity(landmarks5, TEMPLATE_112)
    return warp_affine(image_rgb_uint8, matrix, IMAGE_SIZE)


def center_crop(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Fallback for a photo without a detected face: its central square, resized."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = _pil(image[y0:y0 + side, x0:x0 + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))


def pad_resize(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """An already aligned crop -> size x size: pad the short side to a square (black, centred),
    then resize. A 112x96 crop comes back exactly as the 112x112 template crop it was cut from."""
    from PIL import Image

    h, w = image.shape[:2]
    side = max(h, w)
    if (h, w) != (side, side):
        sq = np.zeros((side, side, 3), np.uint8)
        y0, x0 = (side - h) // 2, (side - w) // 2
        sq[y0:y0 + h, x0:x0 + w] = image
        image = sq
    if side == size:
        return np.ascontiguousarray(image)
    return np.asarray(_pil(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))


def align_photo(path_or_array, detector) -> tuple[np.ndarray | None, object | None]:
    """Detect and align one photo: (112x112x3 uint8, Detection), or (None, None) without a face.

    Raises MtmimError("<file>: <reason>") for an unreadable file.
    """
    from mtmim_cli.data.readers import load_image

    if isinstance(path_or_array, np.ndarray):
        image = path_or_array
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise MtmimError(f"<array>: expected an RGB uint8 image, got {image.shape} {image.dtype}")
        image = np.ascontiguousarray(image[:, :, :3])
    else:
        image = load_image(path_or_array)
    if min(image.shape[:2]) < MIN_SIDE:
        return None, None
    det = detector.detect_one(image)
    if det is None:
        return None, None
    return warp_face(image, det.landmarks), det


# --------------------------------------------------------------------------- whole datasets

ON_MISS = ("skip", "center", "fail")


@dataclass
class AlignSummary:
    """What `align_dataset` did: counts over the whole cache, timing for this run."""

    out: Path
    total: int
    counts: dict[str, int]
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (path, status, reason)
    processed: int = 0        # records aligned by this run (the rest came from a resumed file)
    resumed_from: int = 0
    seconds: float = 0.0
    reused: bool = False      # the final file already existed with the same input and settings

    @property
    def speed(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    @property
    def detection_rate(self) -> float:
        return self.counts.get("detected", 0) / self.total if self.total else float("nan")

    def format(self, max_problems: int = 50) -> str:
        lines = [f"{self.out}: {self.total} records"]
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        usable = sum(self.counts.get(k, 0) for k in ("detected", "center", "prealigned"))
        if self.total:
            detected = ("" if self.counts.get("prealigned") else
                        f"; detected {self.detection_rate:.1%}")
            lines.append(f"  usable {usable}/{self.total} ({usable / self.total:.1%}){detected}")
        if self.reused:
            lines.append("  already complete: nothing to do (pass --overwrite to redo)")
        elif self.processed:
            extra = f", resumed after {self.resumed_from}" if self.resumed_from else ""
            lines.append(f"  aligned {self.processed} in {self.seconds:.1f} s "
                         f"({self.speed:.1f} img/s{extra})")
        if self.problems:
            lines.append(f"  not detected or unreadable ({len(self.problems)}):")
            for path, status, reason in self.problems[:max_problems]:
                lines.append(f"    {status:7s} {path}: {reason}")
            if len(self.problems) > max_problems:
                lines.append(f"    ... {len(self.problems) - max_problems} more "
                             "(all are listed in the cache: mtmim info --misses)")
        return "\n".join(lines)


def summarize_cache(path: str | Path, **extra) -> AlignSummary:
    """The summary of a finished cache file: counts, and every record that has a reason
    (misses, unreadable files, centre-crop fallbacks)."""
    from mtmim_cli.data.cache import STATUS_NAMES, Cache

    c = Cache(path)
    counts = {name: int((c.status == code).sum()) for code, name in STATUS_NAMES.items()}
    problems = [(c.paths[i], STATUS_NAMES[int(s)], c.reason[i])
                for i, s in enumerate(c.status) if c.reason[i]]
    return AlignSummary(out=Path(path), total=len(c), counts=counts, problems=problems, **extra)


def shard_slice(n_records: int, shard: tuple[int, int]) -> slice:
    """Contiguous blocks, so that merging the shards in order gives the unsharded order."""
    i, n = shard
    return slice(i * n_records // n, (i + 1) * n_records // n)


# A photo that breaks the detector is rare and comes alone (the odd sizes that crash
# facenet-pytorch are guarded in detect.py), so this many detection failures in a row mean
# the detector itself fails (a broken install, no memory, a lost device): align stops. Eight
# keeps a short run of odd photos from stopping a long job, and the records of the run are
# never committed, so at most eight photos' work is redone after the fix.
MAX_FAILURES_IN_A_ROW = 8

# Errors no photo causes: the install, the memory or the device failed, and every later
# photo would fail alike (a photo's pixels cannot make a module, a name or an attribute
# vanish). They stop align at once.
_SYSTEMATIC = (MemoryError, ImportError, NameError, AttributeError, NotImplementedError,
               SystemError)
# ... and torch's RuntimeErrors that say so. Its other RuntimeErrors (a kernel larger than a
# degenerate input, say) may be about the photo: they count towards MAX_FAILURES_IN_A_ROW.
_SYSTEMATIC_TEXT = ("out of memory", "can't allocate memory", "cuda", "cudnn", "cublas",
                    "hip error", "not compiled", "undefined symbol", "device-side assert",
                    "same device")


def is_systematic(exc: BaseException, stage: str = "detect") -> bool:
    """Whether `exc`, raised while decoding (`stage` "decode") or detecting ("detect") one
    photo, is not that photo's fault. An OSError counts while detecting only: detection reads
    no file, so there it is a library or the device failing (decoding's are the file's)."""
    if isinstance(exc, _SYSTEMATIC) or (stage == "detect" and isinstance(exc, OSError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _SYSTEMATIC_TEXT)


@dataclass
class _Outcome:
    """What one worker made of one record; the main thread writes it."""

    status: int
    face: np.ndarray | None = None
    det: object | None = None
    reason: str = ""
    encoded: bytes | None = None    # the face's JPEG/PNG bytes when the cache stores them
    stage: str = ""                 # "decode" or "detect": where `error` was raised
    error: BaseException | None = None
    detected: bool = False          # detection (or the resize of an aligned crop) returned


def _process(load: Callable[[str], np.ndarray], rel: str, aligned: bool, on_miss: str,
             detector, encode: Callable[[np.ndarray], bytes] | None = None) -> _Outcome:
    """One record in a worker thread: `_outcome`, then the face encoded for an encoded cache
    (Pillow releases the GIL while encoding too)."""
    out = _outcome(load, rel, aligned, on_miss, detector)
    if encode is not None and out.face is not None:
        out.encoded = encode(out.face)
    return out


def _outcome(load: Callable[[str], np.ndarray], rel: str, aligned: bool, on_miss: str,
             detector) -> _Outcome:
    """One record, start to finish: decode (Pillow releases the GIL), detect (torch ops
    release it too, so two workers use two cores) and warp. A failure becomes an ERROR
    outcome carrying its exception; the main thread decides whether it stops the run."""
    from mtmim_cli.data.cache import CENTER, DETECTED, ERROR, MISS, PREALIGNED
    from mtmim_cli.data.readers import UnreadableImage

    try:
        image = load(rel)
    except UnreadableImage as exc:
        return _Outcome(ERROR, reason=exc.reason)
    except Exception as exc:  # noqa: BLE001  one odd photo must not stop a long run
        return _Outcome(ERROR, reason=f"decoding failed: {exc!r}", stage="decode", error=exc)
    try:
        if aligned:
            return _Outcome(PREALIGNED, face=pad_resize(image), detected=True)
        h, w = image.shape[:2]
        if min(h, w) < MIN_SIDE:
            return _Outcome(MISS, reason=f"image too small ({w}x{h}) to hold a face")
        det = detector.detect_prepared(detector.prepare(image))
        if det is not None:
            return _Outcome(DETECTED, face=warp_face(image, det.landmarks), det=det,
                            detected=True)
        if on_miss == "center":
            return _Outcome(CENTER, face=center_crop(image), reason="no face found",
                            detected=True)
        return _Outcome(MISS, reason="no face found", detected=True)
    except Exception as exc:  # noqa: BLE001
        return _Outcome(ERROR, reason=f"detection failed: {exc!r}", stage="detect", error=exc)


def failed_cache(status: np.ndarray) -> bool:
    """A cache in which no record holds a face and some failed: what a systematic fault
    leaves (error rows, with misses for the photos too small ever to reach the detector)."""
    from mtmim_cli.data.cache import ERROR, USABLE

    status = np.asarray(status)
    return bool(len(status)) and not np.isin(status, USABLE).any() and bool((status == ERROR).any())


def settings_difference(old: str, new: str) -> str:
    """The settings (JSON) that differ, as 'name OLD (this run: NEW)'. A cache made before a
    setting was recorded reads as that setting's old value: detector behaviour 1, no pad."""
    a, b = json.loads(old), json.loads(new)
    for d in (a, b):
        if not d.get("aligned"):
            d.setdefault("detector_behaviour", 1)
            d.setdefault("pad", 0.0)
    return ", ".join(f"{k} {a.get(k)} (this run: {b.get(k)})" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))


def _partial_difference(partial: Path, records_sha1: str, settings: str) -> str:
    """How a partial cache of the same photos was made differently ('' when it was not, or it
    holds other photos or cannot be read: the writer then starts over)."""
    import h5py

    try:
        with h5py.File(partial, "r") as f:
            if f.attrs.get("records_sha1") != records_sha1:
                return ""
            old = f.attrs.get("settings")
            old = old.decode() if isinstance(old, bytes) else str(old)
        return settings_difference(old, settings)
    except Exception:  # noqa: BLE001  a damaged partial file is started over by the writer
        return ""


def align_dataset(src: str | Path, fmt: str, out: str | Path, *, on_miss: str = "skip",
                  aligned: bool = False, min_face: float | None = None,
                  det_size: int | None = None, retry: bool = True, pad: float = 0.0,
                  device: str = "cpu",
                  shard: tuple[int, int] | None = None, threads: int | None = None,
                  workers: int = 2, prefetch: int = 16, commit_every: int = 64,
                  overwrite: bool = False, progress: bool = True, command: str = "",
                  log: Callable[[str], None] | None = None, detector=None,
                  image_format: str = "raw", jpeg_quality: int = 95) -> AlignSummary:
    """Align every photo of a dataset into one HDF5 cache (resumable, atomic).

    Records are decoded, detected and warped in `workers` threads, up to `prefetch` ahead, and
    written in order by this one; the result does not depend on `workers`.
    `threads` sets torch's intra-op threads for detection (None: leave torch's setting).
    `log` receives one plain line per commit (for logs and non-terminal runs).
    `image_format` jpeg or png stores the faces encoded (data/cache.py), encoded in the workers.
    A photo that fails to decode or detect is an ERROR record; a detector that fails
    systematically raises MtmimError and leaves the cache partial, resumable (`_fill`).
    torch's process-wide settings are restored on return.
    """
    from mtmim_cli.atomic import tmp_path_for
    from mtmim_cli.data.cache import Cache, CacheWriter, records_digest
    from mtmim_cli.data.detect import (
        BEHAVIOUR,
        DEFAULT_DET_SIZE,
        DEFAULT_MIN_FACE,
        FaceDetector,
        check_pad,
    )
    from mtmim_cli.data.readers import image_loader, read_records, source_root

    if on_miss not in ON_MISS:
        raise MtmimError(f"--on-miss {on_miss}: choose from {', '.join(ON_MISS)}")
    min_face = DEFAULT_MIN_FACE if min_face is None else float(min_face)
    det_size = DEFAULT_DET_SIZE if det_size is None else int(det_size)
    if min_face <= 0:
        raise MtmimError(f"--min-face {min_face}: must be positive")
    pad = check_pad(pad)
    out = Path(out)
    aligned = aligned or fmt == "rec"  # insightface packs hold aligned crops
    records = read_records(src, fmt)
    root = source_root(src, fmt)
    load = image_loader(src, fmt)
    all_digest = records_digest(records)
    if shard is not None:
        records = records[shard_slice(len(records), shard)]
    settings = {"aligned": aligned, "on_miss": on_miss,
                "min_face": None if aligned else min_face, "det_size": None if aligned else det_size,
                "retry": None if aligned else retry}
    if pad and not aligned:  # only when set, so caches made before --pad keep their settings
        settings["pad"] = float(pad)
    if not aligned:
        settings["detector_behaviour"] = BEHAVIOUR
    attrs = {"reader": fmt, "source_root": str(root), "command": command,
             "template": TEMPLATE_112.tolist(), "settings": json.dumps(settings, sort_keys=True),
             "shard": f"{shard[0]}/{shard[1]}" if shard else "", "all_records_sha1": all_digest}

    if out.exists() and not overwrite:
        diff = ""
        try:
            old = Cache(out)
            same = (old.attrs.get("records_sha1") == records_digest(records)
                    and old.attrs.get("settings") == attrs["settings"]
                    and old.image_format == image_format)
            if old.attrs.get("records_sha1") == records_digest(records):
                diff = settings_difference(old.attrs.get("settings", "{}"), attrs["settings"])
        except MtmimError:
            same = False
        if not same:
            raise MtmimError(f"{out}: exists and was made from other photos or settings"
                             f"{f' ({diff})' if diff else ''}; remove it or pass --overwrite")
        if failed_cache(old.status):   # e.g. finished by a build that kept a broken detector's rows
            k = _last_error(old.status)
            raise MtmimError(f"{out}: none of its {len(old)} records holds a face "
                             f"({_errors(old.status)}, the last: {old.paths[k]}: "
                             f"{old.reason[k]}); a failed run, not a cache: fix the cause, "
                             "then pass --overwrite")
        return summarize_cache(out, reused=True)
    partial = tmp_path_for(out)
    if partial.exists() and not overwrite:
        diff = _partial_difference(partial, records_digest(records), attrs["settings"])
        if diff:
            raise MtmimError(f"{partial}: a partial cache of these photos made with other "
                             f"settings ({diff}); finishing it would mix the two: remove it, "
                             "or pass --overwrite to start over")

    with _detection_settings(aligned, threads):
        if not aligned and detector is None:
            detector = FaceDetector(device=device, min_face=min_face, det_size=det_size,
                                    retry=retry, pad=pad)
        writer = CacheWriter(out, records, attrs, match_attrs=("settings",),
                             image_format=image_format, jpeg_quality=jpeg_quality)
        start = writer.start
        try:
            seconds = _fill(writer, records, load, root, aligned=aligned, on_miss=on_miss,
                            detector=detector, workers=workers, prefetch=prefetch,
                            commit_every=commit_every, progress=progress, log=log)
        finally:
            writer.close()
    return summarize_cache(out, processed=len(records) - start, resumed_from=start,
                           seconds=seconds)


@contextmanager
def _detection_settings(aligned: bool, threads: int | None) -> Iterator[None]:
    """torch's process-wide settings for detection, restored on the way out: align is a
    library call too (tests, the Python API), and must leave the process as it found it."""
    if aligned:
        yield
        return
    import torch

    from mtmim_cli.threads import torch_threads

    with torch_threads(threads):
        # MTCNN's activations underflow into denormal floats, which CPUs handle slowly;
        # flushing them to zero gives the same landmarks here and ~10% more photos/s
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.set_flush_denormal(False)   # torch has no getter: back to its default, off


def _last_error(status: np.ndarray) -> int:
    """The index of the last ERROR record (there is one: see `failed_cache`)."""
    from mtmim_cli.data.cache import ERROR

    return int(np.flatnonzero(np.asarray(status) == ERROR)[-1])


def _errors(status: np.ndarray) -> str:
    from mtmim_cli.data.cache import ERROR

    k = int((np.asarray(status) == ERROR).sum())
    return f"{k} error{'s' if k != 1 else ''}"


def _fill(writer, records: Sequence, load: Callable[[str], np.ndarray], root: Path, *,
          aligned: bool, on_miss: str, detector, workers: int, prefetch: int,
          commit_every: int, progress: bool, log: Callable[[str], None] | None) -> float:
    """Align records writer.start.. into the writer and finish it; returns the seconds taken.

    A detector that fails systematically (an error no photo causes, or MAX_FAILURES_IN_A_ROW
    detection failures in a row) stops the run with an MtmimError naming the photo and the
    error; the partial file keeps the records before the failures, committed, so the same
    command resumes once the cause is fixed. Commits never pass the start of a run of
    detection failures, so a kill meanwhile does not keep them either. A cache in which no
    record holds a face and some failed (`failed_cache`) is not finished under its name."""
    from mtmim_cli.data.cache import ERROR, MISS, _attr_text
    from mtmim_cli.progress import make_progress

    start, n = writer.start, len(records)
    encode = writer.encode if writer.encoded else None
    statuses = np.empty(n, np.uint8)
    statuses[:start] = writer.h5["status"][:start]
    last_error: tuple[int, str] | None = None   # (record, reason) of this run's last ERROR
    streak_start: int | None = None   # first record of the current run of detection failures
    streak = 0
    t0 = time.perf_counter()
    last_commit = t0
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")
    futures: dict[int, Future] = {}

    def submit_upto(k: int) -> None:
        for j in range(k, min(n, k + prefetch)):
            if j not in futures:
                futures[j] = pool.submit(_process, load, records[j].path, aligned, on_miss,
                                         detector, encode)

    def stop(i: int, why: str) -> MtmimError:
        keep = i if streak_start is None else streak_start
        writer.commit(keep)
        return MtmimError(
            f"{root / records[i].path}: {why}; stopped without finishing {writer.final_path} "
            f"({writer.tmp_path} keeps the first {keep} of {n} records: rerun the same command "
            "once the cause is fixed to resume)")

    bar = make_progress("img", disable=not progress)
    try:
        with bar:
            task = bar.add_task("align", total=n, completed=start)
            for i in range(start, n):
                submit_upto(i)
                r = futures.pop(i).result()  # records are written in order, whatever finishes first
                if r.error is not None and is_systematic(r.error, r.stage):
                    what = "decoding" if r.stage == "decode" else "detection"
                    raise stop(i, f"{what} failed with an error no photo causes ({r.error!r})")
                if r.stage == "detect":
                    streak_start = i if streak_start is None else streak_start
                    streak += 1
                    if streak >= MAX_FAILURES_IN_A_ROW:
                        raise stop(i, f"detection failed on {streak} photos in a row, so the "
                                      f"detector is at fault, not the photos ({r.error!r})")
                elif r.detected:
                    streak_start, streak = None, 0
                if r.status == MISS and on_miss == "fail":
                    writer.commit(i if streak_start is None else streak_start)
                    raise MtmimError(f"{root / records[i].path}: {r.reason} (--on-miss fail)")
                if r.det is not None:
                    writer.write(i, r.face, r.status, landmarks=r.det.landmarks,
                                 det_score=r.det.score, encoded=r.encoded)
                else:
                    writer.write(i, r.face, r.status, reason=r.reason, encoded=r.encoded)
                statuses[i] = r.status
                if r.status == ERROR:
                    last_error = (i, r.reason)
                bar.advance(task)
                now = time.perf_counter()
                clean = i + 1 if streak_start is None else streak_start
                if clean > writer.committed and (clean - writer.committed >= commit_every
                                                 or now - last_commit > 10):
                    writer.commit(clean)
                    last_commit = now
                    if log:
                        log(f"committed {clean}/{n} ({(i + 1 - start) / (now - t0):.1f} img/s)")
            seconds = time.perf_counter() - t0
            if failed_cache(statuses):
                writer.commit(n if streak_start is None else streak_start)
                k = _last_error(statuses)
                reason = (last_error[1] if last_error is not None and last_error[0] == k
                          else _attr_text(writer.h5["reason"][k]))
                raise MtmimError(
                    f"{writer.tmp_path}: none of its {n} records holds a face "
                    f"({_errors(statuses)}, the last: {records[k].path}: {reason}); not "
                    f"finished as {writer.final_path}: fix the cause (the photos, the install), "
                    "then rerun the same command, or pass --overwrite")
            writer.finish()
    finally:
        for f in futures.values():
            f.cancel()
        pool.shutdown(wait=True)
    return seconds
