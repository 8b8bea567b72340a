"""The steps of ``aikd demo`` that call the library as the commands do (detect, label, score, train), shared by the
demo (:mod:`aikd.demo.run`) and its comparison (:mod:`aikd.demo.compare`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aikd.images import collect_inputs
from aikd.pipeline.crops import CropOptions
from aikd.pipeline.jobs import JobOptions

__all__ = ["WORKERS", "detect_faces", "label_with", "score_with", "step_ok", "train_student"]

WORKERS = min(4, os.cpu_count() or 1)  # the commands' default decode threads


def step_ok(name: str, code: int, allowed: tuple[int, ...] = (0,)) -> None:
    """Raise when a step's exit status is not one of ``allowed``."""
    if code not in allowed:
        raise ValueError(f"demo step '{name}' failed with exit status {code} (its error is printed above)")


def config_file() -> Path:
    """configs/demo_dlib.yaml of the source tree this package runs from."""
    path = Path(__file__).resolve().parents[3] / "configs" / "demo_dlib.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo needs configs/demo_dlib.yaml from the aikd source tree")
    return path


def detect_faces(folder: Path, output: Path, detector: str = "retinaface") -> int:
    """The most confident face of every photo in ``folder`` -> a landmarks file (``aikd detect``'s defaults)."""
    from aikd.pipeline.detection import DetectOptions, DetectTask
    from aikd.pipeline.files import run_files

    items, job = collect_inputs([folder]), JobOptions(workers=WORKERS)
    return run_files(items, output, job, lambda dist: DetectTask(DetectOptions(detector), output, dist, items,
                                                                 job.workers), device=None)


def label_with(images: Path, output: Path, crop: CropOptions | None, options: Any) -> None:
    """``aikd label`` of every image in ``images`` with ``options`` (:class:`~aikd.pipeline.labelling.LabelOptions`).

    Raises:
        ValueError: the technique cannot run (e.g. on this model), or the step failed.
    """
    from aikd.pipeline.files import run_files
    from aikd.pipeline.labelling import LabelTask

    items, job = collect_inputs([images]), JobOptions(workers=WORKERS)
    crop = crop or CropOptions()
    code = run_files(items, output, job, lambda dist: LabelTask(options, output, crop, dist, items, job.workers),
                     device="auto" if options.needs_model else "cpu")
    if code == 2:  # a usage error: the technique itself refused (printed above)
        raise ValueError(f"label --method {options.method}: the technique cannot run here (its reason is printed "
                         "above)")
    step_ok(f"label --method {options.method}", code)


def score_with(images: Path, checkpoint: Path, crop: CropOptions, output: Path) -> None:
    """``aikd score`` of every image in ``images`` with a quality model."""
    from aikd.inference.engine import InferenceOptions
    from aikd.pipeline.files import run_files
    from aikd.pipeline.scoring import ScoreOptions, ScoreTask

    items, job, inference = collect_inputs([images]), JobOptions(None, WORKERS), InferenceOptions()
    options = ScoreOptions(checkpoint)
    code = run_files(items, output, job,
                     lambda dist: ScoreTask(options, output, crop, inference, dist, items, job.workers))
    step_ok("score", code)


def train_student(run: Path, train: Path, landmarks: Path, labels: Path, options: Any) -> None:
    """``aikd train --config configs/demo_dlib.yaml`` with these images, landmarks and labels, into ``run``, with the
    demo's seed, misalignment and epochs (``options``: :class:`~aikd.demo.run.DemoOptions`)."""
    from aikd.config import load_config
    from aikd.runtime import distributed
    from aikd.training.train import TrainConfig
    from aikd.training.train import train as train_loop

    overrides = [f"data.images={train}", f"data.landmarks={landmarks}", f"data.labels={labels}",
                 f"train.seed={options.seed}", f"data.misalignment.max_shift={options.misalign}",
                 *([f"train.epochs={options.epochs}"] if options.epochs else [])]
    config = load_config(TrainConfig, config_file(), overrides)
    config.check_ready()
    with distributed(config.train.device, "train.device") as dist:
        train_loop(config, run, dist=dist)
