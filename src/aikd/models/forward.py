"""The one mixed-precision forward pass of a face-recognition backbone and a quality model.

Training (:mod:`aikd.training.distill`), scoring (:mod:`aikd.inference.engine`) and labelling all run a model
through :func:`embed` / :func:`quality_forward`, so "which layers run under autocast" has one answer per setting:

- ``paper``: the convolutional trunk in float32, ``fc`` and ``features`` under autocast. The paper's code builds
  its backbone with ``fp16=False``, so arcface_torch's inner ``autocast(False)`` keeps the trunk in float32 while
  the outer autocast covers the embedding layers (and the quality head).
- ``trunk``: the trunk under autocast, ``fc``, ``features`` and the quality head in float32 (arcface_torch's own
  mixed precision; much faster, since the trunk is nearly all of the arithmetic, and the small, numerically
  sensitive layers stay exact). Inference always runs this way.

Without an autocast dtype everything runs in float32 either way; results are float32.
"""

from __future__ import annotations

import torch
from torch import nn

from aikd.models.quality import QualityModel
from aikd.runtime import autocast

__all__ = ["AMP_REGIONS", "embed", "quality_forward"]

AMP_REGIONS = ("paper", "trunk")


def embed(backbone: nn.Module, faces: torch.Tensor, amp_dtype: torch.dtype | None,
          regions: str = "paper") -> torch.Tensor:
    """Embeddings of ``faces`` (float32), with autocast (``amp_dtype``) over the regions ``regions`` names.

    Raises:
        ValueError: ``regions`` is not one of :data:`AMP_REGIONS`.
    """
    if regions not in AMP_REGIONS:
        raise ValueError(f"train.amp_regions: expected one of {', '.join(AMP_REGIONS)}, got {regions!r}")
    if amp_dtype is None:
        return backbone(faces).float()
    if not hasattr(backbone, "forward_trunk"):
        with autocast(faces.device, amp_dtype):
            return backbone(faces).float()
    if regions == "trunk":
        with autocast(faces.device, amp_dtype):
            trunk = backbone.forward_trunk(faces)
        return backbone.forward_embedding_from_trunk(trunk.float()).float()
    trunk = backbone.forward_trunk(faces)
    with autocast(faces.device, amp_dtype):
        return backbone.forward_embedding_from_trunk(trunk).float()


def quality_forward(
    model: QualityModel, faces: torch.Tensor, amp_dtype: torch.dtype | None = None, regions: str = "paper"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embedding, quality)`` of a :class:`QualityModel`, float32; the head runs under autocast with the
    ``paper`` regions (as the paper's code), in float32 with ``trunk``."""
    embedding = embed(model.feature_extractor, faces, amp_dtype, regions)
    if amp_dtype is not None and regions == "paper":
        with autocast(faces.device, amp_dtype):
            return embedding, model.quality_head(embedding).squeeze(-1).float()
    return embedding, model.quality_head(embedding).squeeze(-1).float()
