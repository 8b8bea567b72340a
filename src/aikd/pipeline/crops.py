"""How input photos become model-input crops: as they come, aligned by landmarks, or detected first.

Shared by ``score``, ``embed``, ``label`` and ``align`` (:class:`CropOptions`, built once from the command line):

- as they come (the default): the image is resized to the model's input size (AI-KD is alignment-invariant;
  for FR embeddings this assumes already aligned crops, hence ``--aligned`` as an explicit synonym);
- ``landmarks``: five-point alignment with landmarks from a CSV/pickle, matched by image name
  (:class:`aikd.names.NameIndex`);
- ``detect``: landmarks from the face detector (most confident face);
- ``misalign P`` with ``seed S``: the landmarks are jittered by U[-P, P] px before alignment, with noise
  determined by (seed, image key) alone, so resuming or sharding a run does not change it.

Crops are made for the model: at its input size and on its own five-point template
(:meth:`aikd.models.Preprocessing.alignment_points`, the ArcFace template scaled to the input size unless the
model says otherwise), never at a fixed 112: a 128x128 model gets a 128x128 alignment, not a resampled one.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.align import ALIGNED_SIZE, align_face, as_landmarks, misalign
from aikd.images import ImageInput, match_landmarks, resize_image
from aikd.io import read_landmarks

if TYPE_CHECKING:  # no torch for aikd align
    from aikd.preprocessing import Preprocessing

__all__ = ["CropOptions", "Prepare", "make_prepare"]

Prepare = Callable[[np.ndarray, ImageInput], np.ndarray]


@dataclass(frozen=True)
class CropOptions:
    """How a photo becomes the model's input crop.

    Attributes:
        landmarks: align with the landmarks in this file (CSV or the official pickle).
        detect: detect the most confident face and align it.
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


def make_prepare(options: CropOptions, items: Sequence[ImageInput], preprocessing: Preprocessing | None = None,
                 workers: int = 0) -> Prepare:
    """The per-image preparation ``options`` ask for, for the model's input (runs in the decode threads).

    Args:
        options: how to crop.
        items: every input of the run (landmarks are matched to them once, up front).
        preprocessing: the model's input size and alignment template (default: 112x112 ArcFace).
        workers: decode threads (with ``detect``, each thread gets a single-threaded detector of its own).
    """
    if options.mode == "landmarks":
        align = _aligner(preprocessing)
        table = read_landmarks(options.landmarks)
        matched, missing = match_landmarks(items, table.paths, table.landmarks)
        by_key = {item.key: matched[i] for i, item in enumerate(items)}
        missing_keys = {items[i].key for i in missing}
        source = str(options.landmarks)

        def prepare(image: np.ndarray, item: ImageInput) -> np.ndarray:
            if item.key in missing_keys:
                raise ValueError(f"no landmarks for this image in {source}")
            landmarks = as_landmarks(by_key[item.key])
            return align(image, _jitter(landmarks, item.key, options.misalign, options.seed))

        return prepare
    if options.mode == "detect":
        from aikd.detectors import thread_local_detector

        align = _aligner(preprocessing)
        detector_for_thread = thread_local_detector(options.detector, single_threaded=workers > 0,
                                                    score_threshold=options.detect_threshold)

        def prepare(image: np.ndarray, item: ImageInput) -> np.ndarray:
            faces = detector_for_thread().detect(image)
            if not faces:
                raise ValueError("no face found")
            landmarks = as_landmarks(faces[0].landmarks)
            return align(image, _jitter(landmarks, item.key, options.misalign, options.seed))

        return prepare
    if preprocessing is None:
        return lambda image, item: resize_image(image, ALIGNED_SIZE)
    return lambda image, item: preprocessing.resize(image)

