"""The feature factorization unit: x_age = FC(x), x_id = x - x_age, so x = x_id + x_age exactly."""

from __future__ import annotations

import math

import torch
from torch import nn


class FactorizationUnit(nn.Module):
    """Splits an embedding into an age part (a linear map of x) and the identity residual.

    The FC weight starts small (std ``init_gain / sqrt(dim)``, bias zero): x_age then holds
    about ``init_gain`` of x's per-coordinate scale, so fine-tuning starts from x_id ~ x, the
    pretrained identity features, instead of a randomly rotated copy of them (a default
    nn.Linear init would put ~58% of x's scale into x_age and wreck the pretrained model).
    """

    def __init__(self, dim: int, init_gain: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(dim, dim)
        nn.init.normal_(self.fc.weight, std=init_gain / math.sqrt(dim))
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_age = self.fc(x)
        return x - x_age, x_age
