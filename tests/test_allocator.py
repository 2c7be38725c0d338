"""reuse_freed_memory: a large block freed and taken again is not page-faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

_PROBE = """
import ctypes, ctypes.util, resource
from mtmim_cli.allocator import reuse_freed_memory
print(reuse_freed_memory())
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20                    # a 64 MB block, as torch's CPU allocator asks malloc for one:
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)   # above glibc's largest mmap threshold
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); ctypes.memset(p, 1, n)                 # the same size again, every page written
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(keep: str) -> tuple[bool, int]:
    env = {**os.environ, "MTMIM_KEEP_FREED_MEMORY": keep, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env,
                       check=True, timeout=120)
    active, faults = r.stdout.split()
    return active == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_a_reused_block_costs_no_page_faults_and_the_switch_turns_it_off() -> None:
    active, faults = _faults("1")
    off, faults_off = _faults("0")
    if not active:
        pytest.skip("not glibc: mallopt unavailable")
    assert not off
    # glibc's default maps the block afresh: at least one fault per page (per 2 MB page when
    # the kernel backs it with huge pages); kept on the heap it is reused without faults
    assert faults_off >= (64 << 20) // (2 << 20), faults_off
    assert faults <= 0.05 * faults_off, (faults, faults_off)
