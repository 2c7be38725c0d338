"""A small CNN (about 0.1M parameters) for tests and the synthetic demo, where a real encoder
would make a CPU run take minutes. Same contract as the real encoders; not for real faces."""

from __future__ import annotations

import torch
from torch import nn


def _stage(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, 2, 1, bias=False), nn.BatchNorm2d(oup), nn.PReLU(oup))


class TinyNet(nn.Module):
    def __init__(self, num_features: int = 64) -> None:
        super().__init__()
        # 112 -> 56 -> 28 -> 14 -> 7 (width 96 -> 6), then a pooled FC.
        self.body = nn.Sequential(_stage(3, 16), _stage(16, 32), _stage(32, 48), _stage(48, 64))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_features)
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.pool(self.body(x)), 1)))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """forward() as named steps applied in order: body.0 .. body.3, pool (flattened),
        fc, features."""
        return [*[(f"body.{i}", m) for i, m in enumerate(self.body)],
                ("pool", nn.Sequential(self.pool, nn.Flatten(1))), ("fc", self.fc),
                ("features", self.features)]
