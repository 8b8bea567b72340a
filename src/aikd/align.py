"""Five-point face alignment to the ArcFace 112x112 template, and the AI-KD landmark misalignment.

Alignment follows insightface: the five landmarks of a face (left eye, right eye, nose, left mouth corner,
right mouth corner; left/right as seen in the image) are mapped onto :data:`ARCFACE_TEMPLATE`, the
``arcface_dst`` points of ``insightface/utils/face_align.py``, by the least-squares similarity transform
(rotation, uniform scale, translation; never a reflection) of S. Umeyama, "Least-squares estimation of
transformation parameters between two point patterns", IEEE TPAMI 13(4), 1991, eqs. (40)-(42). In two
dimensions Umeyama's solution, with his reflection correction, equals the closed form used here: with
centred source points ``p`` and centred template points ``q``, the linear part is ``[[a, -b], [b, a]]`` with
``a = sum(p . q) / sum(|p|^2)`` and ``b = sum(p x q) / sum(|p|^2)``. This is what
``skimage.transform.SimilarityTransform.from_estimate`` returns, and it vectorises over a batch.

The crop is ``cv2.warpAffine`` with bilinear interpolation and a black constant border.

Misalignment follows Babnik et al., "AI-KD: Towards Alignment Invariant Face Image Quality Assessment Using
Knowledge Distillation", IWBF 2024: every landmark coordinate gets i.i.d. noise ``U[-p, p]`` in
source-image pixels before alignment, with ``p = 3`` by default. :class:`Misalignment` adds optional global
modes (rotation, scale and translation of all five points together) for ablations.

Example::

    landmarks = as_landmarks(row)                     # (5, 2) or flat x1, y1, ..., x5, y5
    aligned = align_face(image, landmarks)            # (112, 112, C), image dtype
    misaligned = misalign(landmarks, np.random.default_rng(0), max_shift=3.0)
    student_input = align_face(image, misaligned)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "ALIGNED_SIZE",
    "ARCFACE_TEMPLATE",
    "LANDMARK_NAMES",
    "Misalignment",
    "align_face",
    "align_faces",
    "as_landmarks",
    "check_landmarks",
    "estimate_similarity",
    "misalign",
    "transform_points",
    "valid_landmarks",
]

ALIGNED_SIZE = 112
"""Side of the aligned crop the ArcFace template is defined in."""

ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float32,
)
ARCFACE_TEMPLATE.flags.writeable = False

LANDMARK_NAMES = ("left eye", "right eye", "nose", "left mouth corner", "right mouth corner")

DEGENERACY_TOLERANCE = 1e-4
"""Relative tolerance for degenerate landmarks: two points closer than this times the landmarks' spread
(RMS distance from their centroid) coincide; five points whose smaller principal extent is below this times
the larger one are collinear."""

_WARP_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)  # what cv2.warpAffine accepts
_OK, _NOT_FINITE, _COINCIDENT, _COLLINEAR = 0, 1, 2, 3
_CHUNK = 65536  # faces checked at once: bounds the temporaries when validating a large index


# ------------------------------------------------------------------------------------------------ landmarks
def _to_array(points: object, name: str = "landmarks") -> tuple[np.ndarray, bool]:
    """Copy ``points`` to a float64 (N, 5, 2) array; also say whether the input was a batch."""
    raw = np.asarray(points)
    if raw.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected numbers, got an array of dtype {raw.dtype}")
    shape = raw.shape
    if shape in ((5, 2), (10,)):
        batched = False
    elif (raw.ndim == 3 and shape[1:] == (5, 2)) or (raw.ndim == 2 and shape[1] == 10):
        batched = True
    else:
        raise ValueError(
            f"{name}: expected shape (5, 2), (10,), (N, 5, 2) or (N, 10) (x1, y1, ..., x5, y5), got {shape}"
        )
    array = np.array(raw, dtype=np.float64, copy=True).reshape(-1, 5, 2)
    return array, batched


def _problems(landmarks: np.ndarray) -> np.ndarray:
    """Problem code per face of a float64 (N, 5, 2) array: ok, not finite, coincident or collinear."""
    codes = np.full(len(landmarks), _OK)
    for start in range(0, len(landmarks), _CHUNK):
        codes[start : start + _CHUNK] = _chunk_problems(landmarks[start : start + _CHUNK])
    return codes


def _chunk_problems(landmarks: np.ndarray) -> np.ndarray:
    finite = np.isfinite(landmarks).all(axis=(1, 2))
    points = np.where(finite[:, None, None], landmarks, 0.0)
    centred = points - points.mean(axis=1, keepdims=True)
    spread = np.sqrt((centred**2).sum(axis=2).mean(axis=1))
    first, second = np.triu_indices(5, k=1)
    distances = np.linalg.norm(points[:, first] - points[:, second], axis=-1)
    coincident = distances.min(axis=1) <= DEGENERACY_TOLERANCE * spread
    # Singular values of the centred points from the 2x2 scatter matrix in closed form: orders of magnitude
    # cheaper than a batched SVD over millions of faces (measured: docs/speed.md).
    sxx = (centred[..., 0] ** 2).sum(axis=1)
    syy = (centred[..., 1] ** 2).sum(axis=1)
    sxy = (centred[..., 0] * centred[..., 1]).sum(axis=1)
    largest = (sxx + syy) / 2 + np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    smallest = np.divide(np.maximum(sxx * syy - sxy**2, 0.0), largest, out=np.zeros_like(largest),
                         where=largest > 0)
    collinear = np.sqrt(smallest) <= DEGENERACY_TOLERANCE * np.sqrt(largest)
    codes = np.full(len(points), _OK)
    codes[collinear] = _COLLINEAR
    codes[coincident] = _COINCIDENT
    codes[~finite] = _NOT_FINITE
    return codes


def _describe(landmarks: np.ndarray, code: int) -> str:
    """Say in words what is wrong with one (5, 2) face."""
    if code == _NOT_FINITE:
        bad = [LANDMARK_NAMES[i] for i in range(5) if not np.isfinite(landmarks[i]).all()]
        return f"NaN or infinite coordinates ({', '.join(bad)})"
    if code == _COINCIDENT:
        distances = np.linalg.norm(landmarks[:, None] - landmarks[None], axis=-1)
        np.fill_diagonal(distances, np.inf)
        i, j = np.unravel_index(np.argmin(distances), distances.shape)
        x, y = landmarks[i]
        return f"{LANDMARK_NAMES[i]} and {LANDMARK_NAMES[j]} coincide at ({x:g}, {y:g})"
    return "all five points are collinear"


def _validate(landmarks: np.ndarray, batched: bool, name: str = "landmarks") -> np.ndarray:
    """Raise ``ValueError`` naming the first bad face of a float64 (N, 5, 2) array; return it unchanged."""
    codes = _problems(landmarks)
    bad = np.flatnonzero(codes != _OK)
    if bad.size:
        index = int(bad[0])
        reason = _describe(landmarks[index], int(codes[index]))
        if not batched:
            raise ValueError(f"{name}: {reason}")
        raise ValueError(f"{name}[{index}]: {reason} ({bad.size} of {len(landmarks)} faces invalid)")
    return landmarks


def as_landmarks(points: object) -> np.ndarray:
    """Validate five-point landmarks and return a float64 copy.

    Args:
        points: (5, 2) points, flat (10,) as x1, y1, ..., x5, y5, or a batch of either, (N, 5, 2) or (N, 10).
            Never modified, and never shared with the result.

    Returns:
        (5, 2) for one face, (N, 5, 2) for a batch.

    Raises:
        ValueError: wrong shape or dtype, NaN/inf, two coincident points or five collinear points; for a batch
            the message names the first bad index and how many faces are bad.
    """
    landmarks, batched = _to_array(points)
    _validate(landmarks, batched)
    return landmarks if batched else landmarks[0]


def check_landmarks(points: object) -> None:
    """Raise ``ValueError`` if ``points`` are not usable five-point landmarks (see :func:`as_landmarks`)."""
    as_landmarks(points)


def valid_landmarks(points: object) -> np.ndarray:
    """Say which faces have usable landmarks, without raising for bad values.

    Args:
        points: (5, 2), (10,), (N, 5, 2) or (N, 10) landmarks.

    Returns:
        A numpy bool for one face, an (N,) bool array for a batch: False where a face has NaN/inf,
        coincident or collinear points.

    Raises:
        ValueError: only when ``points`` has no landmark shape at all (there is no row to judge).
    """
    landmarks, batched = _to_array(points)
    valid = _problems(landmarks) == _OK
    return valid if batched else valid[0]


# ------------------------------------------------------------------------------------ similarity transform
def _template_points(template: object, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The template as a validated float64 (5, 2) array, scaled from the 112 frame to ``size``."""
    if np.shape(template) != (5, 2):
        raise ValueError(f"template: expected shape (5, 2), got {np.shape(template)}")
    points, _ = _to_array(template, "template")
    return _validate(points, False, "template")[0] * (size / ALIGNED_SIZE)


