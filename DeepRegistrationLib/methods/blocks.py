"""Network building blocks every method shares: convolution blocks and a 3-D U-Net.

Kept small and plain (voxelmorph-style) so each method file shows only what its paper adds.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn


NEGATIVE_SLOPE = 0.2


def variance_preserving_(layer: nn.Module) -> nn.Module:
    """He initialisation for a convolution followed by LeakyReLU(0.2), biases zero.

    torch's default (uniform, a = sqrt(5)) shrinks the activations about threefold per layer:
    through the U-Net the bottleneck's spatial variation was 30x smaller than the input's and the
    field head saw almost constant features. Keeping the variance per layer lets the pair's
    content reach the head from the first step; measured on MNI152 pairs (batch 8, 8 mm), the
    ground-truth error fell 13% in 100 steps against 8% with the default initialisation.
    """
    gain = nn.init.calculate_gain("leaky_relu", NEGATIVE_SLOPE)
    taps = math.prod(layer.kernel_size)
    if isinstance(layer, (nn.ConvTranspose2d, nn.ConvTranspose3d)):  # kernel / stride^d taps
        fan_in = layer.in_channels * taps / math.prod(layer.stride)
    else:
        fan_in = layer.in_channels // layer.groups * taps
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class ConvBlock(nn.Sequential):
    """3x3x3 convolution (stride 1 or 2) followed by LeakyReLU(0.2), He-initialised."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        convolution = nn.Conv3d(in_channels, out_channels, 3, stride, 1)
        super().__init__(variance_preserving_(convolution), nn.LeakyReLU(NEGATIVE_SLOPE))


class UpBlock(nn.Sequential):
    """Transposed 4x4x4 convolution doubling the resolution, then LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int):
        upsample = nn.ConvTranspose3d(in_channels, out_channels, 4, 2, 1)
        super().__init__(variance_preserving_(upsample), nn.LeakyReLU(NEGATIVE_SLOPE))


class UNet(nn.Module):
    """Encoder of stride-2 convolutions, decoder of transposed convolutions with skip connections.

    ``encoder`` lists the channels after each downsampling; the decoder mirrors it back to full
    resolution, ending with ``out_channels`` features (the head that turns them into a field
    belongs to the method). Input sides must divide by ``2 ** len(encoder)``.
    """

    def __init__(self, in_channels: int = 2, encoder: Sequence[int] = (16, 32, 32, 32),
                 out_channels: int = 16):
        super().__init__()
        self.stem = ConvBlock(in_channels, encoder[0] // 2 or 1)
        widths = [encoder[0] // 2 or 1] + list(encoder)
        self.down = nn.ModuleList(ConvBlock(widths[i], widths[i + 1], stride=2)
                                  for i in range(len(encoder)))
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        channels = widths[-1]
        for level in reversed(range(len(encoder))):
            skip = widths[level]
            up_channels = max(channels // 2, skip)
            self.up.append(UpBlock(channels, up_channels))
            self.fuse.append(ConvBlock(up_channels + skip, up_channels))
            channels = up_channels
        self.head = ConvBlock(channels, out_channels)
        self.out_channels = out_channels
        self.size_multiple = 2 ** len(encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            x = fuse(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def flow_head(in_channels: int, scale: float = 1e-5) -> nn.Conv3d:
    """3x3x3 convolution to a 3-channel field, initialised near zero (start at identity)."""
    head = nn.Conv3d(in_channels, 3, 3, 1, 1)
    nn.init.normal_(head.weight, 0.0, scale)
    nn.init.zeros_(head.bias)
    return head
