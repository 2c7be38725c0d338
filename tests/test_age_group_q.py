"""The age-group variants of the MI penalty against direct computations."""

from __future__ import annotations

import math

import torch

from mtmim_cli.models.club import AgeGroupQ, train_group_q


def _q(seed=0, d=6, k=4):
    torch.manual_seed(seed)
    return AgeGroupQ(d, k, hidden=16)


def test_club_equals_the_all_pairs_average():
    q = _q()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 6, generator=g)
    groups = torch.tensor([0, 1, 1, 3, 0, 2, 2, 2, 1, 0, 3])
    lq = q.log_probs(x)
    lq = lq.detach()
    brute = sum(float(lq[i, groups[i]] - lq[i, groups[j]]) for i in range(11) for j in range(11)) / 121
    assert math.isclose(float(q.mi_upper(x, groups).detach()), brute, rel_tol=1e-6, abs_tol=1e-6)


def test_lautum_is_the_mean_kl_from_the_prior_and_zero_when_q_ignores_x():
    q = _q()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 6, generator=g)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    p = torch.bincount(groups, minlength=4).float() / 9
    lq = q.log_probs(x).detach()
    direct = sum(float((p * (p.log() - lq[i])).sum()) for i in range(9)) / 9
    assert math.isclose(float(q.lautum(x, groups).detach()), direct, rel_tol=1e-6)
    with torch.no_grad():   # a q whose output is the prior whatever x is
        q.net[2].weight.zero_()
        q.net[2].bias.copy_(p.log())
        assert abs(float(q.lautum(x, groups))) < 1e-6
        assert abs(float(q.mi_upper(x, groups))) < 1e-6


def test_a_fitted_q_reads_a_planted_group_and_its_measures_fall_when_it_is_removed():
    """x carries the group in one direction: a q fitted on half the rows reads it on the other
    half (both measures well above 0); with that direction removed it finds nothing there
    (both near 0)."""
    g = torch.Generator().manual_seed(3)
    groups = torch.randint(0, 4, (2048,), generator=g)
    noise = torch.randn(2048, 6, generator=g)
    planted = noise.clone()
    planted[:, 0] += 3.0 * groups.float()
    out = {}
    for name, x in (("planted", planted), ("removed", noise)):
        q = _q(seed=4)
        opt = torch.optim.Adam(q.parameters(), lr=1e-2)
        train_group_q(q, opt, x[:1024], groups[:1024], steps=100)
        with torch.no_grad():
            out[name] = (float(q.mi_upper(x[1024:], groups[1024:])),
                         float(q.lautum(x[1024:], groups[1024:])))
    assert out["planted"][0] > 1.0 and out["planted"][1] > 1.0
    assert out["removed"][0] < 0.15 and out["removed"][1] < 0.15
