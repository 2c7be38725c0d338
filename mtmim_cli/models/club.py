"""CLUB (Cheng et al., ICML 2020): a variational upper bound on I(x_id; x_age).

q(x_age | x_id) = N(mu(x_id), diag exp(logvar(x_id))), mu and logvar small MLPs. On a batch
of N pairs the estimate is

    1/N^2 sum_i sum_j [log q(y_i | x_i) - log q(y_j | x_i)]

(positive pairs minus all pairs, j = i included). log-variances and 2*pi constants cancel,
and for a diagonal Gaussian the all-pairs mean has a closed form:

    mean_j (y_jk - mu_ik)^2 = Var_j(y_jk) + (mu_ik - mean_j y_jk)^2

so the estimate costs O(N*d) memory, never an N x N x d tensor. (The centred form avoids
the cancellation of mean(y^2) - 2 mu mean(y) + mu^2 in float32.)

Bounded log-variance (the documented choice): logvar = B * tanh(raw / B), default B = 7,
so the variance lies in [e^-7, e^7] (std 0.03 to 33) and equals the raw output near 0.
Unbounded, q can shrink a variance towards zero on a batch it fits, which sends log q to
+inf and the penalty's gradient (divided by the variance) to overflow. CLUB's reference code
uses tanh with B = 1 (variance 0.37 to 2.7), which assumes unit-scale data; face embeddings
and a freshly initialised factorization have per-coordinate scales from ~0.05 to ~10, so the
bound is widened and kept smooth (tanh) rather than clamped (a clamp has zero gradient).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)


def club_closed_form(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CLUB estimate from q's mean/log-variance at each x_i and the paired y_i (all (N, d))."""
    inv_var = torch.exp(-logvar)
    positive = (y - mu).pow(2)
    y_mean = y.mean(dim=0, keepdim=True)
    y_var = (y - y_mean).pow(2).mean(dim=0, keepdim=True)
    all_pairs = y_var + (mu - y_mean).pow(2)
    return 0.5 * ((all_pairs - positive) * inv_var).sum(dim=1).mean()


def gaussian_log_likelihood(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i log N(y_i; mu_i, diag exp(logvar_i)), the full density (constants included)."""
    ll = -0.5 * ((y - mu).pow(2) * torch.exp(-logvar) + logvar + _LOG_2PI)
    return ll.sum(dim=1).mean()


class CLUB(nn.Module):
    """The variational net q(x_age | x_id) and the CLUB estimate built on it."""

    def __init__(self, dim_id: int, dim_age: int, hidden: int = 512, logvar_bound: float = 7.0) -> None:
        super().__init__()
        self.logvar_bound = float(logvar_bound)
        self.mu = nn.Sequential(nn.Linear(dim_id, hidden), nn.ReLU(), nn.Linear(hidden, dim_age))
        self.logvar = nn.Sequential(nn.Linear(dim_id, hidden), nn.ReLU(), nn.Linear(hidden, dim_age))

    def forward(self, x_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q's mean and (bounded) log-variance at x_id."""
        b = self.logvar_bound
        return self.mu(x_id), b * torch.tanh(self.logvar(x_id) / b)

    def log_likelihood(self, x_id: torch.Tensor, x_age: torch.Tensor) -> torch.Tensor:
        """Mean log q(x_age_i | x_id_i): what q maximises (features detached by the caller)."""
        with torch.autocast(device_type=x_id.device.type, enabled=False):
            mu, logvar = self(x_id.float())
            return gaussian_log_likelihood(mu, logvar, x_age.float())

    def mi_upper(self, x_id: torch.Tensor, x_age: torch.Tensor) -> torch.Tensor:
        """The CLUB estimate on this batch, closed form, differentiable in x_id, x_age and q.

        Computed in float32 whatever the autocast dtype: the estimate is a difference of two
        large terms and bf16 loses it."""
        with torch.autocast(device_type=x_id.device.type, enabled=False):
            mu, logvar = self(x_id.float())
            return club_closed_form(mu, logvar, x_age.float())


def train_q(q: CLUB, optimizer: torch.optim.Optimizer, x_id: torch.Tensor, x_age: torch.Tensor,
            steps: int) -> float:
    """`steps` Adam steps of q on the log-likelihood of (detached) features; returns the last
    step's log-likelihood (measured before that step's update)."""
    return _likelihood_steps(q, optimizer, x_id, x_age.detach().float(), steps)


def _likelihood_steps(q: nn.Module, optimizer: torch.optim.Optimizer, x_id: torch.Tensor,
                      target: torch.Tensor, steps: int) -> float:
    """`steps` steps of q on log q(target | x_id), x_id detached; the last step's
    log-likelihood (measured before that step's update)."""
    x_id = x_id.detach().float()
    ll = float("nan")
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = -q.log_likelihood(x_id, target)
        loss.backward()
        optimizer.step()
        ll = -float(loss.detach())
    return ll


class AgeGroupQ(nn.Module):
    """q(g | x_id): a small MLP with a softmax over the K age groups, and two measures of how
    much x_id tells about the age group built on it (the `--mi-target` variants).

    Why: with the paper's deterministic factorization (x_age = FC(x), x_id = x - x_age),
    x_age is a function of x_id whenever I - W is invertible, so I(x_id; x_age) is unbounded
    and CLUB between them scores how well a Gaussian q tracks that map; the encoder can lower
    it (shrink x_age) without removing age from x_id. Measured against the age *group*
    instead, the information is finite (at most log K) and is what the penalty is for.

    - `mi_upper`: CLUB with the categorical q, 1/N^2 sum_i sum_j [log q(g_i|x_i) -
      log q(g_j|x_i)] = mean_i [log q(g_i|x_i) - sum_k p_k log q(k|x_i)], p the batch's group
      frequencies (closed form of the all-pairs term).
    - `lautum`: mean_i KL(p || q(.|x_i)) = mean_i sum_k p_k [log p_k - log q(k|x_i)]. With q the
      true posterior it is the lautum information L(x_id; g) (Palomar & Verdu 2008), zero
      exactly when x_id and g are independent. Minimising it pushes q's prediction towards
      the prior, where CLUB's first term also rewards pushing it towards a wrong group (an
      incentive to re-encode age rather than remove it).
    """

    def __init__(self, dim_id: int, groups: int, hidden: int = 512) -> None:
        super().__init__()
        self.groups = int(groups)
        self.net = nn.Sequential(nn.Linear(dim_id, hidden), nn.ReLU(), nn.Linear(hidden, groups))

    def log_probs(self, x_id: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_id.device.type, enabled=False):
            return torch.log_softmax(self.net(x_id.float()), dim=1)

    def log_likelihood(self, x_id: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Mean log q(g_i | x_i): what q maximises."""
        return self.log_probs(x_id).gather(1, groups[:, None]).mean()

    def _prior(self, groups: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(groups, minlength=self.groups).float()
        return counts / counts.sum().clamp_min(1.0)

    def mi_upper(self, x_id: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        lq = self.log_probs(x_id)
        p = self._prior(groups)
        return (lq.gather(1, groups[:, None]).squeeze(1) - lq @ p).mean()

    def lautum(self, x_id: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        lq = self.log_probs(x_id)
        p = self._prior(groups)
        return (torch.special.xlogy(p, p).sum() - lq @ p).mean()


def train_group_q(q: AgeGroupQ, optimizer: torch.optim.Optimizer, x_id: torch.Tensor,
                  groups: torch.Tensor, steps: int) -> float:
    """`steps` Adam steps of q on the log-likelihood of the (detached) features' groups."""
    return _likelihood_steps(q, optimizer, x_id, groups, steps)
