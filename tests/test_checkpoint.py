"""Checkpoints: atomic writes, weights_only loading, meta, RNG round trip, identity model."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mtmim_cli.errors import MtmimError
from mtmim_cli.models.backbones import build_backbone
from mtmim_cli.models.identity import load_identity_model
from mtmim_cli.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mtmim_cli.train.objectives import PretrainObjective

META = {"kind": "pretrain", "backbone": "tiny", "input_width": 112, "embedding_size": 64,
        "normalisation": "(v-127.5)/128"}


def test_save_load_round_trip_and_meta_required(tmp_path: Path) -> None:
    obj = PretrainObjective(build_backbone("tiny"), 5, 64)
    path = save_checkpoint(tmp_path / "c.pt", {"meta": META, "objective": obj.state_dict()})
    state = load_checkpoint(path)
    assert state["meta"] == META
    assert all(torch.equal(v, state["objective"][k]) for k, v in obj.state_dict().items())
    assert {k.split(".")[0] for k in state["objective"]} == {"encoder", "id_head"}
    with pytest.raises(ValueError, match="meta"):
        save_checkpoint(tmp_path / "d.pt", {"meta": {"kind": "pretrain"}, "objective": {}})
    assert not (tmp_path / "d.pt").exists()


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = save_checkpoint(tmp_path / "c.pt", {"meta": META, "objective": {"w": torch.ones(3)}})
    before = good.read_bytes()

    def boom(obj, f, *a, **k):
        Path(f).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(good, {"meta": META, "objective": {"w": torch.zeros(3)}})
    assert good.read_bytes() == before          # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_refuses_pickled_code_and_junk(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"meta": META, "objective": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MtmimError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(MtmimError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(MtmimError, match="not an mtmim checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(MtmimError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")


def test_rng_state_round_trip(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "r.pt", {"meta": META, "objective": {}, "rng": rng_state()})
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_identity_model_from_our_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    obj = PretrainObjective(build_backbone("tiny"), 5, 64).eval()
    save_checkpoint(tmp_path / "m.pt", {"meta": META, "objective": obj.state_dict()})
    model = load_identity_model(tmp_path / "m.pt")
    assert model.input_width == 112 and model.embedding_size == 64 and not model.training
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(model(x), obj.identity_features(x))
    with pytest.raises(MtmimError, match="not iresnet50"):
        load_identity_model(tmp_path / "m.pt", backbone="iresnet50")
