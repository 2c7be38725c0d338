"""Minimising CLUB lowers the true MI: a linear-Gaussian toy encoder whose two outputs start
correlated; the MI of its outputs is known in closed form from their covariance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtmim_cli.models.club import CLUB, train_q

Z, OUT, NOISE = 8, 8, 0.3


def gaussian_mi(a: torch.Tensor, b: torch.Tensor) -> float:
    """I(a; b) of a = A z + s e1, b = B z + s e2 (z, e ~ N(0, I)): 0.5 log(|S_aa| |S_bb| / |S|)."""
    a, b = a.double(), b.double()
    eye = torch.eye(OUT, dtype=torch.float64) * NOISE**2
    s_aa, s_bb, s_ab = a @ a.T + eye, b @ b.T + eye, a @ b.T
    joint = torch.cat([torch.cat([s_aa, s_ab], 1), torch.cat([s_ab.T, s_bb], 1)], 0)
    return float(0.5 * (torch.logdet(s_aa) + torch.logdet(s_bb) - torch.logdet(joint)))


def run(penalty: float, steps: int = 300, seed: int = 0) -> tuple[float, float, float]:
    """Train a -> z[:4] and b -> z[4:] (linear heads, MSE), plus penalty * CLUB(a, b) with q
    updated 5 times after each encoder step (Algorithm 1). Returns (MI start, MI end, task MSE)."""
    torch.manual_seed(seed)
    shared = torch.randn(OUT, Z) / Z**0.5
    enc_a = nn.Parameter(shared + 0.3 * torch.randn(OUT, Z) / Z**0.5)  # a and b start correlated
    enc_b = nn.Parameter(shared + 0.3 * torch.randn(OUT, Z) / Z**0.5)
    head_a, head_b = nn.Linear(OUT, Z // 2), nn.Linear(OUT, Z // 2)
    q = CLUB(OUT, OUT, hidden=32)
    opt = torch.optim.Adam([enc_a, enc_b, *head_a.parameters(), *head_b.parameters()], lr=1e-2)
    q_opt = torch.optim.Adam(q.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    start = gaussian_mi(enc_a.detach(), enc_b.detach())
    for _ in range(steps):
        z = torch.randn(256, Z, generator=g)
        a = z @ enc_a.T + NOISE * torch.randn(256, OUT, generator=g)
        b = z @ enc_b.T + NOISE * torch.randn(256, OUT, generator=g)
        task = ((head_a(a) - z[:, :4]) ** 2).mean() + ((head_b(b) - z[:, 4:]) ** 2).mean()
        loss = task + penalty * q.mi_upper(a, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_q(q, q_opt, a, b, steps=5)
    return start, gaussian_mi(enc_a.detach(), enc_b.detach()), float(task.detach())


@pytest.mark.slow
def test_club_penalty_drives_true_mi_down() -> None:
    torch.set_num_threads(1)
    start, free_end, free_task = run(penalty=0.0)
    start2, pen_end, pen_task = run(penalty=0.3)
    print(f"true MI: start {start:.3f}; no penalty {free_end:.3f} (task {free_task:.3f}); "
          f"penalty {pen_end:.3f} (task {pen_task:.3f})")
    assert start == start2 and start > 1.0
    assert free_end > 0.5 * start       # the tasks alone leave most of the shared information
    assert pen_end < 0.3 * free_end     # the penalty removes it
    assert pen_task < 0.5               # and both outputs still do their tasks (chance: ~1.0)
