"""Shared fixtures: the ../shared data (skipped with a reason when absent) and tiny caches."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtmim_cli.data.cache import DETECTED, CacheWriter
from mtmim_cli.data.records import Record
from mtmim_cli.paths import shared_dir

REPO = Path(__file__).resolve().parents[1]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set MTMIM_SHARED to the shared data folder)")
    return path


def pytest_configure(config) -> None:
    """One thread for torch and BLAS in the tests and the commands they start, unless
    OMP_NUM_THREADS says otherwise: on two cores shared with other work, a two-thread pool
    spins at every small op while its other thread waits for a core (at load 3, an evaluate
    test took 2.9 s with one torch thread and 23 s with two; another, 3.2 s with one OpenBLAS
    thread and 17 s with two). numpy is loaded by now, so OpenBLAS is limited through
    threadpoolctl (scikit-learn's dependency) rather than the environment."""
    import torch
    from threadpoolctl import threadpool_limits

    n = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(n)
    threadpool_limits(n)


@pytest.fixture
def one_thread():
    """Two shared cores: torch's thread pool makes tiny ops crawl when the machine is busy."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(shared_dir(), "shared data folder")


@pytest.fixture(scope="session")
def fgnet_dir(shared: Path) -> Path:
    return _need(shared / "data" / "fgnet", "FG-NET")


@pytest.fixture(scope="session")
def celeba_dir(shared: Path) -> Path:
    return _need(shared / "data" / "celeba-subset", "CelebA subset")


@pytest.fixture(scope="session")
def cacd_vs_dir(shared: Path) -> Path:
    return _need(shared / "data" / "cacd-vs", "CACD-VS release")


@pytest.fixture(scope="session")
def mobilefacenet_ckpt(shared: Path) -> Path:
    return _need(shared / "weights" / "mobilefacenet-casia-arcface.ckpt", "MobileFaceNet weights")


class Pool(torch.nn.Module):
    """k x k average pooling of the normalised image, flattened: a fixed, deterministic model
    whose features a test can compute without it."""

    input_width = 112

    def __init__(self, k: int) -> None:
        super().__init__()
        self.register_buffer("k", torch.tensor(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, int(self.k)).flatten(1)


def write_cache(path: Path, identities: list[str], ages: list[float] | None = None,
                seed: int = 0, images: np.ndarray | None = None) -> Path:
    """A small real cache of random (or given) images, one record per entry of `identities`."""
    rng = np.random.default_rng(seed)
    ages = ages if ages is not None else [math.nan] * len(identities)
    records = [Record(path=f"img{i:05d}.jpg", identity=ident, age=float(a))
               for i, (ident, a) in enumerate(zip(identities, ages, strict=True))]
    w = CacheWriter(path, records, attrs={"reader": "test", "source_root": str(path.parent)})
    for i in range(len(records)):
        img = images[i] if images is not None else rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        w.write(i, img, DETECTED, landmarks=np.zeros((5, 2)), det_score=1.0)
    w.commit(len(records))
    return w.finish()


def tiny_finetuned(d: Path, ages: list[float], seed: int) -> tuple[Path, Path]:
    """A real fine-tuned (mtmim mode, x_id from its factorization unit) tiny model and the
    labelled cache of 8 people x 6 photos (`ages` in that order) it was trained on."""
    from mtmim_cli.train.finetune import finetune

    ids = [f"id{k}" for k in range(8) for _ in range(6)]
    cache = write_cache(d / "c.h5", ids, ages, seed=seed)
    run = finetune([cache], None, {"out": str(d / "run"), "backbone": "tiny", "mode": "mtmim",
                                   "age_groups": 2, "batch_size": 16, "epochs": 1,
                                   "progress": False, "lr": 1e-3})
    return run / "model.pt", cache


@pytest.fixture
def tiny_cache(tmp_path: Path) -> Path:
    """8 identities x 6 images, ages spread over 0-70."""
    ids = [f"id{k}" for k in range(8) for _ in range(6)]
    ages = [float((k * 7 + j * 11) % 70) for k in range(8) for j in range(6)]
    return write_cache(tmp_path / "tiny.h5", ids, ages)


def align_fgnet_subjects(fgnet_dir: Path, subjects: tuple[str, ...], folder: Path) -> Path:
    """Align the FG-NET photos of the given subjects (linked into `folder`) into a real cache."""
    from mtmim_cli.data.align import align_dataset

    for p in sorted((fgnet_dir / "images").iterdir()):
        if p.name[:3] in subjects:
            (folder / p.name).symlink_to(p)
    out = folder.parent / f"{folder.name}.h5"
    align_dataset(folder, "fgnet", out, on_miss="center", progress=False)
    return out


def assert_cli_defaults_are_the_librarys(command: str, library_name: dict[str, str],
                                         not_settings: set[str] | tuple[str, ...],
                                         default) -> None:
    """Every option of `mtmim COMMAND` that is a setting shows the library's default
    (`default(name)`, options renamed through `library_name`); at least 30 are checked."""
    import typer

    from mtmim_cli.cli import app

    checked = 0
    for p in typer.main.get_command(app).commands[command].params:
        if p.name in not_settings or p.name == "ctx":
            continue
        want = default(library_name.get(p.name, p.name))
        got = str(p.default) if isinstance(p.default, Path) else p.default
        assert got == want, f"--{p.name}: {got!r} on the command line, {want!r} in the library"
        checked += 1
    assert checked >= 30


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `mtmim` in a real subprocess; returns the completed process (never raises on rc)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mtmim_cli.cli", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


# A fixed pooling encoder that every pair-file protocol test scores with.
class PoolNet(torch.nn.Module):
    """8x8 average pooling of the normalised image, flattened: a fixed, deterministic encoder."""

    input_width = 112

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 8).flatten(1) * self.scale


@pytest.fixture
def pool_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "pool.pt"
    torch.save(PoolNet().state_dict(), path)

    def loader(p: Path, backbone: str | None) -> torch.nn.Module:
        m = PoolNet()
        m.load_state_dict(torch.load(p, weights_only=True))
        return m

    from mtmim_cli.eval import loading as L

    monkeypatch.setattr(L, "MODEL_LOADER", loader)
    return path
