"""CLUB: closed form vs brute force, the estimator on correlated Gaussians, the lower bound."""

from __future__ import annotations

import math

import pytest
import torch

from mtmim_cli.models.club import CLUB, club_closed_form, gaussian_log_likelihood, train_q
from mtmim_cli.models.mi_bounds import SeparableCritic, infonce, infonce_blocked, mi_interval

D = 20


def brute_force_club(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1/N^2 sum_i sum_j [log q(y_i|x_i) - log q(y_j|x_i)] from an explicit N x N x d density."""
    q = torch.distributions.Normal(mu[:, None, :], torch.exp(0.5 * logvar)[:, None, :])
    logq = q.log_prob(y[None, :, :]).sum(-1)  # [i, j] = log q(y_j | x_i)
    n = len(y)
    return (logq.diagonal().sum() * n - logq.sum()) / n**2


@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (7, 5), (33, 64), (200, 17)])
def test_closed_form_equals_brute_force(n: int, d: int) -> None:
    g = torch.Generator().manual_seed(n * 100 + d)
    mu = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    mu.requires_grad_()
    got = club_closed_form(mu, logvar, y)
    want = brute_force_club(mu, logvar, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # gradients too: the encoder is trained through this expression
    g1 = torch.autograd.grad(got, (mu, y))
    g2 = torch.autograd.grad(want, (mu, y))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_module_estimate_and_likelihood_match_brute_force() -> None:
    torch.manual_seed(0)
    q = CLUB(12, 9, hidden=16).double()
    x, y = torch.randn(50, 12, dtype=torch.float64), torch.randn(50, 9, dtype=torch.float64)
    mu, logvar = q(x)
    torch.testing.assert_close(club_closed_form(mu, logvar, y), brute_force_club(mu, logvar, y))
    ll = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(y).sum(1).mean()
    torch.testing.assert_close(gaussian_log_likelihood(mu, logvar, y), ll)


def test_log_variance_is_bounded_and_smooth() -> None:
    q = CLUB(4, 4, hidden=8, logvar_bound=7.0)
    with torch.no_grad():
        q.logvar[2].bias.fill_(1e4)
        _, lv = q(torch.randn(5, 4))
    assert torch.all(lv <= 7.0) and torch.all(lv > 6.9)
    raw = torch.tensor([0.01, -0.5])
    assert torch.allclose(7.0 * torch.tanh(raw / 7.0), raw, atol=2e-3)  # identity near 0


def gaussians(mi: float, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    rho = math.sqrt(1 - math.exp(-2 * mi / D))
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, y, rho


@pytest.mark.parametrize("mi", [2.0, 4.0, 6.0])
def test_true_conditional_gives_analytic_club(mi: float) -> None:
    n = 20000
    x, y, rho = gaussians(mi, n, seed=int(mi))
    mu, logvar = rho * x, torch.full_like(x, math.log(1 - rho**2))
    est = float(club_closed_form(mu, logvar, y))
    analytic = D * rho**2 / (1 - rho**2)
    # sampling error from the per-sample terms (the shared mean/variance add O(1/N))
    per = 0.5 * ((y.var(0, unbiased=False) + (mu - y.mean(0)) ** 2 - (y - mu) ** 2) / (1 - rho**2)).sum(1)
    se = float(per.std()) / math.sqrt(n)
    print(f"MI {mi}: true-conditional CLUB {est:.4f}, analytic {analytic:.4f}, s.e. {se:.4f}")
    assert abs(est - analytic) < 4 * se + 2e-3, (est, analytic, se)
    assert 1.6 < analytic / mi < 2.8  # an upper bound, about twice the MI here


@pytest.mark.slow
def test_trained_q_lies_between_mi_and_analytic_club() -> None:
    torch.set_num_threads(1)
    estimates = []
    for mi in (2.0, 4.0, 6.0):
        x, y, rho = gaussians(mi, 20000, seed=10 + int(mi))
        x, y = x.float(), y.float()
        torch.manual_seed(0)
        q = CLUB(D, D, hidden=64)
        opt = torch.optim.Adam(q.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(1000):
            idx = torch.randint(0, len(x), (128,), generator=g)
            train_q(q, opt, x[idx], y[idx], steps=1)
        xt, yt, _ = gaussians(mi, 10000, seed=99)
        with torch.no_grad():
            est = float(q.mi_upper(xt.float(), yt.float()))
        analytic = D * rho**2 / (1 - rho**2)
        print(f"MI {mi}: trained-q CLUB {est:.3f}, analytic CLUB {analytic:.3f}")
        assert mi < est < 1.1 * analytic
        estimates.append(est)
    assert estimates[0] < estimates[1] < estimates[2]


def test_infonce_blocked_equals_direct_float64() -> None:
    torch.manual_seed(1)
    critic = SeparableCritic(5, 3, hidden=8, out=4).double()
    x, y = torch.randn(37, 5, dtype=torch.float64), torch.randn(37, 3, dtype=torch.float64)
    with torch.no_grad():
        s = critic(x, y)
    direct = sum(float(s[i, i]) - math.log(sum(math.exp(float(s[i, j])) for j in range(37)) / 37)
                 for i in range(37)) / 37
    assert infonce_blocked(critic, x, y, block=5) == pytest.approx(direct, rel=1e-10)
    assert float(infonce(s)) == pytest.approx(direct, rel=1e-10)


@pytest.mark.slow
def test_interval_brackets_true_mi() -> None:
    torch.set_num_threads(1)
    lows = []
    for mi in (2.0, 4.0, 6.0):
        x, y, rho = gaussians(mi, 3000, seed=20 + int(mi))
        lower, upper = mi_interval(x, y, steps=400, seed=0)
        analytic = D * rho**2 / (1 - rho**2)
        print(f"MI {mi}: interval [{lower:.3f}, {upper:.3f}], analytic CLUB {analytic:.3f}")
        assert 0.5 * mi < lower < mi < upper < 1.15 * analytic
        lows.append(lower)
    assert lows[0] < lows[1] < lows[2]


def test_interval_near_zero_for_independent_features() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1000, 6, generator=g), torch.randn(1000, 4, generator=g)
    lower, upper = mi_interval(x, y, steps=200, seed=0)
    assert -0.3 < lower < 0.1 and -0.3 < upper < 0.3
