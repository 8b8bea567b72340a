"""Quality scores of face images from an AI-KD model, in Python: :class:`Scorer` and :func:`score_images`.

    from aikd import Scorer, load_quality_model, score_images
    model = load_quality_model("runs/r100/best.pt")
    qualities = score_images(model, ["a.jpg", "b.png"])     # paths, RGB uint8 arrays or PIL images
    scorer = Scorer(model, calibration="calib.json")         # build once, score many times
    scored = scorer.score(["a.jpg"])                         # quality, expected_fnmr, quality_100

The same crop step, preprocessing and engine as ``aikd score`` (:mod:`aikd.pipeline.faces`), so the same image
gets the same score either way. AI-KD (Babnik et al., IWBF 2024) is trained to be alignment invariant, so faces
are scored as they come (any crop, resized to the model's input size) unless ``crop`` asks for alignment.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from aikd.images import ImageError, load_image, pil_to_rgb
from aikd.inference.engine import InferenceOptions, l2_normalise
from aikd.pipeline.crops import CropOptions
from aikd.pipeline.faces import FacePipeline

__all__ = ["Scorer", "score_images"]


class Scorer:
    """A quality model ready to score images in memory: its own inference copy (folded, in eval mode), its crop
    step and, optionally, a calibration. Build it once and call :meth:`score` as often as needed; it does not
    follow later changes to ``model``'s weights (build another).

    Args:
        model: a :class:`~aikd.models.QualityModel` (not modified; it may even be in train mode).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; ``None`` runs where the model's weights are.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:class:`~aikd.inference.engine.InferenceOptions`).
        backend: ``"torch"`` or ``"onnxruntime"``.
        fold: fold BatchNorm into the convolutions (exact).
        crop: how photos become crops (:class:`~aikd.pipeline.crops.CropOptions`; default: as they come).
        calibration: a calib.json path, its data or a :class:`~aikd.evaluation.calibration.Calibration`
            (``aikd calibrate``); ``True``: the calibration the model's checkpoint carries. ``None``: raw
            qualities only.

    Raises:
        ValueError: ``model`` is no quality model, or a setting is wrong (the message names it).
    """

    def __init__(self, model: Any, device: Any = None, *, precision: str = "fp32", backend: str = "torch",
                 fold: bool = True, crop: CropOptions | None = None, calibration: Any = None) -> None:
        from aikd.models.quality import QualityModel

        if not isinstance(model, QualityModel):
            raise ValueError(f"Scorer needs a QualityModel (backbone + quality head), got {type(model).__name__}")
        if device is None:
            parameter = next(model.parameters(), None)
            device = parameter.device if parameter is not None else "cpu"
        options = InferenceOptions(device=str(device), precision=precision, backend=backend, fold=fold)
        engine = options.engine(model)
        self.calibration = None
        if calibration is not None and calibration is not False:
            from aikd.evaluation.calibration import resolve_calibration

            self.calibration = resolve_calibration(calibration, getattr(model, "calibration", None),
                                                   [engine.fingerprint], "the model")
        self.pipeline = FacePipeline(engine, crop)

    def score(self, images: Any, batch_size: int = 32, workers: int = 2, return_embeddings: bool = False
              ) -> np.ndarray | tuple[np.ndarray, np.ndarray] | dict[str, np.ndarray]:
        """Quality scores of ``images`` (see :func:`score_images` for what goes in and comes out).

        Raises:
            ValueError: an image cannot be read, is not an RGB uint8 image, or has no face to score (with
                detection); the message names it.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        images = _as_list(images)
        engine = self.pipeline.engine

        def prepare(index: int) -> np.ndarray:
            faces = self.pipeline.prepare(_as_rgb(images[index], index), key=_key(images[index], index))
            if not faces:
                raise ValueError(f"image {index}: no face found")
            return faces[0].model_input

        qualities, embeddings = [], []
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start in range(0, len(images), batch_size):
                batch = list(pool.map(prepare, range(start, min(start + batch_size, len(images)))))
                embedding, quality = engine(batch)
                qualities.append(quality)
                embeddings.append(embedding)
        quality = np.concatenate(qualities).astype(np.float32) if qualities else np.zeros(0, np.float32)
        embedding = (l2_normalise(np.concatenate(embeddings)) if embeddings
                     else np.zeros((0, engine.embedding_size), np.float32))
        if self.calibration is not None:
            return {**self.calibration.apply(quality), "quality": quality,
                    **({"embedding": embedding} if return_embeddings else {})}
        return (quality, embedding) if return_embeddings else quality


def score_images(
    model: Any,
    images: Any,
    batch_size: int = 32,
    device: Any = None,
    *,
    precision: str = "fp32",
    backend: str = "torch",
    fold: bool = True,
    workers: int = 2,
    return_embeddings: bool = False,
    calibration: Any = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray] | dict[str, np.ndarray]:
    """Quality scores of face images, as ``aikd score`` computes them (same preprocessing, same engine).

    A :class:`Scorer` built for this call alone: to score many times with one model, build a :class:`Scorer`.

    Args:
        model: a :class:`~aikd.models.QualityModel` (not modified; it may even be in train mode).
        images: an image or a sequence of images; each a path, an (H, W, 3) RGB uint8 array or a PIL image.
            An (N, H, W, 3) uint8 array is N images. Faces are taken as they come, resized to the model's input size.
        batch_size: faces per forward pass.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; ``None`` runs where the model's weights are.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        backend: ``"torch"`` or ``"onnxruntime"``.
        fold: fold BatchNorm into the convolutions (exact).
        workers: threads decoding and preparing images.
        return_embeddings: also return the L2-normalised embeddings.
        calibration: see :class:`Scorer`.

    Returns:
        float32 qualities (N,), and (N, D) float32 embeddings when ``return_embeddings``. With a calibration, a
        dict instead: ``quality`` (the raw score), ``expected_fnmr``, ``quality_100`` (0-100, specific to the
        calibration set) and, when ``return_embeddings``, ``embedding``.

    Raises:
        ValueError: an image cannot be read or is not an RGB uint8 image; the message names it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    scorer = Scorer(model, device, precision=precision, backend=backend, fold=fold, calibration=calibration)
    return scorer.score(images, batch_size, workers, return_embeddings)


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (str, os.PathLike)) or _is_pil(images):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Sequence):
        return list(images)
    raise ValueError(f"expected image paths, RGB uint8 arrays or PIL images, got {type(images).__name__}")


def _is_pil(image: Any) -> bool:
    return type(image).__module__.startswith("PIL.")


def _key(image: Any, index: int) -> str:
    """The key a landmarks file or the misalignment seed knows an image by: its path, else its index."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else str(index)


def _as_rgb(image: Any, index: int) -> np.ndarray:
    """Path, PIL image or array -> (H, W, 3) RGB uint8, decoded exactly as the command line decodes files."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return load_image(image)
        except ImageError as err:
            raise ValueError(f"{os.fspath(image)}: {err}") from None
    if _is_pil(image):
        return np.ascontiguousarray(pil_to_rgb(image))  # the decoder's own mode conversion (alpha, 16-bit)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"image {index}: expected an (H, W, 3) RGB uint8 array, got {image.dtype} "
                             f"array of shape {image.shape}")
        return image
    raise ValueError(f"image {index}: expected a path, an RGB uint8 array or a PIL image, "
                     f"got {type(image).__name__}")
