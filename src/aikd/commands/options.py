"""Command-line options several commands share, and the typed options they become (built once per run).

- ``INPUT...``: image files, folders, patterns, lists or ``.bin`` sets (:func:`aikd.images.collect_inputs`);
- running: ``--batch-size``, ``--workers``, ``--resume``, ``--overwrite`` -> :class:`aikd.pipeline.jobs.JobOptions`;
- cropping: ``--landmarks``/``--detect``/``--aligned``, ``--misalign``, ``--seed`` ->
  :class:`aikd.pipeline.crops.CropOptions`;
- inference: ``--device``, ``--precision``, ``--backend``, ``--no-fold`` ->
  :class:`aikd.inference.engine.InferenceOptions`;
- engine: ``--engine local|ray``, ``--ray-address``, ``--ray-actors`` ->
  :class:`aikd.pipeline.ray_engine.RayOptions`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aikd.images import ImageInput
from aikd.inference.engine import InferenceOptions
from aikd.pipeline.crops import CropOptions
from aikd.pipeline.jobs import JobOptions

if TYPE_CHECKING:
    from aikd.pipeline.ray_engine import RayOptions

__all__ = [
    "add_crop_arguments",
    "add_engine_arguments",
    "add_inference_arguments",
    "add_input_arguments",
    "add_job_arguments",
    "crop_options",
    "inference_options",
    "job_options",
    "protected_inputs",
    "ray_options",
]

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``INPUT...`` positional argument every per-image command takes."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (searched recursively), glob patterns, .txt/.csv lists of "
                             "paths, or insightface .bin validation sets")


def count(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]. Every count a user gives is bounded: ``--bins 300000000`` took
    24 GB; out of range is a usage error (exit 2) before anything runs."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {value}")
        return value

    parse.__name__ = "count"  # argparse names the type in its messages
    return parse


SEED = count(0, 2**32 - 1)
BATCH = count(1, 65_536)


def add_job_arguments(parser: argparse.ArgumentParser, batch_size: int | None,
                      batch_help: str = "images per journal record", files: bool = True) -> argparse._ArgumentGroup:
    """``--batch-size``, ``--workers``, ``--resume``, ``--overwrite``: how every per-image command runs.

    ``files=False`` (``aikd serve``: images come in requests): no ``--resume`` and ``--overwrite``, which a file job
    alone has. Returns the argument group, so a command can add its own running options next to these.
    """
    group = parser.add_argument_group("running")
    default = "%(default)s" if batch_size is not None else "depends on the device"
    group.add_argument("--batch-size", type=BATCH, default=batch_size, help=f"{batch_help} (default: {default})")
    group.add_argument("--workers", type=count(0, 256), default=DEFAULT_WORKERS,
                       help="threads decoding and preparing images ahead of the model (and detecting faces); "
                            "0 does everything in the main thread (default: %(default)s)")
    group.add_argument("--decode", choices=("auto", "threads", "processes"), default="auto",
                       help="decode workers as threads, or as processes (no shared interpreter lock: for a model on "
                            "a GPU that waits for the CPU); auto: processes when the model runs on a GPU "
                            "(default: %(default)s)")
    if files:
        group.add_argument("--resume", action="store_true",
                           help="continue an interrupted or finished run: skip images already done, retry failed ones")
        group.add_argument("--overwrite", action="store_true", help="start over, replacing existing outputs")
    return group


def job_options(args: argparse.Namespace) -> JobOptions:
    """The :class:`JobOptions` of :func:`add_job_arguments`."""
    return JobOptions(args.batch_size, args.workers, args.resume, args.overwrite, getattr(args, "decode", "auto"))


def add_crop_arguments(parser: argparse.ArgumentParser, alignment_required: bool = False) -> None:
    """``--landmarks``/``--detect`` (and ``--aligned`` unless alignment is required), ``--detector``,
    ``--detect-threshold``, ``--misalign``, ``--seed``."""
    group = parser.add_argument_group("landmarks" if alignment_required else "how faces are cropped")
    exclusive = group.add_mutually_exclusive_group(required=alignment_required)
    exclusive.add_argument("--landmarks", type=Path, metavar="FILE",
                           help="align each image with its 5 landmarks from FILE (CSV path,x1,y1,...,x5,y5 as "
                                "written by aikd detect, or the official pickle); images without landmarks are "
                                "reported as errors")
    exclusive.add_argument("--detect", action="store_true",
                           help="detect the most confident face and align it (needs the detect extra)")
    if not alignment_required:
        exclusive.add_argument("--aligned", action="store_true",
                               help="inputs are already aligned crops (the default: resized to the model's input "
                                    "size as they come)")
    group.add_argument("--detector", default="retinaface", help="detector for --detect (default: %(default)s)")
    group.add_argument("--detect-threshold", type=float, default=0.5, metavar="T",
                       help="detector confidence threshold for --detect (default: %(default)s)")
    group.add_argument("--misalign", type=float, default=0.0, metavar="P",
                       help="jitter every landmark coordinate by U[-P, P] source pixels before aligning "
                            "(AI-KD uses 3; default: 0, aligned)")
    group.add_argument("--seed", type=SEED, default=0,
                       help="seed of the misalignment noise; with the image key it fixes each crop (default: 0)")


def crop_options(args: argparse.Namespace) -> CropOptions:
    """The :class:`CropOptions` of :func:`add_crop_arguments`."""
    return CropOptions(args.landmarks, args.detect, args.detector, args.detect_threshold, args.misalign, args.seed)


def add_inference_arguments(parser: argparse.ArgumentParser, files: bool = True) -> None:
    """Options of the inference commands (``score``, ``embed``, ``serve``): speed, device, resuming (``files``: a
    file job's options too, :func:`add_job_arguments`)."""
    from aikd.inference.engine import BACKENDS, CPU_BATCH, GPU_BATCH
    from aikd.runtime import PRECISIONS

    group = add_job_arguments(parser, None, f"faces per forward pass ({CPU_BATCH} on the CPU, {GPU_BATCH} on a GPU)",
                              files)
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="fp32 (exact), bf16 (autocast; fast on GPUs and on CPUs with native bf16, e.g. "
                            "AVX-512 BF16 or AMX, emulated and slow elsewhere) or fp16 (GPU autocast); the "
                            "embedding layer and the quality head stay fp32 (default: %(default)s)")
    group.add_argument("--backend", choices=BACKENDS, default="torch",
                       help="torch, or onnxruntime (fp32, needs the onnx extra; often the fastest exact path on "
                            "CPUs, at the cost of an export of some seconds at start) (default: %(default)s)")
    group.add_argument("--no-fold", dest="fold", action="store_false",
                       help="run the model as stored instead of with BatchNorm folded into convolutions")


