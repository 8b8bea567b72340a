"""Decoding images ahead of the model: in worker threads, or in worker processes, in input order, within a budget.

Threads suit a CPU run: PIL and OpenCV release the GIL while they decode, and the model shares the same cores.
Processes suit a GPU run, where the model waits for the CPU: the Python work around each image (opening, checks,
the crop, the conversion) holds the GIL, so threads stop scaling after a few cores (docs/gpu.md measured it), and
processes do not share one. A process needs a picklable ``prepare`` (the file pipeline's crop-and-preprocess step
without a model: :class:`aikd.pipeline.faces.FilePreparer`); the processes are spawned, never forked, so a parent
that holds a GPU context or thread pools is never copied.

Both keep at most ``window`` images in flight and the decoded pixels of all workers within one :class:`PixelBudget`
(shared by the processes), so memory stays bounded however many large photos come together.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from aikd.images import MAX_PIXELS, ImageError, ImageInput, input_pixels, load_input

__all__ = ["CHUNK", "PixelBudget", "Prepare", "decoded", "load_prepared"]

Prepare = Callable[[np.ndarray, ImageInput], np.ndarray]
Loaded = tuple[np.ndarray | None, str | None]
CHUNK = 16  # images per task sent to a decode process: fewer round trips, results still come in order


class PixelBudget:
    """Decoded pixels held at once by the decode workers, bounded: memory stays near ``limit`` x 3 bytes (plus
    the decoder's working copies) however many large photos the workers meet together. An image larger than
    the whole budget is decoded alone.

    Args:
        limit: pixels held at once.
        changed: the condition guarding the count (a ``multiprocessing`` one when processes share the budget).
        used: the count, a ``multiprocessing.Value`` when shared (default: a plain counter).
    """

    def __init__(self, limit: int = MAX_PIXELS, changed: Any = None, used: Any = None) -> None:
        self.limit = int(limit)
        self._changed = changed if changed is not None else threading.Condition()
        self._used = used if used is not None else _Counter()

    @property
    def used(self) -> int:
        return int(self._used.value)

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(max(int(pixels), 0), self.limit)
        with self._changed:
            self._changed.wait_for(lambda: self._used.value + pixels <= self.limit)
            self._used.value += pixels
        try:
            yield
        finally:
            with self._changed:
                self._used.value -= pixels
                self._changed.notify_all()


class _Counter:
    value = 0


def load_prepared(item: ImageInput, prepare: Prepare | None, budget: PixelBudget | None = None) -> Loaded:
    """One input decoded (within ``budget``) and prepared: ``(array, None)``, or ``(None, reason)``."""
    try:
        with budget.hold(input_pixels(item)) if budget is not None else contextlib.nullcontext():
            image = load_input(item)
            return (prepare(image, item) if prepare else image), None  # prepared faces are small
    except (ImageError, ValueError) as err:
        return None, str(err)


def decoded(items: Iterable[ImageInput], prepare: Prepare | None, workers: int, window: int,
            processes: bool = False) -> Iterator[tuple[ImageInput, np.ndarray | None, str | None]]:
    """``(item, array, error)`` of each input, in input order, decoded by ``workers`` threads (or processes) at
    most ``window`` images ahead; ``workers=0`` decodes in the calling thread."""
    if workers <= 0:
        for item in items:
            yield (item, *load_prepared(item, prepare))
        return
    if processes:
        yield from _in_processes(items, prepare, workers, window)
        return
    budget = PixelBudget()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aikd-decode") as pool:
        pending: deque[tuple[ImageInput, Future]] = deque()
        source = iter(items)
        for item in source:
            pending.append((item, pool.submit(load_prepared, item, prepare, budget)))
            if len(pending) >= window:
                break
        while pending:
            item, future = pending.popleft()
            following = next(source, None)
            if following is not None:
                pending.append((following, pool.submit(load_prepared, following, prepare, budget)))
            yield (item, *future.result())


# ------------------------------------------------------------------------------------------------- processes
_WORKER: dict[str, Any] = {}  # in a decode process: its prepare step and the shared budget


def _start_worker(prepare: Prepare | None, changed: Any, used: Any) -> None:
    import cv2

    cv2.setNumThreads(1)  # the processes are the parallelism
    _WORKER.update(prepare=prepare, budget=PixelBudget(changed=changed, used=used))


def _load_chunk(chunk: Sequence[ImageInput]) -> list[Loaded]:
    return [load_prepared(item, _WORKER["prepare"], _WORKER["budget"]) for item in chunk]


def _in_processes(items: Iterable[ImageInput], prepare: Prepare | None, workers: int, window: int
                  ) -> Iterator[tuple[ImageInput, np.ndarray | None, str | None]]:
    context = multiprocessing.get_context("spawn")
    changed, used = context.Condition(), context.Value("q", 0, lock=False)
    chunks = _chunks(iter(items))
    with context.Pool(workers, initializer=_start_worker, initargs=(prepare, changed, used)) as pool:
        pending: deque[tuple[list[ImageInput], Any]] = deque()
        in_flight = 0
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_load_chunk, (chunk,))))
            in_flight += len(chunk)
            if in_flight >= window:
                break
        while pending:
            chunk, result = pending.popleft()
            in_flight -= len(chunk)
            following = next(chunks, None)
            if following is not None:
                pending.append((following, pool.apply_async(_load_chunk, (following,))))
                in_flight += len(following)
            for item, loaded in zip(chunk, result.get(), strict=True):
                yield (item, *loaded)


def _chunks(source: Iterator[ImageInput]) -> Iterator[list[ImageInput]]:
    while True:
        chunk = [item for _, item in zip(range(CHUNK), source, strict=False)]
        if not chunk:
            return
        yield chunk
