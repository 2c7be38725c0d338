"""`--threads`: how many CPU threads torch may use in this process; the BLAS pool numpy and
scikit-learn use, which stays at one thread; and idle OpenMP threads that sleep.

Why one BLAS thread: the analyses after scoring (age probes, bootstraps) run BLAS on small
matrices, where OpenBLAS's second thread spins waiting for work. On two cores shared with
other work that is ruinous: an SVD of a 530 x 256 matrix took 7.4 s with two OpenBLAS threads
at load 5 and 0.06 s with one, and the age probe of one model on FG-NET took 186 s of
evaluate's 264. `MTMIM_BLAS_THREADS` sets another count."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from mtmim_cli.errors import MtmimError


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def passive_openmp() -> None:
    """Idle OpenMP threads (torch's intra-op pool) sleep instead of spinning, unless the
    environment says otherwise. libgomp reads OMP_WAIT_POLICY when torch loads, so this runs
    first thing in `mtmim`. On two cores shared with other work a spinning thread steals the
    core its sibling needs: MobileFaceNet features ran at 38-49 img/s with the default and
    67-69 img/s passive (load 2-3, two threads)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def limit_blas_threads() -> None:
    """Cap the BLAS/OpenMP pools numpy and scikit-learn use (MTMIM_BLAS_THREADS, default 1)."""
    raw = os.environ.get("MTMIM_BLAS_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise MtmimError(f"MTMIM_BLAS_THREADS={raw}: must be a whole number") from None
    if n < 1:
        raise MtmimError(f"MTMIM_BLAS_THREADS={raw}: must be at least 1")
    # Pools loaded later (scipy and scikit-learn bring their own OpenBLAS) read the
    # environment when they load; those already loaded are capped through threadpoolctl.
    # Not MKL_NUM_THREADS: torch reads it, above OMP_NUM_THREADS, for its own intra-op pool,
    # so setting it before torch loads ran every forward and backward pass on one thread.
    os.environ["OPENBLAS_NUM_THREADS"] = str(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(n, user_api="blas")


def set_torch_threads(threads: int | None) -> None:
    """Use `threads` threads for torch's intra-op work, and as many inter-op threads when the
    inter-op pool has not started yet (torch allows setting it only once, before first use).
    None leaves torch's defaults (one thread per core). BLAS keeps one thread either way
    (`limit_blas_threads`)."""
    limit_blas_threads()
    if threads is None:
        return
    if threads < 1:
        raise MtmimError(f"--threads {threads}: must be at least 1")
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # already started: intra-op threads are what forward passes use anyway


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside the block and restored after it
    (None or 0 leaves it): for library calls, which must leave the process's setting as they
    found it, where `set_torch_threads` is a command's setting for its whole process."""
    if not threads:
        yield
        return
    if threads < 1:
        raise MtmimError(f"--threads {threads}: must be at least 1")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
