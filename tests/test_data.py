"""Training data: synthetic faces, the (image, landmarks, label) index and its report, the split, the dataset."""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from aikd.align import ARCFACE_TEMPLATE, Misalignment, align_face
from aikd.models import Preprocessing
from aikd.training.data import (
    TRAIN_STREAM,
    VAL_STREAM,
    DataConfig,
    DistillationDataset,
    SyntheticConfig,
    build_index,
    make_loader,
    read_index,
    split_by_label,
)
from aikd.training.synthetic import SyntheticFaces

COLUMNS = "path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5"
GOOD = [40.0, 50.0, 70.0, 50.0, 55.0, 70.0, 43.0, 90.0, 68.0, 90.0]


# ----------------------------------------------------------------------------------------------- synthetic
def test_synthetic_landmarks_are_exact():
    faces = SyntheticFaces(count=6, image_size=144, seed=3)
    for i in range(6):
        aligned = align_face(faces.clean_image(i), faces.landmarks[i])
        for eye in ARCFACE_TEMPLATE[:2]:  # the pupil (dark) sits exactly on each eye landmark
            x, y = np.round(eye).astype(int)
            assert aligned[y, x].max() < 80, (i, aligned[y, x])
        x, y = np.round(ARCFACE_TEMPLATE[2]).astype(int)
        assert aligned[y - 20, x].min() > 30  # forehead: skin, not the black border


def test_synthetic_is_seeded_and_label_follows_degradation():
    a, b = SyntheticFaces(count=8, seed=1), SyntheticFaces(count=8, seed=1)
    assert np.array_equal(a.load_image(5), b.load_image(5))
    assert not np.array_equal(a.load_image(5), SyntheticFaces(count=8, seed=2).load_image(5))
    np.testing.assert_allclose(a.labels, 1 - a.degradation, rtol=1e-6)
    faces = SyntheticFaces(count=64, seed=0)
    sharpness = [cv2.Laplacian(cv2.cvtColor(align_face(faces.clean_image(i), faces.landmarks[i]), cv2.COLOR_RGB2GRAY),
                               cv2.CV_64F).var() for i in range(64)]
    degraded = [cv2.Laplacian(cv2.GaussianBlur(cv2.cvtColor(align_face(faces.load_image(i), faces.landmarks[i]),
                                                            cv2.COLOR_RGB2GRAY), (5, 5), 0), cv2.CV_64F).var()
                for i in range(64)]
    ratio = np.array(degraded) / np.array(sharpness)
    # Detail left after degradation falls as the label falls: the label is visible in the pixels.
    assert np.corrcoef(ratio, faces.labels)[0, 1] > 0.5


def test_synthetic_index_from_config():
    index = build_index(DataConfig(source="synthetic"))
    assert len(index) == 512 and index.landmarks.shape == (512, 5, 2) and index.image_root is None
    assert index.load_image(0).shape == (144, 144, 3)


# --------------------------------------------------------------------------------------------------- index
def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((120, 110, 3), 128, np.uint8))


