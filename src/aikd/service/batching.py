"""Dynamic batching: faces of concurrent requests gathered into one forward pass, on a model thread of its own.

A request is first admitted (:meth:`Batcher.admit`): at most ``queue_size`` requests are held at once, and one
more is refused at once with 429 ``queue_full`` and a ``Retry-After`` (never queued without bound, never left to
hang). An admitted request decodes and prepares its images in the worker threads, then hands its faces to the
model thread (:meth:`Ticket.infer`) and awaits them without blocking the event loop.

A model thread takes the faces waiting, up to ``max_batch``, and runs them in one forward pass. It waits up to
``max_wait_ms`` for more only while other admitted requests are still preparing theirs (faces on their way): a
lone client never waits, and under load the passes fill up. A request with more faces than ``max_batch`` is split
over several passes. A request that gave up (timed out) is skipped. With ``model_threads`` > 1, as many passes run
at once, each on its own batch (on a small CPU, two single-threaded passes beat one pass split over two cores: no
operator waits for a thread that was preempted).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aikd.pipeline.faces import PreparedFace, ScoredFace
from aikd.service.errors import ServiceError
from aikd.service.metrics import Metrics
from aikd.service.options import BatchOptions

__all__ = ["Batcher", "Ticket"]

log = logging.getLogger(__name__)
Infer = Callable[[Sequence[PreparedFace]], list[ScoredFace]]


@dataclass
class _Job:
    """The faces of one request, with the future its handler awaits."""

    faces: Sequence[PreparedFace]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list[Any] = field(default_factory=list)
    taken: int = 0  # faces handed to a forward pass so far
    done: int = 0  # faces with results

    def __post_init__(self) -> None:
        self.results = [None] * len(self.faces)


class Ticket:
    """One admitted request's place in the queue; :meth:`release` it when the request is answered."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self.preparing = True
        self.released = False

    async def infer(self, faces: Sequence[PreparedFace]) -> list[ScoredFace]:
        """The model's results for ``faces``, in order (one or several forward passes shared with other requests)."""
        self._batcher._prepared(self)
        return await self._batcher.infer(faces)

    def release(self) -> None:
        """Leave the queue (idempotent)."""
        self._batcher._release(self)


class Batcher:
    """The model thread and the bounded queue in front of it.

    Args:
        infer: one forward pass over faces (:meth:`aikd.pipeline.faces.FacePipeline.infer`).
        options: wait and queue size.
        metrics: where batch sizes, forward times and the queue depth are counted.
        max_batch: faces per forward pass at most.
    """

    def __init__(self, infer: Infer, options: BatchOptions, metrics: Metrics | None = None,
                 max_batch: int = 32) -> None:
        self._infer, self.options, self._metrics, self.max_batch = infer, options, metrics, max_batch
        self._cond = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued_faces = 0
        self._held = 0  # admitted requests not yet released
        self._preparing = 0  # of those, the ones whose faces have not reached the model thread yet
        self._closing = False
        self._seconds_per_face = 0.05  # moving average of forward time per face: the Retry-After estimate
        self._threads = [threading.Thread(target=self._run, name=f"aikd-model-{n}", daemon=True)
                         for n in range(options.model_threads)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------------------------------- admission
    @property
    def held(self) -> int:
        """Requests admitted and not yet answered."""
        return self._held

    def admit(self) -> Ticket:
        """A place in the queue.

        Raises:
            ServiceError: ``queue_full`` (429, with ``Retry-After``) or ``shutting_down``.
        """
        with self._cond:
            if self._closing:
                raise ServiceError("shutting_down", "the server is shutting down")
            if self._held >= self.options.queue_size:
                raise ServiceError("queue_full", f"the server holds {self._held} requests, its limit; retry later",
                                   {"Retry-After": str(self.retry_after_s())})
            self._held += 1
            self._preparing += 1
            self._gauge()
            return Ticket(self)

    def retry_after_s(self) -> int:
        """Seconds after which the queue is likely to have room (at least 1)."""
        waiting = self._queued_faces + self._held
        return max(1, min(60, math.ceil(waiting * self._seconds_per_face)))

    def _prepared(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.preparing and not ticket.released:
                ticket.preparing = False
                self._preparing -= 1
                self._cond.notify_all()

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.released:
                return
            ticket.released = True
            self._held -= 1
            if ticket.preparing:
                ticket.preparing = False
                self._preparing -= 1
            self._gauge()
            self._cond.notify_all()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._held)
            self._metrics.model_queue.set(self._queued_faces)

    # ----------------------------------------------------------------------------------------- inference
    async def infer(self, faces: Sequence[PreparedFace]) -> list[ScoredFace]:
        """The model's results for ``faces`` (no admission: for the server's own checks, such as ``/readyz``)."""
        if not faces:
            return []
        loop = asyncio.get_running_loop()
        job = _Job(faces, loop, loop.create_future())
        with self._cond:
            if self._closing:
                raise ServiceError("shutting_down", "the server is shutting down")
            self._jobs.append(job)
            self._queued_faces += len(faces)
            self._gauge()
            self._cond.notify_all()
        return await job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish the faces already queued, then stop the model thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                self._gather()
                parts = self._take()
                self._gauge()
            if parts:
                self._run_batch(parts)

    def _gather(self) -> None:
        """Wait (holding the condition) for faces still being prepared, up to ``max_wait_ms`` or a full batch."""
        deadline = time.monotonic() + self.options.max_wait_ms / 1000
        while self._queued_faces < self.max_batch and self._preparing > 0 and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to ``max_batch`` faces from the front of the queue, as (job, start, end) slices; jobs given up on
        are dropped."""
        parts: list[tuple[_Job, int, int]] = []
        room = self.max_batch
        while self._jobs and room > 0:
            job = self._jobs[0]
            if job.future.done():  # cancelled: its request timed out or its client left
                self._jobs.popleft()
                self._queued_faces -= len(job.faces) - job.taken
                continue
            count = min(room, len(job.faces) - job.taken)
            parts.append((job, job.taken, job.taken + count))
            job.taken += count
            room -= count
            self._queued_faces -= count
            if job.taken == len(job.faces):
                self._jobs.popleft()
        return parts

    def _run_batch(self, parts: list[tuple[_Job, int, int]]) -> None:
        faces = [face for job, start, end in parts for face in job.faces[start:end]]
        started = time.perf_counter()
        try:
            scored = self._infer(faces)
        except Exception:  # the model failed: each request gets an error, the thread goes on
            log.exception("the forward pass of %d faces failed", len(faces))
            for job, _, _ in parts:
                job.loop.call_soon_threadsafe(_fail, job.future,
                                              ServiceError("internal", "the model failed on this batch"))
            return
        elapsed = time.perf_counter() - started
        self._seconds_per_face = 0.8 * self._seconds_per_face + 0.2 * elapsed / len(faces)
        if self._metrics is not None:
            self._metrics.batch_faces.observe(len(faces))
            self._metrics.model_seconds.observe(elapsed)
        offset = 0
        for job, start, end in parts:
            job.results[start:end] = scored[offset:offset + end - start]
            offset += end - start
            job.done += end - start
            if job.done == len(job.faces):
                job.loop.call_soon_threadsafe(_succeed, job.future, job.results)


def _succeed(future: asyncio.Future, results: list[ScoredFace]) -> None:
    if not future.done():
        future.set_result(results)


def _fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
