"""`--shard I/N`, shared by the commands that split work across processes or machines."""

from __future__ import annotations

from mtmim_cli.errors import MtmimError


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' (0 <= I < N) -> (I, N); None or '' -> None (no sharding)."""
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise MtmimError(f"--shard {text}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise MtmimError(f"--shard {text}: need 0 <= I < N")
    return i, n
