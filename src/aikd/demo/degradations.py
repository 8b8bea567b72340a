"""A ladder of image degradations of increasing strength, for showing what face image quality measures.

Each kind has :data:`LEVELS` strengths (level 0 is the untouched photo). They act on the whole photo and keep its
size, so the landmarks of the original still locate the face in every degraded copy:

    blur        Gaussian blur, sigma 1.5, 3, 6 pixels of a 100-pixel-wide face
    noise       additive Gaussian noise, sigma 15, 30, 60 grey levels
    jpeg        JPEG compression at quality 30, 12, 4
    downscale   down until the face is 48, 24, 12 pixels wide, and back up (area, then bilinear)
    dark        under-exposure: pixel values times 0.5, 0.25, 0.12 (gamma 1.4)
    bright      over-exposure: values times 1.8, 2.6, 3.6, clipped
    occlusion   a grey bar over the lower face covering 25 %, 45 %, 65 % of the face box from the chin up

Blur, downscaling and occlusion are stated for the face (its width: 2.5 times the distance between the eyes,
:func:`face_box`), so a level means the same to a small face as to a large one. Noise draws from a generator
seeded by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

__all__ = ["KINDS", "LEVELS", "degrade", "face_box"]

LEVELS = 3
_FACE = 100.0  # the face width the pixel strengths below are stated for

_BLUR = (1.5, 3.0, 6.0)
_NOISE = (15.0, 30.0, 60.0)
_JPEG = (30, 12, 4)
_DOWNSCALE = (48.0, 24.0, 12.0)
_DARK = (0.5, 0.25, 0.12)
_BRIGHT = (1.8, 2.6, 3.6)
_OCCLUSION = (0.25, 0.45, 0.65)


def face_box(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(centre x, centre y, width) of a face from its five landmarks: 2.5 eye distances wide, centred on the
    landmarks' mean."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eyes = float(np.linalg.norm(points[1] - points[0]))
    centre = points.mean(axis=0)
    return float(centre[0]), float(centre[1]), max(2.5 * eyes, 8.0)


def _blur(photo: np.ndarray, level: int, face: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    return cv2.GaussianBlur(photo, (0, 0), sigmaX=_BLUR[level - 1] * face[2] / _FACE)


def _noise(photo: np.ndarray, level: int, face: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(photo.shape, dtype=np.float32) * np.float32(_NOISE[level - 1])
    return np.clip(np.rint(photo + noise), 0, 255).astype(np.uint8)


def _jpeg(photo: np.ndarray, level: int, face: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    ok, encoded = cv2.imencode(".jpg", photo[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, _JPEG[level - 1]])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])


def _downscale(photo: np.ndarray, level: int, face: tuple[float, float, float],
               rng: np.random.Generator) -> np.ndarray:
    factor = max(face[2] / _DOWNSCALE[level - 1], 1.0)
    height, width = photo.shape[:2]
    small = cv2.resize(photo, (max(1, round(width / factor)), max(1, round(height / factor))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def _exposure(gains: tuple[float, ...], gamma: float) -> Callable[..., np.ndarray]:
    def apply(photo: np.ndarray, level: int, face: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
        values = (photo / 255.0) ** gamma * gains[level - 1]
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)

    return apply


def _occlusion(photo: np.ndarray, level: int, face: tuple[float, float, float],
               rng: np.random.Generator) -> np.ndarray:
    x, y, width = face
    bottom = y + 0.55 * width  # around the chin
    top = bottom - _OCCLUSION[level - 1] * 1.1 * width
    out = photo.copy()
    rows = slice(max(0, int(top)), max(0, int(bottom)))
    cols = slice(max(0, int(x - 0.6 * width)), max(0, int(x + 0.6 * width)))
    out[rows, cols] = 128
    return out


KINDS: dict[str, Callable[..., np.ndarray]] = {
    "blur": _blur,
    "noise": _noise,
    "jpeg": _jpeg,
    "downscale": _downscale,
    "dark": _exposure(_DARK, 1.4),
    "bright": _exposure(_BRIGHT, 1.0),
    "occlusion": _occlusion,
}


def degrade(photo: np.ndarray, kind: str, level: int, landmarks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``photo`` (RGB uint8) degraded by ``kind`` at ``level`` (1..:data:`LEVELS`; 0 returns it unchanged).

    Args:
        photo: the image.
        kind: one of :data:`KINDS`.
        level: strength.
        landmarks: the face's five points (scale and place of blur, downscaling and occlusion).
        rng: the noise generator.

    Raises:
        ValueError: unknown kind or level.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(KINDS)}")
    if not 0 <= level <= LEVELS:
        raise ValueError(f"degradation level must be 0..{LEVELS}, got {level}")
    if level == 0:
        return photo.copy()
    return KINDS[kind](photo, level, face_box(landmarks), rng)
