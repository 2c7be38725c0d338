"""`--threads`: how many CPU threads torch may use in this process."""

from __future__ import annotations

from mtmim_cli.errors import MtmimError


def set_torch_threads(threads: int | None) -> None:
    """Use `threads` threads for torch's intra-op work, and as many inter-op threads when the
    inter-op pool has not started yet (torch allows setting it only once, before first use).
    None leaves torch's defaults (one thread per core)."""
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
