"""The training loop: exact mid-epoch resume, non-finite stop, schedules, sampler, hooks,
and gather_with_grad across two real gloo processes."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtmim_cli.data.dataset import CacheDataset
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.backbones import build_backbone
from mtmim_cli.train.checkpoint import load_checkpoint
from mtmim_cli.train.config import TrainConfig
from mtmim_cli.train.distributed import gather_with_grad
from mtmim_cli.train.loop import EpochSampler, LoopState, _end_epoch, lr_factor, train
from mtmim_cli.train.objectives import PretrainObjective
from mtmim_cli.train.validate import PairValidator
from tests.conftest import write_cache

META = {"kind": "pretrain", "backbone": "tiny", "input_width": 112, "embedding_size": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    ids = [f"id{k}" for k in range(6) for _ in range(6)]
    return write_cache(tmp_path / "train.h5", ids, [float(i) for i in range(36)])


class NoisyObjective(PretrainObjective):
    """Draws from the global RNG in every step (like dropout), logs an extra metric from an
    inner update, keeps inner state, and can be told to fail at a given call."""

    metric_names = ("aux",)

    def __init__(self, num_classes: int, fail_at: int = -1, nan_at: int = -1) -> None:
        torch.manual_seed(0)
        super().__init__(build_backbone("tiny", 16), num_classes, 16, s=16.0)
        self.calls, self.inner, self.fail_at, self.nan_at = 0, 0, fail_at, nan_at
        self.drops: list[float] = []

    def forward(self, images, labels, ages):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        images = images + 0.01 * torch.randn_like(images)
        loss, metrics = super().forward(images, labels, ages)
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return loss, metrics

    def after_step(self) -> dict[str, float]:
        self.inner += 1
        return {"aux": float(self.inner)}

    def extra_state_dict(self) -> dict:
        return {"inner": self.inner}

    def load_extra_state_dict(self, d: dict) -> None:
        self.inner = d["inner"]

    def on_lr_drop(self, factor: float) -> None:
        self.drops.append(factor)


def _config(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), epochs=3, batch_size=8, lr=0.01, ckpt_every=2, progress=False,
                schedule="cosine", warmup_steps=3)
    base.update(kw)
    return TrainConfig(**base)


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_resume_mid_epoch_equals_uninterrupted(tmp_path: Path, cache: Path) -> None:
    ds = CacheDataset([cache], train=True, seed=0)
    full = NoisyObjective(ds.num_classes)
    train(full, ds, _config(tmp_path / "full"), meta=META)

    # 4 steps per epoch: the failure at call 7 is mid-epoch 2, after the step-6 checkpoint.
    broken = NoisyObjective(ds.num_classes, fail_at=7)
    with pytest.raises(KeyboardInterrupt):
        train(broken, CacheDataset([cache], train=True, seed=0), _config(tmp_path / "cut"), meta=META)
    ck = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert ck["loop"]["step"] == 6 and ck["loop"]["position"] == 2 and ck["extra"] == {"inner": 6}
    torch.manual_seed(123)   # the resumed run must restore the RNG, not rely on it
    resumed = NoisyObjective(ds.num_classes)
    res = train(resumed, CacheDataset([cache], train=True, seed=0),
                _config(tmp_path / "cut", resume=True), meta=META)
    assert res.steps == 12 and resumed.inner == 12
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    a, b = _rows(tmp_path / "full" / "metrics.csv"), _rows(tmp_path / "cut" / "metrics.csv")
    assert [r["step"] for r in b] == [str(i) for i in range(1, 13)]
    for ra, rb in zip(a, b, strict=True):
        for col in ("loss", "accuracy", "lr", "aux", "epoch"):
            assert ra[col] == rb[col], (ra["step"], col)


def test_nonfinite_loss_stops_naming_the_step(tmp_path: Path, cache: Path) -> None:
    ds = CacheDataset([cache], train=True)
    obj = NoisyObjective(ds.num_classes, nan_at=3)
    with pytest.raises(MtmimError, match="loss is nan at step 3.*last.pt"):
        train(obj, ds, _config(tmp_path / "run", ckpt_every=2), meta=META)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["loop"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["objective"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "model.pt").exists()


def test_schedules_closed_form() -> None:
    c = TrainConfig(schedule="poly", warmup_steps=4, poly_power=2.0)
    assert [lr_factor(c, s, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(c, 12, 20) == pytest.approx((1 - 8 / 16) ** 2)
    c = TrainConfig(schedule="cosine", warmup_steps=0)
    assert lr_factor(c, 5, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 20)))
    assert lr_factor(TrainConfig(schedule="plateau"), 100, 20) == 1.0


def test_plateau_divides_lr_by_ten_when_loss_stalls() -> None:
    class Obj:
        drops: list[float] = []

        def on_lr_drop(self, f: float) -> None:
            self.drops.append(f)

    c = TrainConfig(schedule="plateau", plateau_patience=1)
    st, obj = LoopState(), Obj()
    for loss in (5.0, 4.0, 4.0, 3.0, 3.5):
        st.epoch_loss_sum, st.epoch_loss_n = loss * 2, 2
        _end_epoch(st, c, None, obj, lambda m: None)
    assert st.plateau_scale == pytest.approx(0.01) and obj.drops == [0.1, 0.1]
    assert st.epoch == 5 and st.position == 0


def test_lr_column_follows_the_schedule(tmp_path: Path, cache: Path) -> None:
    ds = CacheDataset([cache], train=True)
    c = _config(tmp_path / "r", epochs=1, schedule="poly", warmup_steps=2, optimizer="sgd")
    train(NoisyObjective(ds.num_classes), ds, c, meta=META)
    rows = _rows(tmp_path / "r" / "metrics.csv")
    want = [0.01 * lr_factor(c, s, 4) for s in range(4)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(want, rel=1e-5)
    assert [float(r["aux"]) for r in rows] == [1.0, 2.0, 3.0, 4.0]
    assert (tmp_path / "r" / "model.pt").exists()
    # a finished run refuses to start again in the same folder without --resume
    with pytest.raises(MtmimError, match="--resume"):
        train(NoisyObjective(ds.num_classes), ds, c, meta=META)


def test_a_cpu_run_keeps_freed_memory(tmp_path: Path, cache: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Training on the CPU asks malloc to keep freed memory once, before the first step
    (each step frees and re-takes its activations; bench/train_allocator.py)."""
    import mtmim_cli.train.loop as loop

    calls = []
    monkeypatch.setattr(loop, "reuse_freed_memory", lambda: calls.append(1) or True)
    ds = CacheDataset([cache], train=True)
    train(NoisyObjective(ds.num_classes), ds, _config(tmp_path / "r", epochs=1), meta=META)
    assert calls == [1]


