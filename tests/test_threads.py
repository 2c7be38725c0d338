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


def _blas_pools(env: dict) -> list[int]:
    """Thread counts of every BLAS pool in a fresh process that caps them, then loads the
    libraries that bring their own (scipy's and scikit-learn's OpenBLAS)."""
    import json
    import os
    import subprocess
    import sys

    code = ("from mtmim_cli.threads import limit_blas_threads; limit_blas_threads(); "
            "import numpy, scipy.linalg, sklearn.linear_model; "
            "from threadpoolctl import threadpool_info; import json; "
            "print(json.dumps([p['num_threads'] for p in threadpool_info() "
            "if p['user_api'] == 'blas']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_every_blas_pool_keeps_one_thread_even_those_loaded_later() -> None:
    pools = _blas_pools({"OPENBLAS_NUM_THREADS": "2", "MTMIM_BLAS_THREADS": "1"})
    assert pools and all(n == 1 for n in pools), pools
    assert all(n == 2 for n in _blas_pools({"MTMIM_BLAS_THREADS": "2"}))
    with pytest.raises(MtmimError, match="MTMIM_BLAS_THREADS=x"):
        import os

        os.environ["MTMIM_BLAS_THREADS"] = "x"
        try:
            set_torch_threads(None)
        finally:
            del os.environ["MTMIM_BLAS_THREADS"]


def test_mtmim_sets_passive_openmp_before_torch_loads() -> None:
    """In a fresh `mtmim` process torch's OpenMP pool sees OMP_WAIT_POLICY=PASSIVE (unless
    the environment set a policy), read when libgomp loads."""
    import os
    import subprocess
    import sys

    code = ("import os, sys; from mtmim_cli import cli; "
            "cli.app = lambda: print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules); "
            "cli.main()")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["PASSIVE", "False"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["ACTIVE", "False"]


@pytest.mark.parametrize("order", ["limit-then-torch", "torch-then-limit"])
def test_capping_blas_leaves_torchs_own_threads_alone(order: str) -> None:
    """torch's intra-op pool keeps the count a process that never capped BLAS gets, whether
    torch loads after the cap (it reads MKL_NUM_THREADS then) or before it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = "2"

    def threads(code: str) -> int:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True).stdout
        return int(out.strip().splitlines()[-1])

    plain = threads("import torch; print(torch.get_num_threads())")
    cap = "from mtmim_cli.threads import limit_blas_threads; limit_blas_threads(); "
    code = {"limit-then-torch": cap + "import torch; print(torch.get_num_threads())",
            "torch-then-limit": "import torch; " + cap + "print(torch.get_num_threads())"}
    assert plain == 2
    assert threads(code[order]) == plain
