"""MI as a metric: an interval [InfoNCE lower bound, CLUB upper bound] from fresh estimators.

CLUB alone over-states the MI (for correlated Gaussians with the true conditional it is
d rho^2 / (1 - rho^2), about twice -(d/2) log(1 - rho^2)), so the reported figure is an
interval. The lower bound is InfoNCE (van den Oord et al. 2018; Poole et al. 2019) with a
separable critic f(x, y) = g(x) . h(y):

    I >= mean_i [f(x_i, y_i) - log mean_j exp f(x_i, y_j)]

which can never exceed log M on M evaluation pairs (the interval says so by its cap).

Both estimators are trained from scratch on one half of the features and evaluated on the
other half, then the halves swap and the two evaluations are averaged (cross-fitting): an
estimator evaluated on the pairs it was fitted on can memorise them and report MI that is
not there. Each variable is standardised first (MI is invariant to invertible per-variable
maps, and unit scale suits the optimisers and CLUB's bounded log-variance).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from mtmim_cli.models.club import CLUB


class SeparableCritic(nn.Module):
    """f(x, y) = g(x) . h(y) with small MLPs g and h: all M x M scores from M + M forwards."""

    def __init__(self, dim_x: int, dim_y: int, hidden: int = 256, out: int = 64) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(dim_x, hidden), nn.ReLU(), nn.Linear(hidden, out))
        self.h = nn.Sequential(nn.Linear(dim_y, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.g(x) @ self.h(y).T


def infonce(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE bound from an (M, M) critic matrix whose diagonal holds the positive pairs."""
    m = scores.shape[0]
    return (scores.diagonal() - torch.logsumexp(scores, dim=1)).mean() + math.log(m)


@torch.no_grad()
def infonce_blocked(critic: SeparableCritic, x: torch.Tensor, y: torch.Tensor, block: int = 4096) -> float:
    """InfoNCE over all M x M pairs in row blocks (memory O(block * M))."""
    gx, hy = critic.g(x), critic.h(y)
    m = x.shape[0]
    total = 0.0
    for s in range(0, m, block):
        sc = gx[s:s + block] @ hy.T
        pos = (gx[s:s + block] * hy[s:s + block]).sum(dim=1)
        total += float((pos - torch.logsumexp(sc, dim=1)).sum())
    return total / m + math.log(m)


def _fit(model: nn.Module, objective, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int,
         lr: float, weight_decay: float, seed: int, check_every: int = 50) -> nn.Module:
    """Adam on minibatches of 80% of the rows, keeping the state with the best objective on
    the other 20% (early stopping: a few hundred rows of 128-d features are memorised fast)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_val = max(2, len(x) // 5)
    val, fit = perm[:n_val], perm[n_val:]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state = -math.inf, None
    for step in range(steps + 1):
        if step % check_every == 0 or step == steps:
            with torch.no_grad():
                v = float(objective(model, x[val], y[val]))
            if v > best:
                best, best_state = v, {k: t.clone() for k, t in model.state_dict().items()}
        if step == steps:
            break
        idx = fit[torch.randint(0, len(fit), (min(batch_size, len(fit)),), generator=gen)]
        opt.zero_grad(set_to_none=True)
        (-objective(model, x[idx], y[idx])).backward()
        opt.step()
    model.load_state_dict(best_state)
    return model.eval()


def fit_club(x: torch.Tensor, y: torch.Tensor, steps: int = 2000, batch_size: int = 256,
             hidden: int = 128, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0) -> CLUB:
    """A fresh q(y | x) fitted by maximum likelihood (early-stopped on held-out rows)."""
    torch.manual_seed(seed)
    q = CLUB(x.shape[1], y.shape[1], hidden=hidden)
    return _fit(q, lambda m, a, b: m.log_likelihood(a, b), x, y, steps, batch_size, lr,
                weight_decay, seed)


def fit_critic(x: torch.Tensor, y: torch.Tensor, steps: int = 2000, batch_size: int = 256,
               hidden: int = 256, lr: float = 5e-4, weight_decay: float = 1e-4,
               seed: int = 0) -> SeparableCritic:
    """A fresh separable critic trained to maximise InfoNCE (early-stopped on held-out rows)."""
    torch.manual_seed(seed)
    critic = SeparableCritic(x.shape[1], y.shape[1], hidden=hidden)
    return _fit(critic, lambda m, a, b: infonce(m(a, b)), x, y, steps, batch_size, lr,
                weight_decay, seed)


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-8)
    return [(t - mean) / std for t in (train, *others)]


def mi_interval(x_id: np.ndarray | torch.Tensor, x_age: np.ndarray | torch.Tensor, steps: int = 2000,
                batch_size: int = 256, seed: int = 0, cross_fit: bool = True) -> tuple[float, float]:
    """(InfoNCE lower bound, CLUB upper bound) on I(x_id; x_age), from fresh estimators.

    Features are split in two halves at random (seeded); estimators fitted on one half are
    evaluated on the other (and, with cross_fit, the other way round; the two are averaged).
    The lower bound is capped at log(half size). Needs at least 8 rows."""
    x = torch.as_tensor(np.asarray(x_id), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(x_age), dtype=torch.float32)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 8:
        raise ValueError(f"mi_interval needs two (N, d) arrays with N >= 8, got {tuple(x.shape)} and {tuple(y.shape)}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    half = len(x) // 2
    folds = [(perm[:half], perm[half:]), (perm[half:], perm[:half])]
    lowers, uppers = [], []
    for k, (fit_idx, eval_idx) in enumerate(folds[: 2 if cross_fit else 1]):
        xf, xe = _standardise(x[fit_idx], x[eval_idx])
        yf, ye = _standardise(y[fit_idx], y[eval_idx])
        q = fit_club(xf, yf, steps=steps, batch_size=batch_size, seed=seed + k)
        critic = fit_critic(xf, yf, steps=steps, batch_size=batch_size, seed=seed + k)
        with torch.no_grad():
            uppers.append(float(q.mi_upper(xe, ye)))
        lowers.append(infonce_blocked(critic, xe, ye))
    return float(np.mean(lowers)), float(np.mean(uppers))
