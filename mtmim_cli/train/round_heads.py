"""The paper's heads re-fitted for many leave-out rounds at once, on fixed encoder features.

FG-NET's protocol re-fits the model without the held-out image in each of its 1002 rounds.
With the encoder fixed, a round trains the factorization unit (x_age = W x + b,
x_id = x - x_age), the margin head on x_id and, by mode, the age-group head on x_age and the
CLUB penalty with its variational net q. Rounds differ only in which rows they leave out, so
all rounds of a chunk train together as one batched computation: every parameter carries a
leading round axis, every round sees the same minibatch of rows with its own held-out rows
masked out (weight 0), and Adam, being elementwise, updates each round's slice exactly as a
separate optimiser would. The result equals training each round on its own with the same
row order (tests/test_round_heads.py checks this against a plain per-round loop built from
the toolkit's own modules).

Every round starts from the same seeded initialisation (factorization, age head, q), except
for the class centres of the margin head, which start at the normalised mean of each class's
x_id over the round's own training rows (`centres="mean"`; a random start, `"random"`, is
what loses a pretrained model's accuracy: a loss of ~40 at step 0). Age groups are
equal-frequency bins of the round's training ages. The three modes use the same rounds,
seeds and row order, so their differences are the modes' alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtmim_cli.data.groups import equal_frequency_groups
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.margin import margin_target, margin_values
from mtmim_cli.models.margin_names import check_margin
from mtmim_cli.train import round_club as Q

MODES = ("baseline", "age", "mtmim")
# One fused kernel per Adam step instead of a dozen passes over each (R, ...) tensor; the
# update is the same elementwise formula.
_FUSED = {"fused": True}


@dataclass(frozen=True)
class RoundHeadConfig:
    """Settings of the per-round head fitting (the `--refit-options` of `--refit head`)."""
    mode: str = "mtmim"
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    margin: str = "arcface"
    s: float = 64.0
    m: float | None = None
    factorize_gain: float = 0.1
    centres: str = "mean"
    age_groups: int = 8
    lambda_age: float = 0.1
    lambda_mim: float = 1e-4
    q_hidden: int = 64
    q_steps: int = 5
    q_lr: float = 1e-5
    logvar_bound: float = 7.0

    def check(self) -> None:
        if self.mode not in MODES:
            raise MtmimError(f"refit mode {self.mode}: choose from {', '.join(MODES)}")
        check_margin(self.margin, "refit margin")
        if self.centres not in ("mean", "random"):
            raise MtmimError(f"refit centres {self.centres}: choose mean or random")
        for name in ("epochs", "q_steps"):
            if getattr(self, name) < 0:
                raise MtmimError(f"refit {name} {getattr(self, name)}: must be >= 0")
        if self.batch_size < 2 or self.lr <= 0 or self.q_lr <= 0:
            raise MtmimError("refit: batch_size must be >= 2 and lr, q_lr > 0")

    def margins(self) -> tuple[float, float, float]:
        m = margin_values(self.margin, self.m)
        return m["m1"], m["m2"], m["m3"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_options(cls, options: dict) -> RoundHeadConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise MtmimError(f"--refit-options: unknown option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        cfg = cls(**options)
        cfg.check()
        return cfg


@dataclass
class RoundMaps:
    """Each round's identity map: x_id = x @ A[r] + b[r] (the factorization's residual)."""
    A: Tensor     # (R, d, d)
    b: Tensor     # (R, d)
    last_loss: Tensor  # (R,) the last step's loss of each round


def _init_state(d: int, num_groups: int, cfg: RoundHeadConfig, seed: int) -> dict[str, Tensor]:
    """The seeded start shared by every round (the modules' own initialisations)."""
    from torch import nn

    from mtmim_cli.models.club import CLUB
    from mtmim_cli.models.factorize import FactorizationUnit

    torch.manual_seed(seed)
    fact = FactorizationUnit(d, init_gain=cfg.factorize_gain)
    age = nn.Linear(d, num_groups)
    q = CLUB(d, d, hidden=cfg.q_hidden, logvar_bound=cfg.logvar_bound)
    # Weights are kept as (in, out), the layout the batched products read without a copy.
    state = {"Wt": fact.fc.weight.T, "b": fact.fc.bias, "age_w": age.weight.T,
             "age_b": age.bias, "mu1_w": q.mu[0].weight.T, "mu1_b": q.mu[0].bias,
             "mu2_w": q.mu[2].weight.T, "mu2_b": q.mu[2].bias, "lv1_w": q.logvar[0].weight.T,
             "lv1_b": q.logvar[0].bias, "lv2_w": q.logvar[2].weight.T, "lv2_b": q.logvar[2].bias}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _stack(t: Tensor, r: int) -> Tensor:
    return t.expand(r, *t.shape).clone().requires_grad_(True)


def _linear(x: Tensor, wt: Tensor, b: Tensor) -> Tensor:
    """Per-round nn.Linear: x (R, B, i), wt (R, i, o) (the weight transposed), b (R, o)."""
    return torch.baddbmm(b[:, None], x, wt)


class _MarginCE(torch.autograd.Function):
    """Per-round weighted margin-softmax cross-entropy on x_id, forward and backward by hand.

    Same value and gradient as normalising x_id, taking cosines with the (normalised)
    centres, replacing the target cosine by `margin_target` (m1 = 1: cos(theta + m2) - m3),
    scaling by s and taking the weighted cross-entropy with autograd; done by hand, the
    (R, B, C) intermediates are written once and reused in place, which is most of the
    re-fit's time on a CPU."""

    @staticmethod
    def forward(ctx, x_id: Tensor, centres: Tensor, y: Tensor, w: Tensor, absent: Tensor | None,
                s: float, m2: float, m3: float) -> Tensor:
        inv_n = x_id.norm(dim=2, keepdim=True).clamp_min(1e-12).reciprocal_()
        u = x_id * inv_n
        cos = torch.bmm(u, centres.transpose(1, 2))                          # (R, B, C)
        yr = y.expand(cos.shape[0], -1)[..., None]
        t = cos.gather(2, yr).clamp_(-1.0, 1.0)
        theta_c = math.pi - m2
        sin = (1.0 - t * t).clamp_min_(0.0).sqrt_()
        inside = t * math.cos(m2) - sin * math.sin(m2)
        outside = t - math.cos(theta_c) - 1.0
        use_in = t >= math.cos(theta_c)
        target = torch.where(use_in, inside, outside) - m3
        logits = cos.mul_(s).scatter_(2, yr, target * s)
        if absent is not None:
            logits.masked_fill_(absent[:, None, :], -math.inf)
        lse = torch.logsumexp(logits, dim=2)                                 # (R, B)
        ce = lse - target.squeeze(2) * s
        ctx.save_for_backward(u, inv_n, centres, logits, lse, yr, w, t, sin, use_in)
        ctx.s, ctx.m2 = s, m2
        return (ce * w).sum(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, inv_n, centres, logits, lse, yr, w, t, sin, use_in = ctx.saved_tensors
        s, m2 = ctx.s, ctx.m2
        g = (grad[:, None] * w)[..., None]                                   # (R, B, 1)
        dl = logits.sub_(lse[..., None]).exp_().mul_(g)                      # softmax * g
        # d target / d cos_y: cos(m2) + t sin(m2) / sin(theta) inside, 1 outside
        slope = torch.where(use_in, math.cos(m2) + t * math.sin(m2) / sin.clamp_min(1e-12),
                            torch.ones_like(t))
        dl_y = (dl.gather(2, yr) - g) * slope
        dcos = dl.scatter_(2, yr, dl_y).mul_(s)
        du = torch.bmm(dcos, centres)
        d_centres = torch.bmm(dcos.transpose(1, 2), u)
        dx = (du - u * (u * du).sum(2, keepdim=True)).mul_(inv_n)
        return dx, d_centres, None, None, None, None, None, None


def _masked_mean(v: Tensor, w: Tensor) -> Tensor:
    return (v * w).sum(1) / w.sum(1).clamp_min(1.0)


def fit_rounds(views: Sequence[np.ndarray], labels: np.ndarray, ages: np.ndarray,
               held: Sequence[np.ndarray], cfg: RoundHeadConfig, seed: int = 0,
               on_step: Callable[[int, int], None] | None = None) -> RoundMaps:
    """Train the heads of every round in `held` together; returns each round's x_id map.

    `views`: V arrays (n, d) of encoder features of the same n images (e.g. image and mirror),
    each a training row of its image. `labels` (n,) identities, `ages` (n,) years (NaN
    unknown: no age loss). `held[r]`: the images round r leaves out (all their views).
    `on_step(done, total)` is called after each step (progress)."""
    cfg.check()
    from mtmim_cli.allocator import reuse_freed_memory

    reuse_freed_memory()   # each step frees and re-takes ~100 MB blocks: keep them mapped
    X = torch.as_tensor(np.concatenate([np.asarray(v, np.float32) for v in views]))
    n_img = len(labels)
    n_views = len(views)
    if X.shape[0] != n_img * n_views:
        raise MtmimError(f"refit: {len(views)} views of {X.shape[0] // max(1, n_views)} rows "
                         f"for {n_img} labels")
    d = X.shape[1]
    R = len(held)
    lab = np.unique(np.asarray(labels), return_inverse=True)[1].astype(np.int64)
    C = int(lab.max()) + 1 if len(lab) else 0
    Y = torch.from_numpy(np.tile(lab, n_views))
    ages = np.asarray(ages, np.float64)

    keep = np.ones((R, n_img), bool)
    for r, h in enumerate(held):
        keep[r, np.asarray(h, np.int64)] = False
    M = torch.from_numpy(np.tile(keep, (1, n_views))).float()              # (R, rows)
    present = torch.from_numpy(np.stack([np.bincount(lab[k], minlength=C) > 0 for k in keep]))
    groups = np.full((R, n_img), -1, np.int64)
    for r in range(R):
        a = ages[keep[r]]
        try:
            bnd = equal_frequency_groups(a, cfg.age_groups)
        except ValueError as exc:
            raise MtmimError(f"refit: age groups: {exc}") from None
        groups[r] = np.where(np.isfinite(ages), np.searchsorted(bnd, np.nan_to_num(ages),
                                                                side="right"), -1)
    G = torch.from_numpy(np.tile(groups, (1, n_views)))                    # (R, rows)

    init = _init_state(d, cfg.age_groups, cfg, seed)
    Wt, b = _stack(init["Wt"], R), _stack(init["b"], R)
    age_w, age_b = _stack(init["age_w"], R), _stack(init["age_b"], R)
    qp = {k: _stack(v, R) for k, v in Q.q_params_from(init).items()}
    with torch.no_grad():
        centres = _start_centres(X, Y, M, C, init["Wt"], init["b"], cfg, seed)
    centres.requires_grad_(True)
    m1, m2, m3 = cfg.margins()
    use_age = cfg.mode in ("age", "mtmim") and cfg.lambda_age > 0
    use_mim = cfg.mode == "mtmim" and cfg.lambda_mim > 0
    main = [Wt, b, centres] + ([age_w, age_b] if use_age else [])
    opt = torch.optim.Adam(main, lr=cfg.lr, weight_decay=cfg.weight_decay, **_FUSED)
    q_opt = torch.optim.Adam(list(qp.values()), lr=cfg.q_lr, **_FUSED) if use_mim else None

    gen = torch.Generator().manual_seed(seed)
    rows = X.shape[0]
    bs = min(cfg.batch_size, rows)
    steps_per_epoch = rows // bs
    total = cfg.epochs * steps_per_epoch
    absent = ~present                                                       # (R, C)
    absent_or_none = absent if bool(absent.any()) else None
    last = torch.full((R,), float("nan"))
    done = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(rows, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * bs:(s + 1) * bs]
            xb, yb, wb = X[idx], Y[idx], M[:, idx]
            x_age = torch.matmul(xb, Wt) + b[:, None]                       # (R, B, d)
            x_id = xb[None] - x_age
            wn = wb / wb.sum(1, keepdim=True).clamp_min(1.0)
            if m1 == 1.0:
                loss = _MarginCE.apply(x_id, F.normalize(centres, dim=2), yb, wn, absent_or_none,
                                       cfg.s, m2, m3)
            else:   # SphereFace's multiplicative margin: autograd through margin_target
                cos = torch.bmm(F.normalize(x_id, dim=2),
                                F.normalize(centres, dim=2).transpose(1, 2))
                yr = yb.expand(R, -1)[..., None]
                target = margin_target(cos.gather(2, yr), m1, m2, m3)
                logits = (cos.scatter(2, yr, target) * cfg.s).masked_fill(absent[:, None, :],
                                                                          -math.inf)
                l_id = F.cross_entropy(logits.reshape(-1, C), yr.reshape(-1),
                                       reduction="none").view(R, -1)
                loss = (l_id * wn).sum(1)
            if use_age:
                gb = G[:, idx]
                known = wb * (gb >= 0)
                l_age = F.cross_entropy(_linear(x_age, age_w, age_b).reshape(-1, cfg.age_groups),
                                        gb.clamp_min(0).reshape(-1), reduction="none").view(R, -1)
                loss = loss + cfg.lambda_age * _masked_mean(l_age, known)
            if use_mim:   # q is held fixed in the encoder step
                with torch.no_grad():
                    fw = Q.forward(qp, x_id.detach(), cfg.logvar_bound)
                loss = loss + cfg.lambda_mim * Q.club_penalty(x_id, x_age, wn, fw, qp)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()   # rounds are independent: the sum's gradient is each round's
            opt.step()
            if use_mim:
                xi, xa = x_id.detach(), x_age.detach()
                with torch.no_grad():
                    for k in range(cfg.q_steps):
                        if k:   # the first step reads the penalty's forward: q has not moved
                            fw = Q.forward(qp, xi, cfg.logvar_bound)
                        for name, t in Q.likelihood_grads(qp, fw, xi, xa, wn).items():
                            qp[name].grad = t
                        q_opt.step()
            last = loss.detach()
            done += 1
            if on_step is not None:
                on_step(done, total)
    if not bool(torch.isfinite(Wt).all() and torch.isfinite(b).all()):
        raise MtmimError("refit: the factorization became non-finite; lower lr")
    with torch.no_grad():
        eye = torch.eye(d).expand(R, d, d)
        return RoundMaps(A=(eye - Wt).detach(), b=(-b).detach(), last_loss=last)


def _start_centres(X: Tensor, Y: Tensor, M: Tensor, C: int, Wt0: Tensor, b0: Tensor,
                   cfg: RoundHeadConfig, seed: int) -> Tensor:
    """(R, C, d) class centres: each class's normalised mean x_id at the start over the
    round's training rows ("mean"), or the margin head's own random start ("random")."""
    R, d = M.shape[0], X.shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    rand = torch.randn(C, d, generator=g) * 0.01
    if cfg.centres == "random":
        return rand.expand(R, C, d).clone()
    u = F.normalize(X - (X @ Wt0 + b0), dim=1)                             # (rows, d)
    onehot = F.one_hot(Y, C).float()                                        # (rows, C)
    sums = torch.einsum("rn,nc,nd->rcd", M, onehot, u)
    empty = sums.norm(dim=2, keepdim=True) == 0
    return torch.where(empty, rand.expand(R, C, d), F.normalize(sums, dim=2))
