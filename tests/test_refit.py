"""The FG-NET re-fit orchestration: the crop width the re-fit's features are taken at, and the
round store's key (stale rounds are refused, never merged)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mtmim_cli.orchestration.refit as RF
import mtmim_cli.train.round_heads as H
from mtmim_cli.data.cache import Cache
from mtmim_cli.data.dataset import preprocess
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import loading as L
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.models.backbones import build_backbone
from mtmim_cli.models.identity import load_identity_model
from mtmim_cli.orchestration.evaluate import evaluate
from tests.conftest import write_cache


def _identity_maps(calls: list[int] | None = None):
    """A stand-in for `fit_rounds` whose maps are the identity: x_id = x, so a head re-fit
    must reproduce `--refit none` exactly, and no training time is spent. `calls` gets the
    number of rounds of each call."""
    def fit(views, labels, ages, held, cfg, seed=0, on_step=None):
        if calls is not None:
            calls.extend([1] * len(held))
        d = views[0].shape[1]
        return H.RoundMaps(A=torch.eye(d).expand(len(held), d, d).clone(),
                           b=torch.zeros(len(held), d), last_loss=torch.zeros(len(held)))
    return fit


def _cache(tmp_path: Path, n_ids: int = 4, per_id: int = 3) -> Path:
    ids = [f"s{k}" for k in range(n_ids) for _ in range(per_id)]
    ages = [float(3 * j + k) for k in range(n_ids) for j in range(per_id)]
    return write_cache(tmp_path / "f.h5", ids, ages, seed=1)


def test_head_refit_takes_a_96_wide_models_crop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MobileFaceNet is built for 112x96 crops. The head re-fit's encoder features must be
    the encoder's output on those crops (128-d), not on 112-wide ones (which the bare encoder
    used to get: 256-d from two overlapping windows of linear7)."""
    cache_path = _cache(tmp_path)
    torch.manual_seed(0)
    torch.save(build_backbone("mobilefacenet").state_dict(), tmp_path / "mfn.pt")
    monkeypatch.setattr(H, "fit_rounds", _identity_maps())
    model = [ModelArg("mfn", tmp_path / "mfn.pt", "mobilefacenet")]
    base = dict(protocol="fgnet-loo", models=model, cache=cache_path, batch_size=4)
    none = evaluate(EvalConfig(**base), progress=False)["results"][0]["metrics"]
    head = evaluate(EvalConfig(**base, refit="head", rounds_dir=tmp_path / "rounds",
                               refit_modes=("baseline",)), progress=False)["results"][0]["metrics"]

    with np.load(tmp_path / "rounds" / "mfn" / "views.npz") as z:
        f = z["f"]
    ident = load_identity_model(tmp_path / "mfn.pt", "mobilefacenet")
    with torch.no_grad():
        direct = ident.encoder(preprocess(Cache(cache_path).images(np.arange(12)), 96)).numpy()
    assert f.shape == (12, 128)
    np.testing.assert_allclose(f, direct, rtol=1e-4, atol=1e-5)
    assert head["rank1"] == none["rank1"] and head["cmc"] == none["cmc"]
    key = json.loads((tmp_path / "rounds" / "mfn" / "config.json").read_text())
    assert key["input_width"] == 96 and key["features"] == [12, 128]


def test_mobilefacenet_refuses_a_112_wide_crop() -> None:
    m = build_backbone("mobilefacenet").eval()
    with pytest.raises(ValueError, match="112x96"):
        m(torch.zeros(1, 3, 112, 112))


class _Pool(nn.Module):
    """8x8 average pooling: a fixed encoder, `dim` picks how many pooled channels it keeps."""

    input_width = 112

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x[:, :self.channels], 8).flatten(1) * self.scale


