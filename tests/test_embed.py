"""aikd embed: file format, normalisation, backbones it reads, misalignment determinism, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aikd.align import ARCFACE_TEMPLATE, align_face
from aikd.cli import main
from aikd.io import load_embeddings, write_csv
from aikd.models import build_backbone, calibrate_batchnorm


@pytest.fixture
def backbone_file(tmp_path):
    """An arcface_torch-style ``backbone.pth``: a raw state dict of a seeded, calibrated tiny iResNet."""
    torch.manual_seed(1)
    backbone = calibrate_batchnorm(build_backbone("tiny"), batches=2, batch_size=8).eval()
    path = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), path)
    return path, backbone


def _reference(backbone, faces):
    """L2-normalised embeddings computed the plain way: preprocessing + eager forward."""
    from aikd.models import Preprocessing

    with torch.no_grad():
        embedding = backbone(Preprocessing()(faces))
    return torch.nn.functional.normalize(embedding, dim=1).numpy()


def test_embedding_file_format_and_values(tmp_path, backbone_file, face_folder, capsys):
    path, backbone = backbone_file
    folder, good, bad = face_folder
    out = tmp_path / "emb.npz"
    assert main(["embed", str(folder), "--weights", str(path), "--arch", "tiny", "--aligned", "-o", str(out),
                 "--device", "cpu", "--batch-size", "4"]) == 1
    with np.load(out, allow_pickle=False) as data:
        assert sorted(data.files) == ["embeddings", "paths"]
        assert data["paths"].dtype.kind == "U" and data["embeddings"].dtype == np.float32
    keys, embeddings = load_embeddings(out)
    assert keys == good and embeddings.shape == (len(good), 512)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    from aikd.images import load_image, resize_image

    faces = [resize_image(load_image(folder / key), 112) for key in good]
    np.testing.assert_allclose(embeddings, _reference(backbone, faces), atol=1e-5)
    err = capsys.readouterr().err
    assert "warning: 4 input(s) were not 112x112" in err  # b, c_gray, e, f are not 112x112
    assert sorted(line.split(",")[0] for line in (tmp_path / "emb.errors.csv").read_text().splitlines()[1:]) == \
        sorted(bad)


def test_quality_checkpoint_feature_extractor(tmp_path, tiny_checkpoint, tiny_model):
    face = np.random.default_rng(2).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    Image.fromarray(face).save(tmp_path / "a.png")
    out = tmp_path / "e.npz"
    assert main(["embed", str(tmp_path / "a.png"), "--weights", str(tiny_checkpoint), "-o", str(out),
                 "--device", "cpu"]) == 0
    _, embeddings = load_embeddings(out)
    np.testing.assert_allclose(embeddings, _reference(tiny_model.feature_extractor, [face]), atol=1e-5)


def _photos_with_landmarks(tmp_path, count=6):
    rng = np.random.default_rng(5)
    folder = tmp_path / "photos"
    folder.mkdir()
    rows, photos, points = [], {}, {}
    for i in range(count):
        key = f"p{i}.png"
        photos[key] = rng.integers(0, 256, (150, 140, 3), dtype=np.uint8)
        points[key] = ARCFACE_TEMPLATE * rng.uniform(0.9, 1.2) + rng.uniform(5, 20, size=2)
        Image.fromarray(photos[key]).save(folder / key)
        rows.append([key, *points[key].ravel().tolist()])
    landmarks = tmp_path / "lm.csv"
    write_csv(landmarks, ["path"] + [f"{axis}{i}" for i in range(1, 6) for axis in "xy"], rows)
    return folder, landmarks, photos, points


def test_misalign_is_deterministic_per_image(tmp_path, backbone_file):
    path, backbone = backbone_file
    folder, landmarks, photos, points = _photos_with_landmarks(tmp_path)
    base = ["embed", str(folder), "--weights", str(path), "--landmarks", str(landmarks), "--device", "cpu"]

    def embed(name, *extra):
        assert main([*base, "-o", str(tmp_path / name), *extra]) == 0
        return load_embeddings(tmp_path / name)

    keys, aligned = embed("aligned.npz")
    expected = _reference(backbone, [align_face(photos[k], points[k]) for k in keys])
    np.testing.assert_allclose(aligned, expected, atol=1e-5)
    _, first = embed("m1.npz", "--misalign", "3", "--seed", "1")
    _, again = embed("m1b.npz", "--misalign", "3", "--seed", "1", "--batch-size", "1", "--workers", "0")
    _, other = embed("m2.npz", "--misalign", "3", "--seed", "2")
    np.testing.assert_allclose(first, again, atol=1e-5)  # batch size and threads do not change the noise
    assert np.abs(first - aligned).max() > 1e-3 and np.abs(first - other).max() > 1e-3
    # The noise follows the image key, not the run: a list naming two of the images (same keys) agrees.
    listing = folder / "part.txt"
    listing.write_text("p3.png\np0.png\n")
    part = ["embed", str(listing), "--weights", str(path), "--landmarks",
            str(landmarks), "--device", "cpu", "--misalign", "3", "--seed", "1", "-o", str(tmp_path / "r.npz")]
    assert main(part) == 0
    part_keys, part_embeddings = load_embeddings(tmp_path / "r.npz")
    np.testing.assert_allclose(part_embeddings, first[[keys.index(k) for k in part_keys]], atol=1e-5)


def test_resume_embeds_only_what_is_missing(tmp_path, backbone_file, face_folder, monkeypatch):
    path, _ = backbone_file
    folder, good, _ = face_folder
    out = tmp_path / "e.npz"
    base = ["embed", "--weights", str(path), "-o", str(out), "--device", "cpu"]
    assert main([base[0], str(folder / "a.jpg"), str(folder / "b.png"), *base[1:]]) == 0
    from aikd.inference.engine import Engine

    seen: list[int] = []
    original = Engine.__call__
    monkeypatch.setattr(Engine, "__call__", lambda self, batch: seen.append(len(batch)) or original(self, batch))
    inputs = [str(folder / key) for key in good]
    assert main([base[0], *inputs, *base[1:], "--resume"]) == 0
    assert sum(seen) == len(good) - 2
    keys, embeddings = load_embeddings(out)
    assert keys == inputs
    assert np.isfinite(embeddings).all()
