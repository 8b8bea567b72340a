"""aikd score, embed and label --engine ray: the local engine's scores, labels and files, resumable after the driver
is killed, the same refusals; Ray never imported by a local run. One local Ray session (2 CPUs) serves every test of
the module."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aikd.cli import main
from aikd.io import load_embeddings, read_labels
from aikd.pipeline.jobs import read_journal
from aikd.pipeline.outputs import journal_dir

try:
    import ray
except ImportError:  # scripts/install.sh installs the ray extra: under CI a missing Ray is a failure
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("the ray extra is not installed", allow_module_level=True)
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray of 2 CPUs (as on the CI machines) for the whole module; its address, for a driver of its own."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _score(folder: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["score", str(folder), "--checkpoint", str(checkpoint), "-o", str(out), "--device", "cpu",
            "--batch-size", "4", *extra]


def test_ray_writes_what_the_local_engine_writes(tmp_path, tiny_checkpoint, face_folder, ray_address):
    folder, good, bad = face_folder
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert main(_score(folder, tiny_checkpoint, local, "--embeddings", str(tmp_path / "local.npz"))) == 1
    assert main(_score(folder, tiny_checkpoint, remote, "--embeddings", str(tmp_path / "ray.npz"),
                       "--engine", "ray")) == 1
    expected, got = _rows(local), _rows(remote)
    assert [row[0] for row in got] == [row[0] for row in expected] == ["path", *good]
    np.testing.assert_allclose([float(r[1]) for r in got[1:]], [float(r[1]) for r in expected[1:]], atol=1e-6)
    assert _rows(tmp_path / "ray.errors.csv") == _rows(tmp_path / "local.errors.csv")
    assert sorted(row[0] for row in _rows(tmp_path / "ray.errors.csv")[1:]) == sorted(bad)
    local_keys, local_embeddings = load_embeddings(tmp_path / "local.npz")
    ray_keys, ray_embeddings = load_embeddings(tmp_path / "ray.npz")
    assert ray_keys == local_keys == good
    np.testing.assert_allclose(ray_embeddings, local_embeddings, atol=1e-6)
    assert (tmp_path / "ray.run.json").read_text() == (tmp_path / "local.run.json").read_text()
    # a Parquet manifest in, Parquet out
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(folder / key) for key in good]}), tmp_path / "manifest.parquet")
    parquet = tmp_path / "ray.parquet"
    assert main(_score(tmp_path / "manifest.parquet", tiny_checkpoint, parquet, "--engine", "ray")) == 0
    table = read_labels(parquet)
    assert table.paths == [str(folder / key) for key in good]
    np.testing.assert_allclose(table.qualities, [float(r[1]) for r in expected[1:]], atol=1e-6)


def test_ray_embeds_aligned_by_landmarks_as_the_local_engine_does(tmp_path, tiny_checkpoint, face_folder,
                                                                    ray_address):
    """aikd embed on the cluster, faces aligned (and misaligned) with a landmarks file each worker matches by key."""
    from aikd.align import ARCFACE_TEMPLATE
    from aikd.io import write_csv

    folder, good, _ = face_folder
    landmarks = tmp_path / "lm.csv"
    points = (ARCFACE_TEMPLATE * 0.9 + 4).ravel().tolist()
    write_csv(landmarks, ["path"] + [f"{axis}{i}" for i in range(1, 6) for axis in "xy"],
              [[key, *points] for key in good[1:]])  # the first image has none: an error either way
    embedded = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.npz"
        assert main(["embed", str(folder), "--weights", str(tiny_checkpoint), "-o", str(out), "--device", "cpu",
                     "--landmarks", str(landmarks), "--misalign", "2", "--seed", "3", "--engine", engine]) == 1
        embedded[engine] = load_embeddings(out)
        assert "no landmarks" in _rows(tmp_path / f"{engine}.errors.csv")[1][1]
    assert embedded["ray"][0] == embedded["local"][0] == good[1:]
    np.testing.assert_allclose(embedded["ray"][1], embedded["local"][1], atol=1e-6)


def _many(folder: Path, count: int) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return [f"{i:04d}.png" for i in range(count)]


def test_a_killed_ray_driver_resumes_with_what_is_missing(tmp_path, tiny_checkpoint, ray_address, monkeypatch):
    keys = _many(tmp_path / "many", 600)
    out = tmp_path / "s.csv"
    command = [*_score(tmp_path / "many", tiny_checkpoint, out, "--engine", "ray"), "--batch-size", "1"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    driver = subprocess.Popen([sys.executable, "-m", "aikd", *command, "--ray-address", ray_address], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = journal_dir(out) / "rank0.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.01)
    assert driver.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not out.exists()
    done_before = set(read_journal(out))
    assert 8 <= len(done_before) < len(keys)
    assert main([*command, "--resume", "--precision", "bf16"]) == 2  # other settings: refused, journal kept
    assert set(read_journal(out)) == done_before

    from aikd.pipeline import ray_engine

    sent: list[int] = []
    original = ray_engine._write_manifest
    monkeypatch.setattr(ray_engine, "_write_manifest", lambda todo, folder: original(
        (sent.append(1) or item for item in todo), folder))
    assert main([*command, "--resume"]) == 0
    assert len(sent) == len(keys) - len(done_before)  # only what was missing went to the cluster
    rows = _rows(out)
    assert [row[0] for row in rows[1:]] == keys  # every input once, in order
    local = tmp_path / "local.csv"
    assert main(_score(tmp_path / "many", tiny_checkpoint, local)) == 0
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], [float(r[1]) for r in _rows(local)[1:]], atol=1e-6)


def test_the_local_engine_never_imports_ray(tmp_path, tiny_checkpoint, face_folder):
    folder, _, _ = face_folder
    code = ("import sys; from aikd.cli import main; "
            f"main({_score(folder, tiny_checkpoint, tmp_path / 'local.csv')!r}); "
            "print('ray' in sys.modules, 'pyarrow' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "False False", done.stderr[-2000:]


def test_engine_usage_errors(tmp_path, tiny_checkpoint, face_folder, capsys):
    folder, _, _ = face_folder
    assert main(_score(folder, tiny_checkpoint, tmp_path / "s.csv", "--ray-address", "auto")) == 2
    assert "--engine ray" in capsys.readouterr().err
    assert main(_score(folder, tiny_checkpoint, tmp_path / "s.csv", "--ray-actors", "2")) == 2
    assert "--ray-actors is for a Ray cluster" in capsys.readouterr().err
    assert main(_score(folder, tiny_checkpoint, tmp_path / "s.csv", "--engine", "ray", "--ray-actors", "0")) == 2
    assert not (tmp_path / "s.csv").exists()

    import argparse

    from aikd.commands.options import add_engine_arguments, ray_options

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    chosen = ray_options(parser.parse_args(["--engine", "ray", "--ray-address", "auto", "--ray-actors", "3"]))
    assert (chosen.address, chosen.actors) == ("auto", 3)


def _identities(folder: Path, people: int = 3, each: int = 4) -> list[str]:
    rng = np.random.default_rng(11)
    keys = []
    for person in range(people):
        (folder / f"p{person}").mkdir(parents=True)
        for i in range(each):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"p{person}" / f"{i}.png")
            keys.append(f"p{person}/{i}.png")
    return keys


@pytest.mark.parametrize("method", ["magnitude", "faceqan", "certainty", "sddfiqa"])
def test_ray_labels_as_the_local_engine_does(tmp_path, tiny_checkpoint, face_folder, ray_address, method):
    """aikd label on the cluster: per-face techniques (FaceQAN's seeded noise included) on the actors, the whole-set
    pass of set techniques (certainty, SDD-FIQA over identity folders) on the driver; the same labels and errors as
    the local engine."""
    if method in ("certainty", "sddfiqa"):
        folder, good, bad, status = tmp_path / "people", _identities(tmp_path / "people", people=8), [], 0
    else:
        (folder, good, bad), status = face_folder, 1
    written = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}-{method}.csv"
        assert main(["label", str(folder), "--method", method, "--weights", str(tiny_checkpoint), "-o", str(out),
                     "--device", "cpu", "--batch-size", "4", "--seed", "7", "--engine", engine]) == status
        written[engine] = _rows(out)
        errors = tmp_path / f"{engine}-{method}.errors.csv"
        assert sorted(r[0] for r in _rows(errors)[1:]) == sorted(bad) if bad else not errors.exists()
    local, remote = written["local"], written["ray"]
    assert remote[0] == local[0] and [r[0] for r in remote[1:]] == [r[0] for r in local[1:]] == good
    columns = zip(zip(*local[1:], strict=True), zip(*remote[1:], strict=True), strict=True)
    for column, (theirs, ours) in enumerate(columns):
        try:
            np.testing.assert_allclose(np.array(ours, float), np.array(theirs, float), atol=1e-6,
                                       err_msg=local[0][column])
        except ValueError:  # a text column (the identity)
            assert ours == theirs


def test_ray_refuses_a_label_method_without_images(tmp_path, face_folder, capsys):
    folder, good, _ = face_folder
    labels = tmp_path / "l.csv"
    labels.write_text("path,quality\n" + "".join(f"{key},{i}\n" for i, key in enumerate(good)))
    assert main(["label", str(folder), "--method", "import", "--labels", str(labels), "-o", str(tmp_path / "o.csv"),
                 "--engine", "ray"]) == 2
    assert "reads no image" in capsys.readouterr().err
