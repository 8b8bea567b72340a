"""Labels from a quality model: any FIQA regressor's scores, for AI-KD to distil (``--method checkpoint``).

AI-KD distils whatever technique made its labels (Babnik et al., IWBF 2024). A quality model file is such a
technique: an aikd checkpoint, the AI-KD release, or a released CR-FIQA, eDifFIQA or SDD-FIQA file
(:mod:`aikd.models.released`: DifFIQA(R), the paper's own label source, is released in eDifFIQA's form). The
model's own preprocessing crops and normalises the faces (each author's input), and it runs as ``aikd score`` runs
it (:mod:`aikd.inference.engine`: BatchNorm folded, fp32), so the labels are the scores ``aikd score`` writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aikd.labelers.base import BatchLabels, Labeler

__all__ = ["QualityModelLabels"]


class QualityModelLabels(Labeler):
    """The qualities a quality model gives.

    Args:
        model: a :class:`~aikd.models.QualityModel` (never modified).
        device: where it runs.
    """

    name = "checkpoint"
    model_kind = "quality"

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        from aikd.inference.engine import InferenceOptions

        self.engine = InferenceOptions(device=str(device)).engine(model)

    def label_batch(self, faces: torch.Tensor, keys: Sequence[str]) -> BatchLabels:
        """Qualities of N faces (the model's input, NCHW)."""
        _, quality = self.engine(faces.detach().cpu().numpy())
        return BatchLabels(quality=quality.astype("float64"))
