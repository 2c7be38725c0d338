"""Transfer tools for small sets (issue 10): the head warm-up that really holds the encoder,
frozen trunks and their cached activations, frozen BatchNorm, L2-SP, class-mean centres,
separate learning rates, replay batches, validation identities, early stopping, the recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtmim_cli.data.dataset import CacheDataset
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.backbones import build_backbone
from mtmim_cli.train.checkpoint import load_checkpoint
from mtmim_cli.train.finetune import finetune
from mtmim_cli.train.finetune_options import split_options
from mtmim_cli.train.mtmim_objective import MTMIMObjective
from mtmim_cli.train.transfer import (
    EncoderPlan,
    ReplaySampler,
    TrainingSet,
    class_mean_centres,
    validation_identities,
)

from .conftest import write_cache
from .test_finetune import save_tiny_pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def aged_cache(tmp_path: Path) -> Path:
    ids = [f"id{k}" for k in range(6) for _ in range(8)]
    ages = [float((k * 5 + j * 9) % 70) for k in range(6) for j in range(8)]
    return write_cache(tmp_path / "aged.h5", ids, ages)


def _run(cache: Path, init: Path, out: Path, **kw):
    cfg = {"out": str(out), "epochs": 3, "batch_size": 16, "lr": 1e-2, "schedule": "constant",
           "progress": False, "ckpt_every": 1}
    cfg.update({k: kw.pop(k) for k in list(kw) if k in ("epochs", "batch_size", "lr", "resume",
                                                           "max_steps", "ckpt_every", "keep",
                                                           "early_stop", "val_every")})
    return finetune([cache], init, cfg, mode="mtmim", age_groups=4, **kw)


class _Kill:
    """Make MTMIMObjective.forward raise at its n-th call (a killed process)."""

    def __init__(self, monkeypatch, at: int) -> None:
        self.calls, self.at = 0, at
        original = MTMIMObjective.forward

        def forward(obj, *args):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt("simulated kill")
            return original(obj, *args)

        monkeypatch.setattr(MTMIMObjective, "forward", forward)


def _encoder_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("encoder.")}


def _equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------- head warm-up
@pytest.mark.slow
def test_head_warmup_holds_encoder_params_and_buffers_and_resumes_bitwise(
        aged_cache: Path, tmp_path: Path, monkeypatch) -> None:
    """3 steps per epoch, warm-up 4: during steps 1-4 the encoder's parameters AND buffers
    (BatchNorm running statistics, counters) stay bit-identical and it has no optimiser state;
    at release (step 5) its Adam state starts from scratch. Runs killed mid-warm-up (in
    step 3) and just after release (in step 6) resume to the uninterrupted run bit for bit,
    with augmentation on (drawn per seed, epoch and index)."""
    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=7)
    kw = {"head_warmup_steps": 4, "augment": "light"}
    full = _run(aged_cache, init, tmp_path / "full", **kw)
    want = load_checkpoint(full / "model.pt")["objective"]

    # killed in step 5's forward: last.pt holds step 4, the end of the warm-up
    with monkeypatch.context() as mp:
        _Kill(mp, at=5)
        with pytest.raises(KeyboardInterrupt):
            _run(aged_cache, init, tmp_path / "at4", **kw)
    ck = load_checkpoint(tmp_path / "at4" / "checkpoints" / "last.pt")
    assert ck["loop"]["step"] == 4
    _equal_states(_encoder_state(ck["objective"]),
                  {k: v for k, v in pre.state_dict().items() if k.startswith("encoder.")})
    heads = ck["optimizer"]["param_groups"][0]["params"]
    encoder = ck["optimizer"]["param_groups"][1]["params"]
    assert all(p in ck["optimizer"]["state"] for p in heads)          # the heads trained
    assert not any(p in ck["optimizer"]["state"] for p in encoder)    # the encoder: no state at all

    for at, saved in ((3, 2), (6, 5)):
        out = tmp_path / f"cut{at}"
        with monkeypatch.context() as mp:
            _Kill(mp, at=at)
            with pytest.raises(KeyboardInterrupt):
                _run(aged_cache, init, out, **kw)
        ck = load_checkpoint(out / "checkpoints" / "last.pt")
        assert ck["loop"]["step"] == saved
        if saved == 5:   # one encoder step after release: Adam's first step, fresh moments
            encoder = ck["optimizer"]["param_groups"][1]["params"]
            assert all(int(ck["optimizer"]["state"][p]["step"]) == 1 for p in encoder)
        torch.manual_seed(999)   # the resumed run restores its RNG streams itself
        _run(aged_cache, init, out, resume=True, **kw)
        _equal_states(load_checkpoint(out / "model.pt")["objective"], want)


def test_plan_warmup_takes_the_encoder_out_and_back(aged_cache: Path) -> None:
    torch.manual_seed(0)
    enc = build_backbone("tiny", 16)
    plan = EncoderPlan(enc, warmup_steps=2)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    plan.set_modes()
    assert not any(m.training for m in enc.modules())
    assert plan.begin_step(1) is False and plan.begin_step(2) is True
    assert all(p.requires_grad for p in plan.trainable) and len(plan.trainable) == len(list(enc.parameters()))
    enc.train()
    plan.set_modes()
    assert all(m.training for m in enc.modules())


def test_plan_follows_modules_swapped_in_later() -> None:
    """--sync-bn swaps every BatchNorm (new parameter objects): the plan's trainable
    parameters, L2-SP anchor and frozen trunk are those of the encoder as it is now."""
    from mtmim_cli.train.distributed import CPUSyncBatchNorm, convert_sync_batchnorm

    torch.manual_seed(0)
    enc = build_backbone("tiny", 16)
    plan = EncoderPlan(enc, freeze_through="body.1", l2sp=0.1, freeze_bn="all")
    convert_sync_batchnorm(enc, torch.device("cpu"))
    assert isinstance(enc.body[2][1], CPUSyncBatchNorm)
    now = {id(p) for p in enc.parameters()}
    assert all(id(p) in now for p in plan.trainable)
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == plan.names
    assert not any(".1." in n and n.startswith("body.") for n in plan.names)   # BN affine frozen
    assert float(plan.penalty().detach()) == 0.0


# ----------------------------------------------------------------------- frozen BatchNorm
@pytest.mark.parametrize("mode", ["stats", "all"])
def test_frozen_batchnorm(aged_cache: Path, tmp_path: Path, mode: str) -> None:
    """stats: running statistics fixed, affine weight/bias trained; all: both fixed."""
    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=3)
    run = _run(aged_cache, init, tmp_path / "r", epochs=1, freeze_bn=mode)
    got = load_checkpoint(run / "model.pt")["objective"]
    before = pre.state_dict()
    for k in got:
        if not k.startswith("encoder.") or ".body." not in k and "features" not in k:
            continue
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(got[k], before[k]), k
    bn_w = [k for k in got if k.startswith("encoder.body.") and k.endswith(".1.weight")]
    assert bn_w
    moved = [k for k in bn_w if not torch.equal(got[k], before[k])]
    assert (moved == []) if mode == "all" else (moved == bn_w)
    conv = "encoder.body.0.0.weight"
    assert not torch.equal(got[conv], before[conv])   # the rest of the encoder trains


# ----------------------------------------------------------------------- frozen trunk
@pytest.mark.slow
def test_cached_activations_train_like_the_frozen_trunk_on_images(aged_cache: Path, tmp_path: Path) -> None:
    """Freeze through body.3 (tail = pool, fc, features): training on cached activations
    (float32) equals training the same frozen-trunk model on images, same seed; the trunk is
    untouched; model.pt is a normal full checkpoint; a second run reuses the cache file."""
    from mtmim_cli.models.identity import load_identity_model

    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=5)
    kw = {"freeze_through": "body.3", "init_centres": "mean-mirror", "l2sp": 1e-2, "epochs": 2}
    shared = tmp_path / "acts"
    a = _run(aged_cache, init, tmp_path / "acts_run", activation_cache=str(shared),
             activation_dtype="float32", **kw)
    b = _run(aged_cache, init, tmp_path / "image_run", activation_cache="off", **kw)
    ga, gb = (load_checkpoint(r / "model.pt")["objective"] for r in (a, b))
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-5, msg=k)
    for k, v in pre.state_dict().items():
        if k.startswith("encoder.body."):
            assert torch.equal(ga[k], v) and torch.equal(gb[k], v), k
    assert not torch.equal(ga["encoder.fc.weight"], pre.state_dict()["encoder.fc.weight"])
    model = load_identity_model(a / "model.pt")
    assert model.factorize is not None and model(torch.zeros(1, 3, 112, 112)).shape == (1, 64)
    files = list(shared.glob("trunk-body.3-*.npy"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    _run(aged_cache, init, tmp_path / "again", activation_cache=str(shared), activation_dtype="float32",
         max_steps=1, **kw)
    assert files[0].stat().st_mtime_ns == stamp   # reused, not recomputed


def test_activation_views_follow_the_flip_bit(aged_cache: Path, tmp_path: Path) -> None:
    from mtmim_cli.data.dataset import _flip_bit
    from mtmim_cli.train.transfer import trunk_activations

    torch.manual_seed(0)
    enc = build_backbone("tiny", 16)
    plan = EncoderPlan(enc, freeze_through="pool")
    base = CacheDataset([aged_cache], train=True, seed=3)
    acts, path = trunk_activations(plan, base, tmp_path, "float32", progress=False)
    assert acts.shape == (48, 2, 64) and path.name.startswith("trunk-pool-")
    ds = TrainingSet(base, np.arange(48), activations=acts)
    ds.set_epoch(5)
    x = ds.__getitems__([0, 1, 2, 3])[0]
    enc.eval()
    with torch.no_grad():
        for k in range(4):
            img = base[k][0][None]          # the image path's view of item k (flip included)
            want = plan.trunk_forward(img)[0]
            assert _flip_bit(3, 5, k) == bool(torch.allclose(x[k], torch.from_numpy(np.array(acts[k, 1]))))
            torch.testing.assert_close(x[k], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(MtmimError, match="not a stage"):
        EncoderPlan(enc, freeze_through="nope")


# ----------------------------------------------------------------------- L2-SP
def test_l2sp_gradient_is_alpha_times_the_distance_to_the_initial_weights() -> None:
    torch.manual_seed(0)
    enc = build_backbone("tiny", 16)
    init = {k: v.clone() for k, v in enc.state_dict().items()}
    obj = MTMIMObjective(enc, 5, 3, embedding_size=16, boundaries=[20.0, 40.0], q_hidden=8, l2sp=0.3)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pen = obj.plan.penalty()
    grads = torch.autograd.grad(pen, obj.plan.trainable)
    for (name, p), g in zip(enc.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, 0.3 * (p.detach() - init[name]), rtol=1e-5, atol=1e-8)
    want = 0.15 * sum(((p.detach() - init[n]) ** 2).sum() for n, p in enc.named_parameters())
    torch.testing.assert_close(pen.detach(), want, rtol=1e-5, atol=0.0)
    # in the loss: the gradient difference to the same loss without L2-SP is exactly that term
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(6, 3, 112, 112, generator=g), torch.arange(6) % 5
    ages = torch.tensor([10.0, 30.0, 50.0, 10.0, 30.0, 50.0])
    obj.eval()
    loss, m = obj(images, labels, ages)
    off = obj.plan.l2sp
    obj.plan.anchor, anchor = {}, obj.plan.anchor
    loss0, _ = obj(images, labels, ages)
    obj.plan.anchor = anchor
    ga = torch.autograd.grad(loss, obj.plan.trainable)
    gb = torch.autograd.grad(loss0, obj.plan.trainable)
    for (name, p), a, b in zip(enc.named_parameters(), ga, gb, strict=True):
        # a float32 sum of two terms: tolerance relative to the gradient's size
        torch.testing.assert_close(a - b, off * (p.detach() - init[name]), rtol=1e-4,
                                   atol=1e-5 * float(b.abs().max()))
    assert float(m["l2sp"]) == pytest.approx(float(want), rel=1e-5)
    groups = obj.main_parameters()
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]


# ----------------------------------------------------------------------- learning rates
def test_encoder_lr_and_heads_lr(aged_cache: Path, tmp_path: Path) -> None:
    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=1)
    run = _run(aged_cache, init, tmp_path / "r", max_steps=1, encoder_lr=1e-4, lr=3e-3)
    groups = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([3e-3, 1e-4])
    ck = load_checkpoint(run / "model.pt")["objective"]
    n_encoder = sum(k.startswith("encoder.") and not k.endswith(("running_mean", "running_var",
                                                                   "num_batches_tracked")) for k in ck)
    assert len(groups[1]["params"]) == n_encoder


# ----------------------------------------------------------------------- class centres
def test_class_mean_centres_against_brute_force(aged_cache: Path) -> None:
    torch.manual_seed(0)
    enc = build_backbone("tiny", 16).eval()
    base = CacheDataset([aged_cache], train=True, seed=0)
    ds = TrainingSet(base, np.arange(0, 48, 2))   # every other image
    for mirror in (False, True):
        got, has = class_mean_centres(enc, ds, mirror)
        assert has.all() and got.shape == (6, 16)
        for c in range(6):
            rows = [i for i in range(len(ds)) if ds.labels[i] == c]
            x = torch.stack([CacheDataset([aged_cache], train=False)[int(ds.keep[i])][0] for i in rows])
            with torch.no_grad():
                e = F.normalize(enc(x), dim=1)
                if mirror:
                    e = (e + F.normalize(enc(torch.flip(x, dims=[3])), dim=1)) / 2
            torch.testing.assert_close(got[c], F.normalize(e.mean(0), dim=0), rtol=1e-5, atol=1e-6)


def test_mean_centres_start_the_margin_loss_low(aged_cache: Path, tmp_path: Path) -> None:
    """Centres at the class means of x_id: the first step's identity loss is far below the
    random head's (the encoder is the same)."""
    import pandas as pd

    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=2)
    first = {}
    for how in ("random", "mean"):
        run = _run(aged_cache, init, tmp_path / how, max_steps=1, init_centres=how, lr=1e-12)
        first[how] = float(pd.read_csv(run / "metrics.csv")["l_id"][0])
    assert first["mean"] < first["random"] - 1.0


