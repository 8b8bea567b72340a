"""The service's model side: one quality model, its crop steps, calibration and decision rule, the worker threads
that prepare images and the model thread that scores them (:mod:`aikd.service.batching`).

An image goes the way ``aikd score`` takes it, through :class:`aikd.pipeline.faces.FacePipeline`: decoded
(:func:`aikd.images.decode_image`, with the pixel limit), then either taken whole (the default: a face crop, resized
by the model's preprocessing) or, with ``detect``, its faces detected and aligned; preprocessed in a worker thread;
scored in a forward pass shared with other requests. So the same image with the same options gets the same quality
from the service as from ``aikd score``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from aikd.images import ImageError, decode_image
from aikd.io import shortest_float32
from aikd.pipeline.crops import CropOptions
from aikd.pipeline.faces import FacePipeline, PreparedFace
from aikd.service.batching import Batcher, Ticket
from aikd.service.errors import ServiceError, image_error_code
from aikd.service.inputs import RequestOptions, Upload
from aikd.service.metrics import Metrics
from aikd.service.options import ServiceOptions
from aikd.service.results import DecisionRule, PreparedImage, image_result
from aikd.version import __version__

__all__ = ["QualityService"]

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 10.0
_NO_CROP = np.zeros((0, 0, 3), np.uint8)


class QualityService:
    """A quality model ready to answer requests.

    Args:
        options: the model, its settings and the service's limits.
        metrics: where to count (default: a registry of its own).

    Raises:
        ValueError: a model file or setting that cannot serve (the message names it).
        ImportError: ``detect`` asked for without the detector's packages.
    """

    def __init__(self, options: ServiceOptions, metrics: Metrics | None = None) -> None:
        self.options = options
        self.metrics = metrics or Metrics()
        self.engine = options.inference.quality_engine(options.checkpoint, options.arch)
        if not self.engine.has_quality:
            raise ValueError(f"{options.checkpoint}: no quality output (a bare face-recognition model)")
        self.calibration = self._calibration()
        self.decision = DecisionRule.choose(self.calibration, options.reject_above)
        workers = options.batching.workers
        self.pipelines: dict[bool, FacePipeline] = {False: FacePipeline(self.engine, CropOptions(), workers)}
        self.detection_error: str | None = None
        try:
            crop = CropOptions(detect=True, detector=options.detector, detect_threshold=options.detect_threshold,
                               misalign=options.misalign, seed=options.seed)
            self.pipelines[True] = FacePipeline(self.engine, crop, workers)
        except ImportError as err:
            if options.detect:
                raise
            self.detection_error = str(err)
        self.max_batch = options.inference.batch_size_on(self.engine.device)
        self.batcher = Batcher(self.pipelines[False].infer, options.batching, self.metrics, self.max_batch)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="aikd-prepare")
        self.architecture = _architecture(self.engine)
        self._builtin_face: np.ndarray | None = None
        self._ready_check: asyncio.Future | None = None

    def _calibration(self) -> Any:
        """The calibration to apply (:func:`~aikd.evaluation.calibration.resolve_calibration`), or ``None``."""
        engine, given = self.engine, self.options.calibration
        if given is None and not engine.calibration:
            return None
        from aikd.evaluation.calibration import resolve_calibration

        requested = given if given is not None else True
        return resolve_calibration(requested, engine.calibration, [engine.fingerprint, engine.weights_fingerprint],
                                   str(self.options.checkpoint))

    def close(self) -> None:
        """Finish the work queued, then stop the threads."""
        self.batcher.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------------------------------ requests
    def admit(self) -> Ticket:
        """A place in the bounded queue (:meth:`aikd.service.batching.Batcher.admit`)."""
        return self.batcher.admit()

    def _pipeline(self, detect: bool | None) -> FacePipeline:
        detect = self.options.detect if detect is None else detect
        if detect and True not in self.pipelines:
            raise ServiceError("detection_unavailable", f"face detection is not available on this server: "
                               f"{self.detection_error}")
        return self.pipelines[bool(detect)]

    async def score(self, uploads: Sequence[Upload], options: RequestOptions, ticket: Ticket) -> list[dict[str, Any]]:
        """The result of each upload (:func:`aikd.service.results.image_result`), in order.

        Raises:
            ServiceError: ``detection_unavailable``, or ``internal`` when the model fails.
        """
        pipeline = self._pipeline(options.detect)
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(*(loop.run_in_executor(self.pool, self._prepare_upload, pipeline, index,
                                                               upload, options)
                                          for index, upload in enumerate(uploads)))
        scored = await ticket.infer([face for image in prepared for face in image.faces])
        results, offset = [], 0
        for image in prepared:
            count = len(image.faces)
            result = image_result(image, scored[offset:offset + count], self.calibration, self.decision,
                                  options.crops)
            offset += count
            results.append(result)
            if result["error"] is not None:
                self.metrics.errors.labels(result["error"]["code"]).inc()
            else:
                self.metrics.images.inc()
        return results

    def _prepare_upload(self, pipeline: FacePipeline, index: int, upload: Upload,
                        options: RequestOptions) -> PreparedImage:
        """Decode, crop and preprocess one upload (in a worker thread)."""
        if upload.error is not None:
            return PreparedImage(index, upload.name, error=upload.error)
        try:
            image = decode_image(upload.data, upload.name, self.options.limits.max_pixels)
        except ImageError as err:
            return PreparedImage(index, upload.name, error=ServiceError(image_error_code(err), str(err)))
        return self._prepare_array(pipeline, index, upload.name, image, options.faces, options.crops)

    def _prepare_array(self, pipeline: FacePipeline, index: int, name: str, image: np.ndarray, choose: str,
                       crops: bool = False) -> PreparedImage:
        height, width = image.shape[:2]
        prepared = PreparedImage(index, name, width, height)
        try:
            faces = pipeline.prepare(image, key=name, choose=choose)
        except ValueError as err:
            prepared.error = ServiceError("bad_landmarks", str(err))
            return prepared
        except Exception:  # one odd image must not fail the request: its result says so, the log says where
            log.exception("preparing image %d failed", index)
            prepared.error = ServiceError("bad_image", "this image could not be processed")
            return prepared
        if not faces:
            prepared.error = ServiceError("no_face", "no face found in the image")
            return prepared
        # Keep the face as the model sees it (its input size) where it is asked for, else nothing: a request holds
        # little once prepared.
        resize = self.engine.preprocessing.resize if crops else lambda _: _NO_CROP
        prepared.faces = [PreparedFace(dataclasses.replace(face.crop, crop=resize(face.crop.crop)), face.model_input)
                          for face in faces]
        return prepared

    # -------------------------------------------------------------------------------------------- checks
    async def ready(self) -> dict[str, Any]:
        """A real inference on a built-in face photo, through the worker and model threads (``/readyz``); callers
        that come while one runs share its answer, so probes cannot pile work up.

        Raises:
            ServiceError: ``not_ready`` when it fails or takes longer than 10 s.
        """
        if self._ready_check is None or self._ready_check.done():
            self._ready_check = asyncio.ensure_future(self._check_ready())
        return await asyncio.shield(self._ready_check)

    async def _check_ready(self) -> dict[str, Any]:
        detect = True in self.pipelines
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            prepared = await loop.run_in_executor(self.pool, self._prepare_builtin, detect)
            if prepared.error is not None:
                raise ServiceError("not_ready", f"the built-in face: {prepared.error.message}")
            scored = await asyncio.wait_for(self.batcher.infer(prepared.faces), READY_TIMEOUT_S)
        except (asyncio.TimeoutError, RuntimeError) as err:
            raise ServiceError("not_ready", f"the built-in face was not scored: {type(err).__name__}") from None
        quality = scored[0].quality
        if quality is None or not math.isfinite(quality):
            raise ServiceError("not_ready", f"the built-in face got a non-finite quality ({quality})")
        return {"status": "ready", "quality": shortest_float32(quality), "detected": detect,
                "seconds": round(time.perf_counter() - started, 4)}

    def _prepare_builtin(self, detect: bool) -> PreparedImage:
        if self._builtin_face is None:
            from aikd.demo.samples import sample_photos  # scikit-image's astronaut, installed with aikd

            self._builtin_face = sample_photos()["astronaut"]
        return self._prepare_array(self.pipelines[detect], 0, "astronaut", self._builtin_face, "best")

    def model_info(self) -> dict[str, Any]:
        """What answers (``/v1/model``): model, preprocessing, calibration, decision rule, detection, limits."""
        options = self.options
        calibration = None
        if self.calibration is not None:
            info = self.calibration.info
            calibration = {"fmr": self.calibration.fmr, "threshold": self.calibration.threshold,
                           "fr_model": self.calibration.fr_model, "dataset": info.get("dataset"),
                           "quality_model": info.get("quality_model"), "recommendation": info.get("recommendation"),
                           "expected_fnmr_range": [float(self.calibration.fnmr.min()),
                                                   float(self.calibration.fnmr.max())]}
        return {"model": self.model_record(), "preprocessing": self.engine.preprocessing.to_dict(),
                "embedding_size": self.engine.embedding_size, "device": str(self.engine.device),
                "calibration": calibration, "decision": self.decision.to_dict() if self.decision else None,
                "detect": {"default": options.detect, "available": True in self.pipelines,
                           "detector": options.detector, "threshold": options.detect_threshold,
                           "misalign": options.misalign},
                "limits": dataclasses.asdict(options.limits),
                "batching": {**dataclasses.asdict(options.batching), "max_batch": self.max_batch},
                "aikd_version": __version__}

    def model_record(self) -> dict[str, Any]:
        """Which model gave a response's qualities: architecture and :meth:`aikd.inference.engine.Engine.record`."""
        return {"architecture": self.architecture, **self.engine.record()}


def _architecture(engine: Any) -> str | None:
    """The backbone's registry name: a torch model's ``arch``, or an exported graph's metadata."""
    model = getattr(engine, "model", None)
    if model is not None:
        return getattr(model, "arch", None)
    session = getattr(engine, "session", None)
    if session is not None:
        from aikd.inference.onnx_format import metadata_from_properties

        return metadata_from_properties(session.metadata(), "model").get("arch")
    return None
