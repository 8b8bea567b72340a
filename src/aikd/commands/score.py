"""``aikd score``: quality scores of face images from an AI-KD model -> ``scores.csv``.

    aikd score faces/ --checkpoint aikd-best.pth --arch r100 -o scores.csv
    aikd score photos/ --checkpoint best.pt --detect -o scores.pkl --embeddings emb.npz
    torchrun --nproc_per_node=4 -m aikd score faces/ --checkpoint best.pt -o scores.csv   # one shard per rank

AI-KD (Babnik et al., IWBF 2024) is trained to be alignment invariant, so faces are scored as they come
(any crop, resized to the model's input size) unless ``--landmarks`` or ``--detect`` asks for five-point
alignment first.

Outputs, in input order: CSV ``path,quality``; ``--format pickle``, the official AI-KD ``{path: score}``
dict; or ``--format jsonl``, one ``{"path": ..., "quality": ...}`` object per line (every format round-trips
exactly, and ``aikd train``/``evaluate`` read them all). Images that cannot be used are listed with a reason in
``OUT_STEM.errors.csv``; the run goes on (exit status 1).

Calibrated quality: with ``--calibration calib.json`` (from ``aikd calibrate``), or a checkpoint or ONNX file
that carries its calibration, the CSV and JSONL outputs get two more columns after the raw ``quality``:
``expected_fnmr``, the FNMR the calibration's FR model is expected to have at its FMR on mated comparisons with
this image, and ``quality_100``, 0-100 with 100 the lowest expected FNMR of the calibration set (specific to that
set). The work is the library's (:mod:`aikd.pipeline.scoring` in :func:`aikd.pipeline.files.run_files`); this
module parses the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aikd.commands.options import (
    add_crop_arguments,
    add_engine_arguments,
    add_inference_arguments,
    add_input_arguments,
    crop_options,
    inference_options,
    job_options,
    protected_inputs,
    ray_options,
)
from aikd.images import collect_inputs
from aikd.pipeline.scoring import SCORE_FORMATS, score_format

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd score``."""
    add_input_arguments(parser)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="quality model: an aikd checkpoint, the AI-KD release (aikd-best.pth), or an "
                             "ONNX file written by aikd export (run by onnxruntime)")
    parser.add_argument("--arch", help="backbone architecture when the checkpoint does not record it (e.g. r100)")
    parser.add_argument("-o", "--output", type=Path, default=Path("scores.csv"),
                        help="score file (default: %(default)s)")
    parser.add_argument("--format", choices=SCORE_FORMATS,
                        help="csv (path,quality), pickle (the official {path: score} dict), jsonl, parquet (large "
                             "runs; needs pyarrow), or ofiq (OFIQ's "
                             "semicolon CSV with the calibrated 0-100 quality as the scalar; needs a calibration); "
                             "default: from the output suffix (.pkl, .jsonl, .parquet), else csv")
    parser.add_argument("--embeddings", type=Path, metavar="FILE.npz",
                        help="also save the L2-normalised embedding of every scored image (aikd embed format)")
    parser.add_argument("--calibration", type=Path, metavar="JSON",
                        help="add expected_fnmr and quality_100 columns (calib.json from aikd calibrate; a "
                             "calibrated checkpoint adds them without it). quality_100 is specific to the "
                             "calibration set")
    parser.add_argument("--fr-model", metavar="NAME|NPZ",
                        help="the FR model the expected FNMR is wanted for (a name, or its embeddings from aikd "
                             "embed): warns when the calibration was made with another")
    add_crop_arguments(parser)
    add_inference_arguments(parser)
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``aikd score``: 0 when every image was scored, 1 when some failed (listed in the errors file)."""
    import functools

    from aikd.pipeline.files import run_files
    from aikd.pipeline.scoring import ScoreOptions, ScoreTask

    job, crop, inference = job_options(args), crop_options(args), inference_options(args)
    options = ScoreOptions(args.checkpoint, args.arch, score_format(args.output, args.format), args.embeddings,
                           args.calibration, args.fr_model)
    items = collect_inputs(args.inputs)
    backend = inference.device_backend(args.checkpoint)
    setup = None
    if backend == "torch":
        from aikd.runtime import use_fastest_convolutions

        setup = use_fastest_convolutions  # here, and in each Ray actor
        setup()
    factory = functools.partial(ScoreTask, options, args.output, crop, inference)
    return run_files(items, args.output, job, factory=factory, ray=ray_options(args, setup), device=inference.device,
                     device_backend=backend, protected=protected_inputs(args))
