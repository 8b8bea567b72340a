"""Tests for aikd.align: template, similarity estimate, warp, landmark validation and misalignment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from aikd.align import (
    ALIGNED_SIZE,
    ARCFACE_TEMPLATE,
    Misalignment,
    align_face,
    align_faces,
    as_landmarks,
    check_landmarks,
    estimate_similarity,
    misalign,
    transform_points,
    valid_landmarks,
)

FACES = Path("/work/shared/data/faces")
TEMPLATE = ARCFACE_TEMPLATE.astype(np.float64)


def similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    """A (2, 3) similarity matrix: rotate by ``angle_deg``, scale, then translate."""
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def photo_landmarks(rng: np.random.Generator, count: int) -> np.ndarray:
    """Landmarks as a detector would give them in a 640x480 photo: template moved about, plus noise."""
    faces = []
    for _ in range(count):
        matrix = similarity(
            rng.uniform(-40, 40), rng.uniform(0.5, 3), rng.uniform(50, 400), rng.uniform(50, 300)
        )
        faces.append(transform_points(TEMPLATE, matrix) + rng.normal(0, 2, (5, 2)))
    return np.stack(faces)


def skimage_params(source: np.ndarray, target: np.ndarray = TEMPLATE) -> np.ndarray:
    transform = pytest.importorskip("skimage.transform")
    # float64 on both sides: given float32 points scikit-image computes in float32 (errors ~1e-6).
    estimate = transform.SimilarityTransform.from_estimate(
        source.astype(np.float64), target.astype(np.float64)
    )
    assert estimate, "scikit-image could not estimate a transform"
    return estimate.params[:2]


def draw_blobs(shape: tuple[int, int], centres: np.ndarray, sigma: float) -> np.ndarray:
    """A float32 image, black but for one gaussian blob of peak 1 at each (x, y) centre."""
    ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    image = np.zeros(shape)
    for x, y in centres:
        image += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return image.astype(np.float32)


def blob_centroids(image: np.ndarray, near: np.ndarray, radius: int = 7) -> np.ndarray:
    """Intensity centroid of the image in a window around each expected (x, y) position."""
    image = image.astype(np.float64)
    if image.ndim == 3:
        image = image.mean(axis=2)
    found = []
    for x, y in near:
        x0, y0 = int(round(x)) - radius, int(round(y)) - radius
        window = image[y0 : y0 + 2 * radius + 1, x0 : x0 + 2 * radius + 1]
        ys, xs = np.mgrid[y0 : y0 + window.shape[0], x0 : x0 + window.shape[1]]
        found.append([(window * xs).sum() / window.sum(), (window * ys).sum() / window.sum()])
    return np.array(found)


# ------------------------------------------------------------------------------------------- the template
def test_template_is_the_insightface_arcface_template():
    assert ARCFACE_TEMPLATE.shape == (5, 2) and ARCFACE_TEMPLATE.dtype == np.float32
    assert ALIGNED_SIZE == 112
    np.testing.assert_allclose(ARCFACE_TEMPLATE[0], [38.2946, 51.6963], atol=1e-4)
    np.testing.assert_allclose(ARCFACE_TEMPLATE[4], [70.7299, 92.2041], atol=1e-4)
    # Image-left eye is left of the image-right eye; mouth below the nose below the eyes.
    assert ARCFACE_TEMPLATE[0, 0] < ARCFACE_TEMPLATE[1, 0] and ARCFACE_TEMPLATE[3, 0] < ARCFACE_TEMPLATE[4, 0]
    assert ARCFACE_TEMPLATE[:2, 1].max() < ARCFACE_TEMPLATE[2, 1] < ARCFACE_TEMPLATE[3:, 1].min()
    with pytest.raises(ValueError):
        ARCFACE_TEMPLATE[0, 0] = 0.0


# -------------------------------------------------------------------------------------- similarity estimate
def test_template_landmarks_map_to_identity():
    np.testing.assert_allclose(estimate_similarity(ARCFACE_TEMPLATE), np.eye(2, 3), atol=1e-12)


@pytest.mark.parametrize(
    "angle, scale, tx, ty", [(0, 1, 10, -5), (30, 2.5, 100, 40), (-75, 0.4, -20, 300), (180, 1.7, 0, 0)]
)
def test_known_similarity_is_recovered(angle, scale, tx, ty):
    moved = similarity(angle, scale, tx, ty)
    landmarks = transform_points(TEMPLATE, moved)
    estimate = estimate_similarity(landmarks)
    composed = estimate[:, :2] @ moved[:, :2], estimate[:, :2] @ moved[:, 2] + estimate[:, 2]
    np.testing.assert_allclose(composed[0], np.eye(2), atol=1e-10)
    np.testing.assert_allclose(composed[1], 0, atol=1e-9)
    np.testing.assert_allclose(transform_points(landmarks, estimate), TEMPLATE, atol=1e-9)


def test_matches_skimage_on_random_and_photo_points():
    rng = np.random.default_rng(7)
    for source in list(rng.uniform(-500, 500, (20, 5, 2))) + list(photo_landmarks(rng, 20)):
        np.testing.assert_allclose(estimate_similarity(source), skimage_params(source), atol=1e-6)
    target = rng.uniform(0, 100, (5, 2))
    source = rng.uniform(0, 100, (5, 2))
    np.testing.assert_allclose(estimate_similarity(source, target), skimage_params(source, target), atol=1e-6)


def test_batch_estimate_matches_skimage_row_by_row():
    landmarks = photo_landmarks(np.random.default_rng(3), 16)
    batch = estimate_similarity(landmarks)
    assert batch.shape == (16, 2, 3) and batch.dtype == np.float64
    for row, matrix in zip(landmarks, batch, strict=True):
        np.testing.assert_allclose(matrix, skimage_params(row), atol=1e-6)
    np.testing.assert_allclose(estimate_similarity(landmarks.reshape(16, 10)), batch, atol=0)


def test_mirrored_landmarks_give_no_reflection():
    mirrored = TEMPLATE * [-1, 1] + [200, 0]  # left/right swapped as in a mirrored photo
    matrix = estimate_similarity(mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0
    np.testing.assert_allclose(matrix[0, 0], matrix[1, 1], atol=1e-12)  # [[a, -b], [b, a]]: no reflection
    np.testing.assert_allclose(matrix[0, 1], -matrix[1, 0], atol=1e-12)
    np.testing.assert_allclose(matrix, skimage_params(mirrored), atol=1e-6)
    rng = np.random.default_rng(11)
    batch = photo_landmarks(rng, 8) * [-1, 1]
    assert (np.linalg.det(estimate_similarity(batch)[:, :, :2]) > 0).all()


def test_flat_and_paired_landmarks_agree():
    landmarks = photo_landmarks(np.random.default_rng(5), 1)[0]
    flat = landmarks.reshape(10)
    assert flat[0] == landmarks[0, 0] and flat[1] == landmarks[0, 1]  # x1, y1, x2, ...
    np.testing.assert_array_equal(as_landmarks(flat), as_landmarks(landmarks))
    np.testing.assert_array_equal(estimate_similarity(flat), estimate_similarity(landmarks))
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    np.testing.assert_array_equal(align_face(image, flat), align_face(image, landmarks))


# --------------------------------------------------------------------------------------- landmark checking
def test_as_landmarks_copies_without_mutating_or_aliasing():
    for points in (
        ARCFACE_TEMPLATE.copy(),
        TEMPLATE.copy(),
        TEMPLATE.reshape(10).copy(),
        np.stack([TEMPLATE] * 3),
    ):
        before = points.copy()
        result = as_landmarks(points)
        assert result.dtype == np.float64 and not np.shares_memory(result, points)
        result += 1000
        np.testing.assert_array_equal(points, before)
    assert as_landmarks(TEMPLATE.tolist()).shape == (5, 2)
    assert as_landmarks(np.zeros((3, 10)) + TEMPLATE.reshape(10)).shape == (3, 5, 2)


@pytest.mark.parametrize(
    "points, message",
    [
        (np.ones((4, 2)), r"expected shape .*got \(4, 2\)"),
        (np.ones((5, 3)), r"got \(5, 3\)"),
        (np.ones((2, 5)), r"got \(2, 5\)"),
        (np.ones((2, 5, 2, 1)), r"got \(2, 5, 2, 1\)"),
        (np.array(["a"] * 10), "expected numbers"),
        (np.where(np.arange(10).reshape(5, 2) == 5, np.nan, TEMPLATE), "NaN or infinite.*nose"),
        (np.where(np.arange(10).reshape(5, 2) == 0, np.inf, TEMPLATE), "NaN or infinite.*left eye"),
        (np.vstack([TEMPLATE[:4], TEMPLATE[1]]), "right eye and right mouth corner coincide"),
        (np.zeros((5, 2)), "coincide"),
        (np.stack([np.linspace(0, 40, 5), np.linspace(10, 90, 5)], axis=1), "collinear"),
    ],
)
def test_bad_landmarks_raise_clear_errors(points, message):
    with pytest.raises(ValueError, match=message):
        as_landmarks(points)
    with pytest.raises(ValueError, match=message):
        check_landmarks(points)
    with pytest.raises(ValueError, match=message):
        estimate_similarity(points)


def test_degeneracy_tolerance_is_scale_aware():
    tiny = TEMPLATE * 1e-3  # a real face shape, only very small: fine
    assert valid_landmarks(tiny) and valid_landmarks(TEMPLATE * 1e4 + 1e6)
    line = np.stack([np.linspace(0, 4000, 5), np.linspace(0, 3000, 5)], axis=1)
    line[2] += [-0.006, 0.008]  # 1e-2 px off a 5000 px line: still collinear for practical purposes
    assert not valid_landmarks(line)
    near = TEMPLATE.copy()
    near[2] = near[0] + 1e-4  # nose 1e-4 px from the left eye
    assert not valid_landmarks(near)


def test_batch_errors_name_the_index_and_valid_landmarks_counts():
    batch = np.stack([TEMPLATE, TEMPLATE * 2, np.full((5, 2), np.nan), TEMPLATE, np.zeros((5, 2))])
    with pytest.raises(ValueError, match=r"landmarks\[2\]: NaN.*\(2 of 5 faces invalid\)"):
        as_landmarks(batch)
    valid = valid_landmarks(batch)
    assert valid.dtype == bool and valid.tolist() == [True, True, False, True, False]
    assert valid_landmarks(batch.reshape(5, 10)).tolist() == valid.tolist()
    assert valid_landmarks(TEMPLATE).shape == () and not valid_landmarks(np.zeros(10))


# ------------------------------------------------------------------------------------------------- warping
@pytest.mark.parametrize("dtype, channels", [(np.float32, None), (np.uint8, 3), (np.float64, 1)])
def test_synthetic_face_blobs_land_on_the_template(dtype, channels):
    moved = similarity(25, 2.6, 140, 30)
    landmarks = transform_points(TEMPLATE, moved)
    blobs = draw_blobs((420, 380), landmarks, sigma=1.3 * 2.6)
    if np.dtype(dtype) == np.uint8:
        blobs = np.round(blobs * 255)
    image = blobs.astype(dtype)
    if channels:
        image = np.repeat(image[:, :, None], channels, axis=2)
    aligned = align_face(image, landmarks)
    assert aligned.dtype == np.dtype(dtype)
    assert aligned.shape == (112, 112) + ((channels,) if channels else ())
    error = np.linalg.norm(blob_centroids(aligned, TEMPLATE) - TEMPLATE, axis=1)
    assert error.max() < 0.5, error


def test_noisy_landmarks_go_where_the_estimate_sends_them():
    rng = np.random.default_rng(2)
    landmarks = transform_points(TEMPLATE, similarity(-15, 2.0, 120, 60)) + rng.uniform(-4, 4, (5, 2))
    aligned = align_face(draw_blobs((360, 360), landmarks, sigma=2.4), landmarks)
    expected = transform_points(landmarks, estimate_similarity(landmarks))
    assert np.abs(expected - TEMPLATE).max() > 1  # the fit is not exact, so this checks the warp itself
    assert np.linalg.norm(blob_centroids(aligned, expected) - expected, axis=1).max() < 0.5


def test_other_sizes_scale_the_template():
    landmarks = transform_points(TEMPLATE, similarity(10, 3.0, 50, 20))
    image = draw_blobs((480, 480), landmarks, sigma=1.3 * 3.0 / 2)
    aligned = align_face(image, landmarks, size=224)
    assert aligned.shape == (224, 224)
    target = TEMPLATE * 2
    assert np.linalg.norm(blob_centroids(aligned, target, radius=9) - target, axis=1).max() < 0.5


def test_outside_the_source_is_black():
    image = np.full((60, 60, 3), 200, dtype=np.uint8)
    aligned = align_face(image, TEMPLATE - 26)  # the crop spans -26..86 px of this 60 px image
    assert aligned[0, 0].tolist() == [0, 0, 0] and aligned[-1, -1].tolist() == [0, 0, 0]
    assert aligned.max() == 200


def test_bad_images_and_sizes_raise():
    with pytest.raises(ValueError, match="dtype int32"):
        align_face(np.zeros((50, 50), np.int32), TEMPLATE)
    with pytest.raises(ValueError, match=r"shape \(H, W\) or \(H, W, C\)"):
        align_face(np.zeros((2, 50, 50, 3), np.uint8), TEMPLATE)
    with pytest.raises(ValueError, match="size"):
        align_face(np.zeros((50, 50), np.uint8), TEMPLATE, size=0)
    with pytest.raises(ValueError, match="align_faces"):
        align_face(np.zeros((50, 50), np.uint8), np.stack([TEMPLATE] * 2))


def test_align_faces_equals_a_loop_of_align_face():
    rng = np.random.default_rng(4)
    landmarks = photo_landmarks(rng, 4)
    images = [rng.integers(0, 256, (h, 640, 3), dtype=np.uint8) for h in (480, 500, 520, 480)]
    batch = align_faces(images, landmarks)
    assert batch.shape == (4, 112, 112, 3) and batch.dtype == np.uint8
    for image, row, aligned in zip(images, landmarks, batch, strict=True):
        np.testing.assert_array_equal(aligned, align_face(image, row))
    np.testing.assert_array_equal(
        align_faces(np.stack(images[:1] * 2), landmarks[[0, 0]].reshape(2, 10))[1], batch[0]
    )
    with pytest.raises(ValueError, match="3 images but 4 landmark rows"):
        align_faces(images[:3], landmarks)
    with pytest.raises(ValueError, match=r"images\[1\]"):
        align_faces([images[0], images[1][..., 0]], landmarks[:2])
    with pytest.raises(ValueError, match=r"landmarks\[1\]: .*coincide"):
        align_faces(images[:2], np.stack([landmarks[0], np.zeros((5, 2))]))


@pytest.mark.skipif(not FACES.exists(), reason="sample faces not present")
def test_real_aligned_crop_is_unchanged_by_aligning_to_the_template():
    cv2 = pytest.importorskip("cv2")
    path = sorted(FACES.glob("*.jpg"))[0]
    image = cv2.imread(str(path))
    assert image is not None and image.shape == (112, 112, 3), path
    np.testing.assert_array_equal(align_face(image, ARCFACE_TEMPLATE), image)
    misaligned = align_face(image, misalign(ARCFACE_TEMPLATE, np.random.default_rng(0)))
    difference = np.abs(misaligned.astype(int) - image.astype(int)).mean()
    assert 0 < difference < 60


# -------------------------------------------------------------------------------------------- misalignment
def test_default_misalignment_is_uniform_within_p():
    landmarks = np.stack([TEMPLATE] * 4000)
    shift = misalign(landmarks, np.random.default_rng(0)) - landmarks
    assert shift.shape == (4000, 5, 2)
    assert np.abs(shift).max() <= 3.0 and np.abs(shift).max() > 2.99
    assert abs(shift.mean()) < 0.05
    np.testing.assert_allclose(shift.std(), 3.0 / np.sqrt(3), rtol=0.02)
    np.testing.assert_allclose(shift.std(axis=(0, 1)), 3.0 / np.sqrt(3), rtol=0.03)  # x and y alike
    assert Misalignment().max_shift == 3.0


def test_misalignment_is_seeded_fresh_per_face_and_leaves_input_alone():
    landmarks = np.stack([TEMPLATE] * 3)
    before = landmarks.copy()
    first = misalign(landmarks, np.random.default_rng(42))
    np.testing.assert_array_equal(landmarks, before)
    assert not np.shares_memory(first, landmarks)
    np.testing.assert_array_equal(first, misalign(landmarks, np.random.default_rng(42)))
    np.testing.assert_array_equal(first, Misalignment().sample(landmarks, np.random.default_rng(42)))
    assert not np.allclose(first[0], first[1])  # each face its own noise
    rng = np.random.default_rng(1)
    assert not np.allclose(misalign(TEMPLATE, rng), misalign(TEMPLATE, rng))  # consecutive draws differ
    assert misalign(TEMPLATE.reshape(10), rng, max_shift=1.0).shape == (5, 2)
    np.testing.assert_array_equal(misalign(TEMPLATE, rng, max_shift=0.0), TEMPLATE)


@pytest.mark.parametrize("rng", [None, 0, np.random.RandomState(0)])
def test_misalignment_refuses_unseeded_or_legacy_generators(rng):
    with pytest.raises(TypeError, match="numpy Generator"):
        misalign(TEMPLATE, rng)


def test_global_modes_stay_within_bounds():
    rng = np.random.default_rng(9)
    landmarks = photo_landmarks(rng, 500)
    moved = Misalignment(max_shift=0.0, rotation=10.0, scale=0.2, translation=5.0).sample(landmarks, rng)
    fits = np.stack([estimate_similarity(moved[i], landmarks[i]) for i in range(500)])  # moved -> original
    angle = np.rad2deg(np.arctan2(fits[:, 1, 0], fits[:, 0, 0]))
    factor = 1 / np.hypot(fits[:, 0, 0], fits[:, 1, 0])
    assert np.abs(angle).max() <= 10 + 1e-9 and np.abs(angle).max() > 9
    assert (factor >= 0.8 - 1e-9).all() and (factor <= 1.2 + 1e-9).all() and np.ptp(factor) > 0.3
    translation = moved.mean(axis=1) - landmarks.mean(axis=1)  # rotation and scale keep the centroid
    assert np.abs(translation).max() <= 5 + 1e-9 and np.abs(translation).max() > 4.5
    only_translation = misalign(landmarks, rng, max_shift=0.0, translation=5.0) - landmarks
    np.testing.assert_allclose(only_translation, only_translation[:, :1].repeat(5, axis=1), atol=1e-9)


def test_global_modes_keep_the_per_point_noise_of_the_seed():
    plain = misalign(TEMPLATE, np.random.default_rng(3))
    shifted = misalign(TEMPLATE, np.random.default_rng(3), translation=5.0)
    offset = shifted - plain  # same per-point noise, plus one offset shared by all five points
    assert np.abs(offset[0]).max() > 0
    np.testing.assert_allclose(offset, np.repeat(offset[:1], 5, axis=0), atol=1e-12)


@pytest.mark.parametrize("field", ["max_shift", "rotation", "scale", "translation"])
def test_misalignment_rejects_negative_bounds_naming_the_field(field):
    with pytest.raises(ValueError, match=field):
        Misalignment(**{field: -1.0})
    with pytest.raises(ValueError, match=field):
        Misalignment(**{field: float("nan")})


def test_misalignment_rejects_impossible_bounds_and_is_frozen():
    with pytest.raises(ValueError, match="scale"):
        Misalignment(scale=1.0)
    with pytest.raises(ValueError, match="rotation"):
        Misalignment(rotation=270.0)
    with pytest.raises(ValueError, match="max_shift"):
        Misalignment(max_shift="3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Misalignment().max_shift = 5.0
