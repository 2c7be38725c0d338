"""Combined-margin head against a direct float64 computation of s*(cos(m1*theta+m2)-m3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtmim_cli.models.margin import MARGIN_PRESETS, CombinedMarginHead, margin_target

SETTINGS = [(1.0, 0.35, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.35, 0.0, 0.0), (1.0, 0.3, 0.2),
            (1.2, 0.2, 0.1)]


def reference_logits(x: np.ndarray, w: np.ndarray, labels: np.ndarray, s: float, m1: float,
                     m2: float, m3: float) -> np.ndarray:
    """float64, straight from the definition (angles via arccos)."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = np.clip(xn @ wn.T, -1, 1)
    out = s * cos
    for r, y in enumerate(labels):
        theta = math.acos(cos[r, y])
        out[r, y] = s * (math.cos(m1 * theta + m2) - m3)
    return out


@pytest.mark.parametrize("m1,m2,m3", SETTINGS)
def test_matches_float64_formula(m1: float, m2: float, m3: float) -> None:
    torch.manual_seed(0)
    head = CombinedMarginHead(16, 10, s=64.0, m1=m1, m2=m2, m3=m3)
    x = torch.randn(64, 16)
    labels = torch.randint(0, 10, (64,))
    # Pull some embeddings towards their class so small and large angles both occur.
    x[:32] = x[:32] * 0.3 + head.weight.detach()[labels[:32]] * 100
    ref = reference_logits(x.double().numpy(), head.weight.detach().double().numpy(),
                           labels.numpy(), 64.0, m1, m2, m3)
    with torch.no_grad():
        got = head(x, labels).double().numpy()
    # Only rows whose margined angle stays within [0, pi] follow the plain formula.
    xn = torch.nn.functional.normalize(x.double())
    wn = torch.nn.functional.normalize(head.weight.detach().double())
    theta = torch.acos((xn * wn[labels]).sum(1).clamp(-1, 1)).numpy()
    inside = m1 * theta + m2 <= math.pi
    assert inside.sum() >= 60
    np.testing.assert_allclose(got[inside], ref[inside], atol=2e-4 * 64)


@pytest.mark.parametrize("m1,m2,m3", SETTINGS)
def test_continuation_past_pi_is_monotone_and_a_penalty(m1: float, m2: float, m3: float) -> None:
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    t = margin_target(torch.cos(theta), m1, m2, m3)
    assert torch.all(t[1:] <= t[:-1] + 1e-12), "target logit must fall as the angle grows"
    assert torch.all(t <= torch.cos(theta) + 1e-12), "the margin must never reward"
    assert torch.max(torch.abs(t[1:] - t[:-1])) < 1e-3, "continuous (no jump at theta_c)"
    theta_c = (math.pi - m2) / m1
    if theta_c < math.pi:
        assert abs(float(margin_target(torch.tensor(math.cos(theta_c), dtype=torch.float64),
                                       m1, m2, m3)) - (-1 - m3)) < 1e-9


def test_gradients_finite_at_cos_plus_minus_one() -> None:
    for preset in MARGIN_PRESETS:
        head = CombinedMarginHead.preset(preset, 8, 3)
        w = head.weight.detach()
        x = torch.stack([w[0], -w[1], w[2] * 5]).clone().requires_grad_(True)
        logits = head(x, torch.tensor([0, 1, 2]))
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
        assert torch.isfinite(logits).all() and torch.isfinite(x.grad).all(), preset
        assert torch.isfinite(head.weight.grad).all(), preset


def test_non_target_logits_are_scaled_cosines_and_float32_under_autocast() -> None:
    head = CombinedMarginHead(8, 5, s=30.0)
    x = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, cos = head.logits_and_cosine(x, labels)
    assert logits.dtype == torch.float32
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[torch.arange(4), labels] = False
    assert torch.allclose(logits[mask], 30.0 * cos[mask])


def test_presets() -> None:
    h = CombinedMarginHead.preset("arcface", 4, 2)
    assert (h.s, h.m1, h.m2, h.m3) == (64.0, 1.0, 0.35, 0.0)
    h = CombinedMarginHead.preset("cosface", 4, 2, margin=0.4)
    assert (h.m1, h.m2, h.m3) == (1.0, 0.0, 0.4)
    assert CombinedMarginHead.preset("sphereface", 4, 2).m1 > 1
