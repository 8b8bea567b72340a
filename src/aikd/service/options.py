"""The settings of ``aikd serve``, each with a safe default and checked once: what a request may hold, how requests
are batched, and which model answers.

Limits bound what one client can make the server hold: a body of ``max_body_bytes`` at most (refused from its
``Content-Length`` before it is read, or as soon as a streamed body passes it), ``max_images`` images in it, each of
at most ``max_pixels`` decoded pixels (the decompression-bomb guard of :func:`aikd.images.decode_image`), and
``request_timeout_s`` seconds from arrival to answer. The queue bounds how many such requests the server holds at
once; a request that finds it full is answered 429 at once, never queued without bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from aikd.inference.engine import InferenceOptions

__all__ = ["BatchOptions", "Limits", "ServiceOptions"]

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one request may hold.

    Attributes:
        max_body_bytes: request body size (a few phone photos; JSON base64 costs a third more).
        max_images: images in one request (a burst for ``/v1/select``).
        max_pixels: decoded pixels of one image (40 MP: a full-size phone photo; 120 MB of RGB).
        request_timeout_s: seconds from a request's arrival to its answer (503 ``timeout`` past it).
    """

    max_body_bytes: int = 32 * MiB
    max_images: int = 32
    max_pixels: int = 40_000_000
    request_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_body_bytes <= 4096 * MiB:  # a request is held in memory whole
            raise ValueError(f"--max-body-mb must be above 0 and at most 4096, got {self.max_body_bytes / MiB:g} MB")
        if self.max_images < 1:
            raise ValueError(f"--max-images must be at least 1, got {self.max_images}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be at least 1, got {self.max_pixels}")
        if not (self.request_timeout_s > 0 and math.isfinite(self.request_timeout_s)):
            raise ValueError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout_s}")


@dataclass(frozen=True)
class BatchOptions:
    """How requests of concurrent clients are gathered into forward passes.

    The most faces per forward pass is the inference option ``--batch-size`` (32 on a CPU).

    Attributes:
        max_wait_ms: how long a forward pass waits for faces still being decoded by other requests before it runs
            (it never waits when nothing else is on its way, so a lone client pays nothing).
        queue_size: requests held at once (reading, decoding, waiting for or in the model); one more is answered
            429 with ``Retry-After``.
        workers: threads that decode, detect, align and preprocess (off the event loop, beside the model threads).
        model_threads: forward passes that run at once, each on its own batch.
    """

    max_wait_ms: float = 10.0
    queue_size: int = 64
    workers: int = 2
    model_threads: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ValueError(f"--max-wait-ms must be in [0, 10000], got {self.max_wait_ms}")
        if self.queue_size < 1:
            raise ValueError(f"--queue-size must be at least 1, got {self.queue_size}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1 for aikd serve, got {self.workers}")
        if self.model_threads < 1:
            raise ValueError(f"--model-threads must be at least 1, got {self.model_threads}")


@dataclass(frozen=True)
class ServiceOptions:
    """Which model answers and how.

    Attributes:
        checkpoint: the quality model: an aikd checkpoint, the AI-KD release, or an ``aikd export`` ONNX file.
        arch: its backbone architecture where the file does not record it.
        inference: device, precision, backend, BatchNorm folding.
        detect: detect and align faces when a request does not say (default: images are face crops, as
            ``aikd score`` takes them).
        detector: the face detector for ``detect``.
        detect_threshold: its confidence threshold.
        misalign: landmark jitter in pixels, as ``aikd score --misalign`` (seeded by each image's name).
        seed: seed of that jitter.
        calibration: a calib.json (default: the calibration the model file carries, if any).
        reject_above: reject an image whose expected FNMR is above this (default: the calibration's recommended
            reject threshold, if it has one).
        api_key_file: keys that ``/v1/*`` requires, one a line (default: no key needed).
        limits: what one request may hold.
        batching: how requests are batched and queued.
    """

    checkpoint: Path
    arch: str | None = None
    inference: InferenceOptions = field(default_factory=lambda: InferenceOptions(device="cpu"))
    detect: bool = False
    detector: str = "retinaface"
    detect_threshold: float = 0.5
    misalign: float = 0.0
    seed: int = 0
    calibration: Path | None = None
    reject_above: float | None = None
    api_key_file: Path | None = None
    limits: Limits = field(default_factory=Limits)
    batching: BatchOptions = field(default_factory=BatchOptions)

    def __post_init__(self) -> None:
        if self.reject_above is not None and not 0 <= self.reject_above <= 1:
            raise ValueError(f"--reject-above is an FNMR in [0, 1], got {self.reject_above}")
