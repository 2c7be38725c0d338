"""The paper's encoder: a ResNet-50 adapted to 112x112 faces with a 512-d FC output.

Adaptation (our decision; the paper gives none): a 3x3 stride-1 stem instead of the 7x7
stride-2 one, so a 112x112 face still reaches 7x7 after the max-pool and three stride-2 stages
(ImageNet's stem would leave 4x4); then global average pooling, FC 2048 -> d and BatchNorm1d,
the usual face-embedding output. The bottleneck stages are torchvision's.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet


class FaceResNet50(nn.Module):
    def __init__(self, num_features: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        body = ResNet(Bottleneck, [3, 4, 6, 3])
        body.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.stem = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            body.layer1, body.layer2, body.layer3, body.layer4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2048, num_features)
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        x = self.dropout(torch.flatten(self.pool(x), 1))
        return self.features(self.fc(x))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """forward() as named steps applied in order: stem, layer1 .. layer4, pool
        (flattened), fc (dropout + fc), features."""
        return [("stem", self.stem), ("layer1", self.layer1), ("layer2", self.layer2),
                ("layer3", self.layer3), ("layer4", self.layer4),
                ("pool", nn.Sequential(self.pool, nn.Flatten(1))),
                ("fc", nn.Sequential(self.dropout, self.fc)), ("features", self.features)]
