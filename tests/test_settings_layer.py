"""One settings layer per training command, in the library (train/finetune_options.py,
train/pretrain_options.py, orchestration.refit.check_refit_options, eval/flip.py): a
library call, `evaluate --refit` and the command line get the same checks and the same
one-line errors, before any file is read. Every refusal here is asked of inputs that do not
exist, so an error about the file instead of the setting means the check came too late."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtmim_cli.errors import MtmimError
from mtmim_cli.train.config import TrainConfig

from .conftest import assert_cli_defaults_are_the_librarys


def _refused(call, match: str) -> str:
    """The one-line message `call()` is refused with; it must name the setting."""
    with pytest.raises(MtmimError, match=match) as info:
        call()
    text = str(info.value)
    assert len(text.splitlines()) == 1, text
    assert "no such file" not in text, text
    return text


# -- finetune -------------------------------------------------------------------------------
BAD_FINETUNE = [
    ({"margin": "foo"}, r"^--margin foo: choose from arcface, cosface, sphereface$"),
    ({"q_steps": 0}, r"^--q-steps 0: must be >= 1$"),
    ({"q_steps": 2.5}, r"^--q-steps 2.5: must be a whole number$"),
    ({"q_lr": 0.0}, r"^--q-lr 0.0: must be > 0$"),
    ({"q_lr": -1e-3}, r"^--q-lr -0.001: must be > 0$"),
    ({"mode": "both"}, r"^--mode both: choose from baseline, age, mtmim$"),
    ({"mi_target": "x_age"}, r"^--mi-target x_age: choose from features, age-group, lautum$"),
    ({"wise": 0.0}, r"^--wise 0.0: must be in \(0, 1\]$"),
    ({"age_groups": 0}, r"^--age-groups 0: must be >= 1$"),
    ({"encoder_lr": 0.0}, r"^--encoder-lr 0.0: must be > 0$"),
    ({"partial_fc": 1.5}, r"^--partial-fc 1.5: must be in \[0, 1\]$"),
    ({"identities": "by-id"}, r"^--identities by-id: choose from auto, by-name, per-cache$"),
    ({"freeze_bn": "some"}, r"^--freeze-bn some: choose from off, stats, all$"),
    ({"activation_dtype": "int8"}, r"^--activation-dtype int8: choose from float16, float32$"),
    ({"recipe": "big"}, r"^--recipe big: choose from small, small-sface, auto$"),
]


@pytest.mark.parametrize(("bad", "match"), BAD_FINETUNE, ids=[next(iter(b)) for b, _ in BAD_FINETUNE])
def test_finetune_refuses_a_bad_setting_before_reading_any_file(tmp_path: Path, bad: dict,
                                                                match: str) -> None:
    from mtmim_cli.train.finetune import finetune

    out = tmp_path / "run"
    _refused(lambda: finetune([tmp_path / "absent.h5"], tmp_path / "absent.pt",
                              {"out": str(out), **bad}), match)
    assert not out.exists()


def test_a_recipes_q_settings_are_checked_under_the_options_given() -> None:
    from mtmim_cli.train.finetune_options import resolve_settings, resolved_settings

    _refused(lambda: resolve_settings({"recipe": "small", "q_lr": 0.0}, {}), "^--q-lr 0.0")
    # what the benches and the re-fit's round key compare is checked as well
    _refused(lambda: resolved_settings({"q_steps": 0}), "^--q-steps 0")
    cfg, o = resolve_settings({"recipe": "small"}, {"q_steps": 1})
    assert (o["q_steps"], o["q_lr"], cfg.lr) == (1, 1e-3, 1e-3)


def test_auto_recipe_refuses_a_bad_setting_before_reading_any_file(tmp_path: Path) -> None:
    from mtmim_cli.orchestration.auto_recipe import auto_finetune

    _refused(lambda: auto_finetune([tmp_path / "absent.h5"], tmp_path / "absent.pt",
                                   {"recipe": "auto", "margin": "foo",
                                    "out": str(tmp_path / "run")}, echo=None),
             "^--margin foo: choose from")


def test_margin_values_of_an_unknown_head_is_a_one_line_error() -> None:
    from mtmim_cli.models.margin import margin_values

    _refused(lambda: margin_values("foo"), r"^--margin foo: choose from arcface, cosface, sphereface$")
    assert margin_values("cosface", 0.4) == {"m1": 1.0, "m2": 0.0, "m3": 0.4}


# -- pretrain -------------------------------------------------------------------------------
BAD_PRETRAIN = [
    ({"margin": "foo"}, r"^--margin foo: choose from arcface, cosface, sphereface$"),
    ({"partial_fc": -0.5}, r"^--partial-fc -0.5: must be in \[0, 1\]$"),
    ({"identities": "by-id"}, r"^--identities by-id: choose from auto, by-name, per-cache$"),
]


@pytest.mark.parametrize(("bad", "match"), BAD_PRETRAIN, ids=[next(iter(b)) for b, _ in BAD_PRETRAIN])
def test_pretrain_refuses_a_bad_setting_before_reading_any_file(tmp_path: Path, bad: dict,
                                                                match: str) -> None:
    from mtmim_cli.train.pretrain import pretrain

    out = tmp_path / "run"
    _refused(lambda: pretrain([tmp_path / "absent.h5"], TrainConfig(out=str(out)), **bad), match)
    assert not out.exists()


def test_pretrain_refuses_an_unknown_preset_before_reading_any_file(tmp_path: Path) -> None:
    from mtmim_cli.train.pretrain import pretrain

    for config in (TrainConfig(out=str(tmp_path / "r")), {"out": str(tmp_path / "r")}):
        _refused(lambda config=config: pretrain([tmp_path / "absent.h5"], config,
                                                preset="insightface"),
                 r"^--preset insightface: choose from arcface$")


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """The TrainConfig `pretrain` hands the training loop (the loop itself does not run)."""
    import mtmim_cli.train.pretrain as P

    seen: list[TrainConfig] = []
    monkeypatch.setattr(P, "train", lambda objective, dataset, config, **_: seen.append(config))
    return seen


def test_a_library_pretrain_with_a_preset_trains_with_the_presets_settings(
        tmp_path: Path, captured: list[TrainConfig]) -> None:
    from mtmim_cli.train.pretrain import pretrain
    from tests.conftest import write_cache

    cache = write_cache(tmp_path / "c.h5", [f"id{k}" for k in range(4) for _ in range(4)])
    pretrain([cache], {"out": str(tmp_path / "r"), "batch_size": 16, "epochs": 3},
             backbone="tiny", preset="arcface")
    cfg = captured[0]
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay) == ("sgd", 0.9, 5e-4)
    assert math.isclose(cfg.lr, 0.1 * 16 / 512)
    assert (cfg.schedule, cfg.poly_power, cfg.warmup_epochs, cfg.clip_grad) == ("poly", 2.0, 2.0, 5.0)
    assert cfg.epochs == 3                      # given: it wins over the preset's 25
    assert cfg.extra["m"] == 0.5 and cfg.extra["margin"] == "arcface"
    assert cfg.extra["preset"] == "arcface"


def test_a_preset_with_a_trainconfig_is_refused_not_ignored(
        tmp_path: Path, captured: list[TrainConfig]) -> None:
    """A TrainConfig cannot say which fields were given, so a preset over it is refused
    (as a recipe over one is); it used to train without the preset's settings."""
    from mtmim_cli.train.pretrain import pretrain
    from tests.conftest import write_cache

    cache = write_cache(tmp_path / "c.h5", [f"id{k}" for k in range(4) for _ in range(4)])
    _refused(lambda: pretrain([cache], TrainConfig(out=str(tmp_path / "r")), backbone="tiny",
                              preset="arcface"), "pass them as a dict, not a TrainConfig")
    assert captured == []