def _write_set(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "images"
    for name in ("a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg", "b/5.jpg", "c/6.jpg", "c/7.png", "c/only_image.jpg"):
        _image(root / name)
    (root / "notes.txt").write_text("not an image")
    rows = {"a/1.jpg": GOOD, "a/2.jpg": GOOD, "b/3.jpg": GOOD, "b/4.jpg": GOOD, "c/6.jpg": GOOD,
            "c/7.png": [40, 50, 40, 50, 55, 70, 43, 90, 68, 90],  # both eyes at one point
            "missing/8.jpg": GOOD, "landmarks_only.jpg": GOOD}
    landmarks = tmp_path / "landmarks.csv"
    lines = [COLUMNS] + [f"{name}," + ",".join(str(v) for v in values) for name, values in rows.items()]
    landmarks.write_text("\n".join(lines + ["a/1.jpg," + ",".join(["1"] * 10)]) + "\n")  # duplicate: first kept
    labels = tmp_path / "labels.csv"
    scores = {"a/1.jpg": 0.9, "a/2.jpg": 0.1, "b/3.jpg": 0.5, "b/4.jpg": "nan", "b/5.jpg": 0.3, "c/6.jpg": 0.7,
              "c/7.png": 0.2, "missing/8.jpg": 0.4}
    labels.write_text("path,quality\n" + "".join(f"{k},{v}\n" for k, v in scores.items()))
    return root, landmarks, labels


def test_index_reports_every_problem_with_counts_and_examples(tmp_path):
    root, landmarks, labels = _write_set(tmp_path)
    index = read_index(root, landmarks, labels)
    assert list(index.names) == ["a/1.jpg", "a/2.jpg", "b/3.jpg", "c/6.jpg"]
    np.testing.assert_allclose(index.landmarks[0].ravel(), GOOD)  # the first of the duplicated rows
    np.testing.assert_allclose(index.labels, [0.9, 0.1, 0.5, 0.7])
    report = index.report
    assert report.usable == 4
    assert report.counts == {"duplicate_landmarks": 1, "no_landmarks": 2, "no_label": 2, "no_image": 1,
                             "bad_label": 1, "bad_landmarks": 1}
    assert report.examples["no_landmarks"] == ["b/5.jpg", "c/only_image.jpg"]
    assert report.examples["no_label"] == ["c/only_image.jpg", "landmarks_only.jpg"]
    assert report.examples["no_image"] == ["missing/8.jpg"]
    assert report.examples["bad_label"] == ["b/4.jpg"]
    assert report.examples["bad_landmarks"] == ["c/7.png"]
    summary = report.summary()
    assert "4 usable faces" in summary and "skipped 1 labels without an image file" in summary
    assert "e.g. missing/8.jpg" in summary
    assert index.load_image(0).shape == (120, 110, 3)


def test_index_without_image_check_keeps_entries_without_files(tmp_path):
    root, landmarks, labels = _write_set(tmp_path)
    index = read_index(root, landmarks, labels, check_images=False)
    assert "missing/8.jpg" in index.names and "no_image" not in index.report.counts
    assert index.report.counts["no_label"] == 1  # only the landmarks file is known now


def test_index_reads_official_pickles(tmp_path):
    root = tmp_path / "images"
    for name in ("x/1.jpg", "x/2.jpg"):
        _image(root / name)
    detection = np.array([1.0, 2.0, 90.0, 100.0, 0.99])
    with open(tmp_path / "landmarks.pkl", "wb") as handle:
        pickle.dump({"x/1.jpg": (detection, np.array(GOOD).reshape(5, 2)), "x/2.jpg": (detection, np.array(GOOD))},
                    handle)
    with open(tmp_path / "labels.pkl", "wb") as handle:
        pickle.dump({"x/1.jpg": np.float32(0.25), "x/2.jpg": 0.75}, handle)
    index = read_index(root, tmp_path / "landmarks.pkl", tmp_path / "labels.pkl")
    assert list(index.names) == ["x/1.jpg", "x/2.jpg"]
    np.testing.assert_allclose(index.labels, [0.25, 0.75])
    assert index.landmarks.dtype == np.float32 and index.landmarks.shape == (2, 5, 2)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["landmarks", "labels"])
def test_index_refuses_a_malicious_pickle(tmp_path, which):
    root = tmp_path / "images"
    _image(root / "x.jpg")
    marker = tmp_path / "pwned"
    files = {"landmarks": {"x.jpg": (None, np.array(GOOD))}, "labels": {"x.jpg": 0.5}}
    files[which] = {"x.jpg": _Evil(marker)}
    for name, content in files.items():
        with open(tmp_path / f"{name}.pkl", "wb") as handle:
            pickle.dump(content, handle)
    with pytest.raises(ValueError, match=rf"{which}\.pkl.*refused to load posix\.system"):
        read_index(root, tmp_path / "landmarks.pkl", tmp_path / "labels.pkl")
    assert not marker.exists()


