"""--threads: torch's thread count follows the option; a bad count is a one-line error."""

from __future__ import annotations

import pytest
import torch

from mtmim_cli.errors import MtmimError
from mtmim_cli.threads import set_torch_threads
from tests.conftest import run_cli


def test_set_torch_threads_sets_and_none_leaves_alone() -> None:
    before = torch.get_num_threads()
    try:
        set_torch_threads(1)
        assert torch.get_num_threads() == 1
        set_torch_threads(None)
        assert torch.get_num_threads() == 1
        set_torch_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(MtmimError, match="--threads 0: must be at least 1"):
        set_torch_threads(0)


def test_a_bad_thread_count_is_one_line_on_the_command_line(tmp_path) -> None:
    r = run_cli("embed", "x.h5", "--model", "m.pt", "--out", str(tmp_path / "e.h5"),
                "--threads", "0")
    assert r.returncode == 2 and r.stderr.strip().endswith("--threads 0: must be at least 1"), \
        r.stderr
