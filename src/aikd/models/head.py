"""The AI-KD quality head: a two-layer MLP regressing a scalar quality from a face embedding.

Babnik et al., "AI-KD" (IWBF 2024), Sec. 3: the student is the face-recognition backbone followed by a
small MLP (512 -> 1024 -> GELU -> 1). Module names ``l1``/``ac``/``l2`` follow the paper's code, so the
released checkpoints' ``quality_head.l1.weight`` ... keys load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QualityHead"]


class QualityHead(nn.Module):
    """Linear -> GELU -> Linear quality regressor.

    Args:
        in_features: embedding size of the backbone (512 for every insightface iResNet).
        hidden_features: width of the hidden layer.
        out_features: number of outputs (1: the quality score).
    """

    def __init__(self, in_features: int = 512, hidden_features: int = 1024, out_features: int = 1) -> None:
        super().__init__()
        self.in_features = in_features
        self.l1 = nn.Linear(in_features, hidden_features)
        self.ac = nn.GELU()
        self.l2 = nn.Linear(hidden_features, out_features)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(N, in_features) embeddings -> (N, out_features) qualities."""
        return self.l2(self.ac(self.l1(embedding)))