def test_index_csv_with_a_bad_cell_takes_the_tolerant_reader(tmp_path):
    root = tmp_path / "images"
    for name in ("1.jpg", "2.jpg"):
        _image(root / name)
    (tmp_path / "lm.csv").write_text(f"{COLUMNS},score\n1.jpg,{','.join(map(str, GOOD))},9\n"
                                     f"2.jpg,oops,{','.join(map(str, GOOD[1:]))},9\n")
    (tmp_path / "q.csv").write_text("path,quality,other\n1.jpg,0.5,x\n2.jpg,0.6,y\n")
    index = read_index(root, tmp_path / "lm.csv", tmp_path / "q.csv")
    assert list(index.names) == ["1.jpg"] and index.report.examples["bad_landmarks"] == ["2.jpg"]


def test_index_errors_name_the_problem(tmp_path):
    root, landmarks, labels = _write_set(tmp_path)
    (tmp_path / "bad.csv").write_text("name,quality\nx,1\n")
    with pytest.raises(ValueError, match="bad.csv: labels file lacks column"):
        read_index(root, landmarks, tmp_path / "bad.csv")
    (tmp_path / "none.csv").write_text("path,quality\nzzz.jpg,0.5\n")
    with pytest.raises(ValueError, match="no usable training faces"):
        read_index(root, landmarks, tmp_path / "none.csv")
    with pytest.raises(ValueError, match="data.landmarks: required"):
        build_index(DataConfig(images=str(root), labels=str(labels)))
    with pytest.raises(ValueError, match="data.images: .* does not exist"):
        build_index(DataConfig(images=str(tmp_path / "nope"), landmarks=str(landmarks), labels=str(labels)))


# --------------------------------------------------------------------------------------------------- split
def test_split_by_label_takes_every_kth_by_label():
    labels = np.random.default_rng(0).permutation(1000) / 1000.0
    train, val = split_by_label(labels, 0.01)
    assert len(val) == 10 and len(train) == 990
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).size == 1000
    np.testing.assert_allclose(np.sort(labels[val]), np.arange(0, 1000, 100) / 1000.0)  # spread over the range
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_label(labels, 0.0)


# ------------------------------------------------------------------------------------------------- dataset
@pytest.fixture
def synthetic_index():
    return build_index(DataConfig(source="synthetic", synthetic=SyntheticConfig(24, 96, 0)))


def test_misalignment_is_fresh_per_epoch_reproducible_and_never_mutates(synthetic_index):
    before = synthetic_index.landmarks.copy()
    dataset = DistillationDataset(synthetic_index, np.arange(24), Preprocessing(), Misalignment(3.0), seed=7)
    first = dataset.misaligned_landmarks(5)
    assert np.abs(first - before[5]).max() <= 3.0 and np.abs(first - before[5]).max() > 0.1
    item = dataset[5]
    dataset.set_epoch(1)
    again = dataset[5]
    assert not torch.equal(item["misaligned"], again["misaligned"])  # fresh noise in a new epoch
    assert torch.equal(item["aligned"], again["aligned"])  # the teacher's view never changes
    dataset.set_epoch(0)
    assert torch.equal(dataset[5]["misaligned"], item["misaligned"])  # (seed, epoch, index) decides
    other = DistillationDataset(synthetic_index, np.arange(24), Preprocessing(), Misalignment(3.0), seed=7)
    assert np.array_equal(other.misaligned_landmarks(5), first)
    np.testing.assert_array_equal(synthetic_index.landmarks, before)
    assert item["index"].item() == 5 and item["quality"].dtype == torch.float32


