"""``aikd align``: write 112x112 face crops aligned to the ArcFace template, or deliberately misaligned.

Each image is aligned with its five landmarks (from ``--landmarks FILE``, e.g. written by ``aikd detect``,
or from the detector with ``--detect``) by the similarity transform of :mod:`aikd.align`, exactly as
``aikd score``/``embed``/``label`` align with the same options. With ``--misalign P`` every landmark
coordinate is first jittered by U[-P, P] source pixels (AI-KD, Babnik et al., IWBF 2024), with noise
determined by ``--seed`` and the image key alone: rerunning, resuming or splitting a run gives the same
crops, which makes misaligned test sets reproducible.

Crops mirror the input tree: the image with key ``a/b.jpg`` becomes ``ALIGNED_DIR/a/b.png`` (lossless PNG
by default; ``--format jpg`` for JPEG). Keys that are absolute paths lose their root, and ``..`` parts
become ``__``, so nothing is written outside ALIGNED_DIR. Every crop is written atomically.

    aikd detect photos/ -o landmarks.csv
    aikd align photos/ --landmarks landmarks.csv -o aligned/
    aikd align photos/ --landmarks landmarks.csv --misalign 3 --seed 1 -o misaligned_p3_s1/

Failures (no landmarks for an image, no face, unreadable file) are listed in ``ALIGNED_DIR.errors.csv``
beside the folder. ``--resume`` skips every crop already in ALIGNED_DIR (it trusts them: resume with the
options of the first run).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from aikd.commands.options import (
    add_crop_arguments,
    add_input_arguments,
    add_job_arguments,
    crop_options,
    job_options,
    protected_inputs,
)
from aikd.images import ImageInput, InputList, collect_inputs, repeated_hashes
from aikd.io import atomic_write
from aikd.pipeline.crops import FaceCropper
from aikd.pipeline.jobs import InputPaths, ItemResult, JobOptions, finish_job, read_journal, run_job
from aikd.pipeline.outputs import claimed_output, journal_dir

__all__ = ["FORMATS", "add_arguments", "crop_path", "run"]

FORMATS = {"png": ".png", "jpg": ".jpg"}
JPEG_QUALITY = 95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd align``."""
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="ALIGNED_DIR",
                        help="folder to write the crops to (mirrors the input tree)")
    add_crop_arguments(parser, alignment_required=True)
    parser.add_argument("--format", choices=sorted(FORMATS), default="png",
                        help=f"png (lossless, default) or jpg (quality {JPEG_QUALITY})")
    add_job_arguments(parser, batch_size=64)


def crop_path(output: Path, key: str, suffix: str) -> Path:
    """Where the crop of the image with ``key`` goes: its key under ``output``, with ``suffix``."""
    parts = [part if part != ".." else "__" for part in PurePosixPath(key.replace("\\", "/")).parts
             if part not in ("/", ".")]
    if not parts or parts[0].endswith(":"):  # a Windows drive ("C:") is no folder of the tree
        parts = parts[1:]
    if not parts:
        raise ValueError(f"image key {key!r} names no file")
    return output.joinpath(*parts).with_suffix(suffix)


def _check_targets(items: InputList, output: Path, suffix: str) -> None:
    """Refuse two images mapping to one crop and a crop replacing an input; in a few passes over ``items`` with
    32-bit hashes (8 bytes an image), every hit checked exactly, so memory does not grow with the images."""
    targets = array.array("I")
    existing = array.array("I")  # file identities of the crops already there (--resume)
    for item in items:
        target = crop_path(output, item.key, suffix)
        targets.append(hash(target) & 0xFFFFFFFF)
        with contextlib.suppress(OSError):
            existing.append(_identity_hash(os.stat(target)))
    repeated = set(repeated_hashes(np.frombuffer(targets, dtype=np.uint32)).tolist())
    owner: dict[Path, str] = {}
    suspects = set()  # resolved inputs that may be a crop: the same file identity as one, or missing
    known = np.unique(np.frombuffer(existing, dtype=np.uint32))
    for position, item in enumerate(items):
        if position in repeated:
            target = crop_path(output, item.key, suffix)
            if target in owner:
                raise ValueError(f"images {owner[target]!r} and {item.key!r} would both be written to {target}; "
                                 "rename one, or align them in separate runs")
            owner[target] = item.key
        try:
            identity = _identity_hash(os.stat(item.path))
            if len(known) and known[min(np.searchsorted(known, identity), len(known) - 1)] == identity:
                suspects.add(item.path.resolve())
        except OSError:
            suspects.add(item.path.resolve())
    if suspects:
        for item in items:
            target = crop_path(output, item.key, suffix)
            if target.resolve() in suspects:
                raise ValueError(f"the crop of {item.key!r} would overwrite the input image {target}; "
                                 "choose another output folder")


def _identity_hash(info: os.stat_result) -> int:
    return hash((info.st_dev, info.st_ino)) & 0xFFFFFFFF


def _encode(crop: np.ndarray, suffix: str) -> bytes:
    bgr = np.ascontiguousarray(crop[:, :, ::-1])
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix == ".jpg" else []
    ok, encoded = cv2.imencode(suffix, bgr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {suffix} crop")
    return encoded.tobytes()


def _output_folder_job(output: Path, job: JobOptions) -> JobOptions:
    """How the output folder may be claimed: an empty folder (e.g. made by mkdir) is no output to protect."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output} is a file; -o names the folder to write the crops to")
    fresh = output.is_dir() and not any(output.iterdir()) and not journal_dir(output).exists()
    return replace(job, resume=False, overwrite=True) if fresh else job


def run(args: argparse.Namespace) -> int:
    """``aikd align``: write the crops and the errors file; returns the exit status."""
    job, crop = job_options(args), crop_options(args)
    items = collect_inputs(args.inputs)
    output: Path = args.output
    suffix = FORMATS[args.format]
    _check_targets(items, output, suffix)
    claim = _output_folder_job(output, job)
    prepare = FaceCropper(crop, items=items, workers=job.workers)  # 112x112 ArcFace crops

    def process_batch(crops: list[np.ndarray], batch: list[ImageInput]) -> list[ItemResult]:
        results = []
        for crop_image, item in zip(crops, batch, strict=True):
            target = crop_path(output, item.key, suffix)
            with atomic_write(target, "wb") as handle:
                handle.write(_encode(crop_image, suffix))
            results.append(ItemResult(rows=[[target.relative_to(output).as_posix()]]))
        return results

    def load_previous(folder: Path) -> Iterator[tuple[str, ItemResult]]:
        for item in items:
            target = crop_path(output, item.key, suffix)
            if target.is_file():
                yield item.key, ItemResult(rows=[[target.relative_to(output).as_posix()]])

    settings = {"command": "align", "crop": crop.record(), "format": args.format}
    with claimed_output(output, settings, resume=claim.resume, overwrite=claim.overwrite,
                        inputs=InputPaths(items, protected_inputs(args))):
        run_job(items, process_batch, output, batch_size=job.batch_size, workers=job.workers,
                resume=job.resume, prepare=prepare, load_previous=load_previous, desc="align")
        return finish_job(items, read_journal(output, previous="previous0"), output, lambda good: None,
                          verb="aligned").exit_code
