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


@pytest.fixture(scope="session")
def face_photos(tmp_path_factory):
    """Real one-face photos shipped by installed packages, as files in a folder tree.

    ``astronaut.png`` (scikit-image, 512x512) and ``people/grace_hopper.jpg`` (matplotlib, 512x600).
    Returns the folder; tests copy what they change.
    """
    import shutil

    skimage_data = pytest.importorskip("skimage.data")
    cbook = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage_data.astronaut()).save(folder / "astronaut.png")
    (folder / "people").mkdir()
    with cbook.get_sample_data("grace_hopper.jpg") as source, open(folder / "people" / "grace_hopper.jpg", "wb") as out:
        shutil.copyfileobj(source, out)
    return folder


@pytest.fixture
def tiny_backbone():
    """A seeded ``tiny`` iResNet backbone with calibrated BatchNorm, in eval mode."""
    from aikd.models import build_backbone, calibrate_batchnorm

    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    calibrate_batchnorm(backbone, batches=2, batch_size=8, seed=0)
    return backbone.eval()


@pytest.fixture(scope="session")
def lfw_faces_dir():
    """The three 112x112 LFW sample crops aligned to the ArcFace template; the test is skipped without them.

    Found as in test_detect.py: ``$AIKD_SHARED_DATA/faces``, else ``shared/data/faces`` beside a folder
    above this file.
    """
    import os
    from pathlib import Path

    if os.environ.get("AIKD_SHARED_DATA"):
        candidates = [Path(os.environ["AIKD_SHARED_DATA"]) / "faces"]
    else:
        candidates = [parent / "shared" / "data" / "faces" for parent in Path(__file__).resolve().parents]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.jpg")):
            return candidate
    pytest.skip("sample faces (shared/data/faces) not found")


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
