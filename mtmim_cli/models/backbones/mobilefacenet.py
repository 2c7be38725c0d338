"""MobileFaceNet (Chen et al. 2018) with the module names of the shared
`mobilefacenet-casia-arcface.ckpt` (conv1, dw_conv1, blocks.N.conv.K, conv2, linear7, linear1),
so that checkpoint loads strictly.

Input (B, 3, 112, 96): the 112x112 template crop with 8 columns cut on each side. The global
depthwise conv `linear7` spans the final 7x6 map, so the width is part of the architecture.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 1.
BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class ConvBlock(nn.Module):
    def __init__(self, inp: int, oup: int, k: int | tuple[int, int], s: int, p: int,
                 dw: bool = False, linear: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(inp, oup, k, s, p, groups=inp if dw else 1, bias=False)
        self.bn = nn.BatchNorm2d(oup)
        self.prelu = None if linear else nn.PReLU(oup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise (stride), 1x1 linear projection."""

    def __init__(self, inp: int, oup: int, stride: int, expansion: int) -> None:
        super().__init__()
        self.connect = stride == 1 and inp == oup
        mid = inp * expansion
        self.conv = nn.Sequential(
            nn.Conv2d(inp, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.PReLU(mid),
            nn.Conv2d(mid, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.connect else self.conv(x)


class MobileFaceNet(nn.Module):
    def __init__(self, num_features: int = 128) -> None:
        super().__init__()
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.dw_conv1 = ConvBlock(64, 64, 3, 1, 1, dw=True)
        blocks, inp = [], 64
        for t, c, n, s in BOTTLENECKS:
            for i in range(n):
                blocks.append(Bottleneck(inp, c, s if i == 0 else 1, t))
                inp = c
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = ConvBlock(128, 512, 1, 1, 0)
        self.linear7 = ConvBlock(512, 512, (7, 6), 1, 0, dw=True, linear=True)
        self.linear1 = ConvBlock(512, num_features, 1, 1, 0, linear=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A 112-wide crop would pass silently: linear7 then spans two overlapping 7x6 windows
        # and the features come out twice as long and wrong.
        if tuple(x.shape[-2:]) != (112, 96):
            raise ValueError(f"MobileFaceNet takes 112x96 crops, got {tuple(x.shape[-2:])}")
        x = self.blocks(self.dw_conv1(self.conv1(x)))
        x = self.linear1(self.linear7(self.conv2(x)))
        return torch.flatten(x, 1)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """forward() as named steps applied in order (for freezing a trunk and caching its
        output): conv1, dw_conv1, blocks.0 .. blocks.14, conv2, linear7, linear1."""
        return [("conv1", self.conv1), ("dw_conv1", self.dw_conv1),
                *[(f"blocks.{i}", b) for i, b in enumerate(self.blocks)],
                ("conv2", self.conv2), ("linear7", self.linear7),
                ("linear1", nn.Sequential(self.linear1, nn.Flatten(1)))]
