"""Batch jobs over many images: parallel decoding, batching, progress, an errors file, and resuming.

``score``, ``detect``, ``embed``, ``label`` and ``align`` all run the same way:

1. images are decoded (and prepared, e.g. aligned) in worker threads, ahead of the model;
2. a ``process_batch`` function turns a batch of decoded images into one :class:`ItemResult` each;
3. every finished batch is appended to a journal next to the output (``OUT.partial/``) and fsynced, so
   a run killed at any moment loses at most the batch in flight;
4. at the end the caller writes the output in input order (atomically) with :func:`finish_job`, reading the
   results back from the journal as it writes (:class:`~aikd.pipeline.journal.Results`), failed inputs go to
   ``OUT_STEM.errors.csv`` (path, reason) and the journal is removed.

Memory does not grow with the number of images: inputs are an :class:`aikd.images.InputList`, results stay on
disk until they are written, and on ``--resume`` one bit per input says what is left.

``--resume`` reads the journal (and, through ``load_previous``, a finished output) and skips every input
already done; failures are tried again. Without ``--resume`` an existing output is never overwritten
unless ``--overwrite`` is given.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from aikd.images import ImageInput
from aikd.io import RecordFile, atomic_write, chunked, write_csv
from aikd.pipeline.decoding import Prepare, decoded
from aikd.pipeline.journal import ItemResult, Journal, Results, read_journal, write_previous
from aikd.pipeline.outputs import errors_path, journal_dir, record_path, settings_path

if TYPE_CHECKING:  # jobs stay torch-free: detect and align never load torch
    from aikd.runtime import Distributed

__all__ = ["EXIT_OK", "EXIT_SOME_FAILED", "EXIT_USAGE", "InputPaths", "ItemResult", "JobOptions", "JobSummary",
           "Prepare", "Results", "TaskFactory", "chunked", "finish_job", "finish_sharded", "pending_inputs",
           "read_journal", "run_job"]

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
MAX_BATCH, MAX_WORKERS = 65_536, 256  # bounds of what a user may ask for (a batch is held in memory)
DECODE_MODES = ("auto", "threads", "processes")


@dataclass
class JobSummary:
    """Counts of a finished job and its exit status (0 all done, 1 some inputs failed)."""

    done: int
    failed: int
    skipped: int = 0
    errors_file: Path | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else EXIT_OK


@dataclass(frozen=True)
class JobOptions:
    """How a per-image command runs: batch size, decode threads, and what to do with an earlier output.

    Attributes:
        batch_size: images per batch (per journal record, or per forward pass); ``None``: the command's default.
        workers: threads decoding and preparing images ahead of the model; 0: the main thread does everything.
        resume: continue an interrupted or finished run, skipping images already done.
        overwrite: start over, replacing existing outputs.
        decode: ``threads``, ``processes`` (workers are processes: no shared GIL, for a model on a GPU that waits
            for the CPU), or ``auto``: processes where the model runs on a GPU and the task can run in them.
    """

    batch_size: int | None = 32
    workers: int = 2
    resume: bool = False
    overwrite: bool = False
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size is not None and not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"--batch-size must be 1 to {MAX_BATCH}, got {self.batch_size}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be 0 to {MAX_WORKERS}, got {self.workers}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pass one")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")


# -------------------------------------------------------------------------------------------- the runner
# A file task's class with its options bound, called with ``(dist, items, workers)`` to make the task
# (:class:`aikd.pipeline.files.FileTask`) on a device: ``functools.partial(ScoreTask, options, output, crop,
# inference)``. Picklable, so each Ray actor makes its own (:mod:`aikd.pipeline.ray_engine`).
TaskFactory = Callable[..., Any]


class InputPaths:
    """Every file a run reads, for the output policy: the images' paths (walked again each time they are asked
    for, never copied into a list) and the ``protected`` files."""

    def __init__(self, items: Sequence[ImageInput], protected: Sequence[Path] = ()) -> None:
        self.items, self.protected = items, list(protected)

    def __iter__(self) -> Iterator[Path]:
        yield from (item.path for item in self.items)
        yield from self.protected

    def __len__(self) -> int:
        return len(self.items) + len(self.protected)


Pairs = Iterable[tuple[str, ItemResult]]
Previous = Mapping[str, ItemResult] | Pairs  # what a finished output holds


def run_job(
    items: Sequence[ImageInput],
    process_batch: Callable[[list[np.ndarray], list[ImageInput]], list[ItemResult]],
    output: Path,
    *,
    batch_size: int = 32,
    workers: int = 2,
    resume: bool = False,
    prepare: Prepare | None = None,
    rank: int = 0,
    world_size: int = 1,
    load_previous: Callable[[Path], Previous] | None = None,
    desc: str = "images",
    processes: bool = False,
) -> Results:
    """Process every input not done yet, recording results in the journal; returns all results so far (read from
    the journal as needed: :class:`~aikd.pipeline.journal.Results`).

    ``processes``: decode in ``workers`` processes rather than threads (``prepare`` must then be picklable;
    :func:`aikd.pipeline.decoding.decoded`). ``load_previous``: on ``--resume``, what a finished output holds (a
    mapping, or ``(key, result)`` pairs as they are read).

    Under torchrun each rank takes inputs ``rank, rank + world_size, ...``; rank 0 then merges everything
    with :func:`finish_sharded` after a barrier and calls :func:`finish_job`.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    todo, count = pending_inputs(items, output, resume, rank, world_size, load_previous)
    journal = Journal(output, rank)
    progress = tqdm(total=count, desc=desc, unit="img", disable=None if rank == 0 else True,
                    dynamic_ncols=True, file=sys.stderr)
    try:
        batch_images: list[np.ndarray] = []
        batch_items: list[ImageInput] = []
        failed: list[tuple[str, ItemResult]] = []

        def flush() -> None:
            results = process_batch(batch_images, batch_items) if batch_items else []
            if len(results) != len(batch_items):
                raise RuntimeError(f"process_batch returned {len(results)} results for {len(batch_items)} images")
            recorded = [*failed, *((item.key, res) for item, res in zip(batch_items, results, strict=True))]
            journal.append(recorded)
            progress.update(len(recorded))
            batch_images.clear()
            batch_items.clear()
            failed.clear()

        for item, image, error in decoded(todo, prepare, workers, window=max(2 * batch_size, 4 * workers),
                                          processes=processes):
            if error is not None:
                failed.append((item.key, ItemResult(error=error)))
            else:
                batch_images.append(image)
                batch_items.append(item)
            if len(batch_items) >= batch_size or len(failed) >= batch_size:
                flush()
        flush()
    finally:
        progress.close()
        journal.close()
    return Results(output, previous=f"previous{rank}")


