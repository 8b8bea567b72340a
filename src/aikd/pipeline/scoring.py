"""The task of ``aikd score`` in the file pipeline: quality (and, optionally, the embedding) of every image.

Outputs, in input order: CSV ``path,quality``; the official AI-KD pickle ``{path: score}``; or JSONL (one object
per line), all written by :func:`aikd.io.write_qualities`. With a calibration (given, or carried by the model
file) CSV and JSONL get ``expected_fnmr`` and ``quality_100`` after ``quality``
(:mod:`aikd.evaluation.calibration`); ``embeddings`` adds an ``aikd embed``-format ``.npz`` of the L2-normalised
embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.evaluation.metrics import l2_normalise
from aikd.images import ImageInput
from aikd.inference.engine import InferenceOptions
from aikd.io import QUALITY_FORMATS, load_embeddings, read_labels, save_embeddings, shortest_float32, write_qualities
from aikd.pipeline.crops import CropOptions
from aikd.pipeline.faces import FacePipeline
from aikd.pipeline.jobs import ItemResult

if TYPE_CHECKING:
    from aikd.runtime import Distributed

__all__ = ["ScoreOptions", "ScoreTask"]


@dataclass(frozen=True)
class ScoreOptions:
    """What ``aikd score`` scores with and writes.

    Attributes:
        checkpoint: the quality model: an aikd checkpoint, the AI-KD release, or an ``aikd export`` ONNX file.
        arch: the backbone architecture where the checkpoint does not record it.
        format: ``csv``, ``pickle`` or ``jsonl``.
        embeddings: also write the L2-normalised embeddings to this ``.npz``.
        calibration: a calib.json to apply (a calibrated model file applies its own without it).
        fr_model: the FR model the expected FNMR is wanted for: warns when the calibration was made with another.
    """

    checkpoint: Path
    arch: str | None = None
    format: str = "csv"
    embeddings: Path | None = None
    calibration: Path | None = None
    fr_model: str | None = None

    def __post_init__(self) -> None:
        if self.format not in QUALITY_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(QUALITY_FORMATS)}, got {self.format!r}")


class ScoreTask:
    """Scores images with a quality model (a :class:`~aikd.pipeline.files.FileTask`), on one rank's device."""

    desc, verb = "scoring", "scored"
    reads_images = True

    def __init__(self, options: ScoreOptions, output: Path, crop: CropOptions, inference: InferenceOptions,
                 dist: Distributed, items: Sequence[ImageInput] = (), workers: int = 0) -> None:
        self.options, self.output, self.crop, self.inference = options, output, crop, inference
        engine = inference.quality_engine(options.checkpoint, options.arch, dist.device)
        self.calibration = self._calibration(engine)
        if self.calibration is not None and options.format == "pickle":
            raise ValueError("--calibration adds columns the official pickle cannot hold: write CSV or JSONL")
        self.pipeline = FacePipeline(engine, crop, workers, items)
        self.preparer = self.pipeline.file_preparer()  # for decode processes (a GPU run)
        self.batch_size = inference.batch_size_on(dist.device)

    def _calibration(self, engine: Any) -> Any:
        """The calibration to apply (:func:`~aikd.evaluation.calibration.resolve_calibration`), or ``None``."""
        options = self.options
        if options.calibration is None and not engine.calibration and options.fr_model is None:
            return None  # the common case: no import of the calibration module at start-up
        from aikd.evaluation.calibration import resolve_calibration

        requested = options.calibration if options.calibration is not None else bool(engine.calibration) or None
        return resolve_calibration(requested, engine.calibration, [engine.fingerprint, engine.weights_fingerprint],
                                   str(options.checkpoint), options.fr_model)

    def settings(self) -> dict[str, Any]:
        return {"command": "score", **self.pipeline.engine.record(), "fold": self.inference.fold,
                "crop": self.crop.record(), "embeddings": self.options.embeddings is not None}

    def side_outputs(self) -> list[tuple[str, Path]]:
        return [("--embeddings", self.options.embeddings)] if self.options.embeddings is not None else []

    def prepare(self, image: np.ndarray, item: ImageInput) -> np.ndarray:
        return self.pipeline.prepare_one(image, item)

    def process(self, batch: list[np.ndarray], items: list[ImageInput]) -> list[ItemResult]:
        embeddings, qualities = self.pipeline.engine(batch)
        keep = self.options.embeddings is not None
        vectors = l2_normalise(embeddings) if keep else [None] * len(batch)
        finite = np.isfinite(qualities) & np.isfinite(embeddings).all(axis=1)
        return [ItemResult(rows=[[shortest_float32(q)]], vector=v) if ok else
                ItemResult(error=f"the model gave a non-finite quality ({q}) or embedding")
                for q, v, ok in zip(qualities, vectors, finite, strict=True)]

    def load_previous(self, output: Path) -> dict[str, ItemResult]:
        """The scores (and embeddings) of a finished earlier run, so ``--resume`` skips those images."""
        scores = read_labels(output, fmt=self.options.format).as_dict()
        if self.options.embeddings is None:
            return {key: ItemResult(rows=[[q]]) for key, q in scores.items()}
        vectors = {}
        if self.options.embeddings.exists():
            keys, embeddings = load_embeddings(self.options.embeddings)
            vectors = dict(zip(keys, embeddings, strict=True))
        # An image scored without its embedding is not done when embeddings are asked for now.
        return {key: ItemResult(rows=[[q]], vector=vectors[key]) for key, q in scores.items() if key in vectors}

    def after_pass(self, dist: Distributed) -> None:
        pass

    def finish(self, results: dict[str, ItemResult]) -> None:
        pass

    def write(self, good: list[tuple[ImageInput, ItemResult]]) -> None:
        keys = [item.key for item, _ in good]
        qualities = [result.rows[0][0] for _, result in good]
        columns = None
        if self.calibration is not None:  # from the quality as written, so a reader of the file gets the same
            applied = self.calibration.apply(np.asarray(qualities, dtype=np.float64))
            columns = {"expected_fnmr": [shortest_float32(v) for v in applied["expected_fnmr"]],
                       "quality_100": applied["quality_100"].tolist()}
        write_qualities(self.output, keys, qualities, self.options.format, columns)
        if self.options.embeddings is not None:
            vectors = [result.vector for _, result in good]
            dim = self.pipeline.engine.embedding_size
            save_embeddings(self.options.embeddings, keys, np.stack(vectors) if vectors else
                            np.zeros((0, dim), np.float32))
