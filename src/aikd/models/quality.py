"""The AI-KD quality model: a face-recognition backbone followed by the quality head.

Babnik et al., "AI-KD" (IWBF 2024), Fig. 2: the student returns both the face embedding (distilled from
the frozen teacher) and a scalar quality (regressed onto the FIQA technique's labels). Attribute names
``feature_extractor`` and ``quality_head`` match the paper code's wrapper, so the released ``aikd-best.pth``
(iResNet-100) loads unchanged with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from aikd.preprocessing import Preprocessing

__all__ = ["QualityModel"]


class QualityModel(nn.Module):
    """Backbone + quality head.

    Args:
        backbone: maps (N, 3, H, W) faces to (N, D) embeddings.
        head: maps (N, D) embeddings to (N, 1) qualities.
        arch: registry name of the backbone (e.g. ``"r100"``) when known; saved with checkpoints.
        preprocessing: the input preprocessing the model expects, when known.

    Attributes:
        calibration: the calibration a checkpoint carries (plain data, :mod:`aikd.evaluation.calibration`), else
            ``None``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        arch: str | None = None,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        super().__init__()
        self.feature_extractor = backbone
        self.quality_head = head
        self.arch = arch
        self.preprocessing = preprocessing
        self.calibration: dict | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Faces (N, 3, H, W) -> (embedding (N, D) unnormalised, quality (N,) float32)."""
        embedding = self.feature_extractor(x)
        quality = self.quality_head(embedding)
        return embedding, quality.squeeze(-1).float()

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}" if self.arch else ""
