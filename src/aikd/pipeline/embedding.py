"""The task of ``aikd embed`` in the file pipeline: the face-recognition embedding of every image.

Output: ``.npz`` with ``paths`` (the image keys, in input order) and ``embeddings`` (N x D float32, L2-normalised),
the format :func:`aikd.io.load_embeddings` reads.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.evaluation.metrics import l2_normalise
from aikd.images import ImageInput
from aikd.inference.engine import InferenceOptions
from aikd.io import EmbeddingWriter, load_embeddings
from aikd.pipeline.crops import CropOptions
from aikd.pipeline.faces import FacePipeline
from aikd.pipeline.jobs import ItemResult

if TYPE_CHECKING:
    from aikd.runtime import Distributed

__all__ = ["EmbedTask"]


class EmbedTask:
    """Embeds images with an FR model (a :class:`~aikd.pipeline.files.FileTask`), on one rank's device.

    Args:
        weights: the FR model as :func:`aikd.models.load_fr_model` reads it (a file, ``dlib``, a quality checkpoint).
        arch: its architecture, where the file does not tell.
    """

    desc, verb = "embedding", "embedded"
    reads_images = True

    def __init__(self, weights: str | Path, arch: str | None, output: Path, crop: CropOptions,
                 inference: InferenceOptions, dist: Distributed, items: Sequence[ImageInput] = (),
                 workers: int = 0) -> None:
        from aikd.models import load_fr_model

        model = load_fr_model(weights, arch)
        engine = inference.engine(model.backbone, dist.device, model.preprocessing)
        self.output, self.crop, self.inference = output, crop, inference
        self.pipeline = FacePipeline(engine, crop, workers, items)
        self.batch_size = inference.batch_size_on(dist.device)
        self._resized, self._lock = 0, threading.Lock()

    def settings(self) -> dict[str, Any]:
        return {"command": "embed", **self.pipeline.engine.record(), "fold": self.inference.fold,
                "crop": self.crop.record()}

    def side_outputs(self) -> list[tuple[str, Path]]:
        return []

    def prepare(self, image: np.ndarray, item: ImageInput) -> np.ndarray:
        if self.crop.mode == "as-is" and image.shape[:2] != tuple(self.pipeline.engine.preprocessing.input_size):
            with self._lock:  # counted in the decode threads
                self._resized += 1
        return self.pipeline.prepare_one(image, item)

    def process(self, batch: list[np.ndarray], items: list[ImageInput]) -> list[ItemResult]:
        embeddings, _ = self.pipeline.engine(batch)
        return [ItemResult(vector=vector) if np.isfinite(vector).all() else
                ItemResult(error="the model gave a non-finite embedding (NaN or infinite values)")
                for vector in l2_normalise(embeddings)]

    def load_previous(self, output: Path) -> dict[str, ItemResult]:
        keys, embeddings = load_embeddings(output)
        return {key: ItemResult(vector=vector) for key, vector in zip(keys, embeddings, strict=True)}

    def after_pass(self, dist: Distributed) -> None:
        resized = dist.sum(self._resized)
        if resized and dist.is_main:
            height, width = self.pipeline.engine.preprocessing.input_size
            print(f"warning: {resized} input(s) were not {height}x{width} aligned crops and were resized; pass "
                  "--landmarks FILE or --detect to align photos", file=sys.stderr)

    def finish(self, results: MutableMapping[str, ItemResult]) -> None:
        pass

    def write(self, good: Iterable[tuple[ImageInput, ItemResult]]) -> None:
        """The ``.npz``, written as the embeddings come (:class:`aikd.io.EmbeddingWriter`)."""
        with EmbeddingWriter(self.output, self.pipeline.engine.embedding_size) as writer:
            for item, result in good:
                writer.add(item.key, result.vector)