def _similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity (N, 2, 3) from float64 (N, 5, 2) source points to (5, 2) target points."""
    source_mean = source.mean(axis=1)
    target_mean = target.mean(axis=0)
    p = source - source_mean[:, None, :]
    q = target - target_mean
    variance = (p**2).sum(axis=(1, 2))
    a = (p * q).sum(axis=(1, 2)) / variance
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(axis=1) / variance
    linear = np.stack([np.stack([a, -b], axis=-1), np.stack([b, a], axis=-1)], axis=1)
    translation = target_mean - np.einsum("nij,nj->ni", linear, source_mean)
    return np.concatenate([linear, translation[:, :, None]], axis=2)


def estimate_similarity(landmarks: object, template: object = ARCFACE_TEMPLATE) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991, no reflection) from landmarks onto the template.

    Args:
        landmarks: (5, 2), (10,), (N, 5, 2) or (N, 10) source-image points.
        template: (5, 2) target points.

    Returns:
        float64 (2, 3) affine matrix for one face, (N, 2, 3) for a batch; ``matrix @ [x, y, 1]`` maps a
        source point into the template frame.
    """
    source, batched = _to_array(landmarks)
    matrices = _similarity(_validate(source, batched), _template_points(template))
    return matrices if batched else matrices[0]


