"""Improved ResNet (iResNet) face-recognition backbones, laid out exactly as insightface ``arcface_torch``.

iResNet: Duta et al., "Improved Residual Networks for Image and Video Recognition" (ICPR 2020), in the
pre-activation form insightface trains ArcFace/CosFace models with (Deng et al., CVPR 2019). Module
names, parameter and buffer shapes, initialisation and the forward pass follow
``arcface_torch/backbones/iresnet.py``, so an ``arcface_torch`` ``backbone.pth`` loads with
``strict=True`` and gives the same embedding.

Layout for a 112x112 RGB face: a 3x3 stem (``conv1``, ``bn1``, ``prelu``), four stages ``layer1..layer4``
of :class:`IBasicBlock` with ``width * (1, 2, 4, 8)`` channels, each stage halving the resolution
(112 -> 56 -> 28 -> 14 -> 7), then ``bn2``, flatten, ``dropout``, ``fc`` (``8 * width * 7 * 7 -> 512``)
and the ``features`` BatchNorm1d that yields the (unnormalised) embedding.

The forward pass is split into the *trunk* (stem to flattened ``bn2`` output) and the *embedding head*
(dropout, ``fc``, ``features``) so that SER-FIQ (Terhorst et al., CVPR 2020) can run the trunk once and the
stochastic head many times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IBasicBlock",
    "IResNet",
    "iresnet18",
    "iresnet18_w025",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
    "iresnet_tiny",
]

# Blocks per stage of the insightface models.
LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus shortcut.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the second convolution (2 in the first block of every stage).
        downsample: shortcut projection (1x1 conv + BN) when shape changes, else ``None`` (identity).
        bn_eps: BatchNorm epsilon (1e-5 in arcface_torch; MagFace trains with 2e-5).
    """

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=bn_eps)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=bn_eps)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=bn_eps)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        out += x if self.downsample is None else self.downsample(x)
        return out


class IResNet(nn.Module):
    """iResNet backbone mapping (N, 3, 112, 112) faces to (N, num_features) embeddings.

    Args:
        layers: blocks in each of the four stages, e.g. ``(3, 13, 30, 3)`` for iResNet-100.
        width: channels of the stem and first stage; stages use ``width * (1, 2, 4, 8)``. 64 in every
            insightface model; smaller values give cheap variants for tests and demos.
        dropout: dropout probability before ``fc`` (0 in inference; SER-FIQ raises it).
        num_features: embedding size.
        fp16: run the trunk under float16 autocast on the input's device (as ``arcface_torch`` does for
            mixed-precision training); ``fc`` and ``features`` always run in float32.
        bn_eps: epsilon of every BatchNorm (1e-5 in arcface_torch; 2e-5 in MagFace's ``models/iresnet.py``).
        frozen_feature_scale: keep the ``features`` BatchNorm1d scale fixed at 1 (arcface_torch and ElasticFace
            do; MagFace trains it).
    """

    fc_scale = 7 * 7  # spatial size after four stride-2 stages of a 112x112 input

    def __init__(
        self,
        layers: Sequence[int],
        width: int = 64,
        dropout: float = 0.0,
        num_features: int = 512,
        fp16: bool = False,
        bn_eps: float = 1e-5,
        frozen_feature_scale: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {list(layers)}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.layers = tuple(int(n) for n in layers)
        self.width = int(width)
        self.num_features = int(num_features)
        self.fp16 = fp16
        self.bn_eps = float(bn_eps)
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.prelu = nn.PReLU(width)
        self.layer1 = self._make_layer(width, self.layers[0], stride=2)
        self.layer2 = self._make_layer(width * 2, self.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, self.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, self.layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(width * 8, eps=bn_eps)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(width * 8 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=bn_eps)
        nn.init.constant_(self.features.weight, 1.0)
        # Frozen in arcface_torch; trainers must respect it.
        self.features.weight.requires_grad = not frozen_feature_scale
        self._init_weights()

    def _init_weights(self) -> None:
        # insightface default: N(0, 0.1) convolutions, identity BatchNorm2d; Linear/PReLU keep torch defaults.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=self.bn_eps),
            )
        stage = [IBasicBlock(self.inplanes, planes, stride, downsample, self.bn_eps)]
        self.inplanes = planes
        stage += [IBasicBlock(planes, planes, bn_eps=self.bn_eps) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, four stages and ``bn2``, flattened: (N, 3, 112, 112) -> (N, 8 * width * 49)."""
        # Entered only when asked: autocast refuses some device types (e.g. "meta", used to count FLOPs).
        fp16 = torch.autocast(x.device.type, dtype=torch.float16) if self.fp16 else contextlib.nullcontext()
        with fp16:
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.prelu(x)
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
            x = self.bn2(x)
            return torch.flatten(x, 1)

    def forward_embedding_from_trunk(self, trunk: torch.Tensor) -> torch.Tensor:
        """Dropout, ``fc`` and ``features`` on a trunk output; ``trunk`` itself is never modified.

        ``self.dropout`` is declared in-place as in ``arcface_torch``; here it is applied out of place so a
        cached trunk output can be fed through the (stochastic) head repeatedly.
        """
        x = F.dropout(trunk, self.dropout.p, self.dropout.training, inplace=False)
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Faces (N, 3, 112, 112) scaled to [-1, 1] -> embeddings (N, num_features), not L2-normalised."""
        return self.forward_embedding_from_trunk(self.forward_trunk(x))


def iresnet18(**kwargs) -> IResNet:
    """iResNet-18 (blocks 2, 2, 2, 2)."""
    return IResNet(LAYERS["r18"], **kwargs)


def iresnet34(**kwargs) -> IResNet:
    """iResNet-34 (blocks 3, 4, 6, 3)."""
    return IResNet(LAYERS["r34"], **kwargs)


def iresnet50(**kwargs) -> IResNet:
    """iResNet-50 (blocks 3, 4, 14, 3)."""
    return IResNet(LAYERS["r50"], **kwargs)


def iresnet100(**kwargs) -> IResNet:
    """iResNet-100 (blocks 3, 13, 30, 3): the AI-KD student and the usual ArcFace/CosFace backbone."""
    return IResNet(LAYERS["r100"], **kwargs)


def iresnet200(**kwargs) -> IResNet:
    """iResNet-200 (blocks 6, 26, 60, 6)."""
    return IResNet(LAYERS["r200"], **kwargs)


def iresnet18_w025(**kwargs) -> IResNet:
    """iResNet-18 at a quarter of the width (16 stem channels): a small but real-shaped model for demos."""
    return IResNet(LAYERS["r18"], width=16, **kwargs)


def iresnet_tiny(**kwargs) -> IResNet:
    """One block per stage at 1/8 width (8 stem channels): for tests only; same input and embedding size."""
    return IResNet((1, 1, 1, 1), width=8, **kwargs)
