"""MagFace's iResNet, as ``IrvingMeng/MagFace`` publishes it: insightface's layout, its own BatchNorm and input.

Meng, Zhao, Huang and Li, "MagFace: A Universal Representation for Face Recognition and Quality Assessment",
CVPR 2021. ``models/iresnet.py`` there has the module names and shapes of insightface's iResNet
(:mod:`aikd.models.iresnet`: ``conv1``, ``bn1``, ``prelu``, ``layer1..4`` of ``IBasicBlock``, ``bn2``,
``fc``, ``features``), with two differences that matter at inference: every BatchNorm has ``eps=2e-05``
(insightface: 1e-5), and the ``features`` BatchNorm1d scale is trained rather than frozen at 1. Its dropout is
``Dropout2d(0.4)`` on the 7x7 map, the identity at inference.

Input (``inference/gen_feat.py``): ``cv2.imread`` (**BGR**), ``ToTensor`` (x / 255) and ``Normalize`` with
mean 0 and std 1: BGR in [0, 1], 112x112 crops aligned to the ArcFace template (insightface's MS1MV2).

Quality: the magnitude of the unnormalised embedding is MagFace's quality score, what
``aikd label --method magnitude`` computes (:mod:`aikd.labelers.magnitude`).

Published files (``magface_epoch_00025.pth`` for iResNet-100, likewise for iResNet-50): ``{"epoch", "arch",
"state_dict", "optimizer"}``; ``state_dict`` is the training model's: the backbone under ``features.`` (with
``module.`` inside or outside it for DistributedDataParallel / DataParallel training,
``features.module.conv1.weight`` or ``module.features.conv1.weight``) and the MagLinear classifier
``fc.weight`` (512 x identities), which is training-only and left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aikd.models.iresnet import LAYERS, IResNet
from aikd.models.registry import ModelSpec, register_model
from aikd.preprocessing import Preprocessing

__all__ = ["MAGFACE_PREPROCESSING", "convert_magface", "magface_r50", "magface_r100"]

BN_EPS = 2e-5
MAGFACE_PREPROCESSING = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), channel_order="BGR")
_PREFIXES = ("features.module.", "features.")


def magface_r50(**kwargs: Any) -> IResNet:
    """MagFace iResNet-50 (blocks 3, 4, 14, 3; BatchNorm eps 2e-5)."""
    return IResNet(LAYERS["r50"], bn_eps=BN_EPS, frozen_feature_scale=False, **kwargs)


def magface_r100(**kwargs: Any) -> IResNet:
    """MagFace iResNet-100 (blocks 3, 13, 30, 3; BatchNorm eps 2e-5)."""
    return IResNet(LAYERS["r100"], bn_eps=BN_EPS, frozen_feature_scale=False, **kwargs)


def _is_training_model(state: Mapping[str, Any]) -> bool:
    return any(key.startswith(tuple(p + "conv1." for p in _PREFIXES)) for key in state)


def convert_magface(state: dict[str, Any]) -> dict[str, Any]:
    """MagFace's training ``state_dict`` (``features.[module.]*`` + MagLinear ``fc.weight``) -> iResNet keys.

    A backbone saved on its own (insightface keys) is returned as it is.
    """
    if not _is_training_model(state):
        return state
    out = {}
    for key, value in state.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            out[key[len(prefix):]] = value
    return out


def _matches(layers: tuple[int, ...]) -> Any:
    """Recogniser of MagFace's training state dict with these block counts (a bare backbone is an insightface
    iResNet by its keys; name the architecture to get MagFace's preprocessing)."""

    def matches(state: Mapping[str, Any]) -> bool:
        if not _is_training_model(state):
            return False
        converted = convert_magface(dict(state))
        counts = tuple(len({key.split(".")[1] for key in converted if key.startswith(f"layer{stage}.")})
                       for stage in range(1, 5))
        return counts == layers

    return matches


for _name, _builder, _layers, _text in (
    ("magface-r50", magface_r50, LAYERS["r50"], "MagFace iResNet-50 (IrvingMeng/MagFace models/iresnet.py)"),
    ("magface-r100", magface_r100, LAYERS["r100"], "MagFace iResNet-100: magnitude = MagFace quality"),
):
    register_model(ModelSpec(_name, _builder, MAGFACE_PREPROCESSING, _text, layers=tuple(_layers), width=64,
                             convert=convert_magface, matches=_matches(tuple(_layers)), family="iresnet"))
