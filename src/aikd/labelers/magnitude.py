"""Embedding magnitude as quality, the way MagFace reads it.

Meng, Zhao, Huang and Li, "MagFace: A Universal Representation for Face Recognition and Quality
Assessment", CVPR 2021: MagFace trains the magnitude ``a = ||f(x)||_2`` of the unnormalised embedding to
grow with the face's recognisability (within ``[l_a, u_a] = [10, 110]`` in their setup), so ``a`` itself
is the quality:

    q = ||f(x)||_2

With a MagFace backbone this is MagFace's own quality score. Other FR models (ArcFace, CosFace) are not
trained to make the magnitude mean anything, although it often correlates with quality; their labels are
best checked with an ERC before distilling them. The range is the model's: no normalisation is applied
(``aikd label --method import --normalise`` rescales any label file).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from aikd.labelers.base import BatchLabels, Labeler

__all__ = ["Magnitude", "embedding_magnitude"]


def embedding_magnitude(embeddings: torch.Tensor) -> np.ndarray:
    """L2 norm of each row of (N, D) unnormalised embeddings, float64 numpy (N,)."""
    return torch.linalg.vector_norm(embeddings.double(), dim=1).cpu().numpy()


class Magnitude(Labeler):
    """Quality = magnitude of the unnormalised embedding of an FR backbone (used in eval mode)."""

    name = "magnitude"

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone.eval()

    @torch.inference_mode()
    def label_batch(self, faces: torch.Tensor, keys: Sequence[str]) -> BatchLabels:
        """Magnitudes of N faces (model input)."""
        if self.backbone.training:
            self.backbone.eval()
        return BatchLabels(quality=embedding_magnitude(self.backbone(faces)))