def test_round_store_refuses_stale_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_path = _cache(tmp_path)
    torch.save(_Pool().state_dict(), tmp_path / "pool.pt")
    channels = {"n": 3}
    monkeypatch.setattr(L, "MODEL_LOADER", lambda p, b: _Pool(channels["n"]))
    calls: list[int] = []
    monkeypatch.setattr(H, "fit_rounds", _identity_maps(calls))
    rounds = tmp_path / "rounds"

    def run(rounds_dir: Path = rounds, **kw) -> dict:
        cfg = EvalConfig(protocol="fgnet-loo", models=[ModelArg("pool", tmp_path / "pool.pt")],
                         cache=cache_path, refit="head", rounds_dir=rounds_dir,
                         refit_modes=("baseline",), **kw)
        return evaluate(cfg, progress=False)["results"][0]["metrics"]

    first = run()
    assert len(calls) == 12
    assert run() == {**first, "wall_seconds": pytest.approx(first["wall_seconds"], abs=60)}
    assert len(calls) == 12  # the same settings reuse every stored round

    # Each thing that changes a round's result is refused by name.
    with pytest.raises(MtmimError, match="refit_options"):
        run(refit_options={"epochs": 3})
    with pytest.raises(MtmimError, match="seed"):
        run(seed=1)
    with pytest.raises(MtmimError, match="flip"):
        run(flip="sum")
    monkeypatch.setattr(RF, "__version__", "9.9.9")
    with pytest.raises(MtmimError, match="tool_version"):
        run()
    monkeypatch.undo()
    monkeypatch.setattr(L, "MODEL_LOADER", lambda p, b: _Pool(channels["n"]))
    monkeypatch.setattr(H, "fit_rounds", _identity_maps(calls))
    channels["n"] = 2   # same files, other feature shape (as a wrongly cropped model had)
    with pytest.raises(MtmimError, match="features"):
        run()
    channels["n"] = 3
    (tmp_path / "pool.pt").write_bytes((tmp_path / "pool.pt").read_bytes() + b"\0")
    with pytest.raises(MtmimError, match="model_sha256"):
        run()

    # Rounds stored by the build that keyed only the inputs' digests are refused too.
    key = json.loads((rounds / "pool" / "config.json").read_text())
    (tmp_path / "old" / "pool").mkdir(parents=True)
    (tmp_path / "old" / "pool" / "config.json").write_text(json.dumps(
        {k: key[k] for k in ("protocol", "refit", "folds", "seed", "flip", "cache_sha256",
                             "model_sha256", "refit_options")}))
    with pytest.raises(MtmimError, match="different run.*input_width"):
        run(rounds_dir=tmp_path / "old")
    assert len(calls) == 12  # nothing was re-fitted or merged on the way


def test_encoder_view_keeps_the_encoders_mode(tmp_path: Path) -> None:
    """extract_views restores the mode of the module it is given; a view created in training
    mode used to switch an evaluating encoder's BatchNorm to training mode afterwards."""
    from mtmim_cli.eval.features import extract_views

    torch.manual_seed(0)
    torch.save(build_backbone("mobilefacenet").state_dict(), tmp_path / "mfn.pt")
    model = load_identity_model(tmp_path / "mfn.pt", "mobilefacenet").eval()
    view = model.encoder_view()
    assert not view.training
    images = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    extract_views(view, images, mirror=False)
    assert not any(m.training for m in model.encoder.modules())


def test_recipe_is_for_the_full_refit_only(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    cache_path = _cache(tmp_path)
    torch.save(build_backbone("tiny").state_dict(), tmp_path / "t.pt")
    base = ["evaluate", "--protocol", "fgnet-loo", "--cache", str(cache_path), "--model",
            f"t={tmp_path / 't.pt'}", "--backbone", "tiny"]
    r = run_cli(*base, "--recipe", "small")
    assert r.returncode == 2 and "applies to --refit full" in r.stderr
    r = run_cli(*base, "--recipe", "nope", "--refit", "full")
    assert r.returncode == 2 and "choose from small" in r.stderr
