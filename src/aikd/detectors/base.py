"""The detector interface: :class:`Face`, the :class:`Detector` protocol, :class:`DetectorBase` and NMS.

Every detector in this package subclasses :class:`DetectorBase`; :mod:`aikd.detectors` builds them by name.
Landmarks are five points in the order of the ArcFace alignment template (left eye, right eye, nose tip,
left mouth corner, right mouth corner; left/right as seen in the image), in float pixels of the image
passed in, with pixel ``(i, j)`` centred on ``x = j, y = i`` (the convention of ``cv2.warpAffine``).

Resize policy, shared by all detectors: an image whose longer side exceeds ``max_size`` is downscaled
(``cv2.INTER_AREA``, aspect ratio kept) before detection and the results are mapped back to the original
pixel grid; smaller images are used as they are. Grayscale images (H, W) or (H, W, 1) are treated as RGB
with three equal channels.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

__all__ = ["LANDMARK_NAMES", "Detector", "DetectorBase", "Face", "as_rgb", "box_iou", "nms"]

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in pixels of the image given to the detector.
        confidence: The detector's face probability, in [0, 1].
        landmarks: (5, 2) float32 ``(x, y)`` points in the order of :data:`LANDMARK_NAMES`.
    """

    box: tuple[float, float, float, float]
    confidence: float
    landmarks: np.ndarray

    def __post_init__(self) -> None:
        landmarks = np.asarray(self.landmarks, dtype=np.float32)
        if landmarks.shape != (5, 2):
            raise ValueError(f"Face.landmarks must have shape (5, 2), got {landmarks.shape}")
        object.__setattr__(self, "landmarks", landmarks)
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        object.__setattr__(self, "confidence", float(self.confidence))

    def mapped(self, scale_x: float, scale_y: float, offset_x: float = 0.0, offset_y: float = 0.0) -> Face:
        """The same face on another pixel grid: ``x' = x * scale_x + offset_x`` (likewise y)."""
        scale = np.array([scale_x, scale_y], dtype=np.float64)
        offset = np.array([offset_x, offset_y], dtype=np.float64)
        box = np.asarray(self.box, dtype=np.float64).reshape(2, 2) * scale + offset
        landmarks = self.landmarks.astype(np.float64) * scale + offset
        return Face(tuple(box.ravel()), self.confidence, landmarks.astype(np.float32))


@runtime_checkable
class Detector(Protocol):
    """Anything that finds faces: ``detect(rgb) -> list[Face]``, most confident first."""

    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB image (grayscale accepted), sorted by confidence, best first."""
        ...


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Check a photo and return it as a contiguous (H, W, 3) uint8 RGB array.

    Raises:
        ValueError: If ``image`` is not a non-empty uint8 array of shape (H, W), (H, W, 1) or (H, W, 3).
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0-255), got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB or (H, W) grayscale, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    return np.ascontiguousarray(image)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one ``x1, y1, x2, y2`` box with each row of ``boxes`` (N, 4)."""
    width = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0)
    height = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0)
    inter = width * height
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    own_area = max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
    return inter / np.maximum(own_area + area - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    Args:
        boxes: (N, 4) ``x1, y1, x2, y2``.
        scores: (N,) confidences.
        iou_threshold: A box is dropped when its intersection-over-union with a kept, higher-scoring box
            exceeds this.

    Returns:
        Indices of the kept boxes, highest score first.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        order = rest[box_iou(boxes[best], boxes[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


class DetectorBase(abc.ABC):
    """Shared input handling: validation, grayscale to RGB, the ``max_size`` resize policy, sorting.

    Subclasses implement :meth:`_detect_rgb` on the (possibly downscaled) RGB image.

    Args:
        score_threshold: Faces below this confidence are dropped.
        nms_threshold: Overlap above which the less confident of two detections is suppressed.
        max_size: Images whose longer side exceeds this many pixels are downscaled to it first;
            ``None`` never resizes.
    """

    name = "base"

    def __init__(self, score_threshold: float, nms_threshold: float, max_size: int | None) -> None:
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not 0.0 < nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        if max_size is not None and max_size < 32:
            raise ValueError(f"max_size must be at least 32 pixels (or None), got {max_size}")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_size = max_size

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB (or grayscale) uint8 photo, most confident first."""
        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        longer = max(height, width)
        if self.max_size is None or longer <= self.max_size:
            faces = self._detect_rgb(rgb)
        else:
            factor = self.max_size / longer
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            # cv2.resize maps pixel centres as x_src + 0.5 = (x_dst + 0.5) * width / new_width.
            scale_x, scale_y = width / size[0], height / size[1]
            faces = [
                face.mapped(scale_x, scale_y, 0.5 * scale_x - 0.5, 0.5 * scale_y - 0.5)
                for face in self._detect_rgb(small)
            ]
        return sorted(faces, key=lambda face: -face.confidence)

    @abc.abstractmethod
    def _detect_rgb(self, rgb: np.ndarray) -> list[Face]:
        """Faces in a validated (H, W, 3) uint8 RGB image, in its own pixel coordinates."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(score_threshold={self.score_threshold}, "
            f"nms_threshold={self.nms_threshold}, max_size={self.max_size})"
        )
