"""The task of ``aikd detect`` in the file pipeline: the five landmarks (and box) of the faces in each photo.

One row per image for its most confident face (or one row per face with ``all_faces``, numbered by a ``face``
column, 0 = most confident)::

    path,[face,]x1,y1,x2,y2,x3,y3,x4,y4,x5,y5,box_x1,box_y1,box_x2,box_y2,confidence

Points are in the order of the ArcFace alignment template (left eye, right eye, nose, left mouth corner, right
mouth corner; see :mod:`aikd.detectors`), in pixels of the photo as stored on disk (EXIF orientation applied), so
the file is what :func:`aikd.io.read_landmarks`, ``aikd align --landmarks`` and ``aikd train`` read.

Detection runs inside the decode worker threads, one detector per thread (OpenCV dnn networks must not be
shared), with onnxruntime limited to one thread per detector: decoding and the detector's numpy pre- and
post-processing then run in parallel too (measured: docs/speed.md). No torch is imported.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.images import ImageInput
from aikd.io import LANDMARK_COLUMNS, csv_rows, open_text, write_csv
from aikd.pipeline.jobs import ItemResult

if TYPE_CHECKING:
    from aikd.runtime import Distributed

__all__ = ["BOX_COLUMNS", "DetectOptions", "DetectTask", "detection_columns"]

BOX_COLUMNS = ("box_x1", "box_y1", "box_x2", "box_y2")
_VALUES = 15  # 10 landmark coordinates, 4 box coordinates, the confidence


def detection_columns(all_faces: bool) -> list[str]:
    """The header of a landmarks file written by ``aikd detect``."""
    return ["path", *(["face"] if all_faces else []), *LANDMARK_COLUMNS, *BOX_COLUMNS, "confidence"]


@dataclass(frozen=True)
class DetectOptions:
    """How faces are found.

    Attributes:
        detector: ``retinaface`` or ``mtcnn`` (:data:`aikd.detectors.DETECTORS`).
        threshold: minimum detector confidence of a face.
        max_size: photos whose longer side exceeds it are downscaled for detection (points mapped back); 0 never.
        all_faces: one row per face instead of the most confident face only.
        batch_size: images per journal record.
    """

    detector: str = "retinaface"
    threshold: float = 0.5
    max_size: int = 640
    all_faces: bool = False
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.max_size < 0:
            raise ValueError(f"--max-size must be >= 0 pixels (0: never downscale), got {self.max_size}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")


class DetectTask:
    """Detects faces in photos (a :class:`~aikd.pipeline.files.FileTask`; runs without a model device)."""

    desc, verb = "detect", "detected faces in"
    reads_images = True

    def __init__(self, options: DetectOptions, output: Path, dist: Distributed | None = None,
                 items: Sequence[ImageInput] = (), workers: int = 0) -> None:
        from aikd.detectors import thread_local_detector

        self.options, self.output, self.batch_size = options, output, options.batch_size
        self._detector = thread_local_detector(options.detector, single_threaded=workers > 0,
                                               score_threshold=options.threshold, max_size=options.max_size or None)
        self._no_face = f"no face found ({options.detector}, confidence threshold {options.threshold:g})"

    def settings(self) -> dict[str, Any]:
        return {"command": "detect", "detector": self.options.detector, "threshold": self.options.threshold,
                "max_size": self.options.max_size, "all_faces": self.options.all_faces}

    def side_outputs(self) -> list[tuple[str, Path]]:
        return []

    def prepare(self, image: np.ndarray, item: ImageInput) -> np.ndarray:
        """Decode-thread step: photo -> (F, 15) array of landmarks, box and confidence, best face first."""
        faces = self._detector().detect(image)
        if not faces:
            raise ValueError(self._no_face)
        if not self.options.all_faces:
            faces = faces[:1]
        return np.array([[*face.landmarks.ravel(), *face.box, face.confidence] for face in faces], np.float64)

    def process(self, batch: list[np.ndarray], items: list[ImageInput]) -> list[ItemResult]:
        return [ItemResult(rows=_rows(found, self.options.all_faces)) for found in batch]

    def load_previous(self, output: Path) -> dict[str, ItemResult]:
        """A finished landmarks file's rows, for ``--resume`` (they count as done)."""
        all_faces = self.options.all_faces
        with open_text(output, "landmarks file") as handle:
            reader = csv_rows(handle, output, "landmarks file")
            header = next(reader, [])
            if header != detection_columns(all_faces):
                had = "with" if "face" in header else "without"
                raise ValueError(f"{output}: not a landmarks file of this kind (written {had} --all-faces, or by "
                                 "another program); pass --overwrite to start over, or another -o")
            done: dict[str, ItemResult] = {}
            for line_no, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise ValueError(f"{output}:{line_no}: expected {len(header)} columns, found {len(row)}")
                values: list[Any] = [float(v) for v in row[-_VALUES:]]
                done.setdefault(row[0], ItemResult()).rows.append([int(row[1]), *values] if all_faces else values)
        return done

    def after_pass(self, dist: Distributed) -> None:
        pass

    def finish(self, results: MutableMapping[str, ItemResult]) -> None:
        pass

    def write(self, good: Iterable[tuple[ImageInput, ItemResult]]) -> None:
        write_csv(self.output, detection_columns(self.options.all_faces),
                  ([item.key, *row] for item, result in good for row in result.rows))


def _rows(detections: np.ndarray, all_faces: bool) -> list[list[Any]]:
    rows = []
    for index, values in enumerate(detections):
        row: list[Any] = [round(float(v), 3) for v in values[:-1]] + [round(float(values[-1]), 6)]
        rows.append([index, *row] if all_faces else row)
    return rows
