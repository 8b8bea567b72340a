"""Released FIQA quality models, loaded unchanged from the files their authors publish: CR-FIQA, eDifFIQA, SDD-FIQA.

Each becomes a :class:`~aikd.models.quality.QualityModel` (backbone + quality head), so ``aikd score --checkpoint``
scores with it and ``aikd label --method checkpoint`` labels with it for AI-KD to distil. Published keys map to the
module's keys one to one (nothing is dropped, nothing invented); loading is strict.

    name        file as released                  network                                        reference
    crfiqa-l    181952backbone.pth                iResNet-100 + qs (Linear 512 -> 1)             fdbtrs/CR-FIQA
    crfiqa-s    32572backbone.pth                 iResNet-50 + qs                                 backbones/iresnet.py
    ediffiqa-l  ediffiqaL.pth                     base_model iResNet-100 + mlp (512-1024-1)       LSIbabnikz/eDifFIQA
    ediffiqa-m  ediffiqaM.pth                     base_model iResNet-50 + mlp                     model/ediffiqa.py,
    ediffiqa-s  ediffiqaS.pth                     base_model iResNet-18 + mlp                     iresnet.py, mlp.py,
    ediffiqa-t  ediffiqaT.pth                     base_model MobileFaceNet (L2-normalised) + mlp  mobilenet.py
    sddfiqa     SDD_FIQA_checkpoints_r50.pth      IR-50 trunk + quality (PReLU, Dropout, Linear   Tencent/TFace quality/
                                                  25088 -> 1), no embedding layer                 .../model/model.py

* **CR-FIQA** (Boutros et al., CVPR 2023): the iResNet's forward returns ``(embedding, qs(embedding))``; the
  quality is ``qs``. Input (``evaluation/QualityModel.py`` and the README's note): RGB, ``(x / 255 - 0.5) / 0.5``,
  112x112 crops aligned to the ArcFace template (``cv2.resize``, no flip).
* **eDifFIQA** (Babnik et al., IEEE TBIOM 2024; DifFIQA(R), the label source of the AI-KD paper, has this form):
  ``eDifFIQA.forward`` is ``mlp(base_model(x))``. Input (``configs/ediffiqa*_config.yaml``): PIL RGB,
  ``Resize(112)``, ``ToTensor``, ``Normalize(0.5, 0.5)``; no flip.
* **SDD-FIQA** (Ou et al., CVPR 2021): ``R50(use_type="Qua")``: the IR-50 body (CurricularFace's block, no
  BatchNorm between its convolutions) flattened into ``quality``. Its "embedding" here is that 25088-D flattened
  map: it is not a face-recognition model. Input (``eval.py``): PIL RGB, ``Resize(112)``, ``ToTensor``,
  ``Normalize(0.5, 0.5)``; no flip.

Every one takes aikd's default input (:class:`~aikd.preprocessing.Preprocessing`: RGB, [-1, 1], 112x112, the
ArcFace five-point template). A file is recognised by its keys and shapes (:func:`recognise`), or named
(``--arch ediffiqa-t``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aikd.models import iresnet
from aikd.models.head import QualityHead
from aikd.models.irnet import STAGE_CHANNELS, UNITS, IRBlock
from aikd.models.mobilefacenet import MobileFaceNet
from aikd.models.quality import QualityModel
from aikd.preprocessing import Preprocessing

__all__ = [
    "QUALITY_MODELS",
    "CrFiqaHead",
    "QualityModelSpec",
    "SddTrunk",
    "describe_quality_model",
    "get_quality_spec",
    "list_quality_models",
    "load_any_quality_model",
    "load_released_quality_model",
    "recognise",
]

RELEASED_PREPROCESSING = Preprocessing()  # RGB, (x / 255 - 0.5) / 0.5, 112x112, the ArcFace template


class CrFiqaHead(nn.Module):
    """CR-FIQA's quality output: ``qs``, a Linear from the embedding to one value."""

    def __init__(self, in_features: int = 512) -> None:
        super().__init__()
        self.qs = nn.Linear(in_features, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.qs(embedding)


class SddTrunk(nn.Module):
    """SDD-FIQA's quality network up to its head: ``input_layer`` and the IR-50 ``body``, flattened (N, 25088).

    Args:
        units: blocks per stage (IR-50: 3, 4, 14, 3).
        channels: channels of the four stages.
    """

    def __init__(self, units: tuple[int, ...] = UNITS["ir50"], channels: tuple[int, ...] = STAGE_CHANNELS) -> None:
        super().__init__()
        stem = int(channels[0])
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                         nn.PReLU(stem))
        blocks, in_channels = [], stem
        for count, depth in zip(units, channels, strict=True):
            for index in range(count):
                blocks.append(IRBlock(in_channels, int(depth), 2 if index == 0 else 1, mid_norm=False))
                in_channels = int(depth)
        self.body = nn.Sequential(*blocks)
        self.num_features = in_channels * 7 * 7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(self.input_layer(x)), 1)


