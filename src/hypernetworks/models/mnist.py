"""The paper's MNIST convnet: two 7x7 conv layers, the second one generated (N_z = 4).

    conv 7x7 1->16, ReLU, max-pool 2 -> conv 7x7 16->16, ReLU, max-pool 2 -> linear 784->10

``mnist-conv`` stores the second kernel (12,544 weights); ``mnist-hyper`` is
``hyperize(mnist-conv, layers="conv2", tile_size=16, embedding_size=4)``: the kernel is one
16x16x7x7 tile made by a KernelGenerator (4,240 weights) from one 4-number embedding, 4,244 in
all, as in the paper; it starts with the std of the plain layer's initialisation.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hypernetworks.models.registry import register_model
from hypernetworks.nn.hyperize import accept_hyperconv2d_state_dicts, hyperize


class MNISTConvNet(nn.Module):
    """Two-layer MNIST convnet (torch's default initialisation)."""

    def __init__(self, channels: int = 16, kernel_size: int = 7, num_classes: int = 10, in_channels: int = 1,
                 image_size: int = 28) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd ('same' padding), got {kernel_size}")
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x2 poolings), got {image_size}")
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size, padding=pad)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=pad)
        self.fc = nn.Linear(channels * (image_size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@register_model("mnist-conv")
def mnist_conv(**overrides) -> MNISTConvNet:
    return MNISTConvNet(**overrides)


@register_model("mnist-hyper")
def mnist_hyper(embedding_size: int = 4, **overrides) -> MNISTConvNet:
    """The second layer's whole kernel is one basic tile of the generator (channels x channels x f x f)."""
    net = MNISTConvNet(**overrides)
    model = hyperize(net, layers="conv2", tile_size=net.conv2.out_channels, embedding_size=embedding_size,
                     inplace=True)
    return accept_hyperconv2d_state_dicts(model)  # checkpoints of the earlier HyperConv2d-based model load too
