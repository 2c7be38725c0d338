"""Honest tables: `evaluate` refuses (or, with --allow-trained-on, labels) models that trained
on test images; titles say "held-out faces" only when they are; the paper's rows sit beside a
result only when the run is the benchmark. Real small caches and real fine-tuning runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtmim_cli.data import provenance as PV
from mtmim_cli.data.cache import Cache
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import benchmarks as B
from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.eval.tables import markdown_table
from mtmim_cli.orchestration.evaluate import evaluate
from tests.conftest import run_cli, write_cache


def _caches(tmp_path: Path) -> tuple[Path, Path]:
    """Training cache A (5 subjects x 6 aged photos) and cache B of other faces."""
    ids = [f"s{k}" for k in range(5) for _ in range(6)]
    ages = [float(4 * j + k) for k in range(5) for j in range(6)]
    a = write_cache(tmp_path / "a.h5", ids, ages, seed=1)
    b = write_cache(tmp_path / "b.h5", [f"t{k}" for k in range(4) for _ in range(3)],
                    [float(5 * j) for _ in range(4) for j in range(3)], seed=2)
    return a, b


def _finetune(cache: Path, out: Path, init=None, exclude=None) -> Path:
    from mtmim_cli.train.finetune import finetune

    opts = {"backbone": "tiny", "embedding_size": 16} if init is None else {"backbone": "tiny"}
    run = finetune([cache], init, {"out": str(out), "epochs": 1, "batch_size": 10,
                                   "max_steps": 1, "progress": False},
                   mode="baseline", age_groups=2, exclude=exclude, **opts)
    return run / "model.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("heldout")
    a, b = _caches(tmp)
    torch.manual_seed(0)
    from mtmim_cli.models.backbones import build_backbone

    torch.save(build_backbone("tiny", 16).state_dict(), tmp / "external.pth")
    return {"tmp": tmp, "a": a, "b": b,
            "on_a": _finetune(a, tmp / "ft-a", exclude=[0, 6, 12]),
            "from_external": _finetune(b, tmp / "ft-ext", init=tmp / "external.pth"),
            "external": tmp / "external.pth"}


def _fgnet(cfg_models, cache, **kw) -> dict:
    # The age analyses are not what these tests check: no InfoNCE critic for the factorized
    # fine-tuned models (it trains for --mi-steps), fewer bootstrap resamples.
    kw = {"mi_steps": 0, "resamples": 200, **kw}
    return evaluate(EvalConfig(protocol="fgnet-loo", models=cfg_models, cache=cache, **kw),
                    progress=False)


def test_model_trained_on_the_test_cache_is_refused(trained) -> None:
    model = [ModelArg("ft", trained["on_a"])]
    with pytest.raises(MtmimError, match=r"trained on 27 of the 30 test images \(e\.g\. img00001"):
        _fgnet(model, trained["a"])
    out = trained["tmp"] / "allowed" / "results.md"
    payload = _fgnet(model, trained["a"], allow_trained_on=True, out=out)
    faces = payload["results"][0]["test_faces"]
    assert faces == {"status": "trained-on", "test_images": 30, "trained_on": 27, "unrecorded": [],
                     "subspace_fitted_on": 0}
    md = out.read_text()
    assert "FG-NET leave-one-out (rank-1 identification, %), includes faces seen in training" in md
    assert "ft: trained on 27 of the 30 test images" in md and "held-out faces" not in md
    assert json.loads(out.with_suffix(".json").read_text())["results"][0]["test_faces"]["trained_on"] == 27


def test_held_out_only_when_the_whole_lineage_is_recorded(trained) -> None:
    # Fresh encoder, trained on A: B's faces are held out and the title may say so.
    got = _fgnet([ModelArg("ft", trained["on_a"])], trained["b"])
    assert got["results"][0]["test_faces"]["status"] == "held-out"
    assert "FG-NET leave-one-out (rank-1 identification, %), held-out faces" in markdown_table(
        "fgnet-loo", got["results"], got["variant_text"], got["benchmark"])
    # Started from weights without a record: nothing found, but nothing claimed either.
    got = _fgnet([ModelArg("x", trained["from_external"])], trained["a"])
    faces = got["results"][0]["test_faces"]
    assert faces["status"] == "unrecorded" and faces["unrecorded"] == [str(trained["external"])]
    table = markdown_table("fgnet-loo", got["results"], got["variant_text"], got["benchmark"])
    assert "faces outside the recorded training data" in table and "held-out faces" not in table
    # ...and the model trained on B is refused on B, through its lineage's last link.
    with pytest.raises(MtmimError, match="trained on 12 of the 12"):
        _fgnet([ModelArg("x", trained["from_external"])], trained["b"])


def test_refit_none_on_the_tuned_cache_is_refused_but_refit_full_rounds_hold_out(trained) -> None:
    """--refit full starts every round from the given weights and trains without the held
    photos: starting from weights that saw the cache is refused like --refit none; starting
    from weights that did not, every round's checkpoint records its held photos as excluded
    and none of their digests among its trained images."""
    with pytest.raises(MtmimError, match="trained on 27 of the 30"):
        _fgnet([ModelArg("ft", trained["on_a"])], trained["a"], refit="full", folds=3,
               refit_options={"max_steps": 1, "batch_size": 10, "epochs": 1, "age_groups": 2,
                              "mode": "baseline"})
    rounds_dir = trained["tmp"] / "rounds"
    _fgnet([ModelArg("ext", trained["from_external"])], trained["a"], refit="full", folds=3,
           rounds_dir=rounds_dir, refit_options={"max_steps": 1, "batch_size": 10, "epochs": 1,
                                                 "age_groups": 2, "mode": "baseline"})
    from mtmim_cli.train.checkpoint import load_checkpoint

    cache = Cache(trained["a"])
    digests = PV.cache_digests(cache)
    held_sets = P.loo_rounds(30, 3, 0)
    for r, held in enumerate(held_sets):
        rec = load_checkpoint(rounds_dir / "ext" / "baseline" / "runs" / f"round-{r:04d}" / "model.pt")["meta"]["trained_on"]
        assert rec["caches"][0]["excluded"] == sorted(held.tolist())
        trained_images = PV.unpack(rec["images"])
        assert not np.isin(digests[held], trained_images).any()
        others = np.setdiff1d(np.arange(30), held)
        assert np.isin(digests[others], trained_images).all()
        assert rec["init"]["trained_on"]["caches"][0]["path"] == str(trained["b"])


def test_fgnet_paper_rows_only_for_the_benchmark(trained, monkeypatch) -> None:
    model = [ModelArg("ext", trained["external"], "tiny")]
    got = _fgnet(model, trained["b"])
    assert got["benchmark"] == {"comparable": False,
                                "reason": "not FG-NET's 1002 photos (this cache holds 12 records)"}
    table = markdown_table("fgnet-loo", got["results"], got["variant_text"], got["benchmark"])
    body, paper = table.split("#### Not comparable: not FG-NET's 1002 photos")
    assert "94.21" not in body and "| MT-MIM (reported, paper) | 94.21 |" in paper
    # Pretend this cache is FG-NET: only the exact per-photo re-fit is the benchmark.
    monkeypatch.setattr(B, "FGNET_PHOTOS", 12)
    monkeypatch.setattr(B, "FGNET_NAMES_SHA256", B.names_sha256(Cache(trained["b"]).paths))
    assert "no re-fit per round" in _fgnet(model, trained["b"])["benchmark"]["reason"]
    got = _fgnet(model, trained["b"], refit="head", rounds_dir=trained["tmp"] / "r-head",
                 refit_options={"epochs": 1, "age_groups": 2})
    assert got["benchmark"]["comparable"]
    table = markdown_table("fgnet-loo", got["results"], got["variant_text"], got["benchmark"])
    assert "Not comparable" not in table and "| MT-MIM (reported, paper) | 94.21 |" in table
    assert "This run is the benchmark: FG-NET, all 12 photos, re-fit (head) once per photo" in table


def test_a_model_whose_age_subspace_saw_test_faces_is_refused_or_flagged(trained) -> None:
    """remove-age fitted on two people of cache A: the weights never saw A, the projection
    did, so A's figures would not be held-out ones for those two people."""
    from mtmim_cli.deploy.remove_age import remove_age

    tmp = trained["tmp"]
    on_b = _finetune(trained["b"], tmp / "ft-b")           # weights: B only, recorded
    noage = tmp / "noage.pt"
    remove_age(on_b, trained["a"], noage, edges=(0, 6, 11, 16, 21, 31), identities=["s0", "s1"])
    a = Cache(trained["a"])
    n_fitted = int(np.isin(np.array(a.identity_names)[a.identity], ["s0", "s1"]).sum())
    assert n_fitted == 12
    assert _fgnet([ModelArg("w", on_b)], trained["a"])["results"][0]["test_faces"]["status"] \
        == "held-out"                                        # the weights alone: held out
    with pytest.raises(MtmimError, match=r"noage.pt: trained on 12 \(its age subspace fitted on "
                                         r"12\) of the 30 test images \(e\.g\. img00000"):
        _fgnet([ModelArg("noage", noage)], trained["a"])
    out = tmp / "subspace" / "results.md"
    payload = _fgnet([ModelArg("noage", noage)], trained["a"], allow_trained_on=True, out=out)
    assert payload["results"][0]["test_faces"] == {
        "status": "trained-on", "test_images": 30, "trained_on": 12, "unrecorded": [],
        "subspace_fitted_on": 12}
    md = out.read_text()
    assert "includes faces seen in training" in md and "held-out faces" not in md
    assert "noage: trained on 12 of the 30 test images (its age subspace fitted on 12)" in md
    # On B the weights' own training data is what refuses it.
    with pytest.raises(MtmimError, match="trained on 12 of the 12"):
        _fgnet([ModelArg("noage", noage)], trained["b"])
    # A remove-age file that does not record its faces claims nothing about them.
    old = torch.load(noage, weights_only=True)
    del old["age_subspace"]["fitted_on"]
    torch.save(old, tmp / "noage-old.pt")
    faces = _fgnet([ModelArg("o", tmp / "noage-old.pt")], trained["a"])["results"][0]["test_faces"]
    assert faces["status"] == "unrecorded" and faces["unrecorded"] == [
        f"{tmp / 'noage-old.pt'} (age subspace)"]


@pytest.mark.slow
def test_cli_refuses_on_one_line(trained) -> None:
    r = run_cli("evaluate", "--protocol", "fgnet-loo", "--cache", str(trained["a"]),
                "--model", f"ft={trained['on_a']}", "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--allow-trained-on" in r.stderr and "27 of the 30" in r.stderr


def test_tar_at_far_needs_a_thousand_impostors() -> None:
    rng = np.random.default_rng(0)
    for n_imp, resolvable in ((999, False), (1000, True)):
        same = np.r_[np.ones(50, bool), np.zeros(n_imp, bool)]
        scores = rng.normal(size=len(same)) + same
        e = P.tar_at_far_entry(scores, same, 1e-3)
        assert e["impostor_pairs"] == n_imp
        if resolvable:
            from mtmim_cli.eval import metrics as M
            assert e["tar_at_far"] == M.tar_at_far(scores, same, 1e-3) and "tar_at_far_note" not in e
        else:
            assert e["tar_at_far"] is None
            assert e["tar_at_far_note"] == "n/a (needs >= 1000 impostors, have 999)"
    assert P.tar_at_far_entry(np.zeros(4), np.array([1, 0, 0, 0], bool), 0.5)["tar_at_far"] is not None