def test_validation_stream_ignores_the_epoch_and_items_can_skip_the_aligned_view(synthetic_index):
    val = DistillationDataset(synthetic_index, np.arange(4), Preprocessing(), Misalignment(), 0, VAL_STREAM)
    first = val.misaligned_landmarks(2)
    val.set_epoch(3)
    assert np.array_equal(val.misaligned_landmarks(2), first)
    train = DistillationDataset(synthetic_index, np.arange(4), Preprocessing(), Misalignment(), 0, TRAIN_STREAM)
    assert not np.array_equal(train.misaligned_landmarks(2), first)
    train.skip_aligned = np.zeros(len(synthetic_index), bool)
    train.skip_aligned[[1, 3]] = True
    batch = next(iter(make_loader(train, 4, shuffle=False, seed=0)))
    assert batch["misaligned"].shape == (4, 3, 112, 112)
    assert batch["aligned_rows"].tolist() == [0, 2] and batch["aligned"].shape == (2, 3, 112, 112)


def test_loader_resumes_mid_epoch_and_splits_ranks(synthetic_index):
    dataset = DistillationDataset(synthetic_index, np.arange(24), Preprocessing(), Misalignment(), seed=1)
    full = [b["index"].tolist() for b in make_loader(dataset, 4, shuffle=True, seed=3, epoch=2, drop_last=True)]
    tail = [b["index"].tolist() for b in make_loader(dataset, 4, shuffle=True, seed=3, epoch=2, start_batch=2,
                                                    drop_last=True)]
    assert tail == full[2:] and len(full) == 6
    other_epoch = [b["index"].tolist() for b in make_loader(dataset, 4, shuffle=True, seed=3, epoch=3)]
    assert other_epoch != full
    ranks = [sum((b["index"].tolist() for b in make_loader(dataset, 4, shuffle=True, seed=3, epoch=2, rank=r,
                                                           world_size=2)), []) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(24))


# ----------------------------------------------------------------------------------------------- large index
INDEX_SCRIPT = """
import resource, sys, time
from aikd.training.data import read_index
start = time.perf_counter()
index = read_index(sys.argv[1], sys.argv[2], sys.argv[3], check_images=False)
print(len(index), time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write_large_index(folder: Path, count: int) -> None:
    """Landmarks and labels CSV files of ``count`` VGGFace2-style names (about 90 bytes per landmarks row)."""
    rng = np.random.default_rng(0)
    with open(folder / "landmarks.csv", "w") as lm, open(folder / "labels.csv", "w") as lb:
        lm.write(COLUMNS + "\n")
        lb.write("path,quality\n")
        for start in range(0, count, 100_000):
            ids = np.arange(start, min(count, start + 100_000))
            names = [f"n{i // 360:06d}/{i % 360:04d}_01.jpg" for i in ids.tolist()]
            points = (np.array(GOOD) + rng.uniform(-5, 5, (len(ids), 10))).round(2)
            lm.write("".join(f"{n},{','.join(map(str, p))}\n" for n, p in zip(names, points.tolist(), strict=True)))
            lb.write("".join(f"{n},{q:.5f}\n" for n, q in zip(names, rng.uniform(0, 1, len(ids)).tolist(),
                                                             strict=True)))


@pytest.mark.slow
def test_index_of_vggface2_size(tmp_path):
    """3.3 M entries (VGGFace2) from CSV, image check off: time and peak memory of the indexing process."""
    count = 3_300_000
    start = time.perf_counter()
    write_large_index(tmp_path, count)
    print(f"\nwrote {count} rows in {time.perf_counter() - start:.1f} s")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", INDEX_SCRIPT, str(tmp_path), str(tmp_path / "landmarks.csv"),
                          str(tmp_path / "labels.csv")], capture_output=True, text=True, env=env, check=True)
    entries, seconds, peak_mb = out.stdout.split()
    print(f"indexed {entries} entries in {float(seconds):.1f} s, peak RSS {float(peak_mb):.0f} MB "
          f"(test process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    assert int(entries) == count
    assert float(seconds) < 60 and float(peak_mb) < 4096
