"""The re-fit round store's key holds the settings a round really trains with: a recipe is
expanded and defaults are filled in, so changing a recipe's value or a default never merges
stale rounds (the store then refuses), while settings that do not change a round's result
(how rounds are batched, mode, worker count) leave the key alone."""

from __future__ import annotations

from pathlib import Path

import pytest

import mtmim_cli.train.finetune_options as FO
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.orchestration.refit import resolved_refit_options, round_key


def _key(refit: str, options: dict) -> dict:
    cfg = EvalConfig(protocol="fgnet-loo", models=[], refit=refit, folds=10,
                     refit_options=options)
    return round_key(cfg, ModelArg("m", Path("m.pt")), cache_sha256="c", model_sha256="m",
                     input_width=96, features=(10, 256))


def test_full_refit_key_expands_the_recipe(monkeypatch) -> None:
    before = _key("full", {"recipe": "small"})
    assert before["resolved_options"]["lambda_mim"] == FO.RECIPES["small"]["lambda_mim"]
    assert before["resolved_options"]["lr"] == FO.RECIPES["small"]["lr"]
    monkeypatch.setitem(FO.RECIPES, "small", {**FO.RECIPES["small"], "lambda_mim": 0.123})
    after = _key("full", {"recipe": "small"})
    assert after["refit_options"] == before["refit_options"]   # the command line is the same
    assert after != before and after["resolved_options"]["lambda_mim"] == 0.123
    # an explicit option over the recipe is what counts
    assert _key("full", {"recipe": "small", "lambda_mim": 0.5})["resolved_options"]["lambda_mim"] == 0.5


def test_full_refit_key_ignores_what_does_not_change_a_round(monkeypatch) -> None:
    base = resolved_refit_options("full", {"recipe": "small"})
    assert resolved_refit_options("full", {"recipe": "small", "workers": 3, "mode": "age",
                                           "progress": True}) == base
    monkeypatch.setitem(FO.DEFAULTS, "replay_ratio", 0.5)    # a fine-tuning default changes
    assert resolved_refit_options("full", {"recipe": "small"}) != base


def test_head_refit_key_fills_defaults_and_skips_chunking() -> None:
    from mtmim_cli.train.round_heads import RoundHeadConfig

    got = resolved_refit_options("head", {"epochs": 3, "rounds_per_chunk": 7, "mode": "mtmim"})
    assert got["epochs"] == 3 and got["q_lr"] == RoundHeadConfig().q_lr and "mode" not in got
    assert got == resolved_refit_options("head", {"epochs": 3, "rounds_per_chunk": 100})
    assert resolved_refit_options("none", {}) == {}


def test_a_store_refuses_rounds_trained_under_another_recipe(tmp_path: Path, monkeypatch) -> None:
    P.RoundStore(tmp_path, _key("full", {"recipe": "small"}))
    monkeypatch.setitem(FO.RECIPES, "small", {**FO.RECIPES["small"], "epochs": 6})
    with pytest.raises(MtmimError, match="resolved_options"):
        P.RoundStore(tmp_path, _key("full", {"recipe": "small"}))
