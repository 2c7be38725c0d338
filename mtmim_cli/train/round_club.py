"""CLUB's variational net q, one per round, for the batched head re-fit (train/round_heads.py).

Round r's q_r(x_age | x_id) = N(mu_r(x_id), diag exp(lv_r(x_id))): mu and lv are MLPs
d -> h -> d with a relu, and lv = B tanh(raw / B) is bounded as in `models.club.CLUB`. Every
parameter carries a leading round axis. Both first layers read the same x_id, so they are
kept side by side as one (R, d, 2h) weight: one product instead of two, with the same values
column by column.

Mode mtmim needs q's forward on each encoder step's x_id twice: for the CLUB penalty (q held
fixed) and for q's first likelihood step right after it (q unchanged in between). `forward`
computes it once and both read it. The penalty's gradient and q's likelihood gradient are
written by hand (closed forms, checked against autograd in tests/test_round_club.py): q's
steps are most of mode mtmim's time, and autograd's graph through the (R, B, d) tensors
costs more passes over memory than the products themselves.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def q_params_from(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """q's parameters in the layout this module reads, from the separate (in, out) weights of
    the mu and lv nets (`mu1_w`, `mu1_b`, `mu2_*`, `lv1_w`, `lv1_b`, `lv2_*`): w1 (d, 2h) and
    b1 (2h), the first layers of mu and lv side by side (mu's h columns first); mu2_w, lv2_w
    (h, d) and mu2_b, lv2_b (d). Weights stay (in, out), the layout the batched products read
    without a copy; the round axis is added in front by the caller."""
    return {"w1": torch.cat([state["mu1_w"], state["lv1_w"]], dim=-1),
            "b1": torch.cat([state["mu1_b"], state["lv1_b"]], dim=-1),
            **{k: state[k] for k in ("mu2_w", "mu2_b", "lv2_w", "lv2_b")}}


_ONE = torch.tensor(1.0)


class QForward(NamedTuple):
    """q's forward on a batch: what the penalty and the likelihood step both read."""
    hid: Tensor   # (R, B, 2h) relu of the first layers (mu's h columns, then lv's)
    mu: Tensor    # (R, B, d) q's mean
    e: Tensor     # (R, B, d) exp(-lv)
    dth: Tensor   # (R, B, d) d lv / d raw = 1 - tanh(raw / bound)^2


def forward(p: dict[str, Tensor], x: Tensor, bound: float) -> QForward:
    """q's forward at x (R, B, d); no graph is kept (call it under torch.no_grad)."""
    h = p["mu2_w"].shape[1]
    hid = torch.baddbmm(p["b1"][:, None], x, p["w1"]).relu_()
    mu = torch.baddbmm(p["mu2_b"][:, None], hid[..., :h], p["mu2_w"])
    th = torch.baddbmm(p["lv2_b"][:, None], hid[..., h:], p["lv2_w"], beta=1.0 / bound,
                       alpha=1.0 / bound).tanh_()                 # lv = bound * th
    return QForward(hid, mu, (th * -bound).exp_(), torch.addcmul(_ONE, th, th, value=-1.0))


def _through_q(p: dict[str, Tensor], fw: QForward, d_mu: Tensor, d_raw: Tensor) -> Tensor:
    """The gradient at q's first layers' outputs (R, B, 2h) from those at mu and raw."""
    d_hid = torch.cat([torch.bmm(d_mu, p["mu2_w"].transpose(1, 2)),
                       torch.bmm(d_raw, p["lv2_w"].transpose(1, 2))], dim=2)
    return torch.ops.aten.threshold_backward(d_hid, fw.hid, 0.0)   # relu's gradient


class _ClubPenalty(torch.autograd.Function):
    """Each round's CLUB estimate over its weighted rows, q held fixed, with its gradient in
    x_id and x_age by hand. Per round, wn the row weights (summing to 1, or all 0), y = x_age,
    ybar = sum_b wn_b y_b, V = sum_b wn_b (y_b - ybar)^2, e = exp(-lv):

        club = 1/2 sum_b wn_b sum_k e_bk [V_k + (mu_bk - ybar_k)^2 - (y_bk - mu_bk)^2]

    (`models.club.club_closed_form` on the kept rows), and with E = sum_b wn_b e_b,
    F = sum_b wn_b e_b (mu_b - ybar):

        d/dmu_b  = wn_b e_b (y_b - ybar)
        d/dlv_b  = -1/2 wn_b e_b [V + (mu_b - ybar)^2 - (y_b - mu_b)^2]
        d/dy_b   = wn_b [E (y_b - ybar) - F - e_b (y_b - mu_b)]

    (the terms through ybar in V cancel: sum_b wn_b (y_b - ybar) = 0), then back through q's
    layers to x_id."""

    @staticmethod
    def forward(ctx, x_id: Tensor, x_age: Tensor, wn: Tensor, fw: QForward,
                p: dict[str, Tensor]) -> Tensor:
        y = x_age.detach()
        w3 = wn[:, None, :]                                       # (R, 1, B)
        ybar = torch.bmm(w3, y)                                   # (R, 1, d)
        yc = y - ybar
        var = torch.bmm(w3, yc * yc)
        md = fw.mu - ybar
        r = y - fw.mu
        # md^2 - r^2 = (md - r)(md + r) and md + r = yc
        t = (md - r).mul_(yc).add_(var).mul_(fw.e)               # e [V + md^2 - r^2]
        ctx.save_for_backward(wn, yc, md, r, t)
        ctx.fw, ctx.p = fw, p
        return 0.5 * torch.bmm(w3, t).sum(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor):
        wn, yc, md, r, t = ctx.saved_tensors
        fw, p = ctx.fw, ctx.p
        w3 = wn[:, None, :]
        big_e = torch.bmm(w3, fw.e)                               # E (R, 1, d)
        big_f = torch.bmm(w3, md.mul_(fw.e))                      # F
        g = (wn * grad[:, None])[..., None]                      # grad * wn_b (R, B, 1)
        d_mu = (yc * fw.e).mul_(g)
        d_raw = t.mul_(g * -0.5).mul_(fw.dth)
        d_x_id = torch.bmm(_through_q(p, fw, d_mu, d_raw), p["w1"].transpose(1, 2))
        d_y = torch.addcmul(big_f.neg_(), yc, big_e).sub_(r.mul_(fw.e)).mul_(g)
        return d_x_id, d_y, None, None, None


def club_penalty(x_id: Tensor, x_age: Tensor, wn: Tensor, fw: QForward,
                 p: dict[str, Tensor]) -> Tensor:
    """(R,) CLUB estimate of each round over the rows weighted wn (R, B) (each round's weights
    sum to 1, or are all 0), with q's forward `fw` at x_id; differentiable in x_id and x_age,
    q held fixed."""
    return _ClubPenalty.apply(x_id, x_age, wn, fw, p)


def likelihood_grads(p: dict[str, Tensor], fw: QForward, x: Tensor, y: Tensor, wn: Tensor
                     ) -> dict[str, Tensor]:
    """Gradients of each round's weighted negative log-likelihood of q (up to constants),
    sum_b wn[r, b] 1/2 sum_k [(y - mu)^2 exp(-lv) + lv], at q's forward `fw` on x:
    d/dmu = (mu - y) e wn and d/dlv = 1/2 wn (1 - (y - mu)^2 e)."""
    h = p["mu2_w"].shape[1]
    w3 = wn[..., None]
    rn = fw.mu - y
    d_mu = (rn * fw.e).mul_(w3)
    d_raw = torch.addcmul(0.5 * w3, rn, d_mu, value=-0.5).mul_(fw.dth)
    d_hid = _through_q(p, fw, d_mu, d_raw)
    return {"w1": torch.bmm(x.transpose(1, 2), d_hid), "b1": d_hid.sum(1),
            "mu2_w": torch.bmm(fw.hid[..., :h].transpose(1, 2), d_mu), "mu2_b": d_mu.sum(1),
            "lv2_w": torch.bmm(fw.hid[..., h:].transpose(1, 2), d_raw), "lv2_b": d_raw.sum(1)}