def test_preset_resolution_fills_only_what_is_not_given() -> None:
    from mtmim_cli.train.pretrain_options import resolve_settings

    cfg, o = resolve_settings({"preset": "arcface", "batch_size": 1024}, {})
    assert math.isclose(cfg.lr, 0.2) and cfg.epochs == 25 and o["m"] == 0.5
    cfg, o = resolve_settings({"preset": "arcface", "lr": 0.05}, {"margin": "cosface"})
    assert cfg.lr == 0.05 and cfg.optimizer == "sgd"
    assert o["margin"] == "cosface" and o["m"] is None   # the preset's m belongs to arcface
    cfg, o = resolve_settings({"preset": "arcface", "m": 0.4}, {})
    assert o["m"] == 0.4
    cfg, o = resolve_settings(None, {})
    assert (cfg.optimizer, cfg.lr, o["margin"], o["m"], o["preset"]) == ("adam", 1e-3, "arcface", None, None)
    _refused(lambda: resolve_settings({"lr": 0.1}, {"nope": 1}), "unknown option")


def test_every_pretrain_cli_default_is_the_librarys() -> None:
    from mtmim_cli.commands.train_cmd import _LIBRARY_NAME, _NOT_SETTINGS
    from mtmim_cli.train.pretrain_options import default

    assert_cli_defaults_are_the_librarys("pretrain", _LIBRARY_NAME, _NOT_SETTINGS, default)


