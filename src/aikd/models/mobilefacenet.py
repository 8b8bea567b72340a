"""MobileFaceNet as eDifFIQA publishes it: the backbone of eDifFIQA(T), module names and shapes as released.

Chen, Liu, Gao and Han, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on Mobile
Devices", CCBR 2018; the module of LSIbabnikz/eDifFIQA ``model/mobilenet.py`` (the InsightFace_Pytorch lineage).
Blocks, for a 112x112 face:

    conv1       Conv_block 3 -> 64, 3x3/2                        112 -> 56
    conv2_dw    Conv_block 64 -> 64, 3x3/1, depthwise
    conv_23     Depth_Wise 64 -> 64 (expansion 128), 3x3/2       56 -> 28
    conv_3      Residual: 4 Depth_Wise 64 -> 64 (128)
    conv_34     Depth_Wise 64 -> 128 (256), 3x3/2                28 -> 14
    conv_4      Residual: 6 Depth_Wise 128 -> 128 (256)
    conv_45     Depth_Wise 128 -> 128 (512), 3x3/2               14 -> 7
    conv_5      Residual: 2 Depth_Wise 128 -> 128 (256)
    conv_6_sep  Conv_block 128 -> 512, 1x1
    conv_6_dw   Linear_block 512 -> 512, 7x7 depthwise (global)   7 -> 1
    linear      Linear 512 -> 512, no bias;  bn  BatchNorm1d(512)

``Conv_block`` is convolution (no bias), BatchNorm2d, PReLU; ``Linear_block`` the same without the PReLU;
``Depth_Wise`` a 1x1 ``Conv_block`` to the expansion width (``conv``), a depthwise ``Conv_block`` (``conv_dw``) and
a 1x1 ``Linear_block`` back (``project``), added to its input in a ``Residual`` stack. The published forward ends
with an L2 normalisation of the embedding (``normalise=True``), which eDifFIQA's quality head reads.

The forward pass is split as aikd's other backbones: :meth:`MobileFaceNet.forward_trunk` gives the 512 pooled
features, :meth:`MobileFaceNet.forward_embedding_from_trunk` applies dropout (0 unless SER-FIQ raises it), ``linear``,
``bn`` and the normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBlock", "DepthWise", "LinearBlock", "MobileFaceNet", "Residual"]


class ConvBlock(nn.Module):
    """Convolution without bias, BatchNorm2d, PReLU (``Conv_block``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.prelu = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))


class LinearBlock(nn.Module):
    """Convolution without bias and BatchNorm2d (``Linear_block``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class DepthWise(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 projection; added to the input when ``residual`` (``Depth_Wise``)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, stride: int = 2,
                 residual: bool = False) -> None:
        super().__init__()
        self.conv = ConvBlock(in_channels, groups)
        self.conv_dw = ConvBlock(groups, groups, 3, stride, 1, groups=groups)
        self.project = LinearBlock(groups, out_channels)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.conv_dw(self.conv(x)))
        return x + out if self.residual else out


class Residual(nn.Module):
    """A stack of residual Depth_Wise blocks under the published ``model`` attribute (``Residual``)."""

    def __init__(self, channels: int, blocks: int, groups: int) -> None:
        super().__init__()
        self.model = nn.Sequential(*(DepthWise(channels, channels, groups, stride=1, residual=True)
                                     for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MobileFaceNet(nn.Module):
    """eDifFIQA's MobileFaceNet: (N, 3, 112, 112) faces -> (N, 512) embeddings (L2-normalised when ``normalise``).

    Args:
        num_features: embedding size (512).
        normalise: end with the L2 normalisation of the published forward.
        dropout: dropout before ``linear`` (0; SER-FIQ raises it).
    """

    def __init__(self, num_features: int = 512, normalise: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.normalise = normalise
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.conv2_dw = ConvBlock(64, 64, 3, 1, 1, groups=64)
        self.conv_23 = DepthWise(64, 64, groups=128)
        self.conv_3 = Residual(64, 4, 128)
        self.conv_34 = DepthWise(64, 128, groups=256)
        self.conv_4 = Residual(128, 6, 256)
        self.conv_45 = DepthWise(128, 128, groups=512)
        self.conv_5 = Residual(128, 2, 256)
        self.conv_6_sep = ConvBlock(128, 512)
        self.conv_6_dw = LinearBlock(512, 512, 7, groups=512)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(512, self.num_features, bias=False)
        self.bn = nn.BatchNorm1d(self.num_features)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Every convolution, flattened: (N, 3, 112, 112) -> (N, 512)."""
        for stage in (self.conv1, self.conv2_dw, self.conv_23, self.conv_3, self.conv_34, self.conv_4, self.conv_45,
                      self.conv_5, self.conv_6_sep, self.conv_6_dw):
            x = stage(x)
        return torch.flatten(x, 1)

    def forward_embedding_from_trunk(self, trunk: torch.Tensor) -> torch.Tensor:
        """Dropout (out of place), ``linear``, ``bn`` and (``normalise``) the L2 normalisation."""
        x = self.bn(self.linear(F.dropout(trunk, self.dropout.p, self.dropout.training, inplace=False)))
        return x / torch.norm(x, 2, 1, True) if self.normalise else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_embedding_from_trunk(self.forward_trunk(x))
