"""The interface every labeller implements: :class:`Labeler`, with :class:`BatchLabels` and :class:`SetLabels`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["BatchLabels", "Labeler", "SetLabels"]


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
    """

    name: ClassVar[str] = ""
    columns: tuple[str, ...] = ()
    needs_images: ClassVar[bool] = True
    needs_model: ClassVar[bool] = True
    set_pass: ClassVar[bool] = False

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
