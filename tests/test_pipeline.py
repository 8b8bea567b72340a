"""Commands chained as a user chains them: an insightface .bin scored, embedded and evaluated."""

import csv
import io
import pickle

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
