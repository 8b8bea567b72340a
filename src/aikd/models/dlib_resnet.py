"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1``) as a torch module: ``dlib-r29``.

D. E. King, "High Quality Face Recognition with Deep Metric Learning" (dlib blog, February 2017), and the network
type ``anet_type`` of dlib's ``examples/dnn_face_recognition_ex.cpp``: a ResNet with 29 convolutions trained with
a metric loss (pairs of one person closer than 0.6 in Euclidean distance, other people farther), 99.38 % on LFW.
The weights (public domain, CC0) ship in the ``face-recognition-models`` package; this module reads them from
dlib's own file (:mod:`aikd.models.dlib_format`), without dlib.

Layout for a 150x150 RGB chip, in dlib's terms (``con N KxK/S``, ``affine`` = a per-channel scale and shift
where training had batch normalisation):

    con 32 7x7/2 (padding 0) -> affine -> relu -> max_pool 3x3/2 (padding 0)               150 -> 72 -> 35
    layer1  3 blocks of 32                                                                  35
    layer2  a down block and 3 blocks of 64                                                 17
    layer3  a down block and 2 blocks of 128                                                 8
    layer4  a down block and 2 blocks of 256                                                 4
    layer5  a down block of 256                                                              2
    global average pool -> fc 256 -> 128, no bias (the descriptor, not normalised)

A block is ``con 3x3/S -> affine -> relu -> con 3x3/1 -> affine``, added to its input, then relu. A down block
convolves with stride 2 and padding 0 and averages its input over 2x2/2 windows for the shortcut; dlib adds two
tensors of different shapes by treating missing elements as zero (``add_prev``), so the shortcut's channels
fill the first channels of the sum, and at 8x8 the 3x3 block output fills the top-left of the 4x4 shortcut.

Input: ``(pixel - mean) / 256`` per channel with dlib's means (122.782, 117.001, 104.298) for R, G, B: on aikd's
0..1 scale mean = m / 255 and std = 256 / 255 (:data:`DLIB_PREPROCESSING`). dlib crops the chip from its own
five landmarks (eye corners, base of the nose) with ``get_face_chip(image, shape, 150, 0.25)``; aikd aligns its
five points (eye centres, nose tip, mouth corners) onto :data:`DLIB_TEMPLATE`, where they fall in dlib's chips
on average. The two chips differ as two landmark detectors do: aikd's chip gives a descriptor about as far
from dlib's as re-cropping dlib's own chip one or two pixels off does, well below 0.6, where dlib stops calling
faces the same person (measured by ``bench/dlib_template.py``: docs/models.md).

The forward pass is split as the other backbones: :meth:`DlibResNet.forward_trunk` gives the pooled 256
features, :meth:`DlibResNet.forward_embedding_from_trunk` applies dropout (SER-FIQ) and ``fc``.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aikd.models.dlib_format import INPUT_MEAN_KEY, is_network_state, state_layers
from aikd.preprocessing import Preprocessing

__all__ = [
    "DLIB_MEANS",
    "DLIB_PREPROCESSING",
    "DLIB_TEMPLATE",
    "DLIB_WEIGHTS_FILE",
    "DLIB_WEIGHTS_PACKAGE",
    "Affine",
    "DlibBlock",
    "DlibResNet",
    "convert_dlib_state",
    "dlib_resnet29",
    "fold_affine",
    "matches_dlib_r29",
    "shipped_weights",
]

DLIB_MEANS = (122.782, 117.001, 104.298)
"""Means dlib's ``input_rgb_image`` subtracts from R, G, B (0..255), before dividing by 256."""

CHIP_SIZE = 150
CHIP_PADDING = 0.25  # get_face_chip_details(shape, 150, 0.25), as dlib's face recognition example and Python API

DLIB_TEMPLATE = (
    (48.18, 46.65),  # left eye (as seen in the image)
    (101.02, 47.15),  # right eye
    (72.16, 76.08),  # nose tip
    (52.99, 101.33),  # left mouth corner
    (95.24, 101.59),  # right mouth corner
)
"""Where aikd's five points (RetinaFace's eye centres, nose tip, mouth corners) fall, on average, in dlib's
150x150 chip: measured by ``bench/dlib_template.py`` on the 92 faces of scikit-image's ``lfw_subset`` where both
dlib and RetinaFace find one (dlib's chip transform applied to RetinaFace's points, averaged)."""

DLIB_PREPROCESSING = Preprocessing(
    input_size=(CHIP_SIZE, CHIP_SIZE),
    mean=tuple(m / 255.0 for m in DLIB_MEANS),
    std=(256.0 / 255.0,) * 3,
    channel_order="RGB",
    embedding_size=128,
    template=DLIB_TEMPLATE,
)

