"""Batched per-round head fitting equals fitting each round on its own with the toolkit's
modules (FactorizationUnit, CombinedMarginHead, nn.Linear, CLUB), row order shared."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtmim_cli.data.groups import equal_frequency_groups
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.club import CLUB, club_closed_form, train_q
from mtmim_cli.models.factorize import FactorizationUnit
from mtmim_cli.models.margin import CombinedMarginHead
from mtmim_cli.train.round_heads import RoundHeadConfig, fit_rounds, masked_club


def _problem(n=36, d=8, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    centres = rng.normal(size=(classes, d)) * 2
    f = (centres[labels] + rng.normal(size=(n, d))).astype(np.float32)
    ff = (f + 0.1 * rng.normal(size=(n, d))).astype(np.float32)
    ages = rng.uniform(0, 60, n).round()
    return f, ff, labels, ages


def _reference_round(views, labels, ages, held, cfg: RoundHeadConfig, seed: int):
    """One round trained alone: the kept rows of each shared minibatch, plain modules."""
    X = torch.from_numpy(np.concatenate(views))
    n = len(labels)
    lab = np.unique(labels, return_inverse=True)[1]
    Y = torch.from_numpy(np.tile(lab, len(views)))
    keep_img = np.ones(n, bool)
    keep_img[held] = False
    keep = torch.from_numpy(np.tile(keep_img, len(views)))
    bnd = equal_frequency_groups(ages[keep_img], cfg.age_groups)
    G = torch.from_numpy(np.tile(np.searchsorted(bnd, ages, side="right"), len(views)))

    torch.manual_seed(seed)
    fact = FactorizationUnit(X.shape[1], init_gain=cfg.factorize_gain)
    age = nn.Linear(X.shape[1], cfg.age_groups)
    q = CLUB(X.shape[1], X.shape[1], hidden=cfg.q_hidden, logvar_bound=cfg.logvar_bound)
    head = CombinedMarginHead.preset(cfg.margin, X.shape[1], int(lab.max()) + 1, s=cfg.s,
                                     margin=cfg.m)
    with torch.no_grad():
        u = F.normalize(fact(X)[0], dim=1)
        for c in range(int(lab.max()) + 1):
            head.weight[c] = F.normalize(u[(Y == c) & keep].sum(0), dim=0)
    params = [fact.fc.weight, fact.fc.bias, head.weight]
    if cfg.mode != "baseline":
        params += [age.weight, age.bias]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    q_opt = torch.optim.Adam(q.parameters(), lr=cfg.q_lr)
    gen = torch.Generator().manual_seed(seed)
    rows = len(X)
    bs = min(cfg.batch_size, rows)
    for _ in range(cfg.epochs):
        perm = torch.randperm(rows, generator=gen)
        for s in range(rows // bs):
            idx = perm[s * bs:(s + 1) * bs]
            idx = idx[keep[idx]]
            x_id, x_age = fact(X[idx])
            loss = F.cross_entropy(head(x_id, Y[idx]), Y[idx])
            if cfg.mode != "baseline":
                loss = loss + cfg.lambda_age * F.cross_entropy(age(x_age), G[idx])
            if cfg.mode == "mtmim":
                for p in q.parameters():
                    p.requires_grad_(False)
                loss = loss + cfg.lambda_mim * q.mi_upper(x_id, x_age)
                for p in q.parameters():
                    p.requires_grad_(True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if cfg.mode == "mtmim":
                train_q(q, q_opt, x_id, x_age, cfg.q_steps)
    eye = torch.eye(X.shape[1])
    return (eye - fact.fc.weight.T).detach(), (-fact.fc.bias).detach()


@pytest.mark.parametrize("mode", ["baseline", "age", "mtmim"])
def test_batched_rounds_equal_separate_rounds(mode):
    f, ff, labels, ages = _problem()
    cfg = RoundHeadConfig(mode=mode, epochs=3, batch_size=16, lr=1e-2, age_groups=3,
                          lambda_mim=0.05, q_hidden=16, q_steps=2, q_lr=1e-3)
    held = [np.array([0]), np.array([17]), np.array([5, 30])]
    maps = fit_rounds([f, ff], labels, ages, held, cfg, seed=3)
    for r, h in enumerate(held):
        A, b = _reference_round([f, ff], labels, ages, h, cfg, seed=3)
        assert torch.allclose(maps.A[r], A, atol=2e-5), (mode, r, (maps.A[r] - A).abs().max())
        assert torch.allclose(maps.b[r], b, atol=2e-5)
    # training moved the maps away from their common start, and rounds differ
    assert (maps.A[0] - maps.A[1]).abs().max() > 1e-6


def test_masked_club_equals_closed_form_on_kept_rows():
    g = torch.Generator().manual_seed(0)
    mu, logvar, y = (torch.randn(2, 9, 5, generator=g) for _ in range(3))
    w = torch.ones(2, 9)
    w[0, [1, 4]] = 0
    w[1, 8] = 0
    got = masked_club(mu, logvar, y, w)
    for r in range(2):
        k = w[r] > 0
        assert torch.allclose(got[r], club_closed_form(mu[r][k], logvar[r][k], y[r][k]), atol=1e-6)


def test_unknown_option_is_one_clear_error():
    with pytest.raises(MtmimError, match="unknown option"):
        RoundHeadConfig.from_options({"epochz": 3})
    with pytest.raises(MtmimError, match="mode"):
        RoundHeadConfig.from_options({"mode": "nope"})


def test_a_round_never_sees_the_rows_it_leaves_out():
    """Changing the held-out image's features (and label's age) leaves its round's maps
    untouched, while the other rounds, which train on it, change."""
    f, ff, labels, ages = _problem()
    cfg = RoundHeadConfig(mode="mtmim", epochs=2, batch_size=16, lr=1e-2, age_groups=3,
                          lambda_mim=0.05, q_hidden=16, q_steps=1, q_lr=1e-3)
    held = [np.array([4]), np.array([9])]
    a = fit_rounds([f, ff], labels, ages, held, cfg, seed=1)
    f2, ff2, ages2 = f.copy(), ff.copy(), ages.copy()
    f2[4] += 5.0
    ff2[4] -= 5.0
    ages2[4] = 99.0
    b = fit_rounds([f2, ff2], labels, ages2, held, cfg, seed=1)
    assert torch.equal(a.A[0], b.A[0]) and torch.equal(a.b[0], b.b[0])
    assert not torch.equal(a.A[1], b.A[1])


@pytest.mark.parametrize("margin", [(0.35, 0.0), (0.0, 0.35), (0.5, 0.1)])
def test_hand_written_margin_loss_matches_autograd(margin):
    """_MarginCE's value and gradients equal autograd through F.normalize, margin_target and
    F.cross_entropy, including targets past theta_c (cos < cos(pi - m2)) and absent classes."""
    from mtmim_cli.models.margin import margin_target
    from mtmim_cli.train.round_heads import _MarginCE

    m2, m3 = margin
    g = torch.Generator().manual_seed(0)
    R, B, C, d = 3, 7, 5, 4
    x = torch.randn(R, B, d, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(R, C, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, C - 1, (B,), generator=g)
    with torch.no_grad():   # make row 0's target point away from x: past theta_c
        c[:, y[0]] = -x[:, 0] / x[:, 0].norm(dim=1, keepdim=True)
    c.requires_grad_(True)
    w = torch.rand(R, B, generator=g, dtype=torch.float64)
    absent = torch.zeros(R, C, dtype=torch.bool)
    absent[1, C - 1] = True
    s = 8.0

    def reference(x, c):
        cos = torch.bmm(F.normalize(x, dim=2), F.normalize(c, dim=2).transpose(1, 2))
        yr = y.expand(R, -1)[..., None]
        t = margin_target(cos.gather(2, yr), 1.0, m2, m3)
        logits = (cos.scatter(2, yr, t) * s).masked_fill(absent[:, None, :], -torch.inf)
        ce = F.cross_entropy(logits.reshape(-1, C), yr.reshape(-1), reduction="none").view(R, B)
        return (ce * w).sum(1)

    up = torch.randn(R, generator=g, dtype=torch.float64)
    ref = reference(x, c)
    gx, gc = torch.autograd.grad((ref * up).sum(), (x, c))
    got = _MarginCE.apply(x, F.normalize(c, dim=2), y, w, absent, s, m2, m3)
    hx, hc = torch.autograd.grad((got * up).sum(), (x, c))
    assert torch.allclose(got, ref, atol=1e-12)
    assert torch.allclose(hx, gx, atol=1e-10) and torch.allclose(hc, gc, atol=1e-10)