# ----------------------------------------------------------------------- replay
def test_replay_sampler_mix_ranks_and_streams() -> None:
    s = ReplaySampler(n_target=50, n_replay=7, global_batch=8, ratio=0.25, world=1, rank=0, seed=3)
    assert (s.per_target, s.per_replay, s.steps) == (6, 2, 8)
    seen_replay = []
    for epoch in range(3):
        s.set_epoch(epoch)
        idx = np.array(s.indices()).reshape(8, 8)
        assert ((idx >= 50).sum(1) == 2).all()                      # 2 replay rows in every batch
        target = idx[idx < 50]
        assert len(np.unique(target)) == 48                        # a pass over the training rows
        seen_replay += idx[idx >= 50].tolist()
    # the replay stream runs through whole permutations, continuing across epochs: 48 draws
    # of 7 items = 6 full passes and 6 items of the 7th
    counts = np.bincount(np.array(seen_replay) - 50, minlength=7)
    assert counts.sum() == 48 and set(counts.tolist()) == {6, 7}
    ranks = []
    for r in range(2):
        sr = ReplaySampler(50, 7, 8, 0.25, world=2, rank=r, seed=3)
        sr.set_epoch(1)
        ranks.append(sr.indices())
    s.set_epoch(1)
    full = s.indices()
    for k in range(8):
        assert sorted(ranks[0][4 * k:4 * k + 4] + ranks[1][4 * k:4 * k + 4]) == sorted(full[8 * k:8 * k + 8])
    s.set_epoch(1, start=16)
    assert list(s) == full[16:] and len(s) == 48
    with pytest.raises(MtmimError, match="between 0 and 1"):
        ReplaySampler(50, 7, 8, 1.0, 1, 0, 0)