DLIB_WEIGHTS_PACKAGE = "face_recognition_models"
DLIB_WEIGHTS_FILE = "models/dlib_face_recognition_resnet_model_v1.dat"

STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
"""(channels, blocks, whether the first block is a down block) of layer1..layer5."""


# ---------------------------------------------------------------------------------------------- network
class Affine(nn.Module):
    """dlib's ``affine`` layer in convolution mode: ``y = weight[c] * x + bias[c]`` per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _add_as_dlib(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``first + second`` with missing elements taken as zero (dlib's ``add_prev``): the sum has the larger size
    in every dimension, each input filling its leading channels, rows and columns."""
    if first.shape == second.shape:
        return first + second
    size = [max(a, b) for a, b in zip(first.shape[1:], second.shape[1:], strict=True)]

    def grown(x: torch.Tensor) -> torch.Tensor:
        channels, rows, cols = (s - d for s, d in zip(size, x.shape[1:], strict=True))
        return F.pad(x, (0, cols, 0, rows, 0, channels))

    return grown(first) + grown(second)


class DlibBlock(nn.Module):
    """``relu(affine2(conv2(relu(affine1(conv1(x))))) + shortcut(x))``; a down block convolves with stride 2,
    padding 0, and its shortcut is a 2x2/2 average pool.

    Args:
        in_channels: input channels.
        channels: output channels.
        down: whether this is a down block.
    """

    def __init__(self, in_channels: int, channels: int, down: bool = False) -> None:
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.affine2 = Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.affine1(self.conv1(x)))
        out = self.affine2(self.conv2(out))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_as_dlib(out, shortcut))


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: (N, 3, 150, 150) chips -> (N, 128) descriptors (see the module docstring).

    Args:
        dropout: dropout probability on the pooled features before ``fc`` (0 in inference; SER-FIQ raises it).
        num_features: descriptor size (128 in dlib's model).
    """

    def __init__(self, dropout: float = 0.0, num_features: int = 128) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.affine1 = Affine(32)
        in_channels = 32
        for index, (channels, blocks, down) in enumerate(STAGES, start=1):
            stage = [DlibBlock(in_channels, channels, down)]
            stage += [DlibBlock(channels, channels) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            in_channels = channels
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels, self.num_features, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation for the ReLU convolutions; a small last-affine scale per block keeps a random,
        # normalisation-free residual network's activations bounded (as "zero-init residual" does).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, DlibBlock):
                nn.init.constant_(module.affine2.weight, 0.1)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, the five stages and the global average pool: (N, 3, H, W) -> (N, 256)."""
        x = F.max_pool2d(F.relu(self.affine1(self.conv1(x))), 3, 2)
        for index in range(1, len(STAGES) + 1):
            x = getattr(self, f"layer{index}")(x)
        return x.mean(dim=(2, 3))

    def forward_embedding_from_trunk(self, trunk: torch.Tensor) -> torch.Tensor:
        """Dropout (out of place, so a cached trunk output can go through it repeatedly) and ``fc``."""
        return self.fc(F.dropout(trunk, self.dropout.p, self.dropout.training, inplace=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Chips scaled as :data:`DLIB_PREPROCESSING` says -> descriptors (N, num_features), not normalised."""
        return self.forward_embedding_from_trunk(self.forward_trunk(x))


@torch.no_grad()
def fold_affine(model: DlibResNet) -> DlibResNet:
    """Inference copy of ``model`` with every affine layer folded into the convolution before it (exact up to
    float rounding: ``gamma * (W x + b) + beta = (gamma W) x + (gamma b + beta)``); ``model`` is untouched."""
    folded = copy.deepcopy(model).eval()
    pairs = [(folded, "conv1", "affine1")]
    pairs += [(block, conv, affine) for module in folded.modules() if isinstance(module, DlibBlock)
              for block, conv, affine in ((module, "conv1", "affine1"), (module, "conv2", "affine2"))]
    for owner, conv_name, affine_name in pairs:
        conv, affine = getattr(owner, conv_name), getattr(owner, affine_name)
        if isinstance(affine, nn.Identity):
            continue
        gamma, beta = affine.weight.double(), affine.bias.double()
        conv.weight.copy_(conv.weight.double() * gamma[:, None, None, None])
        conv.bias.copy_(conv.bias.double() * gamma + beta)
        setattr(owner, affine_name, nn.Identity())
    return folded


def dlib_resnet29(**kwargs: Any) -> DlibResNet:
    """dlib's face-recognition ResNet (29 convolutions), freshly initialised; ``dropout``, ``num_features``."""
    kwargs.pop("fp16", None)  # an iResNet option; this network has no autocast region of its own
    return DlibResNet(**kwargs)


# ----------------------------------------------------------------------------------- dlib layers -> keys
def _expected_layers(model: DlibResNet) -> list[tuple[str, str, nn.Module | None]]:
    """The layer records dlib writes for this network, bottom-up: (kind, description, module with weights)."""
    def con(conv: nn.Conv2d) -> tuple[str, str, nn.Module]:
        return ("con", f"con {conv.out_channels} {conv.kernel_size[0]}x{conv.kernel_size[1]} stride "
                       f"{conv.stride[0]} padding {conv.padding[0]}", conv)

    layers = [con(model.conv1), ("affine", "affine", model.affine1), ("relu", "relu", None),
              ("max_pool", "max_pool 3x3 stride 2 padding 0", None)]
    for index in range(1, len(STAGES) + 1):
        for block in getattr(model, f"layer{index}"):
            layers += [con(block.conv1), ("affine", "affine", block.affine1), ("relu", "relu", None),
                       con(block.conv2), ("affine", "affine", block.affine2)]
            if block.down:
                layers.append(("avg_pool", "avg_pool 2x2 stride 2 padding 0", None))
            layers += [("add_prev", "add_prev", None), ("relu", "relu", None)]
    return layers + [("avg_pool", "avg_pool everything padding 0", None),
                     ("fc", f"fc {model.num_features} no bias", model.fc)]


def matches_dlib_r29(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is dlib-r29's: a dlib network file (:func:`aikd.models.dlib_format.network_state`) with
    this network's layers, or the module's own keys."""
    with torch.device("meta"):
        model = DlibResNet()
    if is_network_state(state):
        expected = [description for _, description, _ in _expected_layers(model)]
        return [layer.describe() for layer in state_layers(state)] == expected
    return set(state) == set(model.state_dict())


def convert_dlib_state(state: dict[str, Any]) -> dict[str, Any]:
    """A dlib network file's layers (:func:`aikd.models.dlib_format.network_state`) -> :class:`DlibResNet` keys;
    other state dicts pass unchanged.

    Raises:
        ValueError: the file's layers are not dlib-r29's (says which layer differs), or its input layer
            subtracts other means than :data:`DLIB_MEANS`.
    """
    if not is_network_state(state):
        return state
    mean = [float(v) for v in state[INPUT_MEAN_KEY].tolist()]
    if not np.allclose(mean, DLIB_MEANS, atol=1e-3):
        raise ValueError(f"the dlib network's input layer subtracts means {mean}, not dlib-r29's {list(DLIB_MEANS)}")
    with torch.device("meta"):
        model = DlibResNet()
    expected, found = _expected_layers(model), state_layers(state)
    names = {module: name for name, module in model.named_modules()}
    out: dict[str, Any] = {}
    for index, ((kind, description, module), layer) in enumerate(zip(expected, found, strict=False)):
        if layer.describe() != description:
            raise ValueError(f"dlib layer {index} is '{layer.describe()}' where dlib-r29 has '{description}'")
        if module is None:
            continue
        prefix, parts = names[module], {name: torch.from_numpy(value) for name, value in layer.tensors.items()}
        if kind == "con":
            out[f"{prefix}.weight"], out[f"{prefix}.bias"] = parts["filters"], parts["biases"]
        elif kind == "affine":
            out[f"{prefix}.weight"], out[f"{prefix}.bias"] = parts["gamma"], parts["beta"]
        else:  # fc: dlib multiplies x (1, inputs) by W (inputs, outputs); torch's Linear holds W transposed
            out[f"{prefix}.weight"] = parts["weights"].t().contiguous()
    if len(found) != len(expected):
        raise ValueError(f"the dlib network has {len(found)} layers, dlib-r29 {len(expected)}")
    return out


# ------------------------------------------------------------------------------------------- the weights
def shipped_weights() -> Path:
    """``dlib_face_recognition_resnet_model_v1.dat`` as installed by the ``face-recognition-models`` package.

    Found without importing the package (its ``__init__`` needs ``pkg_resources``, which recent setuptools
    no longer provide).

    Raises:
        ValueError: the package is not installed, or the file is missing from it.
    """
    spec = importlib.util.find_spec(DLIB_WEIGHTS_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ValueError("weights 'dlib': dlib's face-recognition model ships in the face-recognition-models "
                         "package, which is not installed (pip install face-recognition-models==0.3.0, or "
                         "bash scripts/install.sh)")
    for folder in folders:
        path = Path(folder) / DLIB_WEIGHTS_FILE
        if path.is_file():
            return path
    raise ValueError(f"weights 'dlib': {Path(folders[0]) / DLIB_WEIGHTS_FILE} is missing from the installed "
                     "face-recognition-models package; reinstall it")
