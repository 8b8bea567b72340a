"""The task of ``aikd label`` in the file pipeline: quality labels from a training-free FIQA technique.

The output is ``path,quality`` (what ``aikd train`` reads) plus the technique's extra columns
(:mod:`aikd.labelers`). A labeller works in up to two passes: the first over batches of faces (SER-FIQ, the
magnitude, FaceQAN, GraFIQs, a quality model; the certainty ratio and SDD-FIQA keep embeddings, saved to
``LABELS_STEM.embeddings.npz`` for ``--resume``), the second over the whole set (identity centres, similarity
distributions, imported labels' normalisation). Under torchrun every rank runs the first pass on its share; rank 0
merges them and runs the second.

``--weights`` names a face-recognition model for most techniques, whose preprocessing crops and normalises the
faces; ``--method checkpoint`` takes a quality model instead (:mod:`aikd.models.released`), with its own.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.images import ImageInput
from aikd.io import csv_rows, load_embeddings, open_text, save_embeddings, write_csv
from aikd.labelers import BatchLabels, Labeler, SetLabels, labeler_class
from aikd.labelers.base import merge_batch_labels
from aikd.pipeline.crops import CropOptions, FaceCropper
from aikd.pipeline.jobs import ItemResult

if TYPE_CHECKING:
    from aikd.labelers.certainty import CertaintyOptions
    from aikd.labelers.imported import ImportOptions
    from aikd.labelers.serfiq import SerFiqOptions
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
        seed: seeds the misalignment noise, every technique's random draws (SER-FIQ's dropout masks, FaceQAN's
            noise, SDD-FIQA's sampling) and random weights.
        batch_size: faces per model batch.
        serfiq: SER-FIQ's settings (default: the paper's, with ``seed``).
        identities: image key -> identity for the certainty ratio and SDD-FIQA (default: the parent folder).
        certainty: the certainty ratio's settings.
        imported: the labels file to import, for ``import``.
        settings: the typed settings of any other technique (its ``Labeler.Options``, e.g.
            :class:`~aikd.labelers.faceqan.FaceQanOptions`; default: the authors', with ``seed``).
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
    settings: Any = None

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
        if method.model_kind == "quality" and self.weights.strip().lower() in ("none", "dlib"):
            raise ValueError(f"--method {self.method} labels with a quality model: --weights QUALITY_MODEL.pth "
                             "(an aikd checkpoint, the AI-KD release, or a CR-FIQA, eDifFIQA or SDD-FIQA file)")
        if self.settings is not None and not isinstance(self.settings, method.Options or ()):
            raise ValueError(f"settings of --method {self.method} must be {getattr(method.Options, '__name__', None)}, "
                             f"got {type(self.settings).__name__}")

    def method_settings(self) -> Any:
        """The technique's settings: those given, else its defaults with ``seed`` (``None``: it has none)."""
        given = {"serfiq": self.serfiq, "certainty": self.certainty, "import": self.imported}.get(self.method)
        if given is not None or self.settings is not None:
            return given if given is not None else self.settings
        options = labeler_class(self.method).Options
        if options is None or self.method == "import":
            return None
        fields = {f.name for f in dataclasses.fields(options)}
        return options(**({"seed": self.seed} if "seed" in fields else {}))

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
        self.options, self.output, self.crop, self.items = options, output, crop, items
        self.desc, self.verb = options.method, f"labelled ({options.method})"
        self.batch_size = options.batch_size
        self.reads_images = options.needs_model
        self.device = dist.device
        self.model = _load_model(options, dist)
        self.labeler = _labeler(options, self.model, dist.device)
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
        elif not self.labeler.set_pass and getattr(self.labeler, "options", None) is not None:
            recorded = {key: str(value) for key, value in dataclasses.asdict(self.labeler.options).items()}
        network = getattr(self.model, "backbone", self.model)
        return {"command": "label", "method": options.method, **recorded,
                "model": weights_fingerprint(network) if self.model is not None else None,
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
        keys, size, parts = [item.key for item in items], self.labeler.compute_batch, []
        for start in range(0, len(faces), size):  # passes of exactly `size` faces: the same bits in any batch
            stop = min(start + size, len(faces))
            rows = [*range(start, stop), *[stop - 1] * (start + size - stop)]
            with torch.inference_mode(not self.labeler.needs_gradients):  # FaceQAN, GraFIQs differentiate
                labels = self.labeler.label_batch(faces[rows], [keys[row] for row in rows])
            parts.append((labels, stop - start))
        return _batch_results(merge_batch_labels(parts), self.labeler.columns)

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
            keys, vectors = [], []
            for item in self.items:  # each result read once (a journal reads it from disk)
                result = results.get(item.key)
                if result is not None and result.vector is not None and result.error is None:
                    keys.append(item.key)
                    vectors.append(result.vector)
            if not keys:
                return
            embeddings = np.stack(vectors)
            del vectors
            save_embeddings(embeddings_path(self.output), keys, embeddings)
        labels = self.labeler.label_set(keys, embeddings)
        _apply_set_labels(results, keys, labels, self.labeler.columns)
        describe = getattr(self.labeler, "describe_range", None)
        if describe is not None:
            print(describe(labels), file=sys.stderr)

    def write(self, good: list[tuple[ImageInput, ItemResult]]) -> None:
        write_csv(self.output, self.header, ([item.key, *row] for item, result in good for row in result.rows))
        if getattr(self.model, "random", False):  # again after the progress bar, where it is seen
            print(RANDOM_WEIGHTS_WARNING.format(arch=self.model.arch, seed=self.options.seed), file=sys.stderr)


def _load_model(options: LabelOptions, dist: Distributed) -> Any:
    """The FR model (:class:`~aikd.models.FRModel`) or quality model (``--method checkpoint``) the method needs."""
    if not options.needs_model:
        return None
    if labeler_class(options.method).model_kind == "quality":
        from aikd.models.released import load_any_quality_model

        return load_any_quality_model(options.weights, options.arch, map_location=dist.device)
    from aikd.models import load_fr_model

    model = load_fr_model(options.weights, options.arch, seed=options.seed, map_location=dist.device)
    if model.random and dist.is_main:
        print(RANDOM_WEIGHTS_WARNING.format(arch=model.arch, seed=options.seed), file=sys.stderr)
    return model


def _labeler(options: LabelOptions, model: Any, device: Any) -> Labeler:
    """The labeller ``options.method`` asks for, on ``model`` (an FR or quality model) where it needs one."""
    cls, settings = labeler_class(options.method), options.method_settings()
    if options.method == "import":
        return cls(options.imported)
    if options.method == "checkpoint":
        return cls(model, device)
    backbone = model.backbone
    if options.method in ("certainty", "sddfiqa"):
        from aikd.names import identity_from_folder

        identity_of: Callable[[str], str | None] = (options.identities.get if options.identities is not None
                                                    else identity_from_folder)
        return cls(backbone, identity_of, settings)
    if options.method == "faceqan":
        return cls(backbone, model.preprocessing, settings)
    return cls(backbone) if settings is None else cls(backbone, settings)


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
    for index, key in enumerate(keys):  # the rows only: the embeddings are in their own file by now
        if index in labels.errors or not np.isfinite(labels.quality[index]):
            reason = labels.errors.get(index, f"quality is not finite ({labels.quality[index]})")
            results[key] = ItemResult(error=reason)
        else:
            results[key] = ItemResult(rows=[_row(labels.quality[index], labels.extras, columns, index)])
