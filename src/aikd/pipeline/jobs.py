"""Batch jobs over many images: parallel decoding, batching, progress, an errors file, and resuming.

``score``, ``detect``, ``embed``, ``label`` and ``align`` all run the same way:

1. images are decoded (and prepared, e.g. aligned) in worker threads, ahead of the model;
2. a ``process_batch`` function turns a batch of decoded images into one :class:`ItemResult` each;
3. every finished batch is appended to a journal next to the output (``OUT.partial/``) and fsynced, so
   a run killed at any moment loses at most the batch in flight;
4. at the end the caller writes the output in input order (atomically) with :func:`finish_job`, failed
   inputs go to ``OUT_STEM.errors.csv`` (path, reason) and the journal is removed.

``--resume`` reads the journal (and, through ``load_previous``, a finished output) and skips every input
already done; failures are tried again. Without ``--resume`` an existing output is never overwritten
unless ``--overwrite`` is given.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from aikd.images import ImageInput
from aikd.io import atomic_write, write_csv
from aikd.pipeline.decoding import Prepare, decoded
from aikd.pipeline.outputs import errors_path, journal_dir, record_path, settings_path

if TYPE_CHECKING:  # jobs stay torch-free: detect and align never load torch
    from aikd.runtime import Distributed

__all__ = ["EXIT_OK", "EXIT_SOME_FAILED", "EXIT_USAGE", "ItemResult", "JobOptions", "JobSummary", "Prepare",
           "finish_job", "finish_sharded", "read_journal", "run_job"]

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
MAX_BATCH, MAX_WORKERS = 65_536, 256  # bounds of what a user may ask for (a batch is held in memory)
DECODE_MODES = ("auto", "threads", "processes")


@dataclass
class ItemResult:
    """What a job produced for one input.

    Attributes:
        rows: output rows (the columns after the key); several for e.g. all faces of a photo.
        vector: an optional float32 vector (an embedding) saved alongside.
        error: why the input failed; such an input gets a row in the errors file instead.
    """

    rows: list[list[Any]] = field(default_factory=list)
    vector: np.ndarray | None = None
    error: str | None = None


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


# ------------------------------------------------------------------------------------------------ journal
class Journal:
    """Append-only record of finished inputs of one rank, fsynced after every batch."""

    def __init__(self, output: Path, rank: int = 0):
        self.folder = journal_dir(output)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lines_path = self.folder / f"rank{rank}.jsonl"
        self.vectors_path = self.folder / f"rank{rank}.f32"
        _truncate_partial_line(self.lines_path)
        self._lines = open(self.lines_path, "a", encoding="utf-8")
        self._vectors = open(self.vectors_path, "ab")

    def append(self, batch: Sequence[tuple[str, ItemResult]]) -> None:
        entries = []
        for key, result in batch:
            entry: dict[str, Any] = {"k": key, "r": result.rows, "e": result.error}
            if result.vector is not None:
                vector = np.ascontiguousarray(result.vector, dtype=np.float32).ravel()
                entry["v"] = [self._vectors.tell() // 4, int(vector.size)]
                self._vectors.write(vector.tobytes())
            entries.append(json.dumps(entry, default=_json_default))
        # Vectors first: a line is only trusted when what it points to is already on disk.
        self._vectors.flush()
        os.fsync(self._vectors.fileno())
        self._lines.write("".join(line + "\n" for line in entries))
        self._lines.flush()
        os.fsync(self._lines.fileno())

    def close(self) -> None:
        self._lines.close()
        self._vectors.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot record {type(value).__name__} in the journal")


def _truncate_partial_line(path: Path) -> None:
    """Cut a half-written last line (the process was killed mid-write) so appends start clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)


