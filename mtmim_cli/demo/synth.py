"""The embedded cross-age face set: `mtmim synth` builds it offline from photos the installed
packages ship, so `make demo` runs on a machine without any dataset. How one photo is drawn
(base portraits, identity shape and colour, ageing): demo/faces.py; the point maps it warps
with: demo/warps.py. This module plans the set (identities, ages, the held-out split) and
writes it.

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
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.demo.faces import BASE_LANDMARKS, SIZE, Photo, draw_identity, load_base, render
from mtmim_cli.errors import MtmimError

SYNTH_VERSION = 1


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