def transform_points(points: object, matrix: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix, or one (N, 2, 3) matrix per face, to (..., 2) points."""
    points = np.asarray(points, dtype=np.float64)
    matrix = np.asarray(matrix, dtype=np.float64)
    return np.einsum("...ij,...kj->...ki", matrix[..., :2], points) + matrix[..., None, :, 2]


# ------------------------------------------------------------------------------------------------- warping
def _check_image(image: np.ndarray, name: str = "image") -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: expected shape (H, W) or (H, W, C), got {image.shape}")
    if image.dtype.type not in _WARP_DTYPES:
        names = ", ".join(np.dtype(t).name for t in _WARP_DTYPES)
        raise ValueError(f"{name}: dtype {image.dtype} cannot be warped; use one of {names}")


def _warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    aligned = cv2.warpAffine(
        np.ascontiguousarray(image),
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return aligned.reshape((size, size) + image.shape[2:])  # cv2 drops a trailing channel axis of 1


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size: expected a positive integer, got {size!r}")


def align_face(
    image: np.ndarray, landmarks: object, size: int = ALIGNED_SIZE, template: object = ARCFACE_TEMPLATE
) -> np.ndarray:
    """Warp one face onto the template: bilinear, black outside the source image.

    Args:
        image: (H, W) or (H, W, C) image (uint8, uint16, int16, float32 or float64).
        landmarks: (5, 2) or (10,) points in ``image`` pixels.
        size: side of the aligned crop; the template (given in the 112x112 frame) is scaled by ``size / 112``.
        template: (5, 2) target points in the 112x112 frame.

    Returns:
        (size, size) or (size, size, C) array of the image's dtype.
    """
    _check_image(image)
    _check_size(size)
    points, batched = _to_array(landmarks)
    if batched:
        raise ValueError(
            f"landmarks: align_face takes one face, got shape {np.shape(landmarks)}; use align_faces"
        )
    matrix = _similarity(_validate(points, False), _template_points(template, size))[0]
    return _warp(image, matrix, size)


def align_faces(
    images: Sequence[np.ndarray] | np.ndarray,
    landmarks: object,
    size: int = ALIGNED_SIZE,
    template: object = ARCFACE_TEMPLATE,
) -> np.ndarray:
    """Warp a batch of faces onto the template (see :func:`align_face`) with one vectorised estimate.

    Args:
        images: N images (a list, or an (N, H, W[, C]) array); they may differ in height and width but must
            share dtype and channel count.
        landmarks: (N, 5, 2) or (N, 10) points, one row per image.
        size: side of the aligned crops.
        template: (5, 2) target points in the 112x112 frame.

    Returns:
        (N, size, size[, C]) array of the images' dtype.
    """
    _check_size(size)
    points, batched = _to_array(landmarks)
    if not batched:
        raise ValueError(
            f"landmarks: align_faces takes a batch (N, 5, 2) or (N, 10), got {np.shape(landmarks)}"
        )
    if len(images) != len(points):
        raise ValueError(f"align_faces: {len(images)} images but {len(points)} landmark rows")
    if len(points) == 0:
        raise ValueError("align_faces: no images")
    for index, image in enumerate(images):
        _check_image(image, f"images[{index}]")
        first = images[0]
        if image.dtype != first.dtype or image.shape[2:] != first.shape[2:]:
            raise ValueError(
                f"images[{index}]: dtype {image.dtype} and channels {image.shape[2:]} differ from images[0] "
                f"({first.dtype}, {first.shape[2:]})"
            )
    matrices = _similarity(_validate(points, True), _template_points(template, size))
    return np.stack([_warp(image, matrix, size) for image, matrix in zip(images, matrices, strict=True)])


# ------------------------------------------------------------------------------------------- misalignment
def _check_generator(rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng: expected a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}; "
            "misalignment is always seeded explicitly"
        )


@dataclass(frozen=True)
class Misalignment:
    """Random landmark perturbation applied before alignment (AI-KD, Babnik et al. 2024).

    Attributes:
        max_shift: ``p`` of the paper: each landmark coordinate moves by i.i.d. ``U[-p, p]`` source pixels.
        rotation: all five points turn about their centroid by ``U[-r, r]`` degrees (0 = off; positive is
            clockwise on screen, as the image y axis points down).
        scale: all five points scale about their centroid by ``1 + U[-s, s]`` (0 = off; below 1).
        translation: all five points move by the same ``U[-t, t]`` source pixels per axis (0 = off).
    """

    max_shift: float = 3.0  # the paper's default p
    rotation: float = 0.0
    scale: float = 0.0
    translation: float = 0.0

    def __post_init__(self) -> None:
        for field in ("max_shift", "rotation", "scale", "translation"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"misalignment {field}: expected a number, got {value!r}")
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"misalignment {field}: expected a finite value >= 0, got {value!r}")
        if self.scale >= 1:
            raise ValueError(
                f"misalignment scale: expected a value below 1 (factor 1 +- scale), got {self.scale!r}"
            )
        if self.rotation > 180:
            raise ValueError(f"misalignment rotation: expected at most 180 degrees, got {self.rotation!r}")

    def sample(self, landmarks: object, rng: np.random.Generator) -> np.ndarray:
        """Draw misaligned landmarks; each face of a batch gets its own draw.

        Args:
            landmarks: (5, 2), (10,), (N, 5, 2) or (N, 10) points; not modified.
            rng: the seeded generator all randomness comes from.

        Returns:
            float64 (5, 2) or (N, 5, 2) misaligned landmarks.
        """
        _check_generator(rng)
        points, batched = _to_array(landmarks)
        points = _validate(points, batched)
        count = len(points)
        # Fixed draw order, so a given seed gives the same per-point noise whichever global modes are on.
        shift = rng.uniform(-self.max_shift, self.max_shift, size=(count, 5, 2))
        angle = np.deg2rad(rng.uniform(-self.rotation, self.rotation, size=count))
        factor = 1.0 + rng.uniform(-self.scale, self.scale, size=count)
        offset = rng.uniform(-self.translation, self.translation, size=(count, 1, 2))
        cos, sin = factor * np.cos(angle), factor * np.sin(angle)
        linear = np.stack([np.stack([cos, -sin], axis=-1), np.stack([sin, cos], axis=-1)], axis=1)
        centroid = points.mean(axis=1, keepdims=True)
        moved = np.einsum("nij,nkj->nki", linear, points - centroid) + centroid + offset + shift
        return moved if batched else moved[0]


def misalign(
    landmarks: object,
    rng: np.random.Generator,
    max_shift: float = 3.0,
    rotation: float = 0.0,
    scale: float = 0.0,
    translation: float = 0.0,
) -> np.ndarray:
    """Misaligned copy of ``landmarks``; shorthand for ``Misalignment(...).sample(landmarks, rng)``."""
    return Misalignment(max_shift, rotation, scale, translation).sample(landmarks, rng)
