"""Model registry: architecture name -> builder + the preprocessing it expects (listed by ``aikd models``).

The insightface iResNets are registered here, named as ``arcface_torch``'s configs (``r18`` ... ``r200``;
``iresnet100``-style names are accepted as aliases); ``tiny`` and ``r18_w0.25`` are narrow variants for tests
and demos (same 112x112 input, 512-D embedding and module names); ``elasticface-r100`` is ElasticFace's
published iResNet-100 (``fdbtrs/ElasticFace`` ``backbones/iresnet.py``: arcface_torch's layout, BatchNorm and
input); ``dlib-r29`` is dlib's face-recognition ResNet (150x150 chips, 128-D descriptors), whose pretrained
weights ship in an installable package. Other families register themselves in their own module, imported by
:mod:`aikd.models`: :mod:`~aikd.models.magface`, :mod:`~aikd.models.irnet` (AdaFace, CurricularFace),
:mod:`~aikd.models.vit` (arcface_torch ViTs, TransFace), :mod:`~aikd.models.swin` (SwinFace),
:mod:`~aikd.models.dlib_resnet` (dlib).

What every registered backbone provides (the contract the commands rely on, checked by the tests for each):
``forward(faces) -> unnormalised embeddings (N, num_features)``, ``num_features``, and the split
``forward_trunk`` / ``forward_embedding_from_trunk`` with the stochastic part (dropout) at the start of the
second half, which SER-FIQ and the mixed-precision regions use. Every registered backbone can therefore be
an AI-KD student (``aikd train``: the quality head on its embedding, its last K parameter tensors trainable
in the order its authors' module registers them).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from aikd.models import dlib_resnet, iresnet
from aikd.models.head import QualityHead
from aikd.models.quality import QualityModel
from aikd.preprocessing import Preprocessing

__all__ = [
    "ModelSpec",
    "Preprocessing",
    "build_backbone",
    "build_model",
    "count_macs",
    "describe",
    "embedding_size_of",
    "get_spec",
    "list_models",
    "preprocessing_for",
    "register_model",
]

ARCFACE_PREPROCESSING = Preprocessing()


@dataclass(frozen=True)
class ModelSpec:
    """A registered backbone architecture.

    Attributes:
        name: registry name (``"r100"``).
        builder: returns a freshly initialised backbone; keyword arguments go to :class:`IResNet`.
        preprocessing: input the model expects.
        description: one line for ``aikd models``.
        layers: blocks per stage (used to recognise an iResNet state dict; for transformers, their depth).
        width: stem/first-stage channels (likewise; for transformers, the first token width).
        convert: maps a checkpoint as its authors publish it (wrapper prefixes already stripped) to this
            module's state-dict keys; ``None``: the keys are the module's own.
        matches: whether a (published) state dict is this architecture's, for recognising files that do not
            name their architecture; ``None``: only the iResNet rule (``layers``/``width``) recognises it.
        family: the model family, for ``aikd models`` (``iresnet``, ``irnet``, ``vit``, ``transface``, ``swin``).
    """

    name: str
    builder: Callable[..., nn.Module]
    preprocessing: Preprocessing = field(default=ARCFACE_PREPROCESSING)
    description: str = ""
    layers: tuple[int, ...] = ()
    width: int = 64
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    matches: Callable[[Mapping[str, Any]], bool] | None = None
    family: str = "iresnet"


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (a name can be registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


for _name, _builder, _layers, _width, _description in (
    ("r18", iresnet.iresnet18, iresnet.LAYERS["r18"], 64, "iResNet-18 (insightface arcface_torch)"),
    ("r34", iresnet.iresnet34, iresnet.LAYERS["r34"], 64, "iResNet-34 (insightface arcface_torch)"),
    ("r50", iresnet.iresnet50, iresnet.LAYERS["r50"], 64, "iResNet-50 (insightface arcface_torch)"),
    ("r100", iresnet.iresnet100, iresnet.LAYERS["r100"], 64, "iResNet-100: the AI-KD paper's student"),
    ("r200", iresnet.iresnet200, iresnet.LAYERS["r200"], 64, "iResNet-200 (insightface arcface_torch)"),
    ("r18_w0.25", iresnet.iresnet18_w025, iresnet.LAYERS["r18"], 16, "iResNet-18 at 1/4 width, for demos"),
    ("tiny", iresnet.iresnet_tiny, (1, 1, 1, 1), 8, "1 block per stage at 1/8 width, for tests"),
    ("elasticface-r100", iresnet.iresnet100, iresnet.LAYERS["r100"], 64,
     "ElasticFace iResNet-100 (fdbtrs/ElasticFace): arcface_torch's layout and input"),
):
    register_model(ModelSpec(_name, _builder, ARCFACE_PREPROCESSING, _description, tuple(_layers), _width))


register_model(ModelSpec(
    "dlib-r29", dlib_resnet.dlib_resnet29, dlib_resnet.DLIB_PREPROCESSING,
    "dlib's ResNet face descriptor (128-D, 150x150 chip); weights: --weights dlib",
    layers=tuple(blocks for _, blocks, _ in dlib_resnet.STAGES), width=32,
    convert=dlib_resnet.convert_dlib_state, matches=dlib_resnet.matches_dlib_r29, family="dlib",
))


def list_models() -> list[str]:
    """Registered architecture names, in registration order."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec registered as ``name`` (``iresnet100`` is read as ``r100``).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    key = name.strip()
    if key.lower().startswith("iresnet"):
        key = "r" + key[len("iresnet"):]
    spec = _REGISTRY.get(key) or _REGISTRY.get(key.lower())
    if spec is None:
        raise ValueError(f"unknown model architecture {name!r}; known: {', '.join(list_models())}")
    return spec


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Freshly initialised backbone ``name``; ``kwargs`` (dropout, num_features, fp16) go to the builder."""
    return get_spec(name).builder(**kwargs)


def build_model(name: str, head_hidden: int = 1024, **kwargs: Any) -> QualityModel:
    """Freshly initialised :class:`QualityModel`: backbone ``name`` and a new quality head.

    Args:
        name: registered architecture.
        head_hidden: hidden width of the quality head.
        **kwargs: passed to the backbone builder.
    """
    spec = get_spec(name)
    backbone = spec.builder(**kwargs)
    preprocessing = preprocessing_for(spec.name, embedding_size_of(backbone))
    head = QualityHead(preprocessing.embedding_size, head_hidden)
    return QualityModel(backbone, head, arch=spec.name, preprocessing=preprocessing)


def embedding_size_of(backbone: nn.Module) -> int | None:
    """The length of the embeddings ``backbone`` gives, when it says (``num_features``)."""
    size = getattr(backbone, "num_features", None)
    return int(size) if size else None


def preprocessing_for(arch: str, embedding_size: int | None = None,
                      recorded: Mapping[str, Any] | Preprocessing | None = None) -> Preprocessing:
    """The one rule for a model's preprocessing: what its file records, else its architecture's; with the
    embedding size the backbone really has.

    Args:
        arch: registered architecture.
        embedding_size: the backbone's embedding length (``None``: keep the recorded or registered one).
        recorded: the preprocessing a checkpoint records, if any.

    Raises:
        ValueError: a malformed recorded preprocessing.
    """
    if recorded is None:
        preprocessing = get_spec(arch).preprocessing
    elif isinstance(recorded, Preprocessing):
        preprocessing = recorded
    else:
        try:
            preprocessing = Preprocessing.from_dict(recorded)
        except (ValueError, TypeError) as err:
            raise ValueError(f"bad preprocessing record: {err}") from None
    return preprocessing if embedding_size is None else replace(preprocessing, embedding_size=int(embedding_size))


# ---------------------------------------------------------------------------------------- model statistics
def count_macs(model: nn.Module, input_size: tuple[int, int] = (112, 112)) -> int:
    """Multiply-accumulates of one image: convolutions, linear layers and attention's matrix products
    (normalisation, activations and softmax left out), as counted by :class:`torch.utils.flop_counter.FlopCounterMode`.

    ``model`` may live on the meta device, so no memory is allocated and nothing is computed.
    """
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    was_training = model.training
    # Layers the count leaves out keep the shape: skipped while counting (3-9x faster on the meta device).
    skipped = [m for m in model.modules() if isinstance(m, _UNCOUNTED)]
    for module in skipped:
        module.forward = _identity
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(torch.empty(1, 3, *input_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
        for module in skipped:
            del module.forward
    return int(counter.get_total_flops()) // 2


_UNCOUNTED = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.PReLU, nn.ReLU, nn.ReLU6, nn.GELU, nn.Sigmoid,
              nn.Dropout)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def describe(name: str) -> dict[str, Any]:
    """Name, family, blocks, width, parameter count, cost and preprocessing of a registered backbone (built on the
    meta device)."""
    return copy.deepcopy(_describe(get_spec(name)))


@functools.cache
def _describe(spec: ModelSpec) -> dict[str, Any]:
    with torch.device("meta"):
        backbone = spec.builder()
    macs = count_macs(backbone, spec.preprocessing.input_size)
    return {
        "name": spec.name,
        "family": spec.family,
        "blocks": list(spec.layers),
        "width": spec.width,
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "gmacs": macs / 1e9,
        "gflops": 2 * macs / 1e9,
        "description": spec.description,
        "preprocessing": spec.preprocessing.to_dict(),
    }
