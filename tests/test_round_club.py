"""train/round_club.py: the per-round CLUB nets' penalty and likelihood gradients (written by
hand) against autograd through one `models.club.CLUB` per round on that round's kept rows."""

from __future__ import annotations

import pytest
import torch

from mtmim_cli.models.club import CLUB, club_closed_form
from mtmim_cli.train import round_club as Q

R, B, D, H, BOUND = 3, 9, 5, 4, 2.0


def _rounds(seed: int = 0):
    """R rounds of q as CLUB modules (float64) and the same weights in round_club's layout;
    features, and row weights: round 0 drops rows 1 and 4, round 1 row 8, round 2 none."""
    torch.manual_seed(seed)
    nets = [CLUB(D, D, hidden=H, logvar_bound=BOUND).double() for _ in range(R)]
    with torch.no_grad():   # a log-variance net past tanh's linear part, so the bound matters
        for q in nets:
            q.logvar[2].weight.mul_(8.0)
    state = {f"{k}{i}_{p}": torch.stack([getattr(getattr(q, net)[j], p).detach().T
                                         if p == "weight" else getattr(getattr(q, net)[j], p)
                                         .detach() for q in nets])
             for k, net in (("mu", "mu"), ("lv", "logvar")) for i, j in ((1, 0), (2, 2))
             for p in ("weight", "bias")}
    state = {k.replace("_weight", "_w").replace("_bias", "_b"): v for k, v in state.items()}
    g = torch.Generator().manual_seed(seed + 1)
    x_id = torch.randn(R, B, D, generator=g, dtype=torch.float64)
    x_age = torch.randn(R, B, D, generator=g, dtype=torch.float64) * 2 + 0.5 * x_id
    keep = torch.ones(R, B, dtype=torch.bool)
    keep[0, [1, 4]] = False
    keep[1, 8] = False
    wn = keep.double() / keep.sum(1, keepdim=True)
    return nets, Q.q_params_from(state), x_id, x_age, keep, wn


def test_penalty_value_and_gradients_equal_club_on_kept_rows() -> None:
    nets, p, x_id, x_age, keep, wn = _rounds()
    xi, xa = x_id.clone().requires_grad_(), x_age.clone().requires_grad_()
    with torch.no_grad():
        fw = Q.forward(p, xi, BOUND)
    got = Q.club_penalty(xi, xa, wn, fw, p)
    up = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    gi, ga = torch.autograd.grad((got * up).sum(), (xi, xa))
    for r, q in enumerate(nets):
        k = keep[r]
        a, y = x_id[r][k].clone().requires_grad_(), x_age[r][k].clone().requires_grad_()
        want = club_closed_form(*q(a), y)
        torch.testing.assert_close(got[r], want, rtol=1e-12, atol=1e-12)
        wa, wy = torch.autograd.grad(want * up[r], (a, y))
        torch.testing.assert_close(gi[r][k], wa, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ga[r][k], wy, rtol=1e-10, atol=1e-12)
        assert not gi[r][~k].any() and not ga[r][~k].any()   # left-out rows take no gradient


def test_penalty_of_a_round_without_rows_is_zero() -> None:
    _, p, x_id, x_age, _, wn = _rounds()
    wn[1] = 0.0
    xi, xa = x_id.clone().requires_grad_(), x_age.clone().requires_grad_()
    with torch.no_grad():
        fw = Q.forward(p, xi, BOUND)
    got = Q.club_penalty(xi, xa, wn, fw, p)
    gi, ga = torch.autograd.grad(got.sum(), (xi, xa))
    assert got[1] == 0 and not gi[1].any() and not ga[1].any()
    assert got[0] != 0


def test_likelihood_grads_equal_autograd_of_the_weighted_nll() -> None:
    """What q's step minimises per round: the mean over kept rows of -log q(x_age | x_id)
    (`CLUB.log_likelihood` up to its constant), through each round's own module."""
    nets, p, x_id, x_age, keep, wn = _rounds(seed=4)
    with torch.no_grad():
        got = Q.likelihood_grads(p, Q.forward(p, x_id, BOUND), x_id, x_age, wn)
    for r, q in enumerate(nets):
        k = keep[r]
        mu, logvar = q(x_id[r][k])
        nll = (0.5 * ((x_age[r][k] - mu).pow(2) * torch.exp(-logvar) + logvar)).sum(1).mean()
        params = [q.mu[0].weight, q.mu[0].bias, q.logvar[0].weight, q.logvar[0].bias,
                  q.mu[2].weight, q.mu[2].bias, q.logvar[2].weight, q.logvar[2].bias]
        g = torch.autograd.grad(nll, params)
        want = {"w1": torch.cat([g[0].T, g[2].T], 1), "b1": torch.cat([g[1], g[3]]),
                "mu2_w": g[4].T, "mu2_b": g[5], "lv2_w": g[6].T, "lv2_b": g[7]}
        for name, w in want.items():
            torch.testing.assert_close(got[name][r], w, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_is_the_modules_forward(dtype) -> None:
    nets, p, x_id, *_ = _rounds(seed=7)
    p = {k: v.to(dtype) for k, v in p.items()}
    fw = Q.forward(p, x_id.to(dtype), BOUND)
    for r, q in enumerate(nets):
        mu, logvar = q(x_id[r])
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
        torch.testing.assert_close(fw.mu[r].double(), mu.detach(), **tol)
        torch.testing.assert_close(fw.e[r].double(), torch.exp(-logvar).detach(), **tol)
        lv_slope = 1 - (logvar.detach() / BOUND) ** 2
        torch.testing.assert_close(fw.dth[r].double(), lv_slope, **tol)
