"""Synthetic face-like training data: exact five-point landmarks and a quality label the image really shows.

For tests, demos and benchmarks that must run without a face dataset (``data.source: synthetic``). Each
sample is a cartoon face (skin-toned head, hair, eyebrows, eyes, nose, mouth) drawn around the five
landmarks of the ArcFace template (:data:`aikd.align.ARCFACE_TEMPLATE`) after a random similarity
transform (rotation, scale, translation), so the landmarks are exact by construction and the aligned crop
is a frontal face. The image is then degraded by one level ``d`` in [0, 1] (Gaussian blur, loss of
contrast, additive noise) and its label is ``1 - d``: a quality that a network can learn from pixels, the
way FIQA labels follow blur, noise and contrast on real faces.

Everything is a pure function of ``(seed, index)``: per-sample parameters are drawn once, vectorised, when
the source is built, and an image is drawn on demand, so any worker process renders the same pixels.

Example::

    faces = SyntheticFaces(count=256, seed=0)
    image = faces.load_image(7)          # (144, 144, 3) uint8 RGB
    faces.landmarks[7], faces.labels[7]  # exact landmarks, quality label in [0, 1]
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

from aikd.align import ARCFACE_TEMPLATE, transform_points

__all__ = ["SyntheticFaces"]

_SHIFT = 4  # fractional bits for cv2 drawing: sub-pixel centres and axes
_FACE_CENTRE = np.array([56.0, 66.0])  # centre of the head in the 112x112 template frame
_MAX_BLUR_SIGMA = 2.5  # pixels of Gaussian blur at the worst degradation
_MAX_NOISE = 24.0  # standard deviation of additive noise (0..255 scale) at the worst degradation
_MIN_CONTRAST = 0.35  # contrast left at the worst degradation


class SyntheticFaces:
    """A seeded set of face-like images with exact landmarks and degradation-based quality labels.

    Args:
        count: number of samples.
        image_size: side of the square images in pixels (the face spans about 70% of it).
        seed: seed of every random choice.

    Attributes:
        names: ``synthetic/000000.png``-style names (no file exists; they label the samples in reports).
        landmarks: (count, 5, 2) float32 exact landmarks in image pixels.
        labels: (count,) float32 quality labels, ``1 - degradation``.
        degradation: (count,) float64 degradation levels in [0, 1].
    """

    def __init__(self, count: int = 512, image_size: int = 144, seed: int = 0) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"synthetic count: expected a positive integer, got {count!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 64:
            raise ValueError(f"synthetic image_size: expected an integer >= 64, got {image_size!r}")
        self.count, self.image_size, self.seed = count, image_size, int(seed)
        rng = np.random.default_rng([self.seed, 0x5EED])
        self.degradation = rng.uniform(0.0, 1.0, count)
        self.labels = (1.0 - self.degradation).astype(np.float32)
        angle = np.deg2rad(rng.uniform(-15.0, 15.0, count))
        scale = rng.uniform(0.95, 1.2, count) * image_size / 112.0 * 0.8
        offset = rng.uniform(-0.06, 0.06, (count, 2)) * image_size
        linear = scale[:, None, None] * np.stack(
            [np.stack([np.cos(angle), -np.sin(angle)], -1), np.stack([np.sin(angle), np.cos(angle)], -1)], 1
        )
        centre = np.full(2, image_size / 2.0) + offset
        translation = centre - np.einsum("nij,j->ni", linear, _FACE_CENTRE)
        self.matrices = np.concatenate([linear, translation[:, :, None]], axis=2)  # template -> image
        self.landmarks = transform_points(ARCFACE_TEMPLATE, self.matrices).astype(np.float32)
        self.names = np.array([f"synthetic/{i:06d}.png" for i in range(count)])
        self._colours = rng.uniform(0.0, 1.0, (count, 4, 3))  # skin, hair, background, background gradient

    def __len__(self) -> int:
        return self.count

    def fingerprint(self) -> str:
        """Identifies the rendered data (for caches keyed by the data)."""
        return hashlib.sha256(f"synthetic-v1:{self.count}:{self.image_size}:{self.seed}".encode()).hexdigest()

    def load_image(self, index: int) -> np.ndarray:
        """The degraded face ``index`` as an (image_size, image_size, 3) uint8 RGB array."""
        if not 0 <= index < self.count:
            raise IndexError(f"synthetic face {index} out of range 0..{self.count - 1}")
        clean = self.clean_image(index)
        return _degrade(clean, float(self.degradation[index]), np.random.default_rng([self.seed, 0xD06, index]))

    def clean_image(self, index: int) -> np.ndarray:
        """Face ``index`` before degradation."""
        size = self.image_size
        colours = self._colours[index]
        skin = _skin_tone(colours[0])
        hair = (np.array([95.0, 65.0, 40.0]) * (0.2 + 0.9 * colours[1])).tolist()  # black to light brown
        background, gradient = (colours[2:] * 255).tolist()
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
        image = (np.float32(background) * (1 - ramp) + np.float32(gradient) * ramp) * 0.8
        image = np.ascontiguousarray(np.broadcast_to(image, (size, size, 3))).astype(np.uint8)
        draw = _Painter(image, self.matrices[index])
        draw.ellipse((56, 48), (44, 40), 0, hair)  # hair, behind the head
        draw.ellipse(_FACE_CENTRE, (37, 50), 0, skin)
        for eye_x in (ARCFACE_TEMPLATE[0], ARCFACE_TEMPLATE[1]):
            draw.ellipse(eye_x + (0, -9), (9, 2.2), 0, hair)  # eyebrow
            draw.ellipse(eye_x, (7, 3.6), 0, (245, 245, 240))
            draw.ellipse(eye_x, (3, 3), 0, (40, 30, 25))
        nose = ARCFACE_TEMPLATE[2]
        draw.polygon([nose + (0, -14), nose + (-5, 2), nose + (5, 2)], [c * 0.8 for c in skin])
        mouth_left, mouth_right = ARCFACE_TEMPLATE[3], ARCFACE_TEMPLATE[4]
        draw.ellipse((mouth_left + mouth_right) / 2, (15.5, 4), 0, (150, 45, 50))
        return image


def _skin_tone(u: np.ndarray) -> list[float]:
    """A skin-like RGB colour from three uniforms (light to dark brown, slightly varied hue)."""
    darkness = 0.25 + 0.7 * u[0]
    base = np.array([235.0, 190.0, 160.0]) * darkness + np.array([40.0, 25.0, 15.0]) * (1 - darkness)
    return (base * (0.9 + 0.2 * u[1:2]) + np.array([0.0, 5.0, 0.0]) * u[2]).clip(0, 255).tolist()


class _Painter:
    """Draws template-frame shapes onto an image through a similarity transform (sub-pixel, anti-aliased)."""

    def __init__(self, image: np.ndarray, matrix: np.ndarray) -> None:
        self.image, self.matrix = image, matrix
        self.scale = float(np.hypot(matrix[0, 0], matrix[1, 0]))
        self.angle = float(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])))

    def _fixed(self, points: np.ndarray) -> np.ndarray:
        return np.round(transform_points(np.reshape(points, (-1, 2)), self.matrix) * (1 << _SHIFT)).astype(np.int32)

    def ellipse(self, centre: object, axes: tuple[float, float], angle: float, colour: list[float]) -> None:
        centre_px = tuple(int(v) for v in self._fixed(np.asarray(centre, dtype=np.float64))[0])
        axes_px = tuple(int(round(a * self.scale * (1 << _SHIFT))) for a in axes)
        cv2.ellipse(self.image, centre_px, axes_px, angle + self.angle, 0, 360, colour, -1, cv2.LINE_AA, _SHIFT)

    def polygon(self, points: list[np.ndarray], colour: list[float]) -> None:
        cv2.fillPoly(self.image, [self._fixed(np.stack(points))], colour, cv2.LINE_AA, _SHIFT)


def _degrade(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Blur, flatten the contrast and add noise in proportion to ``level`` in [0, 1]."""
    pixels = image.astype(np.float32)
    sigma = 0.1 + _MAX_BLUR_SIGMA * level
    pixels = cv2.GaussianBlur(pixels, (0, 0), sigmaX=sigma, sigmaY=sigma)
    mean = pixels.mean(axis=(0, 1), keepdims=True)
    pixels = mean + (pixels - mean) * (1.0 - (1.0 - _MIN_CONTRAST) * level)
    pixels += rng.normal(0.0, _MAX_NOISE * level, pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
