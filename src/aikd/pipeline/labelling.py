"""The task of ``aikd label`` in the file pipeline: quality labels from a training-free FIQA technique.

The output is ``path,quality`` (what ``aikd train`` reads) plus the technique's extra columns
(:mod:`aikd.labelers`). A labeller works in up to two passes: the first over batches of faces (SER-FIQ, the
magnitude; the certainty ratio keeps embeddings, saved to ``LABELS_STEM.embeddings.npz`` for ``--resume``), the
second over the whole set (the certainty ratio's identity centres, imported labels' normalisation). Under torchrun
every rank runs the first pass on its share; rank 0 merges them and runs the second.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.images import ImageInput
from aikd.io import csv_rows, load_embeddings, open_text, save_embeddings, write_csv
from aikd.labelers import BatchLabels, Labeler, SetLabels, labeler_class
from aikd.pipeline.crops import CropOptions, FaceCropper
from aikd.pipeline.jobs import ItemResult

if TYPE_CHECKING:
    from aikd.labelers.certainty import CertaintyOptions
    from aikd.labelers.imported import ImportOptions
    from aikd.labelers.serfiq import SerFiqOptions
    from aikd.models import FRModel
    from aikd.runtime import Distributed

__all__ = ["RANDOM_WEIGHTS_WARNING", "LabelOptions", "LabelTask", "embeddings_path"]

RANDOM_WEIGHTS_WARNING = (
    "WARNING: --weights none: the face-recognition model has RANDOM weights (arch {arch}, seed {seed}, "
    "BatchNorm calibrated on noise). Labels from random weights are MEANINGLESS; use them only to try the "
    "pipeline."
)


@dataclass(frozen=True)
class LabelOptions:
    """What ``aikd label`` labels with.

    Attributes:
        method: the technique (:data:`aikd.labelers.LABELERS`).
        weights: the FR model for the methods that need one (a file, ``dlib``, or ``none``: random weights).
        arch: its architecture, where the file does not tell (required with ``none``).
        seed: seeds the misalignment noise, the SER-FIQ dropout masks and random weights.
        batch_size: faces per model batch.
        serfiq: SER-FIQ's settings (default: the paper's, with ``seed``).
        identities: image key -> identity for the certainty ratio (default: the parent folder).
        certainty: the certainty ratio's settings.
        imported: the labels file to import, for ``import``.
    """

    method: str
    weights: str | None = None
    arch: str | None = None
    seed: int = 0
    batch_size: int = 32
    serfiq: SerFiqOptions | None = None
    identities: dict[str, str] | None = field(default=None, compare=False)
    certainty: CertaintyOptions | None = None
    imported: ImportOptions | None = None

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        method = labeler_class(self.method)  # an unknown method: a ValueError naming the known ones
        if method.needs_model and not self.weights:
            raise ValueError(f"--method {self.method} needs a face-recognition model: --weights FR.pth [--arch r100] "
                             "(or --weights none --arch tiny for a pipeline test)")
        if method.needs_model and self.weights.strip().lower() == "none" and not self.arch:
            raise ValueError("--weights none builds random weights: name the architecture with --arch (e.g. tiny)")
        if self.method == "import" and self.imported is None:
            raise ValueError("--method import needs --labels FILE (CSV path,quality or the official pickle)")

    @property
    def needs_model(self) -> bool:
        return labeler_class(self.method).needs_model


def identities_from_lists(lists: Sequence[str | Path], column: str) -> dict[str, str]:
    """Image key -> identity from the ``column`` of CSV list files (the ``path`` column gives the key).

    Raises:
        ValueError: no CSV list, or one without the ``path`` and ``column`` columns.
    """
    identities: dict[str, str] = {}
    files = [Path(text) for text in lists if Path(text).is_file() and Path(text).suffix.lower() == ".csv"]
    if not files:
        raise ValueError("--identity-column reads identities from CSV lists: give a .csv list as INPUT")
    for list_file in files:
        with open_text(list_file, "list of images") as handle:
            reader = csv_rows(handle, list_file, "list of images")
            header = [name.strip() for name in next(reader, [])]
            if "path" not in header or column not in header:
                raise ValueError(f"{list_file}: needs columns path and {column}; header is {','.join(header)}")
            path_col, identity_col = header.index("path"), header.index(column)
            for row in reader:
                if len(row) > max(path_col, identity_col) and row[path_col].strip() and row[identity_col].strip():
                    identities[row[path_col].strip()] = row[identity_col].strip()
    return identities


def embeddings_path(output: Path) -> Path:
    """``labels.csv`` -> ``labels.embeddings.npz`` (the certainty method's first pass, kept for --resume)."""
    return output.with_name(f"{output.stem}.embeddings.npz")


class LabelTask:
    """Labels images with a training-free technique (a :class:`~aikd.pipeline.files.FileTask`)."""

    def __init__(self, options: LabelOptions, output: Path, crop: CropOptions, dist: Distributed,
                 items: Sequence[ImageInput] = (), workers: int = 0) -> None:
        from aikd.models import load_fr_model

        self.options, self.output, self.crop, self.items = options, output, crop, items
        self.desc, self.verb = options.method, f"labelled ({options.method})"
        self.batch_size = options.batch_size
        self.reads_images = options.needs_model
        self.device = dist.device
        self.model: FRModel | None = None
        if options.needs_model:
            self.model = load_fr_model(options.weights, options.arch, seed=options.seed, map_location=dist.device)
            if self.model.random and dist.is_main:
                print(RANDOM_WEIGHTS_WARNING.format(arch=self.model.arch, seed=options.seed), file=sys.stderr)
        self.labeler = _labeler(options, self.model.backbone if self.model is not None else None)
        self.header = ["path", "quality", *self.labeler.columns]
        preprocessing = self.model.preprocessing if self.model is not None else None
        self.cropper = FaceCropper(crop, preprocessing, items, workers) if self.model is not None else None

    def settings(self) -> dict[str, Any]:
        """What defines what a resumed run keeps: the method, the FR model's weights, the crops, and the options of
        methods whose rows come from the first pass. Set methods (certainty, import) recompute every row from the
        kept embeddings (or the labels file) at each run, so their own options may change on ``--resume``."""
        from aikd.models import weights_fingerprint

        options = self.options
        recorded: dict[str, Any] = {}
        if options.method == "serfiq":
            serfiq = self.labeler.options
            recorded = {"passes": str(serfiq.passes), "dropout": str(serfiq.dropout), "rescale": str(serfiq.rescale),
                        "rescale_alpha": str(serfiq.alpha), "rescale_r": str(serfiq.r)}
        return {"command": "label", "method": options.method, **recorded,
                "model": weights_fingerprint(self.model.backbone) if self.model is not None else None,
                "crop": self.crop.record() if self.model is not None else None, "seed": options.seed}

    def side_outputs(self) -> list[tuple[str, Path]]:
        if self.labeler.set_pass and self.labeler.needs_images:  # the first pass's embeddings, kept for --resume
            return [("-o (its embeddings)", embeddings_path(self.output))]
        return []

    def prepare(self, image: np.ndarray, item: ImageInput) -> np.ndarray:
        """The face as float32 (H, W, 3) model input (the model's preprocessing; resized there)."""
        return self.model.preprocessing.normalise(self.cropper(image, item))

    def process(self, batch: list[np.ndarray], items: list[ImageInput]) -> list[ItemResult]:
        import torch

        faces = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous().to(self.device)
        with torch.inference_mode():
            labels = self.labeler.label_batch(faces, [item.key for item in items])
        return _batch_results(labels, self.labeler.columns)

    def load_previous(self, output: Path) -> dict[str, ItemResult]:
        """A finished output's rows, or (set methods) the first pass's embeddings, for ``--resume``."""
        if self.labeler.set_pass:  # the rows are recomputed over the whole set; the first pass is what is saved
            sidecar = embeddings_path(output)
            if not sidecar.exists():
                return {}
            keys, embeddings = load_embeddings(sidecar)
            return {key: ItemResult(vector=vector) for key, vector in zip(keys, embeddings, strict=True)}
        with open_text(output, "labels file") as handle:
            reader = csv_rows(handle, output, "labels file")
            found = next(reader, [])
            if found != self.header:
                raise ValueError(f"{output}: header {','.join(found)} is not this method's "
                                 f"({','.join(self.header)}); pass --overwrite to start over, or another -o")
            return {row[0]: ItemResult(rows=[[float(value) for value in row[1:]]]) for row in reader if row}

    def after_pass(self, dist: Distributed) -> None:
        pass

    def finish(self, results: dict[str, ItemResult]) -> None:
        """The whole-set pass of set methods (certainty, import): qualities from every image at once."""
        if not self.labeler.set_pass:
            return
        if not self.labeler.needs_images:
            keys, embeddings = [item.key for item in self.items], None
        else:
            keys = [item.key for item in self.items if item.key in results and results[item.key].vector is not None
                    and results[item.key].error is None]
            if not keys:
                return
            embeddings = np.stack([results[key].vector for key in keys])
            save_embeddings(embeddings_path(self.output), keys, embeddings)
        labels = self.labeler.label_set(keys, embeddings)
        _apply_set_labels(results, keys, labels, self.labeler.columns)
        describe = getattr(self.labeler, "describe_range", None)
        if describe is not None:
            print(describe(labels), file=sys.stderr)

    def write(self, good: list[tuple[ImageInput, ItemResult]]) -> None:
        write_csv(self.output, self.header, ([item.key, *row] for item, result in good for row in result.rows))
        if self.model is not None and self.model.random:  # again after the progress bar, where it is seen
            print(RANDOM_WEIGHTS_WARNING.format(arch=self.model.arch, seed=self.options.seed), file=sys.stderr)


def _labeler(options: LabelOptions, backbone: Any) -> Labeler:
    """The labeller ``options.method`` asks for (``backbone``: the FR model, for methods that need one)."""
    cls = labeler_class(options.method)
    if options.method == "serfiq":
        from aikd.labelers.serfiq import SerFiqOptions

        return cls(backbone, options.serfiq or SerFiqOptions(seed=options.seed))
    if options.method == "magnitude":
        return cls(backbone)
    if options.method == "certainty":
        from aikd.labelers.certainty import CertaintyOptions, identity_from_folder

        identity_of: Callable[[str], str | None] = (options.identities.get if options.identities is not None
                                                    else identity_from_folder)
        return cls(backbone, identity_of, options.certainty or CertaintyOptions())
    return cls(options.imported)


def _row(quality: float, extras: dict[str, np.ndarray], columns: Sequence[str], index: int) -> list[Any]:
    values = [extras[name][index] for name in columns]
    return [float(quality), *(value.item() if isinstance(value, np.generic) else value for value in values)]


def _batch_results(labels: BatchLabels, columns: Sequence[str]) -> list[ItemResult]:
    if labels.quality is None:  # qualities come from the set pass
        return [ItemResult(vector=vector) for vector in labels.embeddings]
    results = []
    for index, quality in enumerate(labels.quality):
        if not np.isfinite(quality):
            results.append(ItemResult(error=f"quality is not finite ({quality})"))
        else:
            results.append(ItemResult(rows=[_row(quality, labels.extras, columns, index)]))
    return results


def _apply_set_labels(results: dict[str, ItemResult], keys: Sequence[str], labels: SetLabels,
                      columns: Sequence[str]) -> None:
    for index, key in enumerate(keys):
        vector = results.get(key, ItemResult()).vector
        if index in labels.errors:
            results[key] = ItemResult(error=labels.errors[index], vector=vector)
        else:
            results[key] = ItemResult(rows=[_row(labels.quality[index], labels.extras, columns, index)],
                                      vector=vector)
