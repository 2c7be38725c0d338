"""Keep freed memory in the process, so that batch after batch of CPU inference (and each
training step on the CPU: bench/train_allocator.py) does not page-fault its activations back in.

torch's CPU allocator takes every block from malloc, and glibc serves blocks above its mmap
threshold (at most 32 MB) with a fresh mmap and returns them to the kernel on free. A
MobileFaceNet batch of 128 faces has activations of ~90 MB, so each batch faulted ~2 GB of
zeroed pages in again: `mtmim embed` spent as much system time as user time (2.4 million minor
faults for 128 faces; bench/embed.py prints the counts). Serving large blocks from the heap and
keeping up to `TRIM_THRESHOLD` of freed memory cuts the faults ~10x, at the cost of a resident
size that stays near the peak of a batch. MTMIM_KEEP_FREED_MEMORY=0 leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 1 << 30                # freed memory kept at the heap's top before trimming

_done = False


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and keep freed memory (once per
    process). Returns whether the setting is in force; elsewhere than glibc it does nothing."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MTMIM_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # musl and other C libraries have no mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
