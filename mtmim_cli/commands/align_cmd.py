"""`mtmim align`, `mtmim info`, `mtmim merge`: raw photos -> aligned HDF5 caches."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from mtmim_cli.app import app
from mtmim_cli.atomic import ensure_writable

_FORMATS = "fgnet, celeba, folder, csv, agedb, cacd, cacd-vs, morph, rec (see data/README.md)"


def _command_line() -> str:
    return "mtmim " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# Detail for the commands' text: the frame is the photo's mean colour; it is for tight crops
# that are all face, which MTCNN misses or misplaces; landmarks are mapped back.
PAD_HELP = "Frame tight crops by this fraction of their longer side before detecting (try 0.5)."


@app.command()
def align(
    src: Path = typer.Argument(..., help="Dataset folder (or CSV / label file for csv, morph, celeba)."),
    fmt: str = typer.Option(..., "--format", "-f", help=f"Dataset layout: {_FORMATS}."),
    out: Path = typer.Option(..., "--out", "-o", help="The HDF5 cache to write (e.g. fgnet.h5)."),
    on_miss: str = typer.Option("skip", "--on-miss",
                                help="No face found: skip (stored as a miss), center (a centre crop) or fail."),
    aligned: bool = typer.Option(False, "--aligned",
                                 help="Input is aligned crops: resize to 112x112, no detection."),
    min_face: float = typer.Option(None, "--min-face",
                                   help="Smallest face: below 1 a fraction of the shorter side, else pixels (0.15)."),
    det_size: int = typer.Option(None, "--det-size",
                                 help="Downscale longer photos to this many pixels to detect (640; 0 = never)."),
    pad: float = typer.Option(0.0, "--pad", help=PAD_HELP),
    no_retry: bool = typer.Option(False, "--no-retry",
                                  help="Do not retry a miss (at a 20-px minimum face, then padded)."),
    device: str = typer.Option("cpu", "--device", help="Torch device for MTCNN: cpu, cuda, cuda:1."),
    threads: int = typer.Option(None, "--threads",
                                help="Torch threads per worker (default 1 on cpu)."),
    workers: int = typer.Option(2, "--workers",
                                help="Threads that decode, detect and warp in parallel."),
    shard: str = typer.Option(None, "--shard",
                              help="I/N: only the I-th of N blocks of records (join with `mtmim merge`)."),
    commit_every: int = typer.Option(64, "--commit-every",
                                     help="Records between durable commits (what a kill can lose)."),
    image_format: str = typer.Option("raw", "--image-format",
                                     help="How faces are stored: raw, jpeg or png (see above)."),
    jpeg_quality: int = typer.Option(95, "--jpeg-quality", help="JPEG quality for --image-format jpeg."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Redo a cache made from other photos or settings."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Detect, align (five points onto the 112x112 template) and cache every photo of a dataset.

    Resumes after a kill: rerun the same command. Misses and unreadable files are stored with
    a reason and listed at the end; a detector that keeps failing (8 photos in a row, or no
    memory, a broken install) stops unfinished, and the rerun resumes once it is fixed. A miss is retried at MTCNN's 20-px minimum face, then
    padded by 0.5 (unless --no-retry). --pad frames every photo (in its mean colour) before
    detecting, for tight crops that are all face, which MTCNN misses or misplaces.

    --image-format: raw stores 37,632 bytes a face (fastest to read); jpeg about 5.8 KB at
    quality 95, decoded by the loader workers (for MS1M-size sets); png is lossless, about
    20 KB. --threads defaults to 1 on cpu because the workers use the cores and MTCNN's small
    layers scale poorly; the cache does not depend on --workers.
    """
    ensure_writable(out)

    from mtmim_cli.data.align import align_dataset
    from mtmim_cli.sharding import parse_shard

    console = Console(stderr=True)
    interactive = console.is_terminal and not quiet
    if threads is None and device == "cpu":
        threads = 1
    summary = align_dataset(
        src, fmt, out, on_miss=on_miss, aligned=aligned, min_face=min_face, det_size=det_size,
        retry=not no_retry, pad=pad, device=device, shard=parse_shard(shard), threads=threads,
        workers=workers, commit_every=max(1, commit_every), overwrite=overwrite,
        image_format=image_format, jpeg_quality=jpeg_quality,
        progress=interactive, command=_command_line(),
        log=None if interactive or quiet else (lambda line: print(line, file=sys.stderr, flush=True)),
    )
    print(summary.format())


@app.command()
def info(
    cache: Path = typer.Argument(..., help="An mtmim HDF5 cache."),
    misses: bool = typer.Option(False, "--misses", help="List every record without a detected face."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON."),
) -> None:
    """Counts, identities, age histogram, misses and schema of a cache."""
    import json

    from mtmim_cli.data.info import cache_info, format_info

    description = cache_info(cache)
    if as_json:
        print(json.dumps(description, indent=2, default=str))
    else:
        print(format_info(description, max_problems=None if misses else 20))


@app.command()
def merge(
    out: Path = typer.Argument(..., help="The merged cache to write."),
    shards: list[Path] = typer.Argument(..., help="All N shard caches of one `align --shard` job."),
    copy: bool = typer.Option(False, "--copy",
                              help="Copy the images into OUT (standalone; twice the disk)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Join the caches of `mtmim align --shard I/N` into the cache an unsharded run writes.

    Without --copy, OUT links the shards' images (HDF5 virtual datasets, no copy): keep the
    shard files where they are relative to OUT.
    """
    ensure_writable(out, option="OUT")

    from mtmim_cli.data.align import summarize_cache
    from mtmim_cli.data.shards import merge_caches

    interactive = Console(stderr=True).is_terminal and not quiet
    path = merge_caches(out, shards, command=_command_line(), progress=interactive, copy=copy)
    print(summarize_cache(path).format())


@app.command()
def subset(
    cache: Path = typer.Argument(..., help="The cache to take records from."),
    identities: str = typer.Option(..., "--identities",
                                   help="Identities to keep: NAMES, @FILE or @FILE.json:key.path."),
    out: Path = typer.Option(..., "--out", "-o", help="The cache to write."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write a cache with only the listed identities' records (e.g. an open-set test side).

    --identities takes comma-separated names, @FILE (one name per line) or @FILE.json:key.path
    (a list in a JSON split file, e.g. @open-set.json:fgnet.test_subjects); whole numbers
    match by value (1 = '001').
    """
    ensure_writable(out)

    from mtmim_cli.data.align import summarize_cache
    from mtmim_cli.data.identity_lists import read_identity_list
    from mtmim_cli.data.subset import subset_cache

    interactive = Console(stderr=True).is_terminal and not quiet
    path = subset_cache(cache, out, read_identity_list(identities), command=_command_line(),
                        progress=interactive)
    print(summarize_cache(path).format())
