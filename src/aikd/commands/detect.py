"""``aikd detect``: the five landmarks of the face in each photo -> ``landmarks.csv``.

    aikd detect photos/ -o landmarks.csv
    aikd detect photos/ -o landmarks.csv --resume          # continue an interrupted run
    aikd align photos/ --landmarks landmarks.csv -o aligned/

The file's layout and how detection runs: :mod:`aikd.pipeline.detection` (the file pipeline,
:func:`aikd.pipeline.files.run_files`); this module parses the command line. Images without a face get a row in
``landmarks.errors.csv`` and the run goes on (exit status 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aikd.commands.options import add_input_arguments, add_job_arguments, count, job_options, protected_inputs
from aikd.images import collect_inputs

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd detect``."""
    from aikd.detectors import DETECTORS

    add_input_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="CSV",
                        help="landmarks file to write (path,x1,y1,...,x5,y5,box_x1,...,confidence)")
    parser.add_argument("--all-faces", action="store_true",
                        help="one row per detected face (with a 'face' index, 0 = most confident) "
                             "instead of the most confident face only")
    parser.add_argument("--detector", default="retinaface", choices=sorted(DETECTORS),
                        help="face detector (default: %(default)s)")
    # 0.5: at 0.9 a profile sample face (scored 0.896) was missed, which 0.5 found.
    parser.add_argument("--threshold", type=float, default=0.5, metavar="T",
                        help="minimum detector confidence of a face (default: %(default)s)")
    parser.add_argument("--max-size", type=count(0, 100_000), default=640, metavar="PX",
                        help="photos whose longer side exceeds PX are downscaled for detection (points are "
                             "mapped back); 0 never downscales (default: %(default)s)")
    add_job_arguments(parser, batch_size=32)


def run(args: argparse.Namespace) -> int:
    """``aikd detect``: detect, write the landmarks file and the errors file; returns the exit status."""
    from aikd.pipeline.detection import DetectOptions, DetectTask
    from aikd.pipeline.files import run_files

    job = job_options(args)
    options = DetectOptions(args.detector, args.threshold, args.max_size, args.all_faces, job.batch_size)
    items = collect_inputs(args.inputs)
    return run_files(items, args.output, job,
                     lambda dist: DetectTask(options, args.output, dist, items, job.workers),
                     device=None, protected=protected_inputs(args))
