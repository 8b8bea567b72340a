"""How inputs become model-input crops: resize, landmarks, misalignment determinism, the model's input size."""

import argparse

import numpy as np
import pytest

from aikd.align import ARCFACE_TEMPLATE, align_face
from aikd.commands.options import add_crop_arguments, crop_options
from aikd.images import ImageInput
from aikd.io import write_csv
from aikd.pipeline.crops import FaceCropper
from aikd.preprocessing import Preprocessing


def _args(*argv):
    """The crop options of a command line (as every per-image command builds them)."""
    parser = argparse.ArgumentParser()
    add_crop_arguments(parser)
    return crop_options(parser.parse_args(list(argv)))


@pytest.fixture
def photo():
    return np.random.default_rng(0).integers(0, 256, (200, 180, 3), dtype=np.uint8)


def _landmarks_file(tmp_path, rows):
    path = tmp_path / "lm.csv"
    header = ["path"] + [f"{a}{i}" for i in range(1, 6) for a in "xy"]
    write_csv(path, header, [[key, *np.asarray(points).ravel().tolist()] for key, points in rows])
    return path


def test_default_takes_the_image_whole_and_preprocessing_alone_resizes(photo, tmp_path):
    item = ImageInput(tmp_path / "a.png", "a.png")
    crop = FaceCropper(_args(), Preprocessing(), [item])(photo, item)
    assert crop is photo
    assert Preprocessing().normalise(crop).shape == (112, 112, 3)


def test_landmarks_align_and_report_missing(photo, tmp_path):
    points = ARCFACE_TEMPLATE * 1.3 + 20
    items = [ImageInput(tmp_path / "a.png", "a.png"), ImageInput(tmp_path / "b.png", "b.png")]
    args = _args("--landmarks", str(_landmarks_file(tmp_path, [("a.png", points)])))
    prepare = FaceCropper(args, items=items)
    np.testing.assert_array_equal(prepare(photo, items[0]), align_face(photo, points))
    with pytest.raises(ValueError, match="no landmarks for this image in .*lm.csv"):
        prepare(photo, items[1])


def test_misalignment_is_deterministic_per_key(photo, tmp_path):
    points = ARCFACE_TEMPLATE * 1.3 + 20
    items = [ImageInput(tmp_path / k, k) for k in ("a.png", "b.png")]
    lm = str(_landmarks_file(tmp_path, [("a.png", points), ("b.png", points)]))
    first = FaceCropper(_args("--landmarks", lm, "--misalign", "3", "--seed", "1"), items=items)
    again = FaceCropper(_args("--landmarks", lm, "--misalign", "3", "--seed", "1"), items=items[::-1])
    other_seed = FaceCropper(_args("--landmarks", lm, "--misalign", "3", "--seed", "2"), items=items)
    np.testing.assert_array_equal(first(photo, items[0]), again(photo, items[0]))
    assert not np.array_equal(first(photo, items[0]), first(photo, items[1]))
    assert not np.array_equal(first(photo, items[0]), other_seed(photo, items[0]))
    assert not np.array_equal(first(photo, items[0]), align_face(photo, points))


def test_option_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --landmarks"):
        _args("--misalign", "3")
    with pytest.raises(ValueError, match=">= 0"):
        _args("--misalign", "-1")
    with pytest.raises(SystemExit):
        _args("--landmarks", "x.csv", "--detect")
