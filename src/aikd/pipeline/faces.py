"""The per-image path for images in memory: (detect ->) align -> preprocess -> model, one face or every face.

    pipeline = FacePipeline(InferenceOptions(device="cpu").quality_engine("best.pt"), CropOptions(detect=True))
    for face in pipeline.faces(rgb, key="photo.jpg", choose="all"):   # crop, landmarks, box, quality, embedding
        print(face.box, face.quality)

The file pipeline (:mod:`aikd.pipeline.files`), the Python API (:mod:`aikd.inference.scorer`) and the service run
these same steps: :meth:`FacePipeline.prepare` (crop and preprocess; thread-safe, for worker threads) and
:meth:`FacePipeline.infer` (one forward pass over faces of any number of images), so the same image gets the same
quality whichever way it comes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aikd.images import ImageInput
from aikd.inference.engine import Engine
from aikd.pipeline.crops import CropOptions, FaceCrop, FaceCropper

__all__ = ["FacePipeline", "FilePreparer", "PreparedFace", "ScoredFace"]


@dataclass(frozen=True)
class PreparedFace:
    """A face cropped and preprocessed: ``crop`` (where it came from) and ``model_input`` (float32, the engine's
    layout)."""

    crop: FaceCrop
    model_input: np.ndarray


@dataclass(frozen=True)
class ScoredFace:
    """A face with what the model made of it: ``quality`` (``None`` for a bare FR backbone) and ``embedding``
    (raw, not L2-normalised)."""

    crop: FaceCrop
    quality: float | None
    embedding: np.ndarray


@dataclass(frozen=True)
class FilePreparer:
    """The file pipeline's crop-and-preprocess step without the model (:meth:`FacePipeline.prepare_one`'s
    arithmetic): picklable where the crop needs no detector, so decode processes can run it."""

    cropper: FaceCropper
    preprocessing: Any
    channels_first: bool

    def __call__(self, image: np.ndarray, item: ImageInput) -> np.ndarray:
        return self.preprocessing.normalise(self.cropper(image, item), channels_first=self.channels_first)


class FacePipeline:
    """One model's per-image path.

    Args:
        engine: the model (:class:`~aikd.inference.engine.InferenceOptions` builds one).
        crop: how photos become crops (default: as they come; the model's preprocessing resizes them).
        workers: threads that will call :meth:`prepare` (each detects with its own single-threaded detector).
        items: the images of a file run, matched to a landmarks file once, up front.
    """

    def __init__(self, engine: Engine, crop: CropOptions | None = None, workers: int = 0,
                 items: Sequence[ImageInput] = ()) -> None:
        self.engine = engine
        self.cropper = FaceCropper(crop or CropOptions(), engine.preprocessing, items, workers)

    def prepare(self, image: np.ndarray, key: str = "", choose: str = "best",
                landmarks: np.ndarray | None = None) -> list[PreparedFace]:
        """``image`` (uint8 RGB) cropped and preprocessed for the model; empty when detection finds no face.

        Raises:
            ValueError: bad landmarks, or none for ``key`` in the landmarks file.
        """
        return [PreparedFace(face, self.engine.prepare(face.crop))
                for face in self.cropper.faces(image, key, choose, landmarks)]

    def prepare_one(self, image: np.ndarray, item: ImageInput) -> np.ndarray:
        """The file pipeline's step (:data:`aikd.pipeline.jobs.Prepare`): the one face of a file's image, as model
        input.

        Raises:
            ValueError: no face found, or no landmarks for it (the reason goes to the errors file).
        """
        return self.engine.prepare(self.cropper(image, item))

    def file_preparer(self) -> FilePreparer | None:
        """:meth:`prepare_one` as a picklable step for decode processes; ``None`` with detection (a detector
        session is no thing to copy into another process)."""
        if self.cropper.options.mode == "detect":
            return None
        return FilePreparer(self.cropper, self.engine.preprocessing, self.engine.channels_first)

    def infer(self, faces: Sequence[PreparedFace]) -> list[ScoredFace]:
        """One forward pass over ``faces`` (of any images)."""
        if not faces:
            return []
        embeddings, qualities = self.engine([face.model_input for face in faces])
        return [ScoredFace(face.crop, None if qualities is None else float(qualities[index]), embeddings[index])
                for index, face in enumerate(faces)]

    def faces(self, image: np.ndarray, key: str = "", choose: str = "best",
              landmarks: np.ndarray | None = None) -> list[ScoredFace]:
        """:meth:`prepare` then :meth:`infer`, for one image."""
        return self.infer(self.prepare(image, key, choose, landmarks))
