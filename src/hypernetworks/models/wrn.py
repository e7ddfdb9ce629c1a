"""Wide ResNet 40-k (Zagoruyko and Komodakis, 2016) and the paper's Hyper WRN 40-k.

Pre-activation basic blocks, N = (depth - 4) / 6 per group, widths 16, 16k, 32k, 64k, 8x8 average
pool. The hyper version is ``hyperize`` of the plain one: all 3x3 convolutions of the residual
groups (36 for depth 40) are tiled from 16x16x3x3 basic kernels made by one KernelGenerator
(N_z = 64, d = N_z), each layer starting with the std of its plain (Kaiming) initialisation; the
stem conv, the 1x1 shortcuts, batch norms and the classifier stay ordinary. ``materialise(hyper)``
is a plain WideResNet whose state_dict loads into the plain twin.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hypernetworks.models.registry import register_model
from hypernetworks.nn.hyperize import accept_hyperconv2d_state_dicts, hyperize


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout:
            y = F.dropout(y, self.dropout, self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs (Kaiming fan-out initialisation of the convs)."""

    def __init__(self, depth: int = 40, width: int = 2, num_classes: int = 10, dropout: float = 0.0,
                 in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"depth must be 6N + 4 with N >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        groups, in_planes = [], widths[0]
        for g, stride in zip(range(3), (1, 2, 2)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_planes, widths[g + 1], stride if b == 0 else 1, dropout))
                in_planes = widths[g + 1]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _residual_3x3(name: str, module: nn.Module) -> bool:
    """The paper's generated layers: the 3x3 convs of the residual groups (not the stem, not shortcuts)."""
    return name.startswith("block") and isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)


def hyper_wide_resnet(depth: int = 40, width: int = 2, embedding_size: int = 64, base: int = 16,
                      init: str | float = "match", **overrides) -> WideResNet:
    """``hyperize`` of WideResNet(depth, width, **overrides): 3x3 residual convs from base x base x 3x3 tiles.
    ``init="generator"`` gives the earlier start (every layer at the std of one 16x16 tile's Kaiming
    init, e.g. 0.118 where a 128->128 layer's own is 0.042), kept for the comparison in docs/static.md."""
    model = hyperize(WideResNet(depth, width, **overrides), layers=_residual_3x3, tile_size=base,
                     embedding_size=embedding_size, init=init, inplace=True)
    return accept_hyperconv2d_state_dicts(model)  # checkpoints of the earlier HyperConv2d-based model load too


def _register(depth: int, width: int) -> None:
    @register_model(f"wrn-{depth}-{width}")
    def plain(**overrides) -> WideResNet:
        return WideResNet(**{"depth": depth, "width": width, **overrides})

    @register_model(f"hyper-wrn-{depth}-{width}")
    def hyper(**overrides) -> WideResNet:
        return hyper_wide_resnet(**{"depth": depth, "width": width, **overrides})


for _w in (1, 2):
    _register(40, _w)
