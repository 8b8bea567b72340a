"""``aikd detect``: the five landmarks of the face in each photo -> ``landmarks.csv``.

One row per image for its most confident face (or one row per face with ``--all-faces``, numbered by a
``face`` column, 0 = most confident)::

    path,[face,]x1,y1,x2,y2,x3,y3,x4,y4,x5,y5,box_x1,box_y1,box_x2,box_y2,confidence

Points are in the order of the ArcFace alignment template (left eye, right eye, nose, left mouth corner,
right mouth corner; see :mod:`aikd.detectors`), in pixels of the photo as stored on disk (EXIF orientation
applied), so the file is what :func:`aikd.io.read_landmarks`, ``aikd align --landmarks`` and
``aikd train`` read. ``path`` is the image key: relative to the folder given on the command line.

Images without a face get a row in ``landmarks.errors.csv`` and the run goes on (exit status 1).

    aikd detect photos/ -o landmarks.csv
    aikd detect photos/ -o landmarks.csv --resume          # continue an interrupted run
    aikd align photos/ --landmarks landmarks.csv -o aligned/

Detection runs inside the decode worker threads, one detector per thread (OpenCV dnn networks must not be
shared), with onnxruntime limited to one thread per detector. On the 2-core development machine this
was the fastest arrangement for RetinaFace (astronaut + Grace Hopper photos, img/s over two runs: 18 and
27 with two single-threaded workers; 11 and 16 detecting in the main thread with onnxruntime's own thread
pool) and for MTCNN (6.2 vs 4.1), because decoding and the detector's numpy pre/post-processing then run
in parallel too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aikd.commands.options import add_input_arguments, add_job_arguments, job_options, protected_inputs
from aikd.images import ImageInput, collect_inputs
from aikd.io import LANDMARK_COLUMNS, csv_rows, open_text, write_csv
from aikd.pipeline.jobs import ItemResult, claim_output, finish_job, run_job

__all__ = ["BOX_COLUMNS", "add_arguments", "detection_columns", "run"]

BOX_COLUMNS = ("box_x1", "box_y1", "box_x2", "box_y2")
_VALUES = 15  # 10 landmark coordinates, 4 box coordinates, the confidence


def detection_columns(all_faces: bool) -> list[str]:
    """The header of a landmarks file written by ``aikd detect``."""
    return ["path", *(["face"] if all_faces else []), *LANDMARK_COLUMNS, *BOX_COLUMNS, "confidence"]


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
    parser.add_argument("--max-size", type=int, default=640, metavar="PX",
                        help="photos whose longer side exceeds PX are downscaled for detection (points are "
                             "mapped back); 0 never downscales (default: %(default)s)")
    add_job_arguments(parser, batch_size=32)


def _detect_prepare(detector_name: str, threshold: float, max_size: int | None, all_faces: bool,
                    workers: int) -> Callable[[np.ndarray, ImageInput], np.ndarray]:
    """Decode-thread step: photo -> (F, 15) array of landmarks, box and confidence, best face first."""
    from aikd.detectors import thread_local_detector

    detector = thread_local_detector(detector_name, single_threaded=workers > 0, score_threshold=threshold,
                                     max_size=max_size)
    no_face = f"no face found ({detector_name}, confidence threshold {threshold:g})"

    def prepare(image: np.ndarray, item: ImageInput) -> np.ndarray:
        faces = detector().detect(image)
        if not faces:
            raise ValueError(no_face)
        if not all_faces:
            faces = faces[:1]
        return np.array([[*face.landmarks.ravel(), *face.box, face.confidence] for face in faces], np.float64)

    return prepare


def _rows(detections: np.ndarray, all_faces: bool) -> list[list[Any]]:
    rows = []
    for index, values in enumerate(detections):
        row: list[Any] = [round(float(v), 3) for v in values[:-1]] + [round(float(values[-1]), 6)]
        rows.append([index, *row] if all_faces else row)
    return rows


def _load_previous(all_faces: bool) -> Callable[[Path], dict[str, ItemResult]]:
    """Reader of a finished landmarks file, for ``--resume`` (its rows count as done)."""

    def load(path: Path) -> dict[str, ItemResult]:
        with open_text(path, "landmarks file") as handle:
            reader = csv_rows(handle, path, "landmarks file")
            header = next(reader, [])
            if header != detection_columns(all_faces):
                had = "with" if "face" in header else "without"
                raise ValueError(f"{path}: not a landmarks file of this kind (written {had} --all-faces, or by "
                                 "another program); pass --overwrite to start over, or another -o")
            done: dict[str, ItemResult] = {}
            for line_no, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise ValueError(f"{path}:{line_no}: expected {len(header)} columns, found {len(row)}")
                values: list[Any] = [float(v) for v in row[-_VALUES:]]
                done.setdefault(row[0], ItemResult()).rows.append([int(row[1]), *values] if all_faces else values)
        return done

    return load


def run(args: argparse.Namespace) -> int:
    """``aikd detect``: detect, write the landmarks file and the errors file; returns the exit status."""
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.max_size < 0:
        raise ValueError(f"--max-size must be >= 0 pixels (0: never downscale), got {args.max_size}")
    job = job_options(args)
    items = collect_inputs(args.inputs)
    output: Path = args.output
    claim_output(output, job, {"command": "detect", "detector": args.detector, "threshold": args.threshold,
                               "max_size": args.max_size, "all_faces": args.all_faces},
                 inputs=protected_inputs(args, items))
    prepare = _detect_prepare(args.detector, args.threshold, args.max_size or None, args.all_faces, job.workers)

    def process_batch(detections: list[np.ndarray], batch: list[ImageInput]) -> list[ItemResult]:
        return [ItemResult(rows=_rows(found, args.all_faces)) for found in detections]

    results = run_job(items, process_batch, output, batch_size=job.batch_size, workers=job.workers,
                      resume=job.resume, prepare=prepare, load_previous=_load_previous(args.all_faces),
                      desc="detect")

    def write_output(good: list[tuple[ImageInput, ItemResult]]) -> None:
        write_csv(output, detection_columns(args.all_faces),
                  ([item.key, *row] for item, result in good for row in result.rows))

    return finish_job(items, results, output, write_output, verb="detected faces in").exit_code
