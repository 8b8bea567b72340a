"""The interface every labeller implements: :class:`Labeler`, with :class:`BatchLabels` and :class:`SetLabels`;
the per-image random generator every stochastic labeller draws from (:func:`image_generator`)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["COMPUTE_BATCH", "BatchLabels", "Labeler", "SetLabels", "image_generator", "merge_batch_labels"]

# Faces per model pass in ``aikd label``: fixed (short passes padded), because a face's output is the same bits in any
# batch of one size, at any position, but not across sizes; so a label does not depend on --batch-size, --workers or a
# resume. 16 is past the knee of CPU batching (dlib-r29: batch 1 is 3.3x slower per face than 16).
COMPUTE_BATCH = 16


def image_generator(seed: int, key: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by ``(seed, CRC-32 of key)`` alone: what an image draws does not depend on the batch it
    falls in, on resuming, on sharding or on the order of the images."""
    import torch

    state = np.random.SeedSequence([seed, zlib.crc32(key.encode("utf-8"))]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


@dataclass
class BatchLabels:
    """What a labeller computed for one batch of N faces.

    Attributes:
        quality: (N,) float64 qualities, or ``None`` when they need the whole set (:meth:`Labeler.label_set`).
        extras: extra output columns, each (N,), named as in :attr:`Labeler.columns`.
        embeddings: (N, D) float32 embeddings to keep for :meth:`Labeler.label_set`, else ``None``.
    """

    quality: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    embeddings: np.ndarray | None = None


@dataclass
class SetLabels:
    """Qualities of a whole set of N images.

    Attributes:
        quality: (N,) float64; entries of failed images are NaN.
        extras: extra output columns, each (N,).
        errors: index -> reason, for the images that could not be labelled.
    """

    quality: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


class Labeler:
    """A training-free FIQA technique that makes quality labels (higher = better for recognition).

    Class attributes:
        name: the ``--method`` name.
        columns: extra output columns written after ``quality``.
        needs_images: ``False`` when labels come from :meth:`label_set` alone (no image is decoded).
        needs_model: whether an FR model is needed.
        set_pass: whether :meth:`label_set` gives the qualities (after :meth:`label_batch` if
            ``needs_images``); otherwise :meth:`label_batch` gives them.
        model_kind: what ``--weights`` names: ``"fr"`` (a face-recognition model) or ``"quality"`` (a quality
            model, whose own preprocessing then crops and normalises the faces).
        needs_gradients: :meth:`label_batch` differentiates through the model (run outside inference mode).
        Options: the typed settings of the technique (a frozen dataclass), or ``None``.
        compute_batch: faces per call of :meth:`label_batch` in ``aikd label`` (:data:`COMPUTE_BATCH`).
    """

    name: ClassVar[str] = ""
    columns: tuple[str, ...] = ()
    needs_images: ClassVar[bool] = True
    needs_model: ClassVar[bool] = True
    set_pass: ClassVar[bool] = False
    model_kind: ClassVar[str] = "fr"
    needs_gradients: ClassVar[bool] = False
    Options: ClassVar[Any] = None
    compute_batch: int = COMPUTE_BATCH

    def label_batch(self, faces: torch.Tensor, keys: Sequence[str]) -> BatchLabels:
        """First pass over one batch of faces (model input) with their image keys."""
        raise NotImplementedError(f"{self.name} labels the whole set at once")

    def label_set(self, keys: Sequence[str], embeddings: np.ndarray | None) -> SetLabels:
        """Second pass over every image of the run (only for ``set_pass`` labellers).

        Args:
            keys: image keys of all images that passed the first pass, in input order.
            embeddings: their (N, D) embeddings from :meth:`label_batch`, or ``None``.
        """
        raise NotImplementedError(f"{self.name} labels one batch at a time")


def merge_batch_labels(parts: Sequence[tuple[BatchLabels, int]]) -> BatchLabels:
    """One :class:`BatchLabels` of the first ``count`` rows of each part, in order (padding rows dropped)."""
    def joined(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        return None if arrays[0] is None else np.concatenate(arrays)

    names = parts[0][0].extras
    return BatchLabels(
        quality=joined([part.quality[:count] if part.quality is not None else None for part, count in parts]),
        extras={name: np.concatenate([part.extras[name][:count] for part, count in parts]) for name in names},
        embeddings=joined([part.embeddings[:count] if part.embeddings is not None else None
                           for part, count in parts]))
