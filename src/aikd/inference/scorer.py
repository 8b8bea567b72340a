"""Quality scores of face images from an AI-KD model, in Python: :func:`score_images`.

    from aikd import load_quality_model, score_images
    model = load_quality_model("runs/r100/best.pt")
    qualities = score_images(model, ["a.jpg", "b.png"])     # paths, RGB uint8 arrays or PIL images
    scored = score_images(model, ["a.jpg"], calibration="calib.json")  # + expected_fnmr, quality_100

The same preprocessing and inference engine as ``aikd score`` (:mod:`aikd.commands.score`), so the same
image gets the same score either way. AI-KD (Babnik et al., IWBF 2024) is trained to be alignment invariant,
so faces are scored as they come (any crop, resized to the model's input size).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from aikd.images import ImageError, load_image, pil_to_rgb
from aikd.inference.engine import Engine, l2_normalise
from aikd.models.quality import QualityModel
from aikd.runtime import resolve_device

__all__ = ["cached_engine", "score_images"]


# ------------------------------------------------------------------------------------------- Python API
def score_images(
    model: nn.Module,
    images: Any,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    *,
    precision: str = "fp32",
    backend: str = "torch",
    fold: bool = True,
    workers: int = 2,
    return_embeddings: bool = False,
    calibration: Any = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray] | dict[str, np.ndarray]:
    """Quality scores of face images, as ``aikd score`` computes them (same preprocessing, same engine).

    Args:
        model: a :class:`~aikd.models.QualityModel` (not modified; it may even be in train mode).
        images: an image or a sequence of images; each a path, an (H, W, 3) RGB uint8 array or a PIL image.
            An (N, H, W, 3) uint8 array is N images. Faces are taken as they come, resized to the model's input size.
        batch_size: faces per forward pass.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; ``None`` runs where the model's weights are.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :class:`~aikd.inference.engine.Engine`).
        backend: ``"torch"`` or ``"onnxruntime"``.
        fold: fold BatchNorm into the convolutions (exact).
        workers: threads decoding and preparing images.
        return_embeddings: also return the L2-normalised embeddings.
        calibration: a calib.json path, its data or a :class:`~aikd.evaluation.calibration.Calibration` (``aikd calibrate``);
            ``True``: the calibration the model's checkpoint carries. ``None`` (default): raw qualities only.

    Returns:
        float32 qualities (N,), and (N, D) float32 embeddings when ``return_embeddings``. With a calibration, a
        dict instead: ``quality`` (the raw score), ``expected_fnmr``, ``quality_100`` (0-100, specific to the
        calibration set) and, when ``return_embeddings``, ``embedding``.

    Raises:
        ValueError: an image cannot be read or is not an RGB uint8 image; the message names it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else "cpu"
    if not isinstance(model, QualityModel):
        raise ValueError(f"score_images needs a QualityModel (backbone + quality head), got {type(model).__name__}")
    calibrated = _calibration(model, calibration)
    engine = cached_engine(model, device, precision, backend, fold)
    images = _as_list(images)

    def prepare(index: int) -> np.ndarray:
        return engine.prepare(_as_rgb(images[index], index))

    qualities, embeddings = [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(images), batch_size):
            batch = list(pool.map(prepare, range(start, min(start + batch_size, len(images)))))
            embedding, quality = engine(batch)
            qualities.append(quality)
            embeddings.append(embedding)
    dim = engine.embedding_size
    quality = np.concatenate(qualities).astype(np.float32) if qualities else np.zeros(0, np.float32)
    embedding = l2_normalise(np.concatenate(embeddings)) if embeddings else np.zeros((0, dim), np.float32)
    if calibrated is not None:
        return {**calibrated.apply(quality), "quality": quality, **({"embedding": embedding} if return_embeddings
                                                                   else {})}
    return (quality, embedding) if return_embeddings else quality


def _calibration(model: nn.Module, calibration: Any) -> Any:
    """The :class:`~aikd.evaluation.calibration.Calibration` asked for (``True``: the model's own), or ``None``."""
    if calibration is None or calibration is False:
        return None
    from aikd.evaluation.calibration import load_calibration

    if calibration is True:
        if not getattr(model, "calibration", None):
            raise ValueError("calibration=True: this model carries no calibration (aikd calibrate --checkpoint "
                             "writes one into a checkpoint); pass a calib.json path instead")
        return load_calibration(model.calibration, "the model's calibration")
    return load_calibration(calibration)


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


# Folding an iResNet-100 takes a moment: keep one engine per model while its weights stay the same.
_ENGINES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Engine]] = weakref.WeakKeyDictionary()


def cached_engine(model: nn.Module, device: Any, precision: str, backend: str, fold: bool) -> Engine:
    """The engine of ``model`` run this way, reused while its weights stay the same."""
    weights = tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))
    key = (weights, str(resolve_device(device)), precision, backend, fold)
    cached = _ENGINES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    engine = Engine(model, device=device, precision=precision, backend=backend, fold=fold)
    _ENGINES[model] = (key, engine)
    return engine
