"""IR networks of the face.evoLVe lineage, laid out as AdaFace and CurricularFace publish them.

AdaFace (Kim, Jain and Liu, CVPR 2022; ``mk-minchul/AdaFace``, ``net.py``, ``Backbone`` with ``BasicBlockIR``)
and CurricularFace (Huang et al., CVPR 2020; ``HuangYG123/CurricularFace``, ``backbone/model_irse.py``,
``bottleneck_IR``) train the same residual plan as insightface's iResNet under other module names:

* ``input_layer``: 3x3 convolution 3 -> 64 (no bias), BatchNorm2d, PReLU;
* ``body``: one flat ``Sequential`` of blocks, stages of 64, 128, 256 and 512 channels, the first block of each
  stage with stride 2. A block is ``res_layer`` + ``shortcut_layer``. ``shortcut_layer`` is a 1x1 strided
  convolution + BatchNorm2d when the channel count changes, else ``MaxPool2d(1, stride)`` (subsampling with
  no weights: unlike insightface's iResNet, the very first block has no projection). ``res_layer`` is
  BatchNorm2d, 3x3 conv, [BatchNorm2d,] PReLU, 3x3 conv (stride), BatchNorm2d; the bracketed BatchNorm is
  AdaFace's, CurricularFace's block has none;
* ``output_layer``: BatchNorm2d(512), Dropout, Flatten, Linear(512 * 7 * 7 -> 512), BatchNorm1d(512,
  affine=False) - the (unnormalised) embedding.

Blocks per stage: IR-18 (2, 2, 2, 2), IR-50 (3, 4, 14, 3), IR-101 (3, 13, 30, 3); every BatchNorm has
torch's default epsilon (1e-5). AdaFace's ``forward`` returns ``(embedding / norm, norm)``: the norm of the
unnormalised embedding is AdaFace's *feature norm*, which its loss reads as image quality;
:meth:`IRNet.forward_with_norm` gives that pair, :meth:`IRNet.forward` the unnormalised embedding as every
aikd backbone does (so ``aikd label --method magnitude`` labels with the AdaFace feature norm).

Preprocessing (AdaFace ``inference.py`` ``to_input`` and its README): 112x112 crops aligned to the ArcFace
template (AdaFace's MTCNN reference points for a square crop are the ArcFace points), **BGR**, scaled to
[-1, 1] with mean 0.5 and std 0.5. CurricularFace reads images with PIL: **RGB**, the same scaling
(``config.py``: ``RGB_MEAN = RGB_STD = [0.5, 0.5, 0.5]``).

Published files: AdaFace's ``adaface_ir{18,50,101}_*.ckpt`` are PyTorch Lightning checkpoints: the network
under ``state_dict`` with the prefix ``model.``, next to the AdaFace margin head (``head.kernel``,
``head.t``, ``head.batch_mean``, ``head.batch_std``), which is training-only and left out.
CurricularFace's IR-101 backbone file is ``backbone.module.state_dict()``: the module's keys as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aikd.models.registry import ModelSpec, register_model
from aikd.preprocessing import Preprocessing

__all__ = ["IRBlock", "IRNet", "adaface_ir18", "adaface_ir50", "adaface_ir101", "curricularface_ir101"]

UNITS: dict[str, tuple[int, int, int, int]] = {
    "ir18": (2, 2, 2, 2),
    "ir50": (3, 4, 14, 3),
    "ir101": (3, 13, 30, 3),
}
STAGE_CHANNELS = (64, 128, 256, 512)


class IRBlock(nn.Module):
    """``res_layer(x) + shortcut_layer(x)`` (AdaFace ``BasicBlockIR``; CurricularFace ``bottleneck_IR``).

    Args:
        in_channels: input channels.
        depth: output channels.
        stride: stride of the second 3x3 convolution and of the shortcut.
        mid_norm: BatchNorm between the first convolution and the PReLU (AdaFace: yes; CurricularFace: no).
    """

    def __init__(self, in_channels: int, depth: int, stride: int, mid_norm: bool = True) -> None:
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        layers: list[nn.Module] = [nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False)]
        if mid_norm:
            layers.append(nn.BatchNorm2d(depth))
        layers += [nn.PReLU(depth), nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth)]
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRNet(nn.Module):
    """IR network mapping (N, 3, 112, 112) faces to (N, num_features) unnormalised embeddings.

    Args:
        units: blocks per stage, e.g. ``(3, 13, 30, 3)`` for IR-101.
        mid_norm: AdaFace's block (``True``) or CurricularFace's (``False``).
        dropout: dropout before the embedding Linear (the published 0.4 is a training setting; 0 here, which
            is what eval mode does anyway; SER-FIQ draws its own masks).
        num_features: embedding size.
        channels: channels of the four stages (the published nets: 64, 128, 256, 512).
    """

    def __init__(self, units: Sequence[int], mid_norm: bool = True, dropout: float = 0.0, num_features: int = 512,
                 channels: Sequence[int] = STAGE_CHANNELS) -> None:
        super().__init__()
        if len(units) != 4 or any(int(n) < 1 for n in units) or len(channels) != 4:
            raise ValueError(f"units must be four positive block counts, got {list(units)}")
        self.units = tuple(int(n) for n in units)
        self.num_features = int(num_features)
        stem = int(channels[0])
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                         nn.PReLU(stem))
        blocks, in_channels = [], stem
        for count, depth in zip(self.units, channels, strict=True):
            for index in range(count):
                blocks.append(IRBlock(in_channels, int(depth), 2 if index == 0 else 1, mid_norm))
                in_channels = int(depth)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(in_channels), nn.Dropout(dropout), nn.Flatten(),
                                          nn.Linear(in_channels * 7 * 7, num_features),
                                          nn.BatchNorm1d(num_features, affine=False))
        self.body = nn.Sequential(*blocks)  # registered after output_layer, as in both published files
        self._init_weights()

    def _init_weights(self) -> None:
        # As both published files: Kaiming-normal (fan_out) convolutions and Linear, identity BatchNorm2d.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def dropout(self) -> nn.Dropout:
        """The dropout of ``output_layer`` (before its Linear), under the name the other backbones use."""
        return self.output_layer[1]

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """``input_layer``, ``body`` and the BatchNorm2d of ``output_layer``, flattened: (N, 512 * 49)."""
        return torch.flatten(self.output_layer[0](self.body(self.input_layer(x))), 1)

    def forward_embedding_from_trunk(self, trunk: torch.Tensor) -> torch.Tensor:
        """Dropout (out of place), Linear and BatchNorm1d of ``output_layer`` on a trunk output."""
        x = F.dropout(trunk, self.dropout.p, self.dropout.training, inplace=False)
        return self.output_layer[4](self.output_layer[3](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Faces (N, 3, 112, 112) -> unnormalised embeddings (N, num_features)."""
        return self.forward_embedding_from_trunk(self.forward_trunk(x))

    def forward_with_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AdaFace's output: (L2-normalised embedding (N, D), feature norm (N, 1))."""
        embedding = self.forward(x)
        norm = torch.linalg.vector_norm(embedding, dim=1, keepdim=True)
        return embedding / norm, norm