def test_grad_clipping_bounds_the_update(tmp_path: Path, cache: Path) -> None:
    ds = CacheDataset([cache], train=True)
    obj = NoisyObjective(ds.num_classes)
    before = [p.detach().clone() for p in obj.parameters()]
    c = _config(tmp_path / "r", max_steps=1, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                lr=1.0, schedule="constant", warmup_steps=0, clip_grad=1e-3)
    train(obj, ds, c, meta=META)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(obj.parameters(), before, strict=True)))
    assert 0 < float(step) <= 1e-3 * (1 + 1e-4)


def test_amp_bf16_runs_and_fp16_needs_cuda(tmp_path: Path, cache: Path) -> None:
    ds = CacheDataset([cache], train=True)
    res = train(NoisyObjective(ds.num_classes), ds, _config(tmp_path / "b", max_steps=2, amp="bf16"),
                meta=META)
    assert math.isfinite(res.final_loss)
    if not torch.cuda.is_available():
        with pytest.raises(MtmimError, match="fp16"):
            train(NoisyObjective(ds.num_classes), ds, _config(tmp_path / "h", max_steps=1, amp="fp16"),
                  meta=META)


def test_sampler_ranks_split_each_global_batch() -> None:
    single = EpochSampler(50, 8, 1, 0, seed=4)
    single.set_epoch(2)
    s = single.indices()
    ranks = []
    for r in range(2):
        smp = EpochSampler(50, 8, 2, r, seed=4)
        smp.set_epoch(2)
        ranks.append(smp.indices())
    assert len(s) == 48 and len(ranks[0]) == len(ranks[1]) == 24
    for k in range(6):
        assert sorted(ranks[0][4 * k: 4 * k + 4] + ranks[1][4 * k: 4 * k + 4]) == sorted(s[8 * k: 8 * k + 8])
    single.set_epoch(2, start=16)
    assert list(single) == s[16:] and len(single) == 32
    single.set_epoch(3)
    assert single.indices() != s


def test_gather_with_grad_is_identity_in_one_process() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = gather_with_grad(x)
    assert y is x


