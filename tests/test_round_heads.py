"""Batched per-round head fitting equals fitting each round on its own with the toolkit's
modules (FactorizationUnit, CombinedMarginHead, nn.Linear, CLUB), row order shared."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtmim_cli.data.groups import equal_frequency_groups
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.club import CLUB, train_q
from mtmim_cli.models.factorize import FactorizationUnit
from mtmim_cli.models.margin import CombinedMarginHead
from mtmim_cli.train.round_heads import RoundHeadConfig, fit_rounds


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


def _previous_mtmim_rounds(views, labels, ages, held, cfg: RoundHeadConfig, seed: int):
    """Mode mtmim as `fit_rounds` computed it before its q path was rewritten
    (train/round_club.py): separate mu and lv nets, the CLUB penalty through autograd over
    `masked_club`, and each of the q steps recomputing q's forward."""
    from mtmim_cli.train import round_heads as H

    def linear(x, wt, b):
        return torch.baddbmm(b[:, None], x, wt)

    def q_forward(p, x):
        mu = linear(torch.relu(linear(x, p["mu1_w"], p["mu1_b"])), p["mu2_w"], p["mu2_b"])
        raw = linear(torch.relu(linear(x, p["lv1_w"], p["lv1_b"])), p["lv2_w"], p["lv2_b"])
        return mu, cfg.logvar_bound * torch.tanh(raw / cfg.logvar_bound)

    def masked_club(mu, logvar, y, w):
        n = w.sum(1).clamp_min(1.0)
        wn = (w / n[:, None])[..., None]
        y_mean = (y * wn).sum(1, keepdim=True)
        y_var = ((y - y_mean).pow(2) * wn).sum(1, keepdim=True)
        all_pairs = y_var + (mu - y_mean).pow(2)
        per_row = 0.5 * ((all_pairs - (y - mu).pow(2)) * torch.exp(-logvar)).sum(2)
        return (per_row * w).sum(1) / n

    X = torch.from_numpy(np.concatenate(views))
    n_img, R, d = len(labels), len(held), X.shape[1]
    lab = np.unique(labels, return_inverse=True)[1]
    C = int(lab.max()) + 1
    Y = torch.from_numpy(np.tile(lab, len(views)))
    keep = np.ones((R, n_img), bool)
    for r, h in enumerate(held):
        keep[r, h] = False
    M = torch.from_numpy(np.tile(keep, (1, len(views)))).float()
    G = torch.from_numpy(np.tile(np.stack([np.searchsorted(
        equal_frequency_groups(ages[k], cfg.age_groups), ages, side="right") for k in keep]),
        (1, len(views))))
    init = H._init_state(d, cfg.age_groups, cfg, seed)
    Wt, b, age_w, age_b = (H._stack(init[k], R) for k in ("Wt", "b", "age_w", "age_b"))
    qp = {k: H._stack(v, R) for k, v in init.items() if k[:2] in ("mu", "lv")}
    with torch.no_grad():
        centres = H._start_centres(X, Y, M, C, init["Wt"], init["b"], cfg, seed)
    centres.requires_grad_(True)
    _, m2, m3 = cfg.margins()
    opt = torch.optim.Adam([Wt, b, centres, age_w, age_b], lr=cfg.lr, fused=True)
    q_opt = torch.optim.Adam(list(qp.values()), lr=cfg.q_lr, fused=True)
    gen = torch.Generator().manual_seed(seed)
    bs = min(cfg.batch_size, len(X))
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(X), generator=gen)
        for s in range(len(X) // bs):
            idx = perm[s * bs:(s + 1) * bs]
            xb, yb, wb, gb = X[idx], Y[idx], M[:, idx], G[:, idx]
            x_age = torch.matmul(xb, Wt) + b[:, None]
            x_id = xb[None] - x_age
            wn = wb / wb.sum(1, keepdim=True).clamp_min(1.0)
            loss = H._MarginCE.apply(x_id, F.normalize(centres, dim=2), yb, wn, None, cfg.s,
                                     m2, m3)
            l_age = F.cross_entropy(linear(x_age, age_w, age_b).reshape(-1, cfg.age_groups),
                                    gb.reshape(-1), reduction="none").view(R, -1)
            loss = loss + cfg.lambda_age * (l_age * wb).sum(1) / wb.sum(1).clamp_min(1.0)
            mu, logvar = q_forward({k: v.detach() for k, v in qp.items()}, x_id)
            loss = loss + cfg.lambda_mim * masked_club(mu, logvar, x_age, wb)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            xi, xa = x_id.detach(), x_age.detach()
            for _ in range(cfg.q_steps):
                mu, logvar = q_forward(qp, xi)
                nll = (wn[..., None] * 0.5 * ((xa - mu).pow(2) * torch.exp(-logvar) + logvar)).sum()
                q_opt.zero_grad()
                nll.backward()
                q_opt.step()
    return torch.eye(d) - Wt.detach(), -b.detach(), loss.detach()


def test_mtmim_equals_the_previous_algorithm():
    """The rewritten q path (the penalty's and q's gradients by hand, q's forward shared by
    the penalty and the first q step, mu's and lv's first layers side by side) trains the
    same rounds as before. Not to the bit: the hand-written gradients sum in another order
    than autograd did, so the maps agree to float32 rounding, far inside the distance the
    MI penalty itself moves them (mode mtmim against mode age)."""
    f, ff, labels, ages = _problem()
    cfg = RoundHeadConfig(mode="mtmim", epochs=3, batch_size=16, lr=1e-2, age_groups=3,
                          lambda_mim=0.05, q_hidden=16, q_steps=3, q_lr=1e-3)
    held = [np.array([0]), np.array([17]), np.array([5, 30])]
    got = fit_rounds([f, ff], labels, ages, held, cfg, seed=3)
    A, b, loss = _previous_mtmim_rounds([f, ff], labels, ages, held, cfg, seed=3)
    gap = (got.A - A).abs().max()
    assert gap < 2e-6, gap
    assert (got.b - b).abs().max() < 2e-6
    assert torch.allclose(got.last_loss, loss, rtol=1e-5)
    age = fit_rounds([f, ff], labels, ages, held, replace(cfg, mode="age"), seed=3)
    assert (age.A - A).abs().max() > 1000 * gap   # the penalty's own effect, for scale
