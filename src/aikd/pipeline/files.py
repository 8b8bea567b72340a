"""The one image-file pipeline of ``aikd score``, ``embed`` and ``label``: files in, rows out, resumable.

    from aikd.pipeline.files import run_files
    from aikd.pipeline.scoring import ScoreOptions, ScoreTask
    status = run_files(collect_inputs(["faces/"]), Path("scores.csv"), JobOptions(),
                       ScoreTask.builder(ScoreOptions("best.pt"), CropOptions(), InferenceOptions()))

:func:`run_files` joins the torchrun job (when there is one), lets the task load its model on this rank's device,
claims the output (:mod:`aikd.pipeline.outputs`: nothing replaced, mixed or overwritten), runs every image not done
yet through the task's crop-and-prepare step in the decode threads and its model in batches
(:func:`aikd.pipeline.jobs.run_job`: journal, resume, errors file), and writes the output in input order.
A :class:`FileTask` says what is done with each image and how the output is written; the tasks are
:class:`~aikd.pipeline.scoring.ScoreTask`, :class:`~aikd.pipeline.embedding.EmbedTask` and
:class:`~aikd.pipeline.labelling.LabelTask`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from aikd.images import ImageInput
from aikd.pipeline.jobs import InputPaths, ItemResult, JobOptions, TaskFactory, finish_sharded, run_job
from aikd.pipeline.outputs import claimed_output

if TYPE_CHECKING:
    from aikd.pipeline.ray_engine import RayOptions
    from aikd.runtime import Distributed

__all__ = ["FileTask", "TaskBuilder", "run_files"]


class FileTask(Protocol):
    """What a command does with each image of a file run, and how it writes its output.

    Attributes:
        desc: the progress bar's label.
        verb: the summary line's verb (``scored 10 of 12 images``).
        batch_size: images per forward pass (and journal record).
        reads_images: whether images are decoded at all (imported labels need the list of images only).
    """

    desc: str
    verb: str
    batch_size: int
    reads_images: bool

    def settings(self) -> dict[str, Any]:
        """What defines the output (command, model, options): recorded, and compared on ``--resume``."""

    def side_outputs(self) -> list[tuple[str, Path]]:
        """Further files the task writes, with the option that names them (the output policy covers them too)."""

    def prepare(self, image: np.ndarray, item: ImageInput) -> np.ndarray:
        """One decoded image -> what :meth:`process` takes (in a decode thread); a ``ValueError`` fails the image
        with its message."""

    def process(self, batch: list[np.ndarray], items: list[ImageInput]) -> list[ItemResult]:
        """A batch of prepared images -> one result each."""

    def load_previous(self, output: Path) -> Mapping[str, ItemResult] | Iterable[tuple[str, ItemResult]]:
        """The results a finished earlier output holds (``--resume`` skips those images): a mapping, or
        ``(key, result)`` pairs as they are read."""

    def after_pass(self, dist: Distributed) -> None:
        """On every rank, once its share is done (a place for collectives: counts summed over ranks)."""

    def finish(self, results: MutableMapping[str, ItemResult]) -> None:
        """On rank 0, with every rank's results (read from the journal as they are asked for), before writing: a
        pass over the whole set (may update them)."""

    def write(self, good: Iterable[tuple[ImageInput, ItemResult]]) -> None:
        """Write the output (and side outputs) from the images that succeeded, in input order: ``good`` is an
        iterator, read once, as the results come back from disk (a writer that keeps them all in memory makes
        memory grow with the number of images)."""


def _process_preparer(task: FileTask, job: JobOptions, dist: Distributed) -> Any:
    """The task's picklable prepare step when images are to be decoded in processes (``job.decode``), else
    ``None``: threads."""
    preparer = getattr(task, "preparer", None)
    wanted = job.decode == "processes" or (job.decode == "auto" and getattr(dist.device, "type", "cpu") == "cuda")
    if not wanted or job.workers <= 0:
        return None
    if preparer is None:
        if job.decode == "processes":
            raise ValueError("--decode processes: this command decodes in threads only (with --detect, or for "
                             f"{task.desc}); drop the option or use --decode threads")
        return None
    return preparer


TaskBuilder = Callable[["Distributed"], FileTask]  # builds the task (loads its model) on this rank's device


def run_files(items: Sequence[ImageInput], output: Path, job: JobOptions, build: TaskBuilder | None = None, *,
              factory: TaskFactory | None = None, ray: RayOptions | None = None, device: str | None = "auto",
              device_backend: str = "torch", protected: Sequence[Path] = ()) -> int:
    """Run ``build``'s task over ``items`` into ``output``; returns the exit status (0 all done, 1 some failed).

    Args:
        items: the images (:func:`aikd.images.collect_inputs`).
        output: the output file.
        job: batch size default, decode threads, ``resume``/``overwrite``.
        build: makes the task on this rank's device (it loads the model there).
        factory: instead of ``build``: the task class with its options bound, called with ``(dist, items,
            workers)`` (``functools.partial(ScoreTask, options, output, crop, inference)``); needed for ``ray``.
        ray: run on a Ray cluster instead of this machine (:mod:`aikd.pipeline.ray_engine`; the ray extra).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``; under torchrun ``cuda`` is each rank's own GPU. ``None``:
            the task runs no model (detection): one process on the CPU, torch not imported.
        device_backend: ``onnxruntime`` when the model is an ONNX file (the device is then resolved without torch).
        protected: every file the run reads (images, lists, landmarks, weights): the output must be none of them.

    Raises:
        ValueError: a refused output or bad settings, before any image is processed.
    """
    import contextlib

    from aikd.runtime import Distributed, distributed

    if ray is not None:
        if factory is None:
            raise ValueError("--engine ray: this command runs on the local engine only")
        from aikd.pipeline.ray_engine import run_ray

        return run_ray(items, output, job, factory, ray, device=device or "cpu", device_backend=device_backend,
                       protected=protected)
    if build is None:
        if factory is None:
            raise TypeError("run_files needs build or factory")
        build = functools.partial(_with_items, factory, items, job.workers)
    alone = contextlib.nullcontext(Distributed())  # no model device: one process on the CPU, no torch
    with distributed(device, backend=device_backend) if device is not None else alone as dist:
        task = build(dist)
        with claimed_output(output, task.settings(), resume=job.resume, overwrite=job.overwrite, dist=dist,
                            inputs=InputPaths(items, protected), side_outputs=task.side_outputs()):
            if task.reads_images:
                preparer = _process_preparer(task, job, dist)
                run_job(items, task.process, output, batch_size=task.batch_size, workers=job.workers,
                        resume=job.resume, prepare=preparer or task.prepare, rank=dist.rank,
                        world_size=dist.world_size, load_previous=task.load_previous, desc=task.desc,
                        processes=preparer is not None)
            task.after_pass(dist)
            return finish_sharded(dist, items, output, task.write, verb=task.verb, before_write=task.finish)


def _with_items(factory: TaskFactory, items: Sequence[ImageInput], workers: int, dist: Distributed) -> FileTask:
    return factory(dist, items, workers)
