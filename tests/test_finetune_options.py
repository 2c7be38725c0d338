"""Fine-tuning defaults have one source (train/finetune_options.py): `mtmim finetune` shows
them as its options' defaults and passes on only the options the user gave."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import mtmim_cli.train.finetune as F
from mtmim_cli.cli import app
from mtmim_cli.commands.finetune_cmd import _LIBRARY_NAME, _NOT_SETTINGS
from mtmim_cli.train.finetune_options import DEFAULTS, TRAIN_DEFAULTS, default, split_options

from .conftest import assert_cli_defaults_are_the_librarys


def test_every_cli_default_is_the_librarys() -> None:
    assert_cli_defaults_are_the_librarys("finetune", _LIBRARY_NAME, _NOT_SETTINGS, default)


def test_defaults_resolve_as_the_library_says() -> None:
    cfg, opts = split_options({}, {})
    for k, v in TRAIN_DEFAULTS.items():
        assert getattr(cfg, k) == v
    assert opts == DEFAULTS
    assert default("weight_decay") == cfg.weight_decay   # TrainConfig's own default
    with pytest.raises(KeyError):
        default("nope")


def test_only_given_options_reach_finetune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    monkeypatch.setattr(F, "finetune", lambda caches, init, settings: seen.append(settings))
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", str(tmp_path / "c.h5"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["finetune", str(tmp_path / "c.h5"), "--out", str(tmp_path / "r"),
                            "--lr", "0.5", "--scale", "30", "--no-progress", "--mode", "age"])
    assert r.exit_code == 0, r.output
    for quiet in ("-q", "--quiet"):    # as align, evaluate and embed take it
        r = runner.invoke(app, ["finetune", str(tmp_path / "c.h5"), "--out", str(tmp_path / "r"),
                                quiet])
        assert r.exit_code == 0, r.output
    assert seen == [{"out": str(tmp_path / "r")},
                    {"out": str(tmp_path / "r"), "lr": 0.5, "s": 30.0, "progress": False,
                     "mode": "age"},
                    {"out": str(tmp_path / "r"), "progress": False},
                    {"out": str(tmp_path / "r"), "progress": False}]


def test_help_shows_the_defaults() -> None:
    r = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0
    assert "[default: 0.02]" in r.output and "[default: 400]" in r.output
    assert "[default: mtmim]" in r.output and "e^-B..e^B" in r.output


def test_small_sface_is_small_but_for_what_was_chosen_for_sface() -> None:
    from mtmim_cli.train.finetune_options import RECIPES, resolved_settings

    small = resolved_settings({"recipe": "small"})
    sface = resolved_settings({"recipe": "small-sface"})
    differ = {k for k in small if small[k] != sface[k] and k != "recipe"}
    assert differ == {"freeze_through", "lr", "lambda_mim"}
    assert (sface["freeze_through"], sface["lr"], sface["lambda_mim"]) == ("last:1", 3e-4, 0.1)
    assert set(RECIPES["small-sface"]) == set(RECIPES["small"])