def pending_inputs(items: Sequence[ImageInput], output: Path, resume: bool, rank: int = 0, world_size: int = 1,
                   load_previous: Callable[[Path], Previous] | None = None) -> tuple[Iterator[ImageInput], int]:
    """This rank's inputs not done yet (as they come) and their number. On ``--resume`` a finished output's results
    are recorded beside the journal first (:func:`~aikd.pipeline.journal.write_previous`), and one bit per input
    says what is left."""
    if not resume:
        return (item for i, item in enumerate(items) if i % world_size == rank), len(range(rank, len(items),
                                                                                           world_size))
    if load_previous is not None and output.exists():
        write_previous(output, rank, load_previous(output))
    known = Results(output, previous=f"previous{rank}")
    try:
        left = np.zeros(len(items), dtype=bool)
        for i, item in enumerate(items):
            left[i] = i % world_size == rank and known.status(item.key) != "done"
    finally:
        known.close()
    return (item for item, wanted in zip(items, left, strict=True) if wanted), int(left.sum())


def finish_job(
    items: Sequence[ImageInput],
    results: Results,
    output: Path,
    write_output: Callable[[Iterable[tuple[ImageInput, ItemResult]]], None],
    verb: str = "processed",
) -> JobSummary:
    """Write the output in input order, the errors file and the run record; remove the journal; print a line.

    ``write_output`` gets the images that succeeded with their results, in input order, as they are read from the
    journal (an iterator: memory does not grow with their number). Results of an earlier run (``--resume``) for
    images not among ``items`` are kept, after this run's: resuming never drops what is already done.
    """
    ordered, others = results.ordered(items), results.others
    failures = RecordFile(2)
    counts = {"done": 0, "kept": 0}

    def good() -> Iterator[tuple[ImageInput, ItemResult]]:
        for item, result in ordered:
            if result is None:
                failures.append((item.key, "not processed (the run stopped before reaching it)"))
            elif result.error is not None:
                failures.append((item.key, result.error))
            else:
                counts["done"] += 1
                yield item, result
        for key, result in others():
            if result.error is None and (result.rows or result.vector is not None):
                counts["kept"] += 1
                yield ImageInput(Path(key), key), result

    rows = good()
    write_output(rows)
    for _ in rows:  # a writer that wrote nothing (align) or stopped early: every image is still counted
        pass
    errors_file = errors_path(output)
    if len(failures):
        write_csv(errors_file, ("path", "reason"), failures)
    elif errors_file.exists():
        errors_file.unlink()  # from an earlier run whose failures are now fixed
    failures.close()
    settings = settings_path(output)
    if settings.exists():
        with atomic_write(record_path(output)) as handle:
            handle.write(settings.read_text(encoding="utf-8"))
    shutil.rmtree(journal_dir(output), ignore_errors=True)
    summary = JobSummary(done=counts["done"], failed=len(failures), errors_file=errors_file if len(failures) else None)
    line = f"{verb} {summary.done} of {len(items)} images -> {output}"
    if counts["kept"]:
        line += f" (kept {counts['kept']} done earlier for images not given this time)"
    if summary.failed:
        line += f"; {summary.failed} failed, reasons in {errors_file}"
    print(line, file=sys.stderr)
    return summary


def finish_sharded(
    dist: Distributed,
    items: Sequence[ImageInput],
    output: Path,
    write_output: Callable[[Iterable[tuple[ImageInput, ItemResult]]], None],
    verb: str,
    before_write: Callable[[MutableMapping[str, ItemResult]], None] | None = None,
) -> int:
    """After :func:`run_job` on every rank of a torchrun job: rank 0 reads every rank's journal and finishes.

    Args:
        before_write: called on rank 0 with all ranks' results (a mapping read from the journal) before anything is
            written (a labeller's pass over the whole set); it may update them.

    Returns:
        The exit status (0 all done, 1 some failed), on every rank.
    """
    dist.barrier()  # every rank's journal is complete

    def finish() -> int:
        merged = Results(output, previous="previous0")
        try:
            if before_write is not None:
                before_write(merged)
            return finish_job(items, merged, output, write_output, verb=verb).exit_code
        finally:
            merged.close()

    return dist.from_main(finish)
