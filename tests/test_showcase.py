"""The demo's parts: the degradation ladder, the face-set names and split, the comparisons, the report figures."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from aikd.demo.degradations import KINDS, LEVELS, degrade, face_box
from aikd.demo.showcase import (
    alignment_sensitivity,
    image_key,
    parse_key,
    split_identities,
    write_face_set,
    write_pairs,
)
from aikd.evaluation.report import read_pauc

LANDMARKS = np.array([[80, 90], [120, 90], [100, 112], [84, 135], [116, 135]], np.float64)


@pytest.fixture
def photo():
    """A smooth synthetic 'photo' with detail everywhere (blur, JPEG and downscaling all change it)."""
    y, x = np.mgrid[0:200, 0:200]
    pattern = 128 + 60 * np.sin(x / 3.0) * np.cos(y / 4.0) + 40 * np.sin((x + y) / 9.0)
    return np.clip(np.stack([pattern, pattern[::-1], pattern.T], axis=-1), 0, 255).astype(np.uint8)


def test_every_degradation_grows_with_its_level(photo):
    for kind in KINDS:
        changes = []
        for level in range(1, LEVELS + 1):
            degraded = degrade(photo, kind, level, LANDMARKS, np.random.default_rng(0))
            assert degraded.shape == photo.shape and degraded.dtype == np.uint8, kind
            changes.append(np.abs(degraded.astype(int) - photo).mean())
        assert 0 < changes[0] < changes[1] < changes[2], (kind, changes)
    assert np.array_equal(degrade(photo, "blur", 0, LANDMARKS, np.random.default_rng(0)), photo)
    again = [degrade(photo, "noise", 2, LANDMARKS, np.random.default_rng(5)) for _ in range(2)]
    assert np.array_equal(*again)  # seeded
    with pytest.raises(ValueError, match="unknown degradation 'fog'"):
        degrade(photo, "fog", 1, LANDMARKS, np.random.default_rng(0))
    with pytest.raises(ValueError, match="level must be 0..3"):
        degrade(photo, "blur", 4, LANDMARKS, np.random.default_rng(0))


def test_occlusion_covers_the_lower_face_only(photo):
    occluded = degrade(photo, "occlusion", 3, LANDMARKS, np.random.default_rng(0))
    changed = np.argwhere((occluded != photo).any(axis=-1))
    x, y, width = face_box(LANDMARKS)
    assert width == pytest.approx(100.0)
    assert changed[:, 0].min() > LANDMARKS[:2, 1].min() - 40 and changed[:, 0].max() <= y + 0.55 * width


def test_names_split_and_pairs(tmp_path, photo):
    assert parse_key(image_key("lfw_001", "blur", 2)) == ("lfw_001", "blur", 2)
    assert parse_key("heldout/" + image_key("astronaut", "original", 0)) == ("astronaut", "original", 0)
    with pytest.raises(ValueError, match="not a demo face name"):
        parse_key("astronaut/fog_1.png")
    training, held_out = split_identities(["astronaut", "grace_hopper", *(f"lfw_{i:03d}" for i in range(6))])
    assert "astronaut" in held_out and "grace_hopper" in training and len(held_out) == len(training) == 4
    assert split_identities(["a", "b", "c", "d", "e"], seed=1) == split_identities(["a", "b", "c", "d", "e"], seed=1)
    keys = write_face_set({"a": photo, "b": photo}, {"a": LANDMARKS, "b": LANDMARKS}, {"heldout": ["a", "b"]},
                          tmp_path / "photos", tmp_path / "landmarks.csv")["heldout"]
    per_face = 1 + len(KINDS) * LEVELS
    assert len(keys) == 2 * per_face and (tmp_path / "photos" / "heldout" / keys[0]).is_file()
    with open(tmp_path / "landmarks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(keys) and rows[0]["path"] == f"heldout/{keys[0]}" and float(rows[0]["x1"]) == 80
    mated, nonmated = write_pairs(keys, tmp_path / "pairs.csv")
    assert mated == 2 * (per_face - 1) and nonmated == per_face * per_face
    with open(tmp_path / "pairs.csv", newline="") as handle:
        genuine = [row for row in csv.DictReader(handle) if row["genuine"] == "1"]
    assert all(parse_key(row["a"])[2] == 0 and parse_key(row["a"])[0] == parse_key(row["b"])[0] for row in genuine)


def test_report_figures(tmp_path):
    quality = np.array([0.1, 0.5, 0.3, 0.9])
    same = alignment_sensitivity(quality, quality)
    assert same["mean_abs_percentile_change"] == 0 and same["spearman_aligned_misaligned"] == pytest.approx(1)
    swapped = alignment_sensitivity(quality, quality[::-1])
    assert swapped["mean_abs_percentile_change"] > 0.3 and swapped["spearman_aligned_misaligned"] < 0
    path = tmp_path / "pauc.csv"
    path.write_text("fr_model,dataset,method,fmr,threshold_mode,discard_limit,pauc,pauc_normalised,pauc_oracle,"
                    "pauc_minus_oracle,fnmr0,threshold,mated,comparisons\n"
                    "m,d,AI-KD,0.001,fixed,0.3,0.09,0.75,0.06,0.03,0.4,0.9,10,100\n"
                    "m,d,AI-KD,0.001,fixed,0.2,0.07,0.8,0.05,0.02,0.4,0.9,10,100\n")
    assert read_pauc(path) == {"AI-KD": 0.75, "oracle": pytest.approx(0.5)}