def read_journal(output: Path) -> dict[str, ItemResult]:
    """Every result recorded by any rank's journal (later records of a key win)."""
    results: dict[str, ItemResult] = {}
    folder = journal_dir(output)
    if not folder.is_dir():
        return results
    for lines_path in sorted(folder.glob("rank*.jsonl")):
        vectors_path = lines_path.with_suffix(".f32")
        vectors = np.fromfile(vectors_path, dtype=np.float32) if vectors_path.exists() else np.zeros(0, np.float32)
        with open(lines_path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the half-written line of a killed run
                vector = None
                if entry.get("v"):
                    start, size = entry["v"]
                    if start + size > vectors.size:
                        continue
                    vector = vectors[start:start + size].copy()
                results[entry["k"]] = ItemResult(entry.get("r") or [], vector, entry.get("e"))
    return results


# -------------------------------------------------------------------------------------------- the runner
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
    load_previous: Callable[[Path], dict[str, ItemResult]] | None = None,
    desc: str = "images",
    processes: bool = False,
) -> dict[str, ItemResult]:
    """Process every input not done yet, recording results in the journal; returns all results so far.

    ``processes``: decode in ``workers`` processes rather than threads (``prepare`` must then be picklable;
    :func:`aikd.pipeline.decoding.decoded`).

    Under torchrun each rank takes inputs ``rank, rank + world_size, ...``; rank 0 then merges everything
    with :func:`read_journal` after a barrier and calls :func:`finish_job`.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    done: dict[str, ItemResult] = {}
    if resume:
        if load_previous is not None and output.exists():
            done.update(load_previous(output))
        done.update(read_journal(output))
    todo = [item for i, item in enumerate(items)
            if i % world_size == rank and (item.key not in done or done[item.key].error is not None)]
    journal = Journal(output, rank)
    progress = tqdm(total=len(todo), desc=desc, unit="img", disable=None if rank == 0 else True,
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
            done.update(recorded)
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
    return done


def finish_job(
    items: Sequence[ImageInput],
    results: dict[str, ItemResult],
    output: Path,
    write_output: Callable[[list[tuple[ImageInput, ItemResult]]], None],
    verb: str = "processed",
) -> JobSummary:
    """Write the output in input order, the errors file and the run record; remove the journal; print a line.

    Results of an earlier run (``--resume``) for images not among ``items`` are kept, after this run's:
    resuming never drops what is already done.
    """
    good, bad = [], []
    for item in items:
        result = results.get(item.key)
        if result is None:
            bad.append((item.key, "not processed (the run stopped before reaching it)"))
        elif result.error is not None:
            bad.append((item.key, result.error))
        else:
            good.append((item, result))
    given = {item.key for item in items}
    kept = [(ImageInput(Path(key), key), result) for key, result in results.items()
            if key not in given and result.error is None and (result.rows or result.vector is not None)]
    write_output(good + kept)
    errors_file = errors_path(output)
    if bad:
        write_csv(errors_file, ("path", "reason"), bad)
    elif errors_file.exists():
        errors_file.unlink()  # from an earlier run whose failures are now fixed
    settings = settings_path(output)
    if settings.exists():
        with atomic_write(record_path(output)) as handle:
            handle.write(settings.read_text(encoding="utf-8"))
    shutil.rmtree(journal_dir(output), ignore_errors=True)
    summary = JobSummary(done=len(good), failed=len(bad), errors_file=errors_file if bad else None)
    line = f"{verb} {summary.done} of {len(items)} images -> {output}"
    if kept:
        line += f" (kept {len(kept)} done earlier for images not given this time)"
    if bad:
        line += f"; {len(bad)} failed, reasons in {errors_file}"
    print(line, file=sys.stderr)
    return summary


def finish_sharded(
    dist: Distributed,
    items: Sequence[ImageInput],
    results: dict[str, ItemResult],
    output: Path,
    write_output: Callable[[list[tuple[ImageInput, ItemResult]]], None],
    verb: str,
    before_write: Callable[[dict[str, ItemResult]], None] | None = None,
) -> int:
    """After :func:`run_job` on every rank of a torchrun job: rank 0 merges every rank's journal and finishes.

    Args:
        before_write: called on rank 0 with all ranks' results before anything is written (a labeller's
            pass over the whole set); it may update them.

    Returns:
        The exit status (0 all done, 1 some failed), on every rank.
    """
    dist.barrier()  # every rank's journal is complete

    def finish() -> int:
        merged = dict(results)
        if dist.world_size > 1:
            for key, result in read_journal(output).items():
                if key not in merged or merged[key].error is not None:
                    merged[key] = result
        if before_write is not None:
            before_write(merged)
        return finish_job(items, merged, output, write_output, verb=verb).exit_code

    return dist.from_main(finish)
