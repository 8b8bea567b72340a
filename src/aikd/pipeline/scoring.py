"""The task of ``aikd score`` in the file pipeline: quality (and, optionally, the embedding) of every image.

Outputs, in input order: CSV ``path,quality``; the official AI-KD pickle ``{path: score}``; or JSONL (one object
per line), all written by :func:`aikd.io.write_qualities`. With a calibration (given, or carried by the model
file) CSV and JSONL get ``expected_fnmr`` and ``quality_100`` after ``quality``
(:mod:`aikd.evaluation.calibration`); ``embeddings`` adds an ``aikd embed``-format ``.npz`` of the L2-normalised
embeddings.

``ofiq``: the CSV layout of OFIQ, the ISO/IEC 29794-5 reference implementation (``OFIQSampleApp``: semicolons, a
header ``Filename;<measure>;<measure>.scalar;`` and one row per input image ``path;raw;scalar``), with the raw
quality (the shortest decimal of its float32) and the calibrated 0-100 ``quality_100`` as the scalar, written as
OFIQ writes a whole number. An image that could not be scored keeps its row, with ``-1`` in both columns (OFIQ's
mark of a failed measure). It needs a calibration: OFIQ's scalar is a 0-100 value, which only a calibration gives.

The model: an aikd checkpoint, the AI-KD release, an ``aikd export`` ONNX graph, or a released CR-FIQA, eDifFIQA or
SDD-FIQA file (:mod:`aikd.models.released`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.evaluation.metrics import l2_normalise
from aikd.images import ImageInput
from aikd.inference.engine import InferenceOptions
from aikd.io import (
    QUALITY_FORMATS,
    EmbeddingWriter,
    atomic_write,
    load_embeddings,
    quality_format,
    read_labels,
    shortest_float32,
    write_quality_rows,
)
from aikd.pipeline.crops import CropOptions
from aikd.pipeline.faces import FacePipeline
from aikd.pipeline.jobs import ItemResult, chunked

if TYPE_CHECKING:
    from aikd.runtime import Distributed

__all__ = ["OFIQ_MEASURE", "SCORE_FORMATS", "ScoreOptions", "ScoreTask", "read_ofiq", "score_format", "write_ofiq"]

OFIQ, OFIQ_MEASURE = "ofiq", "AIKDQuality"  # the measure's name in the OFIQ layout
SCORE_FORMATS = (*QUALITY_FORMATS, OFIQ)


def score_format(output: Path, requested: str | None) -> str:
    """The output format: ``requested`` (one of :data:`SCORE_FORMATS`), else from the output's suffix."""
    return OFIQ if requested == OFIQ else quality_format(output, requested)