def test_replay_rows_get_their_own_classes_no_age_and_no_club(aged_cache: Path, tmp_path: Path) -> None:
    replay = write_cache(tmp_path / "replay.h5", [f"r{k}" for k in range(5) for _ in range(4)],
                         [33.0] * 20, seed=3)
    base = CacheDataset([aged_cache, replay], train=True)
    ds = TrainingSet(base, np.arange(len(base)), replay=base.cache_of >= 1, replay_ratio=0.25)
    assert (ds.n_target, ds.n_replay, ds.num_classes, ds.replay_classes_from) == (48, 20, 11, 6)
    assert np.isnan(ds.ages[48:]).all() and np.isfinite(ds.ages[:48]).all()
    assert (ds.labels[48:] >= 6).all() and (ds.labels[:48] < 6).all()
    x, y, a, b = ds.__getitems__([0, 50, 60])
    assert y.tolist() == [int(ds.labels[0]), int(ds.labels[50]), int(ds.labels[60])] and torch.isnan(a[1:]).all()
    # CLUB (and q's batch) over the training rows only
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    obj = MTMIMObjective(enc, 11, 3, embedding_size=8, boundaries=[20.0, 40.0], q_hidden=8,
                         replay_classes_from=6)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(10, 3, 2, 2, generator=g), torch.tensor([0, 7, 1, 8, 2, 9, 3, 10, 4, 5])
    ages = torch.where(labels < 6, torch.tensor(25.0), torch.tensor(float("nan")))
    _, m = obj(images, labels, ages)
    x_id, x_age = obj.factorize(enc(images))
    keep = labels < 6
    torch.testing.assert_close(m["club"], obj.q.mi_upper(x_id[keep], x_age[keep]).detach())
    assert obj._q_batch[0].shape[0] == int(keep.sum())


