"""The combined-margin softmax head: target logit s * (cos(m1*theta + m2) - m3), other logits
s * cos(theta_j), with theta the angle between the L2-normalised embedding and class weight.

m1 > 1 is SphereFace's multiplicative margin, m2 ArcFace's additive angle, m3 CosFace's
additive cosine margin. Past the point where m1*theta + m2 reaches pi, cos() turns back up and
would reward a worse angle; there the target logit continues as cos(theta) - cos(theta_c) - 1
- m3 (theta_c the angle where the margined angle hits pi): continuous, decreasing, and
never above the margin-free logit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtmim_cli.models.margin_names import MARGIN_KEY, MARGIN_PRESETS, check_margin


def margin_target(cos: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """cos(m1*theta + m2) - m3 for cos = cos(theta), with the monotone continuation past pi."""
    cos = cos.clamp(-1.0, 1.0)
    theta_c = (math.pi - m2) / m1
    if m1 == 1.0:
        # Expand cos(theta + m2) so no acos is needed (acos has an infinite slope at +-1).
        sin = torch.sqrt((1.0 - cos * cos).clamp_min(0.0))
        inside = cos * math.cos(m2) - sin * math.sin(m2)
    else:
        theta = torch.acos(cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        inside = torch.cos(m1 * theta + m2)
    if theta_c >= math.pi:
        return inside - m3
    outside = cos - math.cos(theta_c) - 1.0
    return torch.where(cos >= math.cos(theta_c), inside, outside) - m3


def margin_values(name: str, margin: float | None = None) -> dict[str, float]:
    """m1, m2, m3 of a preset ('arcface' | 'cosface' | 'sphereface'); `margin` overrides the
    preset's own margin."""
    m = dict(MARGIN_PRESETS[check_margin(name)])
    if margin is not None:
        m[MARGIN_KEY[name]] = float(margin)
    return m


class CombinedMarginHead(nn.Module):
    """Class weights (num_classes, d) and the margin; `forward(embeddings, labels) -> logits`.

    Logits are float32 even under autocast (the margin arithmetic needs the precision).
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.35, m3: float = 0.0) -> None:
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    @classmethod
    def preset(cls, name: str, embedding_size: int, num_classes: int, s: float = 64.0,
               margin: float | None = None) -> CombinedMarginHead:
        """'arcface' | 'cosface' | 'sphereface'; `margin` overrides that preset's margin."""
        return cls(embedding_size, num_classes, s=s, **margin_values(name, margin))

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.logits_and_cosine(embeddings, labels)[0]

    def logits_and_cosine(self, embeddings: torch.Tensor,
                          labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Margined logits for the loss, and the plain cosines (for accuracy)."""
        with torch.autocast(embeddings.device.type, enabled=False):
            cos = self.cosine(embeddings)
            rows = torch.arange(len(labels), device=cos.device)
            target = margin_target(cos[rows, labels], self.m1, self.m2, self.m3)
            logits = cos.scatter(1, labels[:, None], target[:, None]) * self.s
        return logits, cos

    def loss_and_accuracy(self, embeddings: torch.Tensor,
                          labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean margin cross-entropy of the batch, and its (detached) top-1 accuracy."""
        logits, cos = self.logits_and_cosine(embeddings, labels)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (cos.argmax(1) == labels).float().mean()
        return loss, accuracy

    def extra_repr(self) -> str:
        n, d = self.weight.shape
        return f"d={d}, classes={n}, s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"