def adaface_ir18(**kwargs: Any) -> IRNet:
    """AdaFace IR-18 (blocks 2, 2, 2, 2)."""
    return IRNet(UNITS["ir18"], mid_norm=True, **kwargs)


def adaface_ir50(**kwargs: Any) -> IRNet:
    """AdaFace IR-50 (blocks 3, 4, 14, 3)."""
    return IRNet(UNITS["ir50"], mid_norm=True, **kwargs)


def adaface_ir101(**kwargs: Any) -> IRNet:
    """AdaFace IR-101 (blocks 3, 13, 30, 3), AdaFace's largest published IR net."""
    return IRNet(UNITS["ir101"], mid_norm=True, **kwargs)


def curricularface_ir101(**kwargs: Any) -> IRNet:
    """CurricularFace IR-101 (blocks 3, 13, 30, 3; no BatchNorm between a block's first conv and PReLU)."""
    return IRNet(UNITS["ir101"], mid_norm=False, **kwargs)


# ------------------------------------------------------------------------------------------- checkpoints
def convert_adaface(state: dict[str, Any]) -> dict[str, Any]:
    """AdaFace's Lightning ``state_dict`` (``model.*`` + the margin head ``head.*``) -> the network's keys.

    A state dict without the ``model.`` prefix (a re-saved network) is returned as it is.
    """
    if not any(key.startswith("model.") for key in state):
        return state
    return {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}


def _fits(units: Sequence[int], mid_norm: bool) -> Any:
    """Recogniser of an IR state dict (after :func:`convert_adaface`) with these block counts and block type."""

    def matches(state: Mapping[str, Any]) -> bool:
        state = convert_adaface(dict(state))
        blocks = {int(key.split(".")[1]) for key in state if key.startswith("body.")}
        stem = state.get("input_layer.0.weight")
        if stem is None or tuple(stem.shape) != (STAGE_CHANNELS[0], 3, 3, 3) or blocks != set(range(sum(units))):
            return False
        # res_layer.5 (the last BatchNorm) exists only in AdaFace's six-module block.
        return ("body.0.res_layer.5.weight" in state) == mid_norm

    return matches


BGR_HALF = Preprocessing(channel_order="BGR")  # (x / 255 - 0.5) / 0.5, BGR: AdaFace's to_input()
RGB_HALF = Preprocessing()

for _name, _builder, _units, _text in (
    ("adaface-ir18", adaface_ir18, UNITS["ir18"], "AdaFace IR-18 (mk-minchul/AdaFace net.py)"),
    ("adaface-ir50", adaface_ir50, UNITS["ir50"], "AdaFace IR-50 (mk-minchul/AdaFace net.py)"),
    ("adaface-ir101", adaface_ir101, UNITS["ir101"], "AdaFace IR-101 (mk-minchul/AdaFace net.py)"),
):
    register_model(ModelSpec(_name, _builder, BGR_HALF, _text, layers=_units, convert=convert_adaface,
                             matches=_fits(_units, True), family="irnet"))

register_model(ModelSpec(
    "curricularface-ir101", curricularface_ir101, RGB_HALF,
    "CurricularFace IR-101 (HuangYG123/CurricularFace model_irse.py): AdaFace's IR layout without the mid BN",
    layers=UNITS["ir101"], matches=_fits(UNITS["ir101"], False), family="irnet"))