# ----------------------------------------------------------------------- validation identities, early stop
def test_validation_identities_are_carved_out_of_training(aged_cache: Path, tmp_path: Path) -> None:
    from mtmim_cli.data.provenance import cache_digests, unpack

    base = CacheDataset([aged_cache], train=True)
    v = validation_identities(base, 2, seed=4)
    assert len(v) == 2 and np.array_equal(v, validation_identities(base, 2, seed=4))
    assert not np.array_equal(v, validation_identities(base, 2, seed=5)) or True   # seeded, either way valid
    assert len(validation_identities(base, 0.5, seed=4)) == 3
    with pytest.raises(MtmimError, match="at least 2"):
        validation_identities(base, 6, seed=0)
    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=1)
    run = _run(aged_cache, init, tmp_path / "r", max_steps=2, val_identities=2, val_pairs=40,
               keep="best")
    meta = load_checkpoint(run / "model.pt")["meta"]
    trained = set(unpack(meta["trained_on"]["images"]).tolist())
    from mtmim_cli.data.cache import Cache

    cache = Cache(aged_cache)
    d = cache_digests(cache)
    val_rows = np.flatnonzero(np.isin(base.labels, validation_identities(base, 2, seed=0)))
    assert not trained & set(d[val_rows].tolist()) and len(trained) == 32
    assert meta["num_classes"] == 4
    assert (run / "model.pt").read_bytes() == (run / "best.pt").read_bytes()