@dataclass(frozen=True)
class ScoreOptions:
    """What ``aikd score`` scores with and writes.

    Attributes:
        checkpoint: the quality model: an aikd checkpoint, the AI-KD release, or an ``aikd export`` ONNX file.
        arch: the backbone architecture where the checkpoint does not record it.
        format: ``csv``, ``pickle``, ``jsonl`` or ``ofiq``.
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
        if self.format not in SCORE_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(SCORE_FORMATS)}, got {self.format!r}")


class ScoreTask:
    """Scores images with a quality model (a :class:`~aikd.pipeline.files.FileTask`), on one rank's device."""

    desc, verb = "scoring", "scored"
    reads_images = True

    def __init__(self, options: ScoreOptions, output: Path, crop: CropOptions, inference: InferenceOptions,
                 dist: Distributed, items: Sequence[ImageInput] = (), workers: int = 0) -> None:
        self.options, self.output, self.crop, self.inference, self.items = options, output, crop, inference, items
        engine = _quality_engine(inference, options.checkpoint, options.arch, dist.device)
        self.calibration = self._calibration(engine)
        if self.calibration is not None and options.format == "pickle":
            raise ValueError("--calibration adds columns the official pickle cannot hold: write CSV or JSONL")
        if self.calibration is None and options.format == OFIQ:
            raise ValueError("--format ofiq writes the calibrated 0-100 quality as OFIQ's scalar, and no calibration "
                             "is given: pass --calibration calib.json (from aikd calibrate) or a calibrated checkpoint")
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
        if self.options.format == OFIQ:
            scores = read_ofiq(output)
        else:
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

    def write(self, good: Iterable[tuple[ImageInput, ItemResult]]) -> None:
        """The score file (and the embeddings) from the images scored, in input order, written as they come: CSV,
        JSONL and the embeddings row by row (:func:`aikd.io.write_quality_rows`, :class:`aikd.io.EmbeddingWriter`),
        so memory does not grow with their number; the official pickle and the OFIQ layout are built whole."""
        embeddings = (EmbeddingWriter(self.options.embeddings, self.pipeline.engine.embedding_size)
                      if self.options.embeddings is not None else None)
        try:
            rows = self._rows(good, embeddings)
            if self.options.format == OFIQ:
                write_ofiq(self.output, (item.key for item in self.items),
                           ((key, quality, columns["quality_100"]) for key, quality, columns in rows))
            else:
                columns = ("expected_fnmr", "quality_100") if self.calibration is not None else ()
                write_quality_rows(self.output, rows, self.options.format, columns)
            if embeddings is not None:
                embeddings.close()
        finally:
            if embeddings is not None:
                embeddings.discard()

    def _rows(self, good: Iterable[tuple[ImageInput, ItemResult]], embeddings: EmbeddingWriter | None,
              chunk: int = 512) -> Iterator[tuple[str, float, dict[str, Any] | None]]:
        """``(key, quality, calibrated columns or None)`` of each image, the calibration applied a chunk at a time
        (from the quality as written, so a reader of the file gets the same); each embedding is added on the way."""
        for part in chunked(good, chunk):
            qualities = [result.rows[0][0] for _, result in part]
            extra: list[dict[str, Any] | None] = [None] * len(part)
            if self.calibration is not None:
                applied = self.calibration.apply(np.asarray(qualities, dtype=np.float64))
                extra = [{"expected_fnmr": shortest_float32(fnmr), "quality_100": scalar} for fnmr, scalar
                         in zip(applied["expected_fnmr"], applied["quality_100"].tolist(), strict=True)]
            for (item, result), quality, columns in zip(part, qualities, extra, strict=True):
                if embeddings is not None:
                    embeddings.add(item.key, result.vector)
                yield item.key, quality, columns


def _quality_engine(inference: InferenceOptions, checkpoint: Path, arch: str | None, device: Any) -> Any:
    """The engine of a quality model file; a released CR-FIQA, eDifFIQA or SDD-FIQA file loads unchanged too."""
    if inference.device_backend(checkpoint) != "torch":
        return inference.quality_engine(checkpoint, arch, device)
    from aikd.models.released import load_any_quality_model

    return inference.engine(load_any_quality_model(checkpoint, arch), device, own_model=True)


def _ofiq_number(value: float) -> str:
    """As OFIQSampleApp writes a value: a whole number without decimals."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_ofiq(path: Path, keys: Iterable[str], scored: Iterable[tuple[str, float, float]],
               measure: str = OFIQ_MEASURE) -> None:
    """OFIQ's CSV (see the module docstring): every key in order, ``-1;-1`` for those not scored, then the scored
    images that are not among ``keys`` (kept from an earlier run), written as they come.

    Args:
        path: the output.
        keys: every input image, in input order.
        scored: ``(key, raw quality, 0-100 scalar)`` of the images scored, those among ``keys`` first and in their
            order (as :func:`aikd.pipeline.jobs.finish_job` gives them).
        measure: the column name.
    """
    def line(key: str, raw: float, scalar: float) -> str:
        return f"{key};{_ofiq_number(shortest_float32(raw))};{_ofiq_number(scalar)}\n"

    rows = iter(scored)
    waiting = next(rows, None)
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        handle.write(f"Filename;{measure};{measure}.scalar;\n")
        for key in keys:
            scored_here = waiting is not None and waiting[0] == key
            handle.write(line(*waiting) if scored_here else f"{key};-1;-1\n")
            if scored_here:
                waiting = next(rows, None)
        handle.writelines(line(*row) for row in itertools.chain([waiting] if waiting is not None else [], rows))


def read_ofiq(path: Path) -> dict[str, float]:
    """Key -> raw quality of the images an OFIQ-layout file scored (rows of -1;-1 are the failed ones)."""
    scores = {}
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split(";")
        if header[:1] != ["Filename"] or len(header) < 3:
            raise ValueError(f"{path}: not an OFIQ-layout CSV (header {';'.join(header)})")
        for line in handle:
            fields = line.rstrip("\n").split(";")
            if len(fields) >= 3 and not (fields[1] == "-1" and fields[2] == "-1"):
                scores[fields[0]] = float(fields[1])
    return scores
