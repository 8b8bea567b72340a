"""The interface every labeller implements: :class:`Labeler`, with :class:`BatchLabels` and :class:`SetLabels`;
:class:`IdentitySetLabeler`, what the techniques over identities share; the per-image random generator every
stochastic labeller draws from (:func:`image_generator`)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from aikd.names import identity_from_folder

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["COMPUTE_BATCH", "NO_IDENTITY", "BatchLabels", "IdentitySetLabeler", "Labeler", "SetLabels",
           "image_generator", "merge_batch_labels", "unit_rows"]

# Faces per model pass in ``aikd label``: fixed (short passes padded), because a face's output is the same bits in any
# batch of one size, at any position, but not across sizes; so a label does not depend on --batch-size, --workers or a
# resume. 16 is past the knee of CPU batching (dlib-r29: batch 1 is 3.3x slower per face than 16).
COMPUTE_BATCH = 16
NO_IDENTITY = ("no identity: the image is not inside an identity folder (or its row in the list has no identity); "
               "give a CSV list with --identity-column")


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in their own dtype (float64 for the set techniques, as their authors compute;
    :func:`aikd.evaluation.metrics.l2_normalise` is the float32 one of embeddings files); zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


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


class IdentitySetLabeler(Labeler):
    """A technique over identities (CR-FIQA's certainty ratio, SDD-FIQA): the first pass keeps each face's embedding,
    the set pass labels every image whose identity is known from all of their embeddings at once
    (:meth:`label_identities`); an image without an identity is an error (:data:`NO_IDENTITY`).

    Args:
        backbone: FR backbone (used in eval mode).
        identity_of: image key -> identity, ``None`` where unknown (default: the key's parent folder).
        options: the technique's :attr:`Options` (default: its defaults).

    Class attributes:
        title: the technique in messages.
    """

    set_pass = True
    title: ClassVar[str] = ""

    def __init__(self, backbone: nn.Module, identity_of: Callable[[str], str | None] = identity_from_folder,
                 options: Any = None) -> None:
        self.backbone = backbone.eval()
        self.identity_of = identity_of
        self.options = options if options is not None else self.Options()

    def label_batch(self, faces: torch.Tensor, keys: Sequence[str]) -> BatchLabels:
        """Embeddings of N faces, kept for :meth:`label_set`."""
        import torch

        if self.backbone.training:
            self.backbone.eval()
        with torch.inference_mode():
            return BatchLabels(embeddings=self.backbone(faces).float().cpu().numpy())

    def label_set(self, keys: Sequence[str], embeddings: np.ndarray | None) -> SetLabels:
        """Labels of all embedded images: the ``identity`` column, then :meth:`label_identities`' over the images
        with one."""
        if embeddings is None or len(embeddings) != len(keys):
            raise ValueError(f"{self.title} needs one embedding per image from the first pass")
        identities = [self.identity_of(key) for key in keys]
        known = np.flatnonzero([identity is not None for identity in identities])
        quality = np.full(len(keys), np.nan)
        extras = {column: np.full(len(keys), np.nan) for column in self.columns if column != "identity"}
        errors = {i: NO_IDENTITY for i, identity in enumerate(identities) if identity is None}
        if len(known):
            result = self.label_identities(embeddings[known], [identities[i] for i in known])
            quality[known] = result.quality
            for column, values in result.extras.items():
                extras[column][known] = values
            errors.update({int(known[i]): reason for i, reason in result.errors.items()})
        extras["identity"] = np.array([identity or "" for identity in identities], dtype=object)
        return SetLabels(quality=quality, extras=extras, errors=errors)

    def label_identities(self, embeddings: np.ndarray, identities: Sequence[str]) -> SetLabels:
        """Labels of N images, each with its identity: quality, the extra columns but ``identity``, and errors by
        index."""
        raise NotImplementedError


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
