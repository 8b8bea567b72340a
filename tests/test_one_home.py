"""Bugs that copies of one concept caused, each through the command line where users met it.

Preprocessing (API vs CLI, the model's input size), the FR-model loader, the runtime (label's device and
torchrun sharding) and ONNX files that carry their preprocessing. Score files and name matching: test_names.py.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from aikd.align import ARCFACE_TEMPLATE, align_face
from aikd.cli import main
from aikd.io import read_labels, write_csv
from aikd.models import (
    ModelSpec,
    Preprocessing,
    QualityHead,
    QualityModel,
    build_backbone,
    load_fr_model,
    load_quality_model,
    read_checkpoint,
    save_checkpoint,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
LANDMARK_HEADER = ["path"] + [f"{axis}{i}" for i in range(1, 6) for axis in "xy"]


def _quality_of(model: QualityModel, faces: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(model.preprocessing(faces))[1].numpy()


def test_api_and_command_line_feed_the_model_the_same_input(tmp_path, tiny_checkpoint):
    """A 200x80 image was resized by two different rules (inputs differed by up to 1.64)."""
    rng = np.random.default_rng(3)
    images = {"tall.png": rng.integers(0, 256, (200, 80, 3), dtype=np.uint8),
              "wide.png": rng.integers(0, 256, (80, 200, 3), dtype=np.uint8),
              "small.png": rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)}
    for name, image in images.items():
        Image.fromarray(image).save(tmp_path / name)
    out = tmp_path / "s.csv"
    assert main(["score", *(str(tmp_path / n) for n in images), "--checkpoint", str(tiny_checkpoint),
                 "-o", str(out), "--device", "cpu", "--no-fold"]) == 0
    cli = read_labels(out).qualities
    api = _quality_of(load_quality_model(tiny_checkpoint), list(images.values()))
    np.testing.assert_allclose(cli, api, atol=1e-6)


class AnySizeNet(nn.Module):
    """A face-recognition-shaped stand-in that takes any input size (unlike iResNet's fixed 7x7 fc)."""

    num_features = 512

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.PReLU(8), nn.AdaptiveAvgPool2d(4),
                                  nn.Flatten(), nn.Linear(128, 512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def size96_checkpoint(tmp_path, monkeypatch):
    """A quality model whose input is 96x96, registered (for this test only) like any user model."""
    from aikd.models import registry

    preprocessing = Preprocessing(input_size=(96, 96))
    monkeypatch.setitem(registry._REGISTRY, "test-any96", ModelSpec("test-any96", AnySizeNet, preprocessing))
    torch.manual_seed(0)
    model = QualityModel(AnySizeNet(), QualityHead(512), arch="test-any96", preprocessing=preprocessing)
    return save_checkpoint(tmp_path / "any96.pt", model, "test-any96"), model.eval()


def test_crops_are_aligned_at_the_models_input_size(tmp_path, size96_checkpoint):
    """Alignment was hard-coded at 112 and the crop resampled to 96: a blurred, different input."""
    checkpoint, model = size96_checkpoint
    photo = np.random.default_rng(1).integers(0, 256, (240, 220, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    points = ARCFACE_TEMPLATE * 1.4 + 15
    write_csv(tmp_path / "lm.csv", LANDMARK_HEADER, [["photo.png", *points.ravel().tolist()]])
    out = tmp_path / "s.csv"
    assert main(["score", str(tmp_path / "photo.png"), "--landmarks", str(tmp_path / "lm.csv"), "--checkpoint",
                 str(checkpoint), "-o", str(out), "--device", "cpu", "--no-fold"]) == 0
    expected = _quality_of(model, [align_face(photo, points, size=96)])
    np.testing.assert_allclose(read_labels(out).qualities, expected, atol=1e-6)


def test_one_fr_model_loader_keeps_the_embedding_size_and_preprocessing(tmp_path):
    """label's loader fell back to r100's spec (512-D) for any file; distill and checkpoints had their own rules."""
    torch.manual_seed(0)
    backbone = build_backbone("tiny", num_features=128)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")  # arcface_torch layout: no metadata
    loaded = load_fr_model(tmp_path / "backbone.pth")
    assert loaded.arch == "tiny" and not loaded.random
    assert loaded.preprocessing == Preprocessing(embedding_size=128)
    bgr = Preprocessing(channel_order="BGR", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    save_checkpoint(tmp_path / "bgr.pt", backbone, "tiny", preprocessing=bgr)
    assert load_fr_model(tmp_path / "bgr.pt").preprocessing == Preprocessing(
        channel_order="BGR", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), embedding_size=128)
    save_checkpoint(tmp_path / "plain.pt", backbone, "tiny")  # no preprocessing given: the backbone's own size
    assert read_checkpoint(tmp_path / "plain.pt")[1]["preprocessing"]["embedding_size"] == 128
    random = load_fr_model("none", "tiny", seed=3)
    again = load_fr_model("none", "tiny", seed=3)
    assert random.random and all(torch.equal(a, b) for a, b in zip(random.backbone.state_dict().values(),
                                                                    again.backbone.state_dict().values(),
                                                                    strict=True))


def test_label_picks_and_checks_its_device_like_every_command(tmp_path, capsys):
    folder = tmp_path / "faces"
    folder.mkdir()
    Image.fromarray(np.zeros((112, 112, 3), np.uint8)).save(folder / "a.png")
    assert main(["label", str(folder), "--method", "magnitude", "--weights", "none", "--arch", "tiny",
                 "--device", "tpu", "-o", str(tmp_path / "l.csv")]) == 2
    assert "--device" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


@pytest.mark.parametrize("method", ["serfiq", "certainty"])
def test_label_shards_under_torchrun(tmp_path, method):
    """Two gloo ranks label a share each; rank 0 merges (and runs certainty's whole-set pass) and writes."""
    folder = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for person in ("p1", "p2", "p3"):
        (folder / person).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(folder / person / f"{k}.png")
    command = [sys.executable, "-m", "aikd", "label", str(folder), "--method", method, "--weights", "none",
               "--arch", "tiny", "--passes", "4", "--batch-size", "2", "--device", "cpu"]
    single = subprocess.run([*command, "-o", str(tmp_path / "single.csv")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": SRC}, timeout=300)
    assert single.returncode == 0, single.stderr
    port, processes = _free_port(), []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": SRC, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([*command, "-o", str(tmp_path / "ranks.csv")], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    assert "labelled" in results[0][1] and "labelled" not in results[1][1]  # only rank 0 writes
    sharded, alone = _rows(tmp_path / "ranks.csv"), _rows(tmp_path / "single.csv")
    assert [row[0] for row in sharded] == [row[0] for row in alone]  # same images, same order
    numeric = [i for i, name in enumerate(alone[0]) if name not in ("path", "identity")]
    np.testing.assert_allclose([[float(row[i]) for i in numeric] for row in sharded[1:]],
                               [[float(row[i]) for i in numeric] for row in alone[1:]], rtol=1e-6)


def test_onnx_export_carries_its_preprocessing_and_scores_with_it(tmp_path, tiny_model, face_folder):
    pytest.importorskip("onnxruntime")
    from aikd.inference.export import export_onnx
    from aikd.inference.onnx_format import read_metadata

    folder, good, _ = face_folder
    tiny_model.preprocessing = Preprocessing(channel_order="BGR", mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    checkpoint = save_checkpoint(tmp_path / "bgr.pt", tiny_model, "tiny")
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx")]) == 0
    metadata = read_metadata(tmp_path / "m.onnx")
    assert metadata["preprocessing"] == tiny_model.preprocessing and metadata["arch"] == "tiny"
    assert metadata["outputs"] == ["embedding", "quality"] and metadata["version"]
    np.testing.assert_allclose(metadata["alignment"]["template"], ARCFACE_TEMPLATE, atol=1e-4)
    inputs = [str(folder / key) for key in good]
    assert main(["score", *inputs, "--checkpoint", str(checkpoint), "-o", str(tmp_path / "torch.csv"),
                 "--device", "cpu"]) == 0
    assert main(["score", *inputs, "--checkpoint", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "onnx.csv"),
                 "--device", "cpu"]) == 0
    np.testing.assert_allclose(read_labels(tmp_path / "onnx.csv").qualities,
                               read_labels(tmp_path / "torch.csv").qualities, atol=1e-5)
    export_onnx(tiny_model, tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not an ONNX model"):
        read_metadata(b"not a graph")