def sdd_head(features: int = 512 * 7 * 7) -> nn.Sequential:
    """SDD-FIQA's ``quality``: Flatten, PReLU per feature, Dropout(0.5), Linear to one value."""
    return nn.Sequential(nn.Flatten(), nn.PReLU(features), nn.Dropout(0.5), nn.Linear(features, 1))


@dataclass(frozen=True)
class QualityModelSpec:
    """A released quality model.

    Attributes:
        name: what ``--arch`` takes (``ediffiqa-l``).
        build: a freshly initialised :class:`QualityModel` of it.
        convert: the published state dict (wrapper prefixes stripped) -> the model's keys.
        matches: whether a published state dict is this model's.
        description: one line for ``aikd models``.
        published: the file name as released.
        arch: the registered FR architecture of its backbone, where there is one.
        preprocessing: the input it takes.
    """

    name: str
    build: Callable[[], QualityModel]
    convert: Callable[[dict[str, Any]], dict[str, Any]]
    matches: Callable[[Mapping[str, Any]], bool]
    description: str
    published: str
    arch: str | None = None
    preprocessing: Preprocessing = field(default=RELEASED_PREPROCESSING)


def _prefixed(mapping: dict[str, str], default: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A converter renaming published key prefixes (``mapping``: published -> ours; ``default`` for the rest)."""

    def convert(state: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in state.items():
            prefix = next((p for p in mapping if key.startswith(p)), None)
            out[mapping[prefix] + key[len(prefix):] if prefix else default + key] = value
        return out

    return convert


def _blocks(state: Mapping[str, Any], prefix: str = "") -> tuple[int, ...]:
    """iResNet blocks per stage of a state dict (``layerN.M.`` keys under ``prefix``)."""
    pattern = re.compile(re.escape(prefix) + r"layer([1-4])\.(\d+)\.")
    stages: list[set[int]] = [set(), set(), set(), set()]
    for key in state:
        found = pattern.match(key)
        if found:
            stages[int(found.group(1)) - 1].add(int(found.group(2)))
    return tuple(len(stage) for stage in stages)


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _crfiqa(name: str, arch: str, text: str, published: str) -> QualityModelSpec:
    layers = tuple(iresnet.LAYERS[arch])

    def build() -> QualityModel:
        return QualityModel(iresnet.IResNet(layers), CrFiqaHead(), arch=arch)

    def matches(state: Mapping[str, Any]) -> bool:
        return _shape(state, "qs.weight") == (1, 512) and _blocks(state) == layers

    return QualityModelSpec(name, build, _prefixed({"qs.": "quality_head.qs."}, "feature_extractor."), matches,
                            text, published, arch)


def _ediffiqa(name: str, backbone: Callable[[], nn.Module], arch: str | None, text: str, published: str
              ) -> QualityModelSpec:
    layers = tuple(iresnet.LAYERS[arch]) if arch else None

    def build() -> QualityModel:
        return QualityModel(backbone(), QualityHead(512, 1024, 1), arch=arch)

    def matches(state: Mapping[str, Any]) -> bool:
        if _shape(state, "mlp.l1.weight") != (1024, 512):
            return False
        if layers is None:
            return "base_model.conv_6_dw.conv.weight" in state
        return _blocks(state, "base_model.") == layers

    convert = _prefixed({"base_model.": "feature_extractor.", "mlp.": "quality_head."}, "")
    return QualityModelSpec(name, build, convert, matches, text, published, arch)


def _sddfiqa() -> QualityModelSpec:
    def build() -> QualityModel:
        return QualityModel(SddTrunk(), sdd_head())

    def matches(state: Mapping[str, Any]) -> bool:
        return _shape(state, "quality.3.weight") == (1, 512 * 49) and "body.0.res_layer.0.weight" in state

    return QualityModelSpec("sddfiqa", build, _prefixed({"quality.": "quality_head."}, "feature_extractor."), matches,
                            "SDD-FIQA regressor: IR-50 trunk + PReLU/Linear head (Tencent/TFace quality)",
                            "SDD_FIQA_checkpoints_r50.pth")


QUALITY_MODELS: dict[str, QualityModelSpec] = {spec.name: spec for spec in (
    _crfiqa("crfiqa-l", "r100", "CR-FIQA(L): iResNet-100 + qs (fdbtrs/CR-FIQA, MS1MV2)",
            "181952backbone.pth"),
    _crfiqa("crfiqa-s", "r50", "CR-FIQA(S): iResNet-50 + qs (fdbtrs/CR-FIQA, CASIA-WebFace)",
            "32572backbone.pth"),
    _ediffiqa("ediffiqa-l", iresnet.iresnet100, "r100",
              "eDifFIQA(L): iResNet-100 + MLP head (LSIbabnikz/eDifFIQA)", "ediffiqaL.pth"),
    _ediffiqa("ediffiqa-m", iresnet.iresnet50, "r50",
              "eDifFIQA(M): iResNet-50 + MLP head (LSIbabnikz/eDifFIQA)", "ediffiqaM.pth"),
    _ediffiqa("ediffiqa-s", iresnet.iresnet18, "r18",
              "eDifFIQA(S): iResNet-18 + MLP head (LSIbabnikz/eDifFIQA)", "ediffiqaS.pth"),
    _ediffiqa("ediffiqa-t", MobileFaceNet, None,
              "eDifFIQA(T): MobileFaceNet + MLP head (LSIbabnikz/eDifFIQA)", "ediffiqaT.pth"),
    _sddfiqa(),
)}


def list_quality_models() -> list[str]:
    """Names of the released quality models (``--arch`` of ``aikd score`` / ``aikd label --method checkpoint``)."""
    return list(QUALITY_MODELS)


def get_quality_spec(name: str) -> QualityModelSpec:
    """The released quality model ``name``.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    spec = QUALITY_MODELS.get(name.strip().lower())
    if spec is None:
        raise ValueError(f"unknown released quality model {name!r}; known: {', '.join(QUALITY_MODELS)}")
    return spec


def recognise(state: Mapping[str, Any]) -> QualityModelSpec | None:
    """The released quality model whose published layout ``state`` has (wrapper prefixes stripped), if any."""
    return next((spec for spec in QUALITY_MODELS.values() if spec.matches(state)), None)


def describe_quality_model(name: str) -> dict[str, Any]:
    """Name, description, file, parameters, cost and preprocessing of a released quality model (built on the meta
    device: nothing is allocated)."""
    from aikd.models.registry import count_macs

    spec = get_quality_spec(name)
    with torch.device("meta"):
        model = spec.build()
    macs = count_macs(model, spec.preprocessing.input_size)
    return {"name": spec.name, "family": spec.name.split("-")[0], "description": spec.description,
            "published": spec.published, "parameters": sum(p.numel() for p in model.parameters()),
            "gmacs": macs / 1e9, "gflops": 2 * macs / 1e9, "preprocessing": spec.preprocessing.to_dict()}


def load_released_quality_model(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], name: str | None = None,
                                map_location: str | torch.device = "cpu") -> QualityModel:
    """A released quality model (eval mode) from its file as published, or from its state dict.

    Args:
        checkpoint: the file (read with the safe loader: tensors only) or a state dict.
        name: the model (:data:`QUALITY_MODELS`); default: recognised from the keys.
        map_location: device to put the model on.

    Raises:
        ValueError: a file of no released model (or not of ``name``), or one that does not fit it exactly.
    """
    from aikd.models.checkpoint import _read_any

    state, _, source = _read_any(checkpoint)  # tensors only, wrapper prefixes (module., _orig_mod.) stripped
    return _released_from_state(state, source, name, not isinstance(checkpoint, Mapping), map_location)


