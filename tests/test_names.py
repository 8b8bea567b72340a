"""One name policy wherever a user's image names are joined: inputs, landmarks, labels, scores, protocols."""

from __future__ import annotations

import numpy as np
import pytest

from aikd.cli import main
from aikd.io import write_csv
from aikd.names import NameIndex, match_names, normalise_name
from aikd.training.data import read_index

FIVE_POINTS = [38.3, 51.7, 73.5, 51.5, 56.0, 71.7, 41.5, 92.4, 70.7, 92.2]
LANDMARK_HEADER = ["path"] + [f"{axis}{i}" for i in range(1, 6) for axis in "xy"]


def test_normalise_name():
    assert normalise_name(".\\lfw\\a.jpg") == "lfw/a.jpg"
    assert normalise_name("/data//lfw/./a.jpg ") == "data/lfw/a.jpg"
    assert normalise_name("a/b/../c.jpg") == "a/c.jpg"
    assert normalise_name("Jose\u0301.jpg") == "Jos\u00e9.jpg"  # NFD (macOS file names) equals NFC


def test_exact_normalised_and_trailing_component_matches():
    paths = ["/data/lfw/Abel/Abel_0001.jpg", "lfw\\Bob\\Bob_0001.jpg", "Carl/Carl_0001.jpg",
             "x/dup/Dup_0001.jpg", "y/dup/Dup_0001.jpg"]
    index = NameIndex(paths)
    assert index.find("/data/lfw/Abel/Abel_0001.jpg") == 0  # exact
    assert index.find("Abel/Abel_0001.jpg") == 0  # trailing components of one path
    assert index.find("./lfw/Bob/Bob_0001.jpg") == 1  # normalised
    assert index.find("images/Carl/Carl_0001.jpg") == 2  # the path is the name's trailing components
    assert index.find("dup/Dup_0001.jpg") is None  # ambiguous: never a guess
    assert index.find("x/dup/Dup_0001.jpg") == 3
    assert index.find("Nobody/Nobody_0001.jpg") is None
    assert index.find("Carl_0001.jpg") == 2 and index.find("1.jpg") is None  # a partial file name is no component


def test_a_differing_folder_never_matches():
    index = NameIndex(["a/x/1.png", "b/x/1.png", "a/y/2.png", "id1/1.png"])
    assert index.find_all(["x/1.png", "y/2.png", "1.png", "id2/1.png"]).tolist() == [-1, 2, -1, -1]


def test_match_names_equals_the_index_and_finds_exact_names_by_sorting():
    paths = np.array(["n001/1.jpg", "n001/2.jpg", "n002/1.jpg", "./n003/1.jpg"])
    names = np.array(["n002/1.jpg", "vggface2/n001/2.jpg", "n003/1.jpg", "n004/1.jpg", "n001/1.jpg"])
    rows = match_names(names, paths)
    assert rows.tolist() == [2, 1, 3, -1, 0]
    assert rows.tolist() == NameIndex(paths.tolist()).find_all(names.tolist()).tolist()


def _image_tree(root, names):
    import cv2

    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), np.full((120, 110, 3), 128, np.uint8))


def test_training_index_joins_names_written_relative_to_another_root(tmp_path):
    """Landmarks from one tool (``vggface2/n001/1.jpg``), labels from another (``./n001/1.jpg``): one face."""
    root = tmp_path / "images"
    _image_tree(root, ["n001/1.jpg", "n001/2.jpg", "n002/1.jpg"])
    write_csv(tmp_path / "lm.csv", LANDMARK_HEADER,
              [[f"vggface2/{name}", *FIVE_POINTS] for name in ("n001/1.jpg", "n001/2.jpg", "n002/1.jpg")])
    write_csv(tmp_path / "labels.csv", ["path", "quality"],
              [["./n001/1.jpg", 0.9], ["n001\\2.jpg", 0.5], ["n002/1.jpg", 0.1], ["n009/1.jpg", 0.3]])
    index = read_index(root, tmp_path / "lm.csv", tmp_path / "labels.csv")
    assert index.names.tolist() == ["n001/1.jpg", "n001/2.jpg", "n002/1.jpg"]  # paths as stored on disk
    np.testing.assert_allclose(index.labels, [0.9, 0.5, 0.1])
    assert index.report.counts == {"no_landmarks": 1} and index.report.examples["no_landmarks"] == ["n009/1.jpg"]
    assert index.load_image(0).shape == (120, 110, 3)


def test_two_spellings_of_one_name_are_one_face(tmp_path):
    root = tmp_path / "images"
    _image_tree(root, ["a.jpg", "b.jpg"])
    write_csv(tmp_path / "lm.csv", LANDMARK_HEADER, [["a.jpg", *FIVE_POINTS], ["./a.jpg", *FIVE_POINTS],
                                                     ["b.jpg", *FIVE_POINTS]])
    write_csv(tmp_path / "labels.csv", ["path", "quality"], [["a.jpg", 0.9], ["b.jpg", 0.2]])
    index = read_index(root, tmp_path / "lm.csv", tmp_path / "labels.csv")
    assert index.names.tolist() == ["a.jpg", "b.jpg"] and index.report.counts == {"duplicate_landmarks": 1}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".pkl"])
def test_evaluate_and_train_read_every_score_file_aikd_score_writes(tmp_path, tiny_checkpoint, face_folder,
                                                                    suffix, tiny_train_config):
    """The bug of three score-file readers: ``aikd score -o s.jsonl`` was unreadable by evaluate and train."""
    folder, good, _ = face_folder
    scores = tmp_path / f"scores{suffix}"
    assert main(["score", str(folder), "--checkpoint", str(tiny_checkpoint), "-o", str(scores), "--device", "cpu",
                 "--embeddings", str(tmp_path / "emb.npz")]) == 1
    pairs = tmp_path / "pairs.csv"
    write_csv(pairs, ["a", "b", "genuine"], [[good[i], good[j], int((i + j) % 3 == 0)]
                                             for i in range(len(good)) for j in range(i + 1, len(good))])
    assert main(["evaluate", "--scores", str(scores), "--embeddings", str(tmp_path / "emb.npz"), "--pairs",
                 str(pairs), "--fmr", "0.2", "--no-plots", "-o", str(tmp_path / "report")]) == 0
    landmarks = tmp_path / "lm.csv"
    write_csv(landmarks, LANDMARK_HEADER, [[key, *FIVE_POINTS] for key in good])
    index = read_index(folder, landmarks, scores)
    assert sorted(index.names.tolist()) == good
