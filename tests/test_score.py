"""aikd score and score_images: rows and errors, formats, API parity, resume after SIGKILL, torchrun shards."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aikd.align import ARCFACE_TEMPLATE, align_face
from aikd.cli import main
from aikd.inference.scorer import score_images
from aikd.io import load_embeddings, read_labels, write_csv, write_qualities
from aikd.models import load_quality_model
from aikd.pipeline.jobs import read_journal
from aikd.pipeline.outputs import journal_dir

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _scores(path: Path) -> tuple[list[str], np.ndarray]:
    rows = _csv_rows(path)
    assert rows[0] == ["path", "quality"]
    return [r[0] for r in rows[1:]], np.array([float(r[1]) for r in rows[1:]], dtype=np.float32)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_folder_with_bad_files_scores_the_good_ones(tmp_path, tiny_checkpoint, face_folder, capsys):
    folder, good, bad = face_folder
    out = tmp_path / "scores.csv"
    code = main(["score", str(folder), "--checkpoint", str(tiny_checkpoint), "-o", str(out), "--batch-size", "4",
                 "--device", "cpu"])
    assert code == 1
    keys, qualities = _scores(out)
    assert keys == good and np.isfinite(qualities).all()
    errors = {row[0]: row[1] for row in _csv_rows(tmp_path / "scores.errors.csv")[1:]}
    assert sorted(errors) == sorted(bad)
    for key, reason in bad.items():
        assert reason in errors[key]
    assert f"scored {len(good)} of {len(good) + len(bad)} images" in capsys.readouterr().err
    assert not journal_dir(out).exists()


def test_all_good_exit_zero_and_no_clobbering(tmp_path, tiny_checkpoint, face_folder, capsys):
    folder, good, _ = face_folder
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{folder / key}\n" for key in good))
    out = tmp_path / "s.csv"
    args = ["score", str(listing), "--checkpoint", str(tiny_checkpoint), "-o", str(out), "--device", "cpu"]
    assert main(args) == 0
    assert not (tmp_path / "s.errors.csv").exists()
    before = out.read_bytes()
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--resume"]) == 0  # everything already done: nothing rescored, same file
    assert out.read_bytes() == before


@pytest.mark.parametrize("fmt", ["pickle", "jsonl"])
def test_formats_round_trip(tmp_path, tiny_checkpoint, face_folder, fmt):
    folder, good, _ = face_folder
    base = ["score", str(folder), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    assert main([*base, "-o", str(tmp_path / "s.csv")]) == 1
    suffix = {"pickle": ".pkl", "jsonl": ".jsonl"}[fmt]
    assert main([*base, "-o", str(tmp_path / f"s{suffix}"), "--format", fmt]) == 1
    keys, expected = _scores(tmp_path / "s.csv")
    got = read_labels(tmp_path / f"s{suffix}").as_dict()
    assert list(got) == keys
    np.testing.assert_array_equal(np.array(list(got.values()), dtype=np.float32), expected)
    if fmt == "pickle":  # the official format: a plain dict str -> float, readable by plain pickle
        data = pickle.loads((tmp_path / "s.pkl").read_bytes())
        assert type(data) is dict and all(type(k) is str and type(v) is float for k, v in data.items())
    else:
        lines = (tmp_path / "s.jsonl").read_text().splitlines()
        assert [json.loads(line)["path"] for line in lines] == keys


def test_write_qualities_shortest_exact_decimal(tmp_path):
    values = np.array([0.1, -1 / 3, 12345.678, 1e-8], dtype=np.float32)
    for fmt, name in (("csv", "s.csv"), ("pickle", "s.pkl"), ("jsonl", "s.jsonl")):
        write_qualities(tmp_path / name, ["a", "b", "c", "d"], values, fmt)
        back = np.array(list(read_labels(tmp_path / name).as_dict().values()), dtype=np.float32)
        np.testing.assert_array_equal(back, values)
    assert _csv_rows(tmp_path / "s.csv")[1] == ["a", "0.1"]
    with pytest.raises(ValueError, match="--format must be one of"):
        write_qualities(tmp_path / "x", ["a"], [1.0], "xml")


def test_api_matches_cli_on_paths_arrays_and_pil(tmp_path, tiny_checkpoint, face_folder):
    folder, good, _ = face_folder
    out = tmp_path / "s.csv"
    assert main(["score", str(folder), "--checkpoint", str(tiny_checkpoint), "-o", str(out), "--device", "cpu",
                 "--batch-size", "32"]) == 1
    _, cli = _scores(out)
    model = load_quality_model(tiny_checkpoint)
    paths = [folder / key for key in good]
    np.testing.assert_array_equal(score_images(model, paths), cli)
    np.testing.assert_array_equal(score_images(model, [str(p) for p in paths]), cli)
    pil_images = [Image.open(p) for p in paths]
    np.testing.assert_array_equal(score_images(model, pil_images), cli)
    arrays = [np.asarray(image.convert("RGBA" if image.mode == "RGBA" else "RGB")) for image in pil_images]
    mixed = [paths[0], pil_images[1], *[np.asarray(im.convert("RGB")) for im in pil_images[2:3]], *paths[3:]]
    np.testing.assert_array_equal(score_images(model, mixed), cli)
    rgb_arrays = [a for a in arrays if a.shape[2] == 3]
    assert len(rgb_arrays) >= 4
    single = score_images(model, rgb_arrays[0])
    assert single.shape == (1,) and single.dtype == np.float32
    assert score_images(model, np.stack([rgb_arrays[0]] * 3)).shape == (3,)


def test_scores_do_not_depend_on_the_batch(tiny_model):
    rng = np.random.default_rng(3)
    faces = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(7)]
    reference = score_images(tiny_model, faces, batch_size=7)
    for batch_size in (1, 2, 3):
        np.testing.assert_allclose(score_images(tiny_model, faces, batch_size=batch_size), reference, atol=1e-6)
    np.testing.assert_allclose(score_images(tiny_model, faces[::-1], batch_size=4)[::-1], reference, atol=1e-6)
    # The same batch always gives the same bits.
    np.testing.assert_array_equal(score_images(tiny_model, faces, batch_size=7), reference)


def test_api_leaves_model_alone_and_reports_bad_images(tiny_model, tmp_path):
    tiny_model.train()
    face = np.zeros((112, 112, 3), np.uint8)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    score_images(tiny_model, [face, face])
    assert tiny_model.training
    assert all(np.array_equal(before[k], v) for k, v in tiny_model.state_dict().items())
    with pytest.raises(ValueError, match="image 1: expected an .H, W, 3. RGB uint8 array"):
        score_images(tiny_model, [face, face.astype(np.float32)])
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg: empty file"):
        score_images(tiny_model, [str(tmp_path / "empty.jpg")])
    with pytest.raises(ValueError, match="batch_size"):
        score_images(tiny_model, [face], batch_size=0)


def test_engine_cache_follows_weight_updates(tiny_model):
    face = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    first = score_images(tiny_model, face)
    with __import__("torch").no_grad():
        tiny_model.quality_head.l2.bias += 1.0
    np.testing.assert_allclose(score_images(tiny_model, face), first + 1.0, atol=1e-5)


def test_landmarks_align_first_and_unmatched_get_an_error(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(1)
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = {name: rng.integers(0, 256, (160, 150, 3), dtype=np.uint8) for name in ("p1.png", "p2.png", "p3.png")}
    for name, photo in photos.items():
        Image.fromarray(photo).save(folder / name)
    points = {"p1.png": ARCFACE_TEMPLATE * 1.2 + 10, "p3.png": ARCFACE_TEMPLATE * 0.9 + 25}
    landmarks = tmp_path / "lm.csv"
    header = ["path"] + [f"{axis}{i}" for i in range(1, 6) for axis in "xy"]
    write_csv(landmarks, header, [[name, *p.ravel().tolist()] for name, p in points.items()])
    out = tmp_path / "s.csv"
    assert main(["score", str(folder), "--checkpoint", str(tiny_checkpoint), "--landmarks", str(landmarks),
                 "-o", str(out), "--device", "cpu"]) == 1
    keys, qualities = _scores(out)
    assert keys == ["p1.png", "p3.png"]
    aligned = [align_face(photos[name], points[name]) for name in keys]
    np.testing.assert_array_equal(score_images(load_quality_model(tiny_checkpoint), aligned), qualities)
    assert "no landmarks for this image" in _csv_rows(tmp_path / "s.errors.csv")[1][1]


def test_detect_scores_faces_and_reports_faceless_images(tmp_path, tiny_checkpoint, lfw_faces_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted(lfw_faces_dir.glob("*.jpg")):
        padded = np.pad(np.asarray(Image.open(path).convert("RGB")), ((60, 60), (60, 60), (0, 0)))
        Image.fromarray(padded).save(folder / path.name)
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(folder / "zz_blank.png")
    out = tmp_path / "s.csv"
    assert main(["score", str(folder), "--checkpoint", str(tiny_checkpoint), "--detect", "-o", str(out),
                 "--device", "cpu", "--workers", "2"]) == 1
    keys, qualities = _scores(out)
    assert keys == sorted(p.name for p in lfw_faces_dir.glob("*.jpg")) and np.isfinite(qualities).all()
    assert _csv_rows(tmp_path / "s.errors.csv")[1] == ["zz_blank.png", "no face found"]


def test_embeddings_alongside_scores(tmp_path, tiny_checkpoint, face_folder):
    folder, good, _ = face_folder
    out, emb = tmp_path / "s.csv", tmp_path / "e.npz"
    assert main(["score", str(folder), "--checkpoint", str(tiny_checkpoint), "-o", str(out), "--device", "cpu",
                 "--embeddings", str(emb)]) == 1
    keys, embeddings = load_embeddings(emb)
    assert keys == good and embeddings.shape == (len(good), 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    quality, api_embeddings = score_images(load_quality_model(tiny_checkpoint), [folder / k for k in good],
                                           return_embeddings=True)
    np.testing.assert_array_equal(api_embeddings, embeddings)
    assert main(["score", str(folder), "--checkpoint", str(tiny_checkpoint), "-o", str(tmp_path / "t.csv"),
                 "--embeddings", str(emb)]) == 2  # would clobber the embedding file


def test_usage_errors(tmp_path, tiny_checkpoint, face_folder, capsys):
    folder, _, _ = face_folder
    base = ["score", str(folder), "-o", str(tmp_path / "s.csv")]
    assert main([*base, "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tiny_checkpoint), "--batch-size", "0"]) == 2
    assert main([*base, "--checkpoint", str(tiny_checkpoint), "--device", "tpu"]) == 2
    assert main(["score", str(tmp_path / "nowhere"), "--checkpoint", str(tiny_checkpoint)]) == 2
    assert main([*base, "--checkpoint", str(tiny_checkpoint), "--misalign", "3"]) == 2
    assert "needs --landmarks" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def _many_faces(folder: Path, count: int) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return [f"{i:04d}.png" for i in range(count)]


def test_sigkill_then_resume_scores_every_image_once(tmp_path, tiny_checkpoint, monkeypatch):
    keys = _many_faces(tmp_path / "many", 400)
    out = tmp_path / "s.csv"
    command = [sys.executable, "-m", "aikd", "score", str(tmp_path / "many"), "--checkpoint", str(tiny_checkpoint),
               "-o", str(out), "--batch-size", "1", "--workers", "1", "--device", "cpu"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = journal_dir(out) / "rank0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    done_before = set(read_journal(out))
    assert 10 <= len(done_before) < len(keys)
    # resumed with a changed setting: refused, naming it, and the journal is untouched
    assert main([*command[3:], "--resume", "--precision", "bf16"]) == 2
    assert set(read_journal(out)) == done_before

    from aikd.inference.engine import Engine

    scored: list[int] = []
    original = Engine.__call__
    monkeypatch.setattr(Engine, "__call__", lambda self, batch: scored.append(len(batch)) or original(self, batch))
    assert main([*command[3:], "--resume", "--batch-size", "32", "--workers", "2"]) == 0
    assert sum(scored) == len(keys) - len(done_before)  # nothing scored twice
    got_keys, qualities = _scores(out)
    assert got_keys == keys
    reference = score_images(load_quality_model(tiny_checkpoint), [tmp_path / "many" / k for k in keys])
    np.testing.assert_allclose(qualities, reference, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_merge_in_input_order(tmp_path, tiny_checkpoint, face_folder):
    folder, good, bad = face_folder
    out, emb = tmp_path / "s.csv", tmp_path / "e.npz"
    processes, port = [], _free_port()
    for rank in range(2):
        env = {**_env(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "aikd", "score", str(folder), "--checkpoint", str(tiny_checkpoint), "-o", str(out),
             "--embeddings", str(emb), "--batch-size", "2", "--device", "cpu"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=180) for p in processes]
    assert [p.returncode for p in processes] == [1, 1], results  # some inputs failed: every rank says so
    keys, qualities = _scores(out)
    assert keys == good
    assert sorted(row[0] for row in _csv_rows(tmp_path / "s.errors.csv")[1:]) == sorted(bad)
    model = load_quality_model(tiny_checkpoint)
    reference, reference_embeddings = score_images(model, [folder / k for k in good], return_embeddings=True)
    np.testing.assert_allclose(qualities, reference, atol=1e-6)
    emb_keys, embeddings = load_embeddings(emb)
    assert emb_keys == good
    np.testing.assert_allclose(embeddings, reference_embeddings, atol=1e-5)
    assert "scored 6 of 10 images" in results[0][1] and "scored" not in results[1][1]  # only rank 0 writes


def test_decode_processes_give_the_scores_of_decode_threads(tmp_path, tiny_checkpoint, face_folder):
    """A GPU run decodes in processes (no shared interpreter lock); the scores are those of threads, to the bit,
    as they come and aligned by landmarks; detection, whose detectors are not copied into processes, says so."""
    folder, good, _ = face_folder
    landmarks = tmp_path / "lm.csv"
    points = (ARCFACE_TEMPLATE * 0.9 + 4).ravel().tolist()
    write_csv(landmarks, ["path"] + [f"{axis}{i}" for i in range(1, 6) for axis in "xy"],
              [[key, *points] for key in good])
    for crop in ([], ["--landmarks", str(landmarks)]):
        outputs = {}
        for mode in ("threads", "processes"):
            outputs[mode] = tmp_path / f"{mode}{len(crop)}.csv"
            assert main(["score", str(folder), "--checkpoint", str(tiny_checkpoint), "-o", str(outputs[mode]),
                         "--device", "cpu", "--workers", "2", "--decode", mode, *crop]) == 1
        assert outputs["threads"].read_bytes() == outputs["processes"].read_bytes()
    assert main(["score", str(folder), "--checkpoint", str(tiny_checkpoint), "-o", str(tmp_path / "d.csv"),
                 "--device", "cpu", "--decode", "processes", "--detect"]) == 2
