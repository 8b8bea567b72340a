"""Shared test fixtures (keep small: tiny models, seeded, CPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny_model():
    """A seeded ``tiny`` QualityModel with calibrated BatchNorm, in eval mode."""
    from aikd.models import build_model, calibrate_batchnorm

    torch.manual_seed(0)
    model = build_model("tiny")
    calibrate_batchnorm(model, batches=2, batch_size=8, seed=0)
    return model.eval()


@pytest.fixture
def faces_batch() -> torch.Tensor:
    """Four seeded random 112x112 "faces" already scaled to [-1, 1]."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 112, 112, generator=generator) * 2 - 1
