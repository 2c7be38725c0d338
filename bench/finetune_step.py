"""Cost of the MI machinery: images/s of the MT-MIM step against a plain baseline step, and
peak memory of closed-form against brute-force CLUB.

1. Step throughput, same encoder, same batch, same Adam settings, interleaved rounds:
   - reference: a plain step written here (encoder -> x_id = x - FC(x) -> margin head ->
     cross-entropy -> Adam), no age head, no CLUB, no q;
   - mtmim: MTMIMObjective.forward + backward + Adam step + after_step (CLUB over the batch,
     5 q steps), as the training loop runs it.
   The ratio reference_time / mtmim_time is the fraction of throughput kept (target >= 0.87:
   "MI machinery costs at most 15%").
2. CLUB memory at N = 1001, d = 512 (forward + backward), each in a fresh child process so
   its peak resident memory (ru_maxrss minus the resident size before the work) is its own:
   the closed form (O(N*d)) and a brute force over the explicit N x N x d tensor.

    .venv/bin/python bench/finetune_step.py [--backbone mobilefacenet] [--batch 256] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def step_bench(backbone: str, batch: int, steps: int, warmup: int) -> None:
    import torch
    import torch.nn.functional as F

    from mtmim_cli.models.backbones import build_backbone, default_embedding_size, input_width
    from mtmim_cli.models.factorize import FactorizationUnit
    from mtmim_cli.models.margin import CombinedMarginHead
    from mtmim_cli.train.mtmim_objective import MTMIMObjective

    torch.manual_seed(0)
    dim, width, classes = default_embedding_size(backbone), input_width(backbone), 1000
    images = torch.randn(batch, 3, 112, width)
    labels = torch.randint(0, classes, (batch,))
    ages = torch.rand(batch) * 70

    # the plain reference step
    enc_r = build_backbone(backbone, dim).train()
    fac_r = FactorizationUnit(dim)
    head_r = CombinedMarginHead.preset("arcface", dim, classes)
    opt_r = torch.optim.Adam([*enc_r.parameters(), *fac_r.parameters(), *head_r.parameters()],
                             lr=1e-4, weight_decay=5e-4)

    def ref_step() -> None:
        x_id, _ = fac_r(enc_r(images))
        loss = F.cross_entropy(head_r(x_id, labels), labels)
        opt_r.zero_grad(set_to_none=True)
        loss.backward()
        opt_r.step()

    obj = MTMIMObjective(build_backbone(backbone, dim), classes, 8, mode="mtmim",
                         embedding_size=dim, boundaries=[10, 20, 30, 40, 50, 60, 65]).train()
    opt_m = torch.optim.Adam(obj.main_parameters(), lr=1e-4, weight_decay=5e-4)

    def mtmim_step() -> None:
        loss, _ = obj(images, labels, ages)
        opt_m.zero_grad(set_to_none=True)
        loss.backward()
        opt_m.step()
        obj.after_step()

    for _ in range(warmup):
        ref_step()
        mtmim_step()
    # Wall time and this process's CPU time: on a shared machine the wall clock mostly
    # measures the neighbours; CPU seconds are what the step itself consumed.
    t_ref, t_mim, c_ref, c_mim = [], [], [], []
    for _ in range(steps):  # interleaved, so load changes hit both alike
        for fn, tw, tc in ((ref_step, t_ref, c_ref), (mtmim_step, t_mim, c_mim)):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            tw.append(time.perf_counter() - w0)
            tc.append(time.process_time() - c0)

    # The MI machinery alone on this batch's features: CLUB forward+backward and 5 q steps.
    with torch.no_grad():
        feats = obj.factorize(obj.encoder(images))
    x_id, x_age = (f.detach().requires_grad_() for f in feats)

    def mi_part() -> None:
        club = obj.q.mi_upper(x_id, x_age)
        club.backward()
        obj._q_batch = (x_id.detach(), x_age.detach())
        obj.after_step()

    c_mi = []
    for _ in range(10):
        c0 = time.process_time()
        mi_part()
        c_mi.append(time.process_time() - c0)

    def med(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    r, m, cr, cm, cmi = med(t_ref), med(t_mim), med(c_ref), med(c_mim), med(c_mi)
    print(f"step throughput, {backbone} ({dim}-d), batch {batch}, median of {steps} interleaved steps, "
          f"{torch.get_num_threads()} threads, load {load_avg()}")
    print(f"  reference (plain margin step): {batch / r:8.2f} img/s wall ({r:.2f} s), {cr:.2f} CPU-s/step")
    print(f"  mtmim (CLUB + 5 q steps)     : {batch / m:8.2f} img/s wall ({m:.2f} s), {cm:.2f} CPU-s/step")
    print(f"  throughput kept, wall: {r / m:.3f}; CPU time: {cr / cm:.3f} "
          f"(MI machinery cost {100 * (cm / cr - 1):.1f}% of CPU time; target <= 15%)")
    print(f"  MI machinery alone (CLUB fwd+bwd, 5 q steps, batch {batch}): {cmi * 1e3:.1f} CPU-ms "
          f"= {100 * cmi / cr:.2f}% of the reference step")


def _child_memory(kind: str, n: int, d: int) -> None:
    """Runs in a child: one forward + backward of CLUB, prints its peak memory in MB."""
    import torch

    from mtmim_cli.models.club import club_closed_form

    torch.manual_seed(0)
    mu = torch.randn(n, d, requires_grad=True)
    logvar = (0.1 * torch.randn(n, d)).requires_grad_()
    y = torch.randn(n, d, requires_grad=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if kind == "closed":
        est = club_closed_form(mu, logvar, y)
    else:  # explicit [i, j, k] tensor: log q(y_j | x_i) up to constants that cancel
        inv = torch.exp(-logvar)
        logq = -0.5 * ((y[None, :, :] - mu[:, None, :]) ** 2 * inv[:, None, :]).sum(-1)
        pos = -0.5 * ((y - mu) ** 2 * inv).sum(-1)
        est = pos.mean() - logq.mean()
    est.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "estimate": float(est), "peak_mb": (peak - before) / 1024,
                      "seconds": dt}))


def memory_bench(n: int, d: int) -> None:
    res = {}
    for kind in ("closed", "brute"):
        out = subprocess.run([sys.executable, __file__, "--child-memory", kind, "--n", str(n), "--d", str(d)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"  {kind}: failed ({out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode})")
            continue
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"CLUB forward + backward at N = {n}, d = {d} (peak resident memory above the inputs):")
    for kind, name in (("closed", "closed form O(N*d)"), ("brute", "brute force N x N x d")):
        if kind in res:
            r = res[kind]
            print(f"  {name:24s}: {r['peak_mb']:9.1f} MB, {r['seconds']:.3f} s, estimate {r['estimate']:.6f}")
    if len(res) == 2:
        print(f"  memory ratio brute / closed: {res['brute']['peak_mb'] / max(res['closed']['peak_mb'], 1e-3):.0f}x; "
              f"estimates differ by {abs(res['brute']['estimate'] - res['closed']['estimate']):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="mobilefacenet")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--n", type=int, default=1001)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--skip-steps", action="store_true", help="only the memory figures")
    ap.add_argument("--skip-memory", action="store_true", help="only the step throughput")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_memory:
        _child_memory(a.child_memory, a.n, a.d)
        return
    if not a.skip_memory:
        memory_bench(a.n, a.d)
    if not a.skip_steps:
        step_bench(a.backbone, a.batch, a.steps, a.warmup)


if __name__ == "__main__":
    main()
