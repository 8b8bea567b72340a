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
    from aikd.training.train import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

    def make(*overrides: str):
        return load_config(TrainConfig, path, [*TINY_TEST_OVERRIDES, *overrides])

    return make


# ------------------------------------------------------------------------------ score / embed / export
def png_claiming_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but holds no pixel data (a decompression-bomb stand-in)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    """The ``tiny_model`` fixture saved as an aikd checkpoint."""
    from aikd.models import save_checkpoint

    return save_checkpoint(tmp_path / "tiny.pt", tiny_model, "tiny")


@pytest.fixture
def face_folder(tmp_path):
    """A folder of seeded random "faces" of assorted sizes and modes, plus one file of each bad kind.

    Returns ``(folder, good_keys, bad_reasons)``: keys in input (sorted) order and a fragment of the
    expected reason for each bad file.
    """
    import numpy as np
    from PIL import Image

    folder = tmp_path / "faces"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = {
        "a.jpg": Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)),
        "b.png": Image.fromarray(rng.integers(0, 256, (150, 130, 3), dtype=np.uint8)),
        "c_gray.png": Image.fromarray(rng.integers(0, 256, (90, 100), dtype=np.uint8), mode="L"),
        "d_rgba.png": Image.fromarray(rng.integers(0, 256, (112, 112, 4), dtype=np.uint8), mode="RGBA"),
        "e.bmp": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        "sub/f.webp": Image.fromarray(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)),
    }
    for key, image in good.items():
        image.save(folder / key)
    (folder / "empty.jpg").write_bytes(b"")
    jpeg = (folder / "a.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.png").write_text("not an image at all")
    (folder / "bomb.png").write_bytes(png_claiming_size(60000, 60000))
    bad = {"bomb.png": "too large", "empty.jpg": "empty file", "text.png": "not an image",
           "truncated.jpg": "cannot decode"}
    return folder, sorted(good), bad


def pytest_sessionstart(session):
    """First line of every test run, also under -q: the CPU and torch build, so a failure can be tied to a CPU."""
    from aikd.runtime import describe_cpu

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"aikd cpu: {describe_cpu()}")