def test_recipe_small_sits_between_defaults_and_explicit_options() -> None:
    cfg, o = split_options({"recipe": "small"}, {})
    assert (cfg.lr, cfg.epochs, cfg.optimizer) == (1e-3, 5, "adam")
    assert (o["freeze_through"], o["freeze_bn"], o["init_centres"], o["l2sp"], o["s"], o["m"]) == \
        ("auto", "all", "mean-mirror", 1e-2, 64.0, 0.35)
    assert (o["wise"], o["mi_target"], o["lambda_mim"], cfg.weight_decay) == (0.5, "age-group", 1.0, 0.0)
    cfg, o = split_options({"recipe": "small", "lr": 1e-4}, {"l2sp": 0.0})
    assert cfg.lr == 1e-4 and o["l2sp"] == 0.0
    with pytest.raises(MtmimError, match="--recipe big"):
        split_options({}, {"recipe": "big"})


@pytest.mark.slow
def test_cli_recipe_small_with_explicit_overrides(aged_cache: Path, tmp_path: Path) -> None:
    """`mtmim finetune --recipe small`: the recipe's values apply, options given on the
    command line win, the trunk's activations are cached, model.pt loads as usual."""
    import json

    from mtmim_cli.models.identity import load_identity_model

    from .conftest import run_cli

    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=1)
    out = tmp_path / "run"
    r = run_cli("finetune", str(aged_cache), "--init", str(init), "--recipe", "small", "--epochs", "1",
                "--batch-size", "16", "--age-groups", "4", "--mode", "baseline", "--out", str(out),
                "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["schedule"]) == (1, 16, 1e-3, "constant")
    e = cfg["extra"]
    assert (e["recipe"], e["freeze_through"], e["freeze_bn"], e["init_centres"], e["l2sp"], e["mode"]) == \
        ("small", "pool", "all", "mean-mirror", 1e-2, "baseline")
    assert len(list((out / "activations").glob("trunk-pool-*.npy"))) == 1
    assert load_identity_model(out / "model.pt").factorize is not None
    r = run_cli("finetune", str(aged_cache), "--init", str(init), "--recipe", "big", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--recipe big" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("finetune", str(aged_cache), "--init", str(init), "--recipe", "small", "--augment", "light",
                "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "--activation-cache off" in r.stderr


def test_identity_lists_select_training_and_replay_identities(aged_cache: Path, tmp_path: Path) -> None:
    import json

    from mtmim_cli.data.identity_lists import read_identity_list
    from mtmim_cli.train.transfer import identity_mask

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"a": {"train": [0, 2, 3]}, "celeb": ["r1", "r3"]}))
    names = tmp_path / "names.txt"
    names.write_text("# kept\nid1\n\nid4\n")
    assert read_identity_list("id0, id5") == ["id0", "id5"]
    assert read_identity_list(f"@{names}") == ["id1", "id4"]
    assert read_identity_list(f"@{split}:a.train") == ["0", "2", "3"]
    for bad, msg in [(f"@{split}:a.nope", "no identity list"), (f"@{split}:a", "not a list"),
                     (f"@{tmp_path / 'none.txt'}", "cannot read")]:
        with pytest.raises(MtmimError, match=msg):
            read_identity_list(bad)
    numbered = write_cache(tmp_path / "num.h5", [f"{k:03d}" for k in range(1, 5) for _ in range(3)], [10.0] * 12)
    base = CacheDataset([numbered], train=True)
    assert identity_mask(base, range(1), ["1", "4"], "x").sum() == 6        # '001' is 1
    with pytest.raises(MtmimError, match="none of the 1 listed"):
        identity_mask(base, range(1), ["id9"], "--identities")

    replay = write_cache(tmp_path / "replay.h5", [f"r{k}" for k in range(5) for _ in range(4)], seed=3)
    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=1)
    run = _run(aged_cache, init, tmp_path / "r", max_steps=1, train_identities="id0,id1,id2,id3",
               replay=[str(replay)], replay_identities=f"@{split}:celeb", replay_ratio=0.25)
    meta = load_checkpoint(run / "model.pt")["meta"]
    assert meta["num_classes"] == 6                                        # 4 + 2 replay identities
    assert [c["used"] for c in meta["trained_on"]["caches"]] == [32, 8]


_DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from mtmim_cli.train.finetune import finetune
cache, replay, init, out, acts = sys.argv[1:6]
finetune([cache], init, {"out": out, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                         "batch_size": 16, "max_steps": 4, "schedule": "constant", "progress": False},
         mode="mtmim", age_groups=4, lambda_mim=0.1, q_lr=1e-3, head_warmup_steps=2,
         freeze_bn="stats", freeze_through="body.2", activation_cache=acts,
         activation_dtype="float32", init_centres="mean", replay=[replay], replay_ratio=0.25)
"""


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_through_release_replay_and_cached_trunk(
        aged_cache: Path, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes against one process, global batch 16: a head warm-up
    of 2 steps (the loop re-wraps DDP when the encoder is released), a trunk frozen through
    body.2 trained on its cached activations (rank 0 writes the cache, rank 1 reads it),
    replay rows mixed in at 1/4 (dealt to both ranks unevenly, so the age loss must average
    over the global count of known ages), CLUB over the gathered training rows.
    BatchNorm statistics are frozen, so each sample's forward does not depend on the batch
    split. Tolerance as the pretrain DDP test: float sums in another order."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    replay = write_cache(tmp_path / "replay.h5", [f"r{k}" for k in range(5) for _ in range(4)], seed=3)
    pre, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=11)
    script = tmp_path / "ft.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    acts = str(tmp_path / "acts")
    args = [str(aged_cache), str(replay), str(init)]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(29700 + os.getpid() % 1000), str(script), *args,
                          str(tmp_path / "ddp"), acts], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one"), acts], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "model.pt")["objective"]
    b = load_checkpoint(tmp_path / "ddp" / "model.pt")["objective"]
    moved = [k for k in a if k.startswith("encoder.fc") and not torch.equal(a[k], pre.state_dict()[k])]
    assert moved   # the released tail trained
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-5, worst
    assert len(list((tmp_path / "acts").glob("*.npy"))) == 1


# ----------------------------------------------------------------------- WiSE
def test_wise_model_is_the_interpolation_of_initial_and_trained_weights(aged_cache: Path, tmp_path: Path) -> None:
    """--wise 0.25: model.pt's encoder and factorization = 0.75 x initial + 0.25 x trained
    (checkpoints/last.pt keeps the trained ones); its heads are the trained heads."""
    from mtmim_cli.train.checkpoint import load_checkpoint

    _, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=0)
    full = _run(aged_cache, init, tmp_path / "full", epochs=1)
    wise = _run(aged_cache, init, tmp_path / "wise", epochs=1, wise=0.25)
    trained = load_checkpoint(full / "model.pt")["objective"]
    assert _equal_states(trained, load_checkpoint(wise / "checkpoints" / "last.pt")["objective"]) is None
    got = load_checkpoint(wise / "model.pt")
    assert got["meta"]["wise"] == 0.25
    # the initial weights: the pretrain's encoder, and the factorization unit finetune seeds
    from mtmim_cli.models.factorize import FactorizationUnit

    pre = load_checkpoint(init)["objective"]
    torch.manual_seed(0)
    unit = FactorizationUnit(64)
    first = {**{k: v for k, v in pre.items() if k.startswith("encoder.")},
             **{f"factorize.{k}": v for k, v in unit.state_dict().items()}}
    moved = 0
    for k, v in got["objective"].items():
        if k in first and v.is_floating_point():
            want = 0.75 * first[k] + 0.25 * trained[k]
            torch.testing.assert_close(v, want, rtol=0, atol=1e-6)
            moved += int(not torch.equal(first[k], trained[k]))
        else:
            assert torch.equal(v, trained[k]), k
    assert moved > 0


class _Killed(BaseException):
    """A process killed right after a file reached its final name (not an Exception, so
    nothing on the way up mistakes it for an error it handles)."""


def _kill_after_write(monkeypatch, n: int, seen: list[str]) -> None:
    """Every atomic write ends in os.replace: record each file's name, raise after the n-th
    (n = 0: never)."""
    import os

    real = os.replace

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        seen.append(Path(dst).name)
        if len(seen) == n:
            raise _Killed(f"after write {n}: {Path(dst).name}")

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("keep", ["last", pytest.param("best", marks=pytest.mark.slow)])
def test_wise_model_is_written_once_and_no_kill_leaves_trained_weights_labelled_wise(
        aged_cache: Path, tmp_path: Path, monkeypatch, keep: str) -> None:
    """--wise 0.25 killed right after each checkpoint the run writes (last.pt, best.pt,
    model.pt; the logs and config.json before them hold no weights): model.pt is then absent, or the uninterrupted run's interpolated
    model with its label, never the trained weights labelled WiSE. The resumed run ends with
    that same model.pt; where the kill came after model.pt, the resume keeps the file as it
    is (same inode, same mtime). model.pt is written once; the checkpoints holding trained
    weights carry no WiSE label."""
    _, init = save_tiny_pretrain(tmp_path / "pre.pt", seed=1)
    kw = {"epochs": 2, "ckpt_every": 0, "wise": 0.25}
    if keep == "best":   # seed 1: the best validation is at step 3 of 4, not the init's
        kw.update(keep="best", val_identities=2, val_pairs=40, val_every=1)
    writes: list[str] = []
    with monkeypatch.context() as mp:
        _kill_after_write(mp, 0, writes)
        ref = _run(aged_cache, init, tmp_path / "ref", **kw)
    want = load_checkpoint(ref / "model.pt")
    trained = load_checkpoint(ref / ("best.pt" if keep == "best" else "checkpoints/last.pt"))
    assert want["meta"]["wise"] == 0.25
    raw_keys = [k for k, v in trained["objective"].items()
                if k.startswith("encoder.") and not torch.equal(v, want["objective"][k])]
    assert raw_keys   # model.pt is interpolated, not the trained weights
    if keep == "best":
        assert 0 < load_checkpoint(ref / "checkpoints" / "last.pt")["loop"]["best_step"] < 4

    for n in [k + 1 for k, name in enumerate(writes) if name.endswith(".pt")]:
        out = tmp_path / f"killed{n}"
        with monkeypatch.context() as mp:
            _kill_after_write(mp, n, [])
            with pytest.raises(_Killed):
                _run(aged_cache, init, out, **kw)
        model = out / "model.pt"
        before = None
        if model.exists():
            got = load_checkpoint(model)
            raw = all(torch.equal(got["objective"][k], trained["objective"][k]) for k in raw_keys)
            assert not raw and got["meta"].get("wise") == 0.25, (
                f"killed after write {n} ({writes[n - 1]}): model.pt labelled wise "
                f"{got['meta'].get('wise')} holds the trained weights" if raw else
                f"killed after write {n} ({writes[n - 1]}): model.pt labelled "
                f"{got['meta'].get('wise')}")
            assert _equal_states(got["objective"], want["objective"]) is None
            before = (model.stat().st_ino, model.stat().st_mtime_ns)
        _run(aged_cache, init, out, resume=True, **kw)
        got = load_checkpoint(model)
        assert got["meta"]["wise"] == 0.25
        assert _equal_states(got["objective"], want["objective"]) is None
        if before is not None:   # a finished run's model.pt is never rewritten
            assert (model.stat().st_ino, model.stat().st_mtime_ns) == before, writes[n - 1]
    assert writes.count("model.pt") == 1, writes
    assert "wise" not in trained["meta"]
    assert "wise" not in load_checkpoint(ref / "checkpoints" / "last.pt")["meta"]