ENGINES = ("local", "ray")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine``, ``--ray-address``, ``--ray-actors``: where a per-image command runs (this machine, or a Ray
    cluster)."""
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", choices=ENGINES, default="local",
                       help="local: this machine (torchrun shards it); ray: a Ray cluster, decoding in CPU tasks and "
                            "the model in GPU (or CPU) actors (needs the ray extra; docs/scale.md) "
                            "(default: %(default)s)")
    group.add_argument("--ray-address", metavar="ADDR",
                       help="the Ray cluster for --engine ray (auto, HEAD:6379, ray://HEAD:10001); default: a local "
                            "Ray started for the run")
    group.add_argument("--ray-actors", type=count(1, 4096), metavar="N",
                       help="model actors for --engine ray (default: one per GPU of the cluster, else half its CPUs)")


def ray_options(args: argparse.Namespace, worker_setup: Callable[[], None] | None = None) -> RayOptions | None:
    """The :class:`~aikd.pipeline.ray_engine.RayOptions` of :func:`add_engine_arguments`, or ``None`` (local);
    ``worker_setup``: the command's process-wide settings, made in each model actor's process too."""
    if getattr(args, "engine", "local") != "ray":
        for flag in ("ray_address", "ray_actors"):
            if getattr(args, flag, None):
                raise ValueError(f"--{flag.replace('_', '-')} is for a Ray cluster: pass --engine ray with it")
        return None
    from aikd.pipeline.ray_engine import RayOptions

    return RayOptions(args.ray_address, args.ray_actors, worker_setup=worker_setup)


def protected_inputs(args: argparse.Namespace, items: Sequence[ImageInput] = ()) -> list[Path]:
    """Every file a command reads (the images ``items``, list files, landmarks, labels, model weights): no output may
    be one of them."""
    named = [*getattr(args, "inputs", [])]
    named += [getattr(args, name, None) for name in ("landmarks", "labels", "checkpoint", "weights", "calibration")]
    return [item.path for item in items] + [Path(p) for p in named if p and str(p).lower() != "none"]


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    """The :class:`~aikd.inference.engine.InferenceOptions` of :func:`add_inference_arguments`."""
    return InferenceOptions(args.device, args.precision, args.backend, args.fold, args.batch_size)