def test_only_given_options_reach_pretrain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mtmim_cli.train.pretrain as P
    from mtmim_cli.cli import app

    seen: list[dict] = []
    monkeypatch.setattr(P, "pretrain", lambda caches, settings: seen.append(settings))
    r = CliRunner().invoke(app, ["pretrain", str(tmp_path / "c.h5"), "--out", str(tmp_path / "r"),
                                 "--preset", "arcface", "--epochs", "3", "--scale", "30", "-q"])
    assert r.exit_code == 0, r.output
    assert seen == [{"out": str(tmp_path / "r"), "preset": "arcface", "epochs": 3, "s": 30.0,
                     "progress": False}]


# -- evaluate --refit and --flip --------------------------------------------------------------
def _eval_config(tmp_path: Path, **kw):
    from mtmim_cli.eval.config import EvalConfig, ModelArg

    return EvalConfig(protocol="fgnet-loo", models=[ModelArg("m", tmp_path / "absent.pt")],
                      cache=tmp_path / "absent.h5", **kw)


BAD_REFIT = [
    ("full", {"q_steps": 0}, "^--q-steps 0: must be >= 1$"),
    ("full", {"q_lr": 0}, "^--q-lr 0: must be > 0$"),
    ("full", {"margin": "foo"}, "^--margin foo: choose from"),
    ("full", {"recipe": "big"}, "^--recipe big: choose from small"),
    ("full", {"mode": "both"}, "^--mode both: choose from"),
    ("full", {"wise": 2}, r"^--wise 2: must be in \(0, 1\]$"),
    ("head", {"margin": "foo"}, "^refit margin foo: choose from arcface"),
    ("head", {"q_lr": 0}, "q_lr > 0"),
    ("head", {"rounds_per_chunk": 0}, "^--refit-options rounds_per_chunk 0: must be >= 1$"),
]


@pytest.mark.parametrize(("refit", "options", "match"), BAD_REFIT,
                         ids=[f"{r}-{next(iter(o))}" for r, o, _ in BAD_REFIT])
def test_evaluate_refit_refuses_a_bad_setting_before_reading_any_file(
        tmp_path: Path, refit: str, options: dict, match: str) -> None:
    from mtmim_cli.orchestration.evaluate import evaluate

    cfg = _eval_config(tmp_path, refit=refit, refit_options=options)
    _refused(lambda: evaluate(cfg, progress=False), match)


def test_every_refit_mode_is_checked(tmp_path: Path) -> None:
    from mtmim_cli.orchestration.refit import check_refit_options

    check_refit_options(_eval_config(tmp_path, refit="full", refit_options={"recipe": "small"}))
    check_refit_options(_eval_config(tmp_path, refit="head", refit_options={"epochs": 2}))
    # the recipe's own q settings, then an option over them, in every mode
    cfg = _eval_config(tmp_path, refit="full", refit_options={"recipe": "small", "q_steps": 0},
                       refit_modes=("baseline",))
    _refused(lambda: check_refit_options(cfg), "^--q-steps 0")


def test_a_bad_flip_is_refused_alike_by_every_library_caller(tmp_path: Path) -> None:
    import numpy as np

    from mtmim_cli.deploy.embed import embed_source
    from mtmim_cli.deploy.verify import calibrate_threshold
    from mtmim_cli.eval.features import combine_views, extract_features
    from mtmim_cli.orchestration.evaluate import evaluate

    want = r"^--flip mean: choose from concat, sum, none$"
    absent = tmp_path / "absent.h5"
    _refused(lambda: evaluate(_eval_config(tmp_path, flip="mean"), progress=False), want)
    _refused(lambda: embed_source(absent, tmp_path / "m.pt", tmp_path / "e.h5", flip="mean"), want)
    _refused(lambda: calibrate_threshold(tmp_path / "m.pt", absent, flip="mean"), want)
    _refused(lambda: combine_views(np.zeros((2, 4), np.float32), None, "mean"), want)
    _refused(lambda: extract_features(None, np.zeros((0, 112, 112, 3), np.uint8), flip="mean"), want)


# -- the command line: the library's message, one line, exit 2 -------------------------------
def test_the_commands_print_the_librarys_one_line_error(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    absent = str(tmp_path / "absent.h5")
    r = run_cli("finetune", absent, "--q-steps", "0", "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --q-steps 0: must be >= 1"], r.stderr
    r = run_cli("evaluate", "--protocol", "fgnet-loo", "--cache", absent, "--model",
                str(tmp_path / "absent.pt"), "--refit", "full", "--refit-options",
                '{"q_lr": 0}')
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --q-lr 0: must be > 0"], r.stderr
