"""How a photo becomes the model's input crop: as it comes, aligned by landmarks, or detected first.

Shared by ``score``, ``embed``, ``label``, ``align``, the Python API and the service (:class:`CropOptions`, built
once; :class:`FaceCropper`, one per model):

- as it comes (the default): the image is taken whole; the model's :class:`~aikd.preprocessing.Preprocessing`
  resizes it to its input size (AI-KD is alignment-invariant; for FR embeddings this assumes already aligned
  crops, hence ``--aligned`` as an explicit synonym);
- ``landmarks``: five-point alignment with landmarks from a CSV/pickle, matched by image name
  (:class:`aikd.names.NameIndex`), or given with an image in memory;
- ``detect``: landmarks from the face detector; the most confident face (``best``, as ``aikd score --detect``),
  the largest one, or every face;
- ``misalign P`` with ``seed S``: the landmarks are jittered by U[-P, P] px before alignment, with noise
  determined by (seed, image key) alone, so resuming or sharding a run does not change it.

Crops are made for the model: at its input size and on its own five-point template
(:meth:`aikd.preprocessing.Preprocessing.align`, the ArcFace template scaled to the input size unless the model
says otherwise), never at a fixed 112: a 128x128 model gets a 128x128 alignment, not a resampled one. Resizing
is never done here: :class:`~aikd.preprocessing.Preprocessing` alone resizes.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.align import align_face, as_landmarks, misalign
from aikd.images import ImageInput, InputLandmarks
from aikd.io import read_landmark_arrays, read_landmarks, warn_repeated
from aikd.names import NameIndex

if TYPE_CHECKING:  # no torch for aikd align
    from aikd.preprocessing import Preprocessing

__all__ = ["FACE_CHOICES", "CropOptions", "FaceCrop", "FaceCropper", "Prepare"]

Prepare = Callable[[np.ndarray, ImageInput], np.ndarray]
FACE_CHOICES = ("best", "largest", "all")  # which detected faces: most confident, largest box, every one


@dataclass(frozen=True)
class CropOptions:
    """How a photo becomes the model's input crop.

    Attributes:
        landmarks: align with the landmarks in this file (CSV or the official pickle).
        detect: detect faces and align them.
        detector: the detector for ``detect``.
        detect_threshold: its confidence threshold.
        misalign: jitter every landmark coordinate by U[-misalign, misalign] pixels before aligning.
        seed: seed of that noise (with each image's key).
    """

    landmarks: Path | None = None
    detect: bool = False
    detector: str = "retinaface"
    detect_threshold: float = 0.5
    misalign: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.landmarks is not None and self.detect:
            raise ValueError("--landmarks and --detect both choose the landmarks; pass one")
        if not self.misalign >= 0:
            raise ValueError(f"--misalign must be >= 0 pixels, got {self.misalign}")
        if self.misalign > 0 and self.mode == "as-is":
            raise ValueError("--misalign jitters landmarks: it needs --landmarks FILE or --detect")
        if not 0.0 <= self.detect_threshold <= 1.0:
            raise ValueError(f"--detect-threshold must be in [0, 1], got {self.detect_threshold}")

    @property
    def mode(self) -> str:
        """``as-is``, ``landmarks`` or ``detect``."""
        return "landmarks" if self.landmarks is not None else "detect" if self.detect else "as-is"

    def record(self) -> dict[str, Any]:
        """What defines the crops, as plain data."""
        return {"mode": self.mode, "landmarks": str(self.landmarks) if self.landmarks else None,
                "detector": self.detector if self.detect else None,
                "detect_threshold": self.detect_threshold if self.detect else None,
                "misalign": self.misalign, "seed": self.seed}


@dataclass(frozen=True)
class FaceCrop:
    """One face of a photo, cropped for the model.

    Attributes:
        crop: uint8 RGB: the aligned face at the model's input size, or (as-is) the image itself.
        landmarks: (5, 2) the landmarks in the photo's pixels (detected or given; before any misalignment
            jitter), or ``None`` as-is.
        box: ``(x1, y1, x2, y2)`` of a detected face, else ``None``.
        detector_score: the detector's confidence of a detected face, else ``None``.
    """

    crop: np.ndarray
    landmarks: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None
    detector_score: float | None = None


class FaceCropper:
    """The per-image crop step of one model: ``cropper.faces(image, key)`` for an image in memory, or
    ``cropper(image, item)`` (a :data:`Prepare`) for the file pipeline, which wants exactly one face.

    Args:
        options: how to crop.
        preprocessing: the model's input size and alignment template (default: 112x112 ArcFace).
        items: every input of a file run: a landmarks file is matched to their keys once, up front (without them,
            each key is matched when its image comes).
        workers: decode threads (with ``detect``, each thread gets a single-threaded detector of its own).
    """

    def __init__(self, options: CropOptions, preprocessing: Preprocessing | None = None,
                 items: Sequence[ImageInput] = (), workers: int = 0) -> None:
        self.options = options
        self._align = _aligner(preprocessing) if options.mode != "as-is" else None
        self._inputs: InputLandmarks | None = None
        self._names: tuple[NameIndex, np.ndarray, threading.Lock] | None = None
        if options.mode == "landmarks":
            if items:  # arrays, not a Python object per image (runs of millions of images)
                names, points = read_landmark_arrays(options.landmarks)
                warn_repeated(names, options.landmarks)
                self._inputs = InputLandmarks(items, names, points)
            else:  # no list up front (a worker of a cluster run): each key is matched as it comes, by the same rule
                table = read_landmarks(options.landmarks)
                self._names = (NameIndex(table.paths), table.landmarks, threading.Lock())
        self._detector = None
        if options.mode == "detect":
            from aikd.detectors import thread_local_detector

            self._detector = thread_local_detector(options.detector, single_threaded=workers > 0,
                                                   score_threshold=options.detect_threshold)

    def faces(self, image: np.ndarray, key: str = "", choose: str = "best",
              landmarks: np.ndarray | None = None) -> list[FaceCrop]:
        """The face crops of ``image`` (uint8 RGB) as the options say; ``landmarks`` given with the image align it
        whatever the mode. An empty list when detection finds no face.

        Args:
            key: the image's key: finds its row of a landmarks file, and seeds its misalignment noise.
            choose: with detection, one of :data:`FACE_CHOICES`.

        Raises:
            ValueError: no landmarks for ``key`` in the landmarks file, bad landmarks, or an unknown ``choose``.
        """
        if choose not in FACE_CHOICES:
            raise ValueError(f"faces must be one of {', '.join(FACE_CHOICES)}, got {choose!r}")
        if landmarks is not None:
            return [self._aligned(image, as_landmarks(landmarks), key)]
        if self.options.mode == "as-is":
            return [FaceCrop(image)]
        if self.options.mode == "landmarks":
            return [self._aligned(image, as_landmarks(self._landmarks_of(key)), key)]
        found = self._detector().detect(image)
        if choose == "largest" and found:
            found = [max(found, key=lambda face: (face.box[2] - face.box[0]) * (face.box[3] - face.box[1]))]
        elif choose == "best":
            found = found[:1]
        return [self._aligned(image, as_landmarks(face.landmarks), key if index == 0 else f"{key}#{index}",
                              face.box, face.confidence) for index, face in enumerate(found)]

    def _landmarks_of(self, key: str) -> np.ndarray:
        found = self._inputs.find(key) if self._inputs is not None else None
        if found is not None:
            return found
        if self._names is not None:
            names, landmarks, lock = self._names
            with lock:  # the index builds its tables on first need: one thread at a time
                row = names.find(key)
            if row is not None:
                return landmarks[row]
        raise ValueError(f"no landmarks for this image in {self.options.landmarks}")

    def __call__(self, image: np.ndarray, item: ImageInput) -> np.ndarray:
        """The one face crop of a file's image (the file pipeline's crop step).

        Raises:
            ValueError: no face found, or no landmarks for it (the reason goes to the errors file).
        """
        found = self.faces(image, item.key)
        if not found:
            raise ValueError("no face found")
        return found[0].crop

    def _aligned(self, image: np.ndarray, landmarks: np.ndarray, key: str, box: Any = None,
                 score: float | None = None) -> FaceCrop:
        align = self._align or _aligner(None)
        crop = align(image, _jitter(landmarks, key, self.options.misalign, self.options.seed))
        return FaceCrop(crop, landmarks, box, score)


def _jitter(landmarks: np.ndarray, key: str, max_shift: float, seed: int) -> np.ndarray:
    if max_shift <= 0:
        return landmarks
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8", "surrogateescape"))])
    return misalign(landmarks, rng, max_shift=max_shift)


def _aligner(preprocessing: Preprocessing | None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Five-point alignment onto the model's own template (:meth:`Preprocessing.align`)."""
    if preprocessing is None:
        return lambda image, landmarks: align_face(image, landmarks)
    height, width = preprocessing.input_size
    if height != width:  # said before the first image rather than for each one
        raise ValueError(f"five-point alignment makes square crops; the model's input is {height}x{width}")
    return preprocessing.align
