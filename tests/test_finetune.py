"""MT-MIM fine-tuning: three modes from one code path, Algorithm 1's alternation, the global
batch under two gloo processes, the CLI end to end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtmim_cli.data.groups import assign_groups
from mtmim_cli.train.finetune import fit_heads_on_features
from mtmim_cli.train.mtmim_objective import MTMIMObjective

from .conftest import run_cli, write_cache

DIM, CLASSES, GROUPS = 8, 5, 3
BOUNDS = [20.0, 40.0]


def make_objective(mode: str, seed: int = 0, **kw) -> MTMIMObjective:
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, DIM))
    return MTMIMObjective(enc, CLASSES, GROUPS, mode=mode, embedding_size=DIM, boundaries=BOUNDS,
                          q_hidden=16, **kw)


def save_tiny_pretrain(path: Path, seed: int):
    """A pretrain checkpoint of ours (tiny backbone, 64-d) to start fine-tuning from."""
    from mtmim_cli.models.backbones import build_backbone
    from mtmim_cli.train.checkpoint import save_checkpoint
    from mtmim_cli.train.objectives import PretrainObjective

    torch.manual_seed(seed)
    pre = PretrainObjective(build_backbone("tiny"), 6, 64)
    save_checkpoint(path, {"meta": {"kind": "pretrain", "backbone": "tiny", "input_width": 112,
                                    "embedding_size": 64, "normalisation": "(v-127.5)/128"},
                           "objective": pre.state_dict()})
    return pre, path


def batch(n: int = 12, seed: int = 1, unknown: bool = True):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 4, 4, generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    ages = torch.rand(n, generator=g) * 60
    if unknown:
        ages[::4] = float("nan")
    return images, labels, ages


def reference_terms(obj: MTMIMObjective, images, labels, ages):
    """L_ID, L_AGE and CLUB recomputed from the parts, independently of forward()."""
    x = obj.encoder(images)
    x_age = x @ obj.factorize.fc.weight.T + obj.factorize.fc.bias
    x_id = x - x_age
    cos = F.normalize(x_id) @ F.normalize(obj.id_head.weight).T
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    onehot = F.one_hot(labels, CLASSES).bool()
    logits = 64.0 * torch.where(onehot, torch.cos(theta + 0.35), cos)
    l_id = F.cross_entropy(logits, labels)
    groups = torch.from_numpy(assign_groups(ages.numpy(), BOUNDS))
    known = groups >= 0
    l_age = F.cross_entropy(obj.age_head(x_age)[known], groups[known])
    if obj.mi_target != "features":
        return l_id, l_age, None
    mu, logvar = obj.q(x_id)
    y = x_age
    n = len(y)
    logq = torch.distributions.Normal(mu[:, None], torch.exp(0.5 * logvar)[:, None]).log_prob(y[None]).sum(-1)
    club = (logq.diagonal().sum() * n - logq.sum()) / n**2
    return l_id, l_age, club


@pytest.mark.parametrize("mode,w_age,w_mim", [("baseline", 0, 0), ("age", 0.1, 0), ("mtmim", 0.1, 1e-4)])
def test_each_mode_optimises_its_own_loss(mode: str, w_age: float, w_mim: float) -> None:
    obj = make_objective(mode)
    images, labels, ages = batch()
    loss, metrics = obj(images, labels, ages)
    enc_params = [*obj.encoder.parameters(), *obj.factorize.parameters()]
    got = torch.autograd.grad(loss, enc_params, retain_graph=True)
    l_id, l_age, club = reference_terms(obj, images, labels, ages)
    want_loss = l_id + w_age * l_age + w_mim * club
    assert float(loss.detach()) == pytest.approx(float(want_loss.detach()), rel=1e-5)
    want = torch.autograd.grad(want_loss, enc_params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert float(metrics["club"]) == pytest.approx(float(club.detach()), rel=1e-4, abs=1e-5)
    assert float(metrics["l_age"]) == pytest.approx(float(l_age.detach()), rel=1e-5)
    # the age head trains in every mode (as a probe where its weight is off)
    g_age = torch.autograd.grad(loss, obj.age_head.weight, retain_graph=True)[0]
    assert g_age.abs().sum() > 0


@pytest.mark.parametrize("target", ["age-group", "lautum"])
def test_age_group_targets_penalise_what_q_reads_of_the_group(target: str) -> None:
    """--mi-target age-group / lautum: the penalty is computed from q(group | x_id) on the rows
    of known age (directly, from q's log-probabilities), reaches the encoder, and q trains on
    those rows' groups in after_step."""
    obj = make_objective("mtmim", q_lr=1e-3, lambda_mim=0.5, mi_target=target)
    images, labels, ages = batch()
    loss, m = obj(images, labels, ages)
    x_id = obj.factorize(obj.encoder(images))[0]
    groups = torch.from_numpy(assign_groups(ages.numpy(), BOUNDS))
    known = groups >= 0
    lq = obj.q.log_probs(x_id[known])
    g = groups[known]
    p = torch.bincount(g, minlength=GROUPS).float() / len(g)
    if target == "age-group":
        want = (lq[torch.arange(len(g)), g] - lq @ p).mean()
    else:
        want = (p * torch.log(p.clamp_min(1e-30))).sum() - (lq @ p).mean()
    assert float(m["club"]) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    l_id, l_age, _ = reference_terms(obj, images, labels, ages)
    assert float(loss.detach()) == pytest.approx(float((l_id + 0.1 * l_age + 0.5 * want).detach()),
                                                 rel=1e-5)
    enc = list(obj.encoder.parameters())
    got = torch.autograd.grad(loss, enc, retain_graph=True)
    ref = torch.autograd.grad(l_id + 0.1 * l_age + 0.5 * want, enc)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    q0 = [t.detach().clone() for t in obj.q.parameters()]
    out = obj.after_step()
    assert not all(torch.equal(a, b) for a, b in zip(q0, obj.q.parameters(), strict=True))
    assert math.isfinite(out["q_loglik"])


def test_unknown_ages_take_no_age_loss() -> None:
    obj = make_objective("age")
    images, labels, ages = batch()
    ages[:] = float("nan")
    _, m = obj(images, labels, ages)
    assert float(m["l_age"]) == 0.0 and math.isnan(float(m["age_accuracy"]))
    assert obj.groups_of(torch.tensor([float("nan"), 19.9, 20.0, 45.0])).tolist() == [-1, 0, 1, 2]


def test_q_frozen_in_encoder_step_then_five_q_steps() -> None:
    obj = make_objective("mtmim", q_lr=1e-3)
    names = {id(p) for g in obj.main_parameters() for p in g["params"]}
    assert not any(id(p) in names for p in obj.q.parameters())
    opt = torch.optim.Adam(obj.main_parameters(), lr=1e-2)
    q0 = [p.detach().clone() for p in obj.q.parameters()]
    images, labels, ages = batch()
    loss, _ = obj(images, labels, ages)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(q0, obj.q.parameters(), strict=True))
    enc = [p.detach().clone() for p in obj.encoder.parameters()]
    out = obj.after_step()
    assert all(torch.equal(a, b) for a, b in zip(enc, obj.encoder.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(q0, obj.q.parameters(), strict=True))
    state = obj.q_optimizer.state_dict()["state"]
    assert int(state[0]["step"]) == 5 and "q_loglik" in out
    obj.on_lr_drop(0.1)
    assert obj.q_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    fresh = make_objective("mtmim", q_lr=1e-3)
    fresh.load_extra_state_dict(obj.extra_state_dict())
    assert fresh.q_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_negative_estimate_warns() -> None:
    obj = make_objective("mtmim", warn_negative_after=3)
    with pytest.warns(RuntimeWarning, match="under-trained"):
        for _ in range(3):
            obj._track_sign(-0.5)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        obj = make_objective("mtmim", q_lr=1e-3)
        images, labels, ages = batch(16, unknown=False)
        sl = slice(rank * 16 // world, (rank + 1) * 16 // world)
        ddp = nn.parallel.DistributedDataParallel(obj)
        loss, metrics = ddp(images[sl], labels[sl], ages[sl])
        loss.backward()
        grads = [p.grad.clone() for p in [*obj.encoder.parameters(), *obj.factorize.parameters()]]
        obj.after_step()
        if rank == 0:
            torch.save({"club": metrics["club"], "grads": grads,
                        "q": [p.detach().clone() for p in obj.q.parameters()]},
                       os.path.join(out_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    d = torch.load(tmp_path / "dist.pt", weights_only=True)
    obj = make_objective("mtmim", q_lr=1e-3)
    images, labels, ages = batch(16, unknown=False)
    loss, metrics = obj(images, labels, ages)
    loss.backward()
    grads = [p.grad for p in [*obj.encoder.parameters(), *obj.factorize.parameters()]]
    obj.after_step()
    assert float(d["club"]) == pytest.approx(float(metrics["club"]), rel=1e-5, abs=1e-6)
    for a, b in zip(d["grads"], grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(d["q"], obj.q.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_fit_heads_on_features_keeps_x_equal_xid_plus_xage() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 16, generator=g)
    labels = np.repeat(np.arange(100, 112), 10)  # arbitrary ids, re-indexed inside
    ages = np.tile(np.arange(10, dtype=float) * 7, 12)
    unit = fit_heads_on_features(x, labels, ages, age_groups=4, epochs=3, batch_size=32, seed=0)
    x_id, x_age = unit(x)
    torch.testing.assert_close(x_id + x_age, x)
    unit2 = fit_heads_on_features(x, labels, ages, age_groups=4, epochs=3, batch_size=32, seed=0)
    torch.testing.assert_close(unit2.fc.weight, unit.fc.weight)  # seeded: reproducible


@pytest.fixture
def aged_cache(tmp_path: Path) -> Path:
    ids = [f"id{k}" for k in range(6) for _ in range(8)]
    ages = [float((k * 5 + j * 9) % 70) for k in range(6) for j in range(8)]
    return write_cache(tmp_path / "aged.h5", ids, ages)


@pytest.mark.slow
def test_cli_finetune_writes_a_loadable_finetune_checkpoint(aged_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("finetune", str(aged_cache), "--backbone", "tiny", "--mode", "mtmim",
                "--epochs", "2", "--batch-size", "16", "--age-groups", "4", "--out", str(out),
                "--no-progress", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr[-2000:]
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.train.checkpoint import load_checkpoint

    ck = load_checkpoint(out / "model.pt")
    meta = ck["meta"]
    assert meta["kind"] == "finetune" and meta["factorize_dim"] == 64 and len(meta["age_groups"]) == 3
    assert meta["age_group_counts"] == [12, 12, 12, 12]
    assert {k.split(".")[0] for k in ck["objective"]} >= {"encoder", "id_head", "factorize", "age_head", "q"}
    model = load_identity_model(out / "model.pt")
    assert model.factorize is not None
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"l_id", "l_age", "club", "q_loglik", "age_accuracy", "lr"} <= set(header)
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 6
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["extra"]["mode"] == "mtmim" and cfg["extra"]["lambda_mim"] == 1e-4


def test_cli_groups_and_bad_input(aged_cache: Path) -> None:
    r = run_cli("groups", str(aged_cache), "--k", "4")
    assert r.returncode == 0, r.stderr
    assert "boundaries:" in r.stdout and r.stdout.count("│ 12 │") + r.stdout.count("12 │") >= 4
    r = run_cli("groups", str(aged_cache), "--k", "100")
    assert r.returncode == 2 and "cannot form 100 groups" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("finetune", str(aged_cache), "--backbone", "tiny", "--mode", "nope")
    assert r.returncode == 2 and "--mode nope" in r.stderr


@pytest.mark.slow
def test_init_from_our_pretrain_checkpoint(aged_cache: Path, tmp_path: Path) -> None:
    from mtmim_cli.train.checkpoint import load_checkpoint
    from mtmim_cli.train.finetune import finetune

    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=123)
    run = finetune([aged_cache], init, {"out": str(tmp_path / "ft"), "epochs": 1, "batch_size": 16,
                                        "lr": 1e-12, "weight_decay": 0.0, "progress": False},
                   mode="age", age_groups=4)
    got = load_checkpoint(run / "model.pt")
    assert got["meta"]["backbone"] == "tiny" and got["meta"]["mode"] == "age"
    for k, v in pre.state_dict().items():
        if k.startswith("encoder.") and k.endswith("weight"):
            torch.testing.assert_close(got["objective"][k], v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("warmup", [1000, 0])
def test_head_warmup_holds_the_encoder(aged_cache: Path, tmp_path: Path, warmup: int) -> None:
    """--head-warmup-steps: the encoder's weights stay exactly as initialised during the
    warm-up while the new heads move; without it the encoder moves from the first step."""
    from mtmim_cli.train.checkpoint import load_checkpoint
    from mtmim_cli.train.finetune import finetune

    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=7)
    run = finetune([aged_cache], init, {"out": str(tmp_path / "ft"), "epochs": 1, "batch_size": 16,
                                        "lr": 1e-2, "schedule": "constant", "progress": False},
                   mode="mtmim", age_groups=4, head_warmup_steps=warmup)
    got = load_checkpoint(run / "model.pt")["objective"]
    enc = {k: v for k, v in pre.state_dict().items() if k.startswith("encoder.") and k.endswith("weight")}
    moved = [k for k, v in enc.items() if not torch.equal(got[k], v)]
    if warmup:
        assert moved == []
    else:
        assert len(moved) == len(enc)
    import pandas as pd

    lrs = pd.read_csv(run / "metrics.csv")["lr"]
    assert len(lrs) > 0 and (lrs == 1e-2).all()  # the logged lr is the heads', never the held 0
