"""Prometheus metrics of one service (``GET /metrics``), in a registry of its own.

The registry belongs to the app, not to the process: two services in one process (tests, a notebook) do not share
or clash over counters, and nothing is registered in ``prometheus_client``'s global registry.

- ``aikd_requests_total{route, status}`` and ``aikd_request_seconds{route}``: every answered request;
- ``aikd_errors_total{code}``: refused requests and failed images, by error code;
- ``aikd_images_total``: images scored;
- ``aikd_batch_faces``: faces per forward pass (how well requests are batched);
- ``aikd_model_seconds``: time of each forward pass;
- ``aikd_queue_depth``: requests held now (reading, decoding, waiting for or in the model);
- ``aikd_model_queue_faces``: faces waiting for the model thread.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's counters, histograms and gauges (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("aikd_requests", "Requests answered", ["route", "status"], registry=self.registry)
        self.latency = Histogram("aikd_request_seconds", "Time from a request's arrival to its answer", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("aikd_errors", "Refused requests and failed images, by code", ["code"],
                              registry=self.registry)
        self.images = Counter("aikd_images", "Images scored", registry=self.registry)
        self.batch_faces = Histogram("aikd_batch_faces", "Faces per forward pass", buckets=BATCH_BUCKETS,
                                     registry=self.registry)
        self.model_seconds = Histogram("aikd_model_seconds", "Time of one forward pass", buckets=LATENCY_BUCKETS,
                                       registry=self.registry)
        self.queue_depth = Gauge("aikd_queue_depth", "Requests held (reading, decoding, waiting for or in the model)",
                                 registry=self.registry)
        self.model_queue = Gauge("aikd_model_queue_faces", "Faces waiting for the model thread",
                                 registry=self.registry)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
