"""Commands chained as a user chains them: an insightface .bin scored, embedded and evaluated."""

import csv
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from aikd.cli import main
from aikd.io import load_embeddings


def _write_bin(path, pairs=6, seed=0):
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(2 * pairs):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        encoded.append(buffer.getvalue())
    path.write_bytes(pickle.dumps((encoded, [i % 2 == 0 for i in range(pairs)])))


def test_bin_set_scored_embedded_and_evaluated(tmp_path, tiny_checkpoint):
    data = tmp_path / "lfw.bin"
    _write_bin(data)
    scores, embeddings, report = tmp_path / "scores.csv", tmp_path / "emb.npz", tmp_path / "report"
    assert main(["score", str(data), "--checkpoint", str(tiny_checkpoint), "-o", str(scores)]) == 0
    assert main(["embed", str(data), "--weights", str(tiny_checkpoint), "-o", str(embeddings)]) == 0
    paths, vectors = load_embeddings(embeddings)
    assert paths[0] == "lfw.bin#000000" and len(paths) == 12
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert main(["evaluate", "--scores", str(scores), "--embeddings", str(embeddings), "--pairs", str(data),
                 "--fmr", "0.5", "--no-plots", "-o", str(report)]) == 0
    with open(report / "pauc.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {row["method"] for row in rows} == {"scores"}
    assert all(np.isfinite(float(row["pauc"])) for row in rows)


def _degraded_sample_photos(folder: Path) -> list[str]:
    """The sample photos, each also blurred, noisy, downscaled and dark (aikd.demo.degradations), as PNG files."""
    from aikd.demo.degradations import degrade
    from aikd.demo.samples import sample_photos
    from aikd.demo.showcase import write_png
    from aikd.detectors import get_detector

    detector, rng, names = get_detector("retinaface"), np.random.default_rng(0), []
    for name, photo in sample_photos().items():
        landmarks = detector.detect(photo)[0].landmarks
        for kind, level in (("original", 0), ("blur", 3), ("noise", 2), ("downscale", 3), ("dark", 2)):
            names.append(f"{name}_{kind}.png")
            write_png(folder / names[-1], degrade(photo, kind, level, landmarks, rng) if level else photo)
    return names


def test_photos_to_trained_model_to_evaluation(tmp_path, tiny_backbone):
    """detect -> label -> train on files -> score -> embed -> evaluate -> export, keys matching throughout."""
    import itertools

    import torch

    from aikd.io import read_labels

    photos = tmp_path / "photos"
    names = _degraded_sample_photos(photos)
    weights = tmp_path / "backbone.pth"
    torch.save(tiny_backbone.state_dict(), weights)
    landmarks, labels = tmp_path / "landmarks.csv", tmp_path / "labels.csv"
    assert main(["detect", str(photos), "-o", str(landmarks)]) == 0
    assert main(["label", str(photos), "--landmarks", str(landmarks), "--method", "serfiq", "--passes", "8",
                 "--weights", str(weights), "--arch", "tiny", "-o", str(labels)]) == 0
    assert sorted(read_labels(labels).paths) == sorted(names)
    run = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "aikd_r100.yaml"  # the paper's setup, shrunk
    assert main(["train", "--config", str(config), "--out", str(run), f"data.images={photos}",
                 f"data.landmarks={landmarks}", f"data.labels={labels}", f"teacher.weights={weights}",
                 "student.arch=tiny", "data.batch_size=4", "data.val_fraction=0.2", "data.workers=0",
                 "train.amp=off", "train.progress=false"]) == 0
    scores, embeddings = tmp_path / "scores.csv", tmp_path / "emb.npz"
    assert main(["score", str(photos), "--checkpoint", str(run / "best.pt"), "--landmarks", str(landmarks),
                 "-o", str(scores)]) == 0
    assert main(["embed", str(photos), "--weights", str(weights), "--landmarks", str(landmarks),
                 "-o", str(embeddings)]) == 0
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b,genuine\n" + "".join(
        f"{a},{b},{int(a.split('_')[0] == b.split('_')[0])}\n" for a, b in itertools.combinations(names, 2)))
    assert main(["evaluate", "--scores", str(scores), str(labels), "--embeddings", str(embeddings),
                 "--pairs", str(pairs), "--fmr", "0.1", "--no-plots", "-o", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "pauc.csv", newline="") as handle:
        assert {row["method"] for row in csv.DictReader(handle)} == {"scores", "labels"}
    assert main(["export", "--checkpoint", str(run / "best.pt"), "-o", str(tmp_path / "m.onnx")]) == 0