def _gather_worker(rank: int, world: int, init: str, x_all: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        sizes = [3, 2]                          # unequal local batches
        start = sum(sizes[:rank])
        x = x_all[start: start + sizes[rank]].clone().requires_grad_(True)
        g = gather_with_grad(x)
        # A loss every rank computes identically from the gathered rows (as CLUB does);
        # DDP would average the ranks' gradients, so average here too.
        loss = (g.sum(0) ** 2).sum() + (g ** 3).mean()
        loss.backward()
        torch.save({"g": g.detach(), "grad": x.grad / world}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_with_grad_two_gloo_processes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    x_all = torch.randn(5, 4, dtype=torch.float64)
    init = f"file://{tmp_path / 'rdv'}"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, init, x_all, str(tmp_path / "o")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    x = x_all.clone().requires_grad_(True)
    ((x.sum(0) ** 2).sum() + (x ** 3).mean()).backward()
    r0, r1 = torch.load(f"{tmp_path / 'o'}.0"), torch.load(f"{tmp_path / 'o'}.1")
    assert torch.equal(r0["g"], x_all) and torch.equal(r1["g"], x_all)
    # DDP's average of each rank's gradient for its own rows = the single-process gradient.
    got = torch.cat([r0["grad"], r1["grad"]])
    assert torch.allclose(got, x.grad, atol=1e-12)


def test_loop_refuses_a_batch_larger_than_the_data(tmp_path: Path, cache: Path) -> None:
    ds = CacheDataset([cache], train=True)
    with pytest.raises(MtmimError, match="fewer than one batch"):
        train(NoisyObjective(ds.num_classes), ds, _config(tmp_path / "x", batch_size=64), meta=META)


class ColourObjective(NoisyObjective):
    """Identity features = the mean colour of the image (validation sees through it)."""

    def identity_features(self, images):
        return images.mean(dim=(2, 3)) + 0.0 * super().identity_features(images)[:, :3]


def test_validation_hook_before_after_and_best(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (5, 3))
    ids = [k for k in range(5) for _ in range(6)]
    images = np.stack([np.broadcast_to(colours[k] + rng.integers(-3, 4, 3), (112, 112, 3))
                       for k in ids]).clip(0, 255).astype(np.uint8)
    val = write_cache(tmp_path / "val.h5", [f"p{k}" for k in ids],
                      [float(j * 10) for _ in range(5) for j in range(6)], images=images)
    train_cache = write_cache(tmp_path / "t.h5", [f"q{k % 4}" for k in range(16)])
    validator = PairValidator(val, 112, n_pairs=60, seed=0)
    assert validator(ColourObjective(4))["accuracy"] == 1.0   # identities are separable by colour
    ds = CacheDataset([train_cache], train=True)
    res = train(ColourObjective(ds.num_classes), ds,
                _config(tmp_path / "r", max_steps=3, val_every=2), meta=META, validator=validator)
    assert [h["step"] for h in res.validations] == [0, 2, 3]
    rows = _rows(tmp_path / "r" / "validation.csv")
    assert [r["step"] for r in rows] == ["0", "2", "3"] and float(rows[0]["accuracy"]) == 1.0
    best = load_checkpoint(tmp_path / "r" / "best.pt")
    assert best["meta"]["kind"] == "pretrain" and "optimizer" not in best


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward sends inf (a finite loss with non-finite gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class InfGradObjective(NoisyObjective):
    """Non-finite gradients (finite loss) on the calls in `bad`; after_step can poison a weight."""

    def __init__(self, num_classes: int, bad: set[int], poison_at: int = -1) -> None:
        super().__init__(num_classes)
        self.bad, self.poison_at = bad, poison_at

    def forward(self, images, labels, ages):
        self.calls += 1
        x = self.encoder(images + 0.01 * torch.randn_like(images))
        if self.calls in self.bad:
            x = _InfGrad.apply(x)
        logits, cos = self.id_head.logits_and_cosine(x, labels)
        return torch.nn.functional.cross_entropy(logits, labels), {
            "accuracy": (cos.argmax(1) == labels).float().mean()}

    def after_step(self) -> dict[str, float]:
        out = super().after_step()
        if self.inner == self.poison_at:
            with torch.no_grad():
                self.id_head.weight[0, 0] = float("nan")
        return out


def test_nonfinite_gradients_skip_the_step(tmp_path: Path, cache: Path, capsys) -> None:
    """A finite loss with inf gradients at call 3: that step changes no parameter and no
    optimiser state (as after step 2), the run goes on, counts it, and the weights stay finite."""
    ds = CacheDataset([cache], train=True)
    c = dict(epochs=1, ckpt_every=1, schedule="constant", warmup_steps=0)
    obj = InfGradObjective(ds.num_classes, bad={3})
    train(obj, ds, _config(tmp_path / "run", **c), meta=META)
    assert "step 3: non-finite gradients with a finite loss; step skipped" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["loop"]["skipped"] == 1 and ck["loop"]["bad_run"] == 0 and ck["loop"]["step"] == 4
    assert obj.inner == 3          # the skipped step's inner update did not run either
    assert all(torch.isfinite(v).all() for v in ck["objective"].values() if v.is_floating_point())
    # the skip left weights and Adam moments exactly as the step before: a run stopped after
    # 2 steps, then given call 3's batch with a skipped step, matches a run of 2 steps
    two = InfGradObjective(ds.num_classes, bad=set())
    train(two, ds, _config(tmp_path / "two", max_steps=2, **c), meta=META)
    ck2 = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    three = InfGradObjective(ds.num_classes, bad={3})
    train(three, ds, _config(tmp_path / "three", max_steps=3, **c), meta=META)
    ck3 = load_checkpoint(tmp_path / "three" / "checkpoints" / "last.pt")
    params = {f"{n}" for n, _ in two.named_parameters()}  # BN statistics of the forward stay
    for k in params:
        assert torch.equal(ck2["objective"][k], ck3["objective"][k]), k
    for pid, state in ck2["optimizer"]["state"].items():
        for name, v in state.items():
            assert torch.equal(v, ck3["optimizer"]["state"][pid][name]), (pid, name)


def test_k_nonfinite_gradient_steps_in_a_row_stop_naming_the_last_good_checkpoint(
        tmp_path: Path, cache: Path) -> None:
    ds = CacheDataset([cache], train=True)
    obj = InfGradObjective(ds.num_classes, bad=set(range(4, 100)))
    with pytest.raises(MtmimError, match=r"3 steps in a row with non-finite gradients \(up to step 6\).*"
                                         r"last.pt \(step 4\)"):
        train(obj, ds, _config(tmp_path / "run", ckpt_every=2, max_bad_steps=3), meta=META)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    # step 4 was skipped, so its checkpoint holds step 3's (good) weights
    assert ck["loop"]["step"] == 4 and not (tmp_path / "run" / "model.pt").exists()


def test_a_checkpoint_never_holds_nonfinite_weights(tmp_path: Path, cache: Path) -> None:
    ds = CacheDataset([cache], train=True)
    obj = InfGradObjective(ds.num_classes, bad=set(), poison_at=3)
    with pytest.raises(MtmimError, match=r"weights became non-finite \(id_head.weight\) at step 3; "
                                         r"stopped without writing last.pt.*last.pt \(step 2\)"):
        train(obj, ds, _config(tmp_path / "run", ckpt_every=1), meta=META)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["loop"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["objective"].values() if v.is_floating_point())


class _Scripted:
    """A validator that returns the given accuracies in turn."""

    name = "scripted"

    def __init__(self, accuracies: list[float]) -> None:
        self.accuracies, self.calls = list(accuracies), 0

    def __call__(self, objective, device="cpu") -> dict:
        self.calls += 1
        return {"accuracy": self.accuracies[self.calls - 1], "std": 0.0}


def test_early_stop_and_keep_best(tmp_path: Path, cache: Path) -> None:
    """Validation every 2 steps scores 0.5 (step 0), 0.7 (2), 0.6 (4), 0.65 (6): with patience
    2 the run stops at step 6, and --keep best makes model.pt the step-2 checkpoint."""
    ds = CacheDataset([cache], train=True)
    v = _Scripted([0.5, 0.7, 0.6, 0.65, 0.9, 0.9, 0.9])
    res = train(NoisyObjective(ds.num_classes), ds,
                _config(tmp_path / "r", val_every=2, early_stop=2, keep="best"), meta=META, validator=v)
    assert res.steps == 6 and [h["step"] for h in res.validations] == [0, 2, 4, 6]
    ck = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert ck["loop"]["stopped"] and ck["loop"]["best_step"] == 2
    assert (tmp_path / "r" / "model.pt").read_bytes() == (tmp_path / "r" / "best.pt").read_bytes()
    # a resumed stopped run does nothing more
    res = train(NoisyObjective(ds.num_classes), ds,
                _config(tmp_path / "r", val_every=2, early_stop=2, keep="best", resume=True),
                meta=META, validator=_Scripted([0.1] * 5))
    assert res.steps == 6
    with pytest.raises(MtmimError, match="--keep best: needs validation"):
        train(NoisyObjective(ds.num_classes), ds, _config(tmp_path / "n", keep="best"), meta=META)
