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


TINY_TEST_OVERRIDES = (
    "data.synthetic.count=72",  # 63 training faces (7 steps of 8), 9 validation faces
    "data.synthetic.image_size=96",
    "data.val_fraction=0.125",
    "data.batch_size=8",
    "data.val_batch_size=16",
    "train.epochs=1",
)


@pytest.fixture
def tiny_train_config():
    """Factory of a ``TrainConfig``: configs/tiny.yaml shrunk further for tests, then ``overrides`` applied."""
    from pathlib import Path

    from aikd.config import load_config
    from aikd.train import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

    def make(*overrides: str):
        return load_config(TrainConfig, path, [*TINY_TEST_OVERRIDES, *overrides])

    return make