def _released_from_state(state: Mapping[str, torch.Tensor], source: str, name: str | None, owned: bool,
                         map_location: str | torch.device) -> QualityModel:
    """The model of a released file's ``state`` (``owned``: read from a file, so its tensors may be taken over)."""
    from aikd.models.checkpoint import _build_and_load

    spec = get_quality_spec(name) if name else recognise(state)
    if spec is None:
        raise ValueError(f"{source}: not a released quality model file ({', '.join(QUALITY_MODELS)}); first keys: "
                         f"{', '.join(list(state)[:4])}")
    model = _build_and_load(spec.build, spec.convert(dict(state)), source, spec.name, owned, state)
    model.preprocessing = spec.preprocessing
    return model.to(map_location).eval()


def load_any_quality_model(checkpoint: str | os.PathLike, arch: str | None = None,
                           map_location: str | torch.device = "cpu") -> QualityModel:
    """Any quality model file: an aikd checkpoint or the AI-KD release (:func:`~aikd.models.load_quality_model`), or
    a released CR-FIQA, eDifFIQA or SDD-FIQA file (named by ``arch``, or recognised by its keys)."""
    from aikd.models.checkpoint import load_quality_model, read_checkpoint

    if arch is not None and arch.strip().lower() in QUALITY_MODELS:
        return load_released_quality_model(checkpoint, arch, map_location)
    try:
        return load_quality_model(checkpoint, arch=arch, map_location=map_location)
    except ValueError as err:
        state, _ = read_checkpoint(checkpoint)  # read again (once) only for a file that is no aikd model
        if recognise(state) is None:
            raise err from None
    return _released_from_state(state, os.fspath(checkpoint), None, True, map_location)
