"""ResNets of the experiments: the 6n+2 CIFAR family and ResNet-18 with a width parameter.

Both are built from torchvision's ``BasicBlock``; only the stems and stage widths differ from
torchvision's ``ResNet`` (whose ``BasicBlock`` path accepts base width 64 only).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock


class ResNet(nn.Module):
    """A ResNet of ``BasicBlock`` stages after a given stem, ending in global average pooling and a linear classifier.

    Each stage starts with a block of the given stride; a block that changes width or stride gets a
    1x1 convolution + batch norm shortcut.
    """

    def __init__(
        self,
        stem: nn.Module,
        stem_channels: int,
        widths: Sequence[int],
        blocks_per_stage: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = stem
        stages: List[nn.Module] = []
        channels = stem_channels
        for width, n_blocks, stride in zip(widths, blocks_per_stage, strides):
            blocks = []
            for index in range(n_blocks):
                block_stride = stride if index == 0 else 1
                shortcut = None
                if block_stride != 1 or channels != width:
                    shortcut = nn.Sequential(
                        nn.Conv2d(channels, width, 1, stride=block_stride, bias=False),
                        nn.BatchNorm2d(width),
                    )
                blocks.append(BasicBlock(channels, width, block_stride, shortcut))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_cifar(n: int = 3, width: int = 16, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """Return the 6n+2-layer CIFAR ResNet (n=3 is ResNet-20) with stage widths ``width, 2*width, 4*width``."""
    if n < 1 or width < 1:
        raise ValueError(f"resnet_cifar needs n >= 1 and width >= 1, got n={n}, width={width}")
    stem = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    )
    return ResNet(stem, width, (width, 2 * width, 4 * width), (n, n, n), (1, 2, 2), num_classes)


def resnet18(width: int = 64, num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """Return ResNet-18 with stage widths ``width, 2*width, 4*width, 8*width`` (torchvision's is ``width=64``)."""
    if width < 1:
        raise ValueError(f"resnet18 needs width >= 1, got {width}")
    stem = nn.Sequential(
        nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    return ResNet(stem, width, (width, 2 * width, 4 * width, 8 * width), (2, 2, 2, 2), (1, 2, 2, 2), num_classes)
