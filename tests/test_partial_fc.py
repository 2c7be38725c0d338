"""Partial FC against the full combined-margin head: one process, and two real gloo processes
with DDP (loss, encoder and class-centre gradients, sampling, checkpoint gathering)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtmim_cli.models.margin import CombinedMarginHead
from mtmim_cli.train.partial_fc import PartialFCHead

C, D_EMB, B = 23, 8, 12
SETTINGS = [(1.0, 0.35, 0.0), (1.0, 0.0, 0.35), (1.35, 0.0, 0.0), (1.0, 0.3, 0.2)]


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D_EMB, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    w = torch.randn(C, D_EMB, generator=g)
    x[:6] = x[:6] * 0.2 + w[labels[:6]]      # some rows close to their class: small angles too
    return x, labels, w


def _full(w: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, m: tuple[float, ...]):
    head = CombinedMarginHead(D_EMB, C, s=32.0, m1=m[0], m2=m[1], m3=m[2])
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.clone().requires_grad_(True)
    loss, acc = head.loss_and_accuracy(x, labels)
    loss.backward()
    return loss.detach(), acc, x.grad, head.weight.grad


@pytest.mark.parametrize("m", SETTINGS)
def test_rate_one_equals_the_full_head_in_one_process(m: tuple[float, ...]) -> None:
    x, labels, w = _data()
    pfc = PartialFCHead(D_EMB, C, rate=1.0, s=32.0, m1=m[0], m2=m[1], m3=m[2])
    with torch.no_grad():
        pfc.weight.copy_(w)
    xg = x.clone().requires_grad_(True)
    loss, acc = pfc.loss_and_accuracy(xg, labels)
    loss.backward()
    ref = _full(w, x, labels, m)
    torch.testing.assert_close(loss, ref[0], rtol=1e-6, atol=1e-6)
    assert float(acc) == float(ref[1])
    torch.testing.assert_close(xg.grad, ref[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pfc.weight.grad, ref[3], rtol=1e-5, atol=1e-7)


def test_sampling_keeps_positives_and_equals_the_head_on_those_classes() -> None:
    x, labels, w = _data(1)
    pfc = PartialFCHead(D_EMB, C, rate=0.4, s=32.0, seed=3)
    with torch.no_grad():
        pfc.weight.copy_(w)
    index = pfc._sampled(labels)
    assert len(index) == max(round(0.4 * C), len(labels.unique()))
    assert set(labels.tolist()) <= set(index.tolist())
    assert torch.equal(index, pfc._sampled(labels))            # a function of (seed, draws)
    xg = x.clone().requires_grad_(True)
    loss, _ = pfc.loss_and_accuracy(xg, labels)
    loss.backward()
    assert int(pfc.draws) == 1
    # Reference: the full head restricted to the sampled classes, labels renumbered.
    ref_w = w[index]
    ref_labels = torch.searchsorted(index, labels)
    head = CombinedMarginHead(D_EMB, len(index), s=32.0)
    with torch.no_grad():
        head.weight.copy_(ref_w)
    xr = x.clone().requires_grad_(True)
    ref = F.cross_entropy(head(xr, ref_labels), ref_labels)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-7)
    grad = torch.zeros_like(w)
    grad[index] = head.weight.grad
    torch.testing.assert_close(pfc.weight.grad, grad, rtol=1e-5, atol=1e-7)   # unsampled: zero
    # in eval mode nothing is sampled and the counter stays
    pfc.eval()
    pfc.loss_and_accuracy(x, labels)
    assert int(pfc.draws) == 1


def test_init_does_not_depend_on_the_number_of_ranks() -> None:
    one = PartialFCHead(D_EMB, 20000, seed=5)._init_rows(0, 20000)
    parts = [PartialFCHead(D_EMB, 20000, seed=5)._init_rows(a, b)
             for a, b in [(0, 6667), (6667, 13334), (13334, 20000)]]
    assert torch.equal(one, torch.cat(parts))
    assert abs(float(one.std()) - 0.01) < 1e-4


def _head_bytes(pfc: PartialFCHead, opt: torch.optim.Optimizer) -> int:
    tensors = [pfc.weight, pfc.weight.grad, *[v for v in opt.state[pfc.weight].values()
                                              if torch.is_tensor(v)]]
    return sum(t.numel() * t.element_size() for t in tensors)


def _worker(rank: int, world: int, init: str, out: str, rate: float) -> None:
    import torch.distributed as dist

    from mtmim_cli.train import distributed as D
    from mtmim_cli.train import row_shards

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x_all, labels, w = _data(2)
        torch.manual_seed(0)
        encoder = nn.Linear(D_EMB, D_EMB)
        pfc = PartialFCHead(D_EMB, C, rate=rate, s=32.0, seed=7)
        if rate == 1.0:
            with torch.no_grad():
                pfc.weight.copy_(w[pfc.start: pfc.stop])
        model = nn.ModuleDict({"encoder": encoder, "id_head": pfc})

        class Obj(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, x, y):
                return self.m["id_head"].loss_and_accuracy(self.m["encoder"](x), y)

        obj = Obj()
        names = row_shards.ddp_ignore_names(obj)
        assert names == ["m.id_head.weight", "m.id_head.draws"]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(obj, names)
        ddp = nn.parallel.DistributedDataParallel(obj)
        rows = slice(rank * B // world, (rank + 1) * B // world)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss, acc = ddp(x_all[rows], labels[rows])
        loss.backward()
        grads = {"encoder": [p.grad.clone() for p in encoder.parameters()],
                 "centres": D.gather_rows(pfc.weight.grad, C)}
        opt.step()
        state, opt_state = row_shards.full_state(model, opt)
        nbytes = _head_bytes(pfc, opt)
        if rank == 0:
            torch.save({"loss": loss.detach(), "acc": acc, "grads": grads, "state": state,
                        "bytes": nbytes, "index": pfc._sampled(labels) if rate < 1 else None},
                       f"{out}.{world}")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, world: int, rate: float) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    init = f"file://{tmp_path / f'rdv{world}-{rate}'}"
    out = str(tmp_path / f"o{rate}")
    procs = [ctx.Process(target=_worker, args=(r, world, init, out, rate)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return torch.load(f"{out}.{world}", weights_only=True)


@pytest.mark.slow
def test_two_gloo_processes_equal_the_full_head(tmp_path: Path) -> None:
    """Rate 1.0 on 2 ranks (DDP over the encoder, centres split 12/11) against the full head
    on the whole batch in this process; rate 0.5 on 2 ranks against rate 0.5 on 1 rank."""
    two = _spawn(tmp_path, 2, 1.0)
    x_all, labels, w = _data(2)
    torch.manual_seed(0)
    encoder = nn.Linear(D_EMB, D_EMB)
    head = CombinedMarginHead(D_EMB, C, s=32.0)
    with torch.no_grad():
        head.weight.copy_(w)
    loss, acc = head.loss_and_accuracy(encoder(x_all), labels)
    loss.backward()
    torch.testing.assert_close(two["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
    assert float(two["acc"]) == float(acc)
    # Two ranks sum the batch's rows in another order (each half, then the allreduce), so an
    # element moves by float32 rounding of its largest summands: measured against the
    # tensor's scale, not the element's own (a small element of a cancelling sum moved by
    # 9e-7 on one machine, 2.5e-5 of itself). A wrong split or scale is off by ~1e-2.
    for a, b in zip(two["grads"]["encoder"], [p.grad for p in encoder.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    g = head.weight.grad
    torch.testing.assert_close(two["grads"]["centres"], g, rtol=0, atol=1e-5 * float(g.abs().max()))
    # the checkpoint view holds all C centres after the step, as one process would
    assert two["state"]["id_head.weight"].shape == (C, D_EMB)

    # float32 sums in another order: gradients of size ~0.5 agree to ~1e-5
    one_half, two_half = _spawn(tmp_path, 1, 0.5), _spawn(tmp_path, 2, 0.5)
    one_index = one_half["index"]
    assert torch.equal(one_index[one_index < 12], two_half["index"])  # rank 0: same classes
    torch.testing.assert_close(two_half["loss"], one_half["loss"], rtol=1e-6, atol=1e-6)
    for a, b in zip(two_half["grads"]["encoder"], one_half["grads"]["encoder"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two_half["grads"]["centres"], one_half["grads"]["centres"],
                               rtol=1e-4, atol=1e-5)
    for k, v in one_half["state"].items():
        torch.testing.assert_close(two_half["state"][k], v, rtol=1e-4, atol=1e-5)
    # per-rank head memory (weights, gradient, momentum): rank 0 holds 12 of 23 centres
    print(f"head bytes per rank: world 1 {one_half['bytes']}, world 2 {two_half['bytes']}")
    assert two_half["bytes"] * 23 == one_half["bytes"] * 12
